"""What losing one replica of a two-replica pool costs the requests in flight (issue 18's "2-replica pool, one
replica killed" case).

The stack is `expertmesh serve`'s (`Stack`: a private Ray cluster with the expert pool, the router, the gateway, the
controller with its dead-replica prober) on the demo model, with a plan of one group holding every expert on two
replicas, so every expert has a second holder. Per round: 64 greedy streams undisturbed, then the same 64 streams
while one of the two replicas is SIGKILLed once every stream is a few tokens in (on average); then the pool is
waited back to two registered replicas (Serve replaces the dead one) before the next round.

Recorded per run (undisturbed / killed): streams that failed (an HTTP error, no [DONE], fewer tokens than asked),
streams whose text differs from the undisturbed run's, and over the streams the time to first token, the whole
stream's time and the longest wait between two tokens (median, p95, max), and the run's wall time; per killed run
also when the killed replica left the directory and when its replacement registered (seconds after the kill).

    .venv/bin/python benchmarks/replica_kill.py [--model models/demo] [--rounds 5] [--streams 64] [--max-tokens 128]

Results: benchmarks/results/replica_kill.json; a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "replica_kill.json"
GROUP = "all"
NAMES = ["lord", "queen", "fool", "friend"]


def two_replica_plan(model: Path, work: Path) -> Path:
    """One group holding every routed expert on two replicas (the plan file `expertmesh serve --plan` takes)."""
    from expertmesh.core.checkpoint import read_moe_info
    from expertmesh.core.plan import ExpertGroup, PlacementPlan

    info = read_moe_info(model)
    keys = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
    plan = PlacementPlan(groups=[ExpertGroup(name=GROUP, keys=keys, min_replicas=2, max_replicas=2)])
    path = work / "plan.yaml"
    plan.save(path)
    return path


async def streams(url: str, model: str, prompts: list[str], max_tokens: int, on_chunk=None) -> list[dict]:
    """One greedy streamed completion per prompt, all at once: per stream its text, tokens, [DONE], status,
    time to first token, whole time and longest gap between two chunks (s)."""

    async def one(client: httpx.AsyncClient, prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        out = {"text": "", "tokens": 0, "done": False, "status": None, "ttft": None, "total": None, "gap": 0.0}
        start = last = time.monotonic()
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
                out["status"] = reply.status_code
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if event.get("usage"):
                        out["tokens"] = event["usage"]["completion_tokens"]
                    if not event.get("choices"):
                        continue
                    now = time.monotonic()
                    out["ttft"] = out["ttft"] if out["ttft"] is not None else now - start
                    out["gap"] = max(out["gap"], now - last) if out["text"] else 0.0
                    last = now
                    out["text"] += event["choices"][0]["text"]
                    if on_chunk is not None:
                        on_chunk()
        except httpx.HTTPError as exc:
            out["error"] = repr(exc)
        out["total"] = time.monotonic() - start
        return out

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


def replica_actors(dashboard: str) -> list[tuple[int, str]]:
    """(pid, replica unique id) of every live replica actor of the group (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return [(a.pid, a.name.rsplit("#", 1)[1]) for a in actors if a.name and f"::experts-{GROUP}#" in a.name]


def summarize(runs: list[dict], reference: list[dict], max_tokens: int, wall: float) -> dict:
    ok = [r for r in runs if r["status"] == 200 and r["done"] and r["tokens"] == max_tokens]

    def stats(key: str) -> dict:
        values = sorted(r[key] for r in ok if r[key] is not None)
        if not values:
            return {}
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        return {"p50": round(statistics.median(values), 3), "p95": round(p95, 3), "max": round(values[-1], 3)}

    return {
        "streams": len(runs),
        "failed": len(runs) - len(ok),
        "text_differs": sum(1 for r, ref in zip(runs, reference, strict=True) if r["text"] != ref["text"]),
        "ttft_s": stats("ttft"),
        "stream_s": stats("total"),
        "longest_gap_s": stats("gap"),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1) if wall else None,
    }


def wait_replicas(directory, count: int, timeout: float) -> None:
    """Wait until `count` replicas of the group are registered (TimeoutError otherwise)."""
    directory.wait_for(lambda s: sum(1 for e in s.replicas if e.group == GROUP) >= count, timeout=timeout)


def kill_round(stack, prompts: list[str], max_tokens: int, reference: list[dict]) -> dict:
    """The streams with one replica SIGKILLed once they are `len(prompts) * 4` chunks in; the kill's timings."""
    victims = replica_actors(stack.pool.dashboard_url)
    assert len(victims) == 2, victims
    pid, unique_id = victims[0]
    chunks = {"n": 0}
    killed: dict = {}

    def on_chunk() -> None:
        chunks["n"] += 1
        if chunks["n"] == len(prompts) * 4 and not killed:
            killed["t"] = time.monotonic()
            os.kill(pid, signal.SIGKILL)

    timings: dict = {}

    def watch() -> None:  # when the dead replica left the directory, when its replacement registered
        with stack.pool.client() as directory:
            while "t" not in killed:
                time.sleep(0.01)
            for key, predicate, timeout in (
                ("deregistered_s", lambda s: not any(e.replica_id.endswith(f"#{unique_id}") for e in s.replicas), 60),
                ("replacement_registered_s", lambda s: sum(1 for e in s.replicas if e.group == GROUP) >= 2, 120),
            ):
                try:
                    directory.wait_for(predicate, timeout=timeout)
                    timings[key] = round(time.monotonic() - killed["t"], 3)
                except TimeoutError:
                    timings[key] = None

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    runs = asyncio.run(streams(stack.url, stack.model_name, prompts, max_tokens, on_chunk))
    wall = time.monotonic() - t0
    watcher.join(timeout=150)
    return {**summarize(runs, reference, max_tokens, wall), "killed": bool(killed), **timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE.parent / "models" / "demo"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    from expertmesh.core import settings

    settings.apply_process_defaults()
    from expertmesh.core.settings import free_port
    from expertmesh.stack import Stack

    model = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(prefix="replica-kill-"))
    stack = Stack(
        model,
        port=free_port(),
        router_port=free_port(),
        log_dir=work,
        ray_port=free_port(),
        directory_port=free_port(),
        metrics_port=0,
        plan=str(two_replica_plan(model, work)),
        # the prober deregisters a dead replica at once; no regrouping or scaling of the one group meanwhile
        controller_settings={"interval_s": 1.0, "imbalance_threshold": 1e9, "hot_expert_skew": 1e9},
        vllm_args=["--max-model-len", "512", "--disable-uvicorn-access-log"],
    )
    prompts = [f"Request {i}: what news from Rome, good {NAMES[i % 4]}?" for i in range(args.streams)]
    rounds = []
    try:
        stack.start()
        asyncio.run(streams(stack.url, stack.model_name, prompts, args.max_tokens))  # warm-up, not counted
        with stack.pool.client() as directory:
            for i in range(args.rounds):
                wait_replicas(directory, 2, timeout=120)
                t0 = time.monotonic()
                reference = asyncio.run(streams(stack.url, stack.model_name, prompts, args.max_tokens))
                undisturbed = summarize(reference, reference, args.max_tokens, time.monotonic() - t0)
                killed = kill_round(stack, prompts, args.max_tokens, reference)
                rounds.append({"undisturbed": undisturbed, "one_replica_killed": killed})
                print(f"round {i + 1}: {json.dumps(rounds[-1])}", file=sys.stderr, flush=True)
    finally:
        stack.stop()

    def median_of(run: str, key: str, stat: str | None = None):
        values = [r[run][key][stat] if stat else r[run][key] for r in rounds]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {
        run: {
            "failed": sum(r[run]["failed"] for r in rounds),
            "text_differs": sum(r[run]["text_differs"] for r in rounds),
            "stream_p50_s": median_of(run, "stream_s", "p50"),
            "stream_p95_s": median_of(run, "stream_s", "p95"),
            "ttft_p50_s": median_of(run, "ttft_s", "p50"),
            "longest_gap_max_s": max(r[run]["longest_gap_s"]["max"] for r in rounds),
            "tokens_per_s": median_of(run, "tokens_per_s"),
        }
        for run in ("undisturbed", "one_replica_killed")
    }
    summary["one_replica_killed"]["deregistered_s"] = median_of("one_replica_killed", "deregistered_s")
    summary["one_replica_killed"]["replacement_registered_s"] = median_of(
        "one_replica_killed", "replacement_registered_s"
    )
    report = {
        "settings": {
            "model": str(model),
            "rounds": args.rounds,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "plan": f"one group '{GROUP}' with every expert, 2 replicas",
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        },
        "summary": summary,
        "rounds": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    header = ("failed", "differs", "stream p50", "p95", "TTFT p50", "max gap", "tok/s")
    print(f"{'':22} " + " ".join(f"{h:>{w}}" for h, w in zip(header, (6, 7, 10, 7, 8, 8, 7), strict=True)))
    for run, s in summary.items():
        print(
            f"{run:22} {s['failed']:6d} {s['text_differs']:7d} {s['stream_p50_s']:10.2f} {s['stream_p95_s']:7.2f} "
            f"{s['ttft_p50_s']:8.2f} {s['longest_gap_max_s']:8.2f} {s['tokens_per_s']:7.1f}"
        )
    print(f"wrote {out}")
    ok = all(s["failed"] == 0 and s["text_differs"] == 0 for s in summary.values())
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"the stack's logs: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
