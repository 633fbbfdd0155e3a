"""One decode step's time line, drawn from real spans: when the router computes and when it waits on the expert pool,
when the replica computes and when it idles.

Starts `expertmesh serve`'s stack (services/stack.py) on the demo model with every process exporting spans to an
in-process OTLP receiver (tests/otlp_collector.py), drives greedy streams at a fixed concurrency, then reads the
`forward pass` spans (the model's process, router/step_tracing.py), their `dispatch layer N` children (one per MoE
layer: the router sends, waits, combines) and the replicas' `expert forward` spans under those. For every traced
decode step it sums: router busy = the step minus its layer calls, router waiting = the layer calls, replica busy =
its `expert forward` spans, replica idle = the step minus those. It prints one step of median length as two lanes
(`#` busy, `.` waiting/idle, one character per `--resolution-us`) and writes every step's intervals to JSON.

    .venv/bin/python benchmarks/step_timeline.py [--concurrency 8] [--routers 1] [--name step_timeline]
        [--env EXPERTMESH_DISPATCH_STREAMS=false]

With `--routers 2` both routers' steps are drawn on the same clock (the gateway alternates requests between them):
what two engines taking turns at the dispatch op look like. With `--env EXPERTMESH_MICRO_BATCHES=2` a step runs as
ping-pong micro-batches (router/micro_batches.py): its layer calls carry their micro-batch, and the router counts as
waiting only while every micro-batch is in a layer call (`router_waiting`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the OTLP receiver
RESULTS = REPO / "benchmarks" / "results"


def _interval(span) -> tuple[int, int]:
    return span.start_time_unix_nano, span.end_time_unix_nano


def _micro_batch(span) -> int:
    return next((a.value.int_value for a in span.attributes if a.key == "expertmesh.micro_batch"), 0)


def router_waiting(step: dict) -> list[tuple[float, float]]:
    """When the router waits on the pool: a step not split waits during its layer calls; a split step only while
    every micro-batch is inside a layer call (its own in flight, or waiting for its turn) or already done with its
    last one, up to the step's last layer call (after that the router computes logits and samples)."""
    parts: dict[int, list[tuple[float, float]]] = {}
    for call, part in zip(step["layer_calls"], step.get("micro_batch") or [0] * len(step["layer_calls"])):
        parts.setdefault(part, []).append(tuple(call))
    if not parts:
        return []
    last = max(b for calls in parts.values() for _, b in calls)
    waiting = None
    for calls in parts.values():
        cover = sorted(calls + [(max(b for _, b in calls), last)])
        waiting = cover if waiting is None else _intersect(waiting, cover)
    return [(a, b) for a, b in waiting if b > a]


def _intersect(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in xs:
        for c, d in ys:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((lo, hi))
    return sorted(out)


def collect_steps(spans: list[tuple[str, object]]) -> list[dict]:
    """Every traced forward pass with its layer calls and the replicas' work under them (ns since the pass began)."""
    by_parent: dict[bytes, list] = {}
    for _, span in spans:
        by_parent.setdefault(span.parent_span_id, []).append(span)
    steps = []
    for service, span in spans:
        if span.name != "forward pass":
            continue
        t0, t1 = _interval(span)
        layers = sorted(
            (s for s in by_parent.get(span.span_id, []) if s.name.startswith("dispatch layer")),
            key=lambda s: s.start_time_unix_nano,
        )
        if not layers:
            continue
        experts = sorted(
            (e for layer in layers for e in by_parent.get(layer.span_id, []) if e.name == "expert forward"),
            key=lambda s: s.start_time_unix_nano,
        )
        steps.append(
            {
                "service": service,
                "process": next((a.value.int_value for a in span.attributes if a.key == "expertmesh.pid"), None),
                "start_ns": t0,
                "duration_us": (t1 - t0) / 1e3,
                "layer_calls": [((a - t0) / 1e3, (b - t0) / 1e3) for a, b in map(_interval, layers)],
                "micro_batch": [_micro_batch(layer) for layer in layers],
                "expert_forward": [((a - t0) / 1e3, (b - t0) / 1e3) for a, b in map(_interval, experts)],
            }
        )
    return steps


def summarize(steps: list[dict]) -> dict:
    """Per-step shares: router busy / waiting, replica busy / idle (medians over steps, in us and in %)."""
    rows = []
    for s in steps:
        wait = sum(b - a for a, b in router_waiting(s))
        replica = sum(b - a for a, b in s["expert_forward"])
        rows.append((s["duration_us"], wait, replica))
    med = lambda values: statistics.median(values) if values else 0.0  # noqa: E731
    duration, wait, replica = (med([r[i] for r in rows]) for i in range(3))
    return {
        "steps": len(rows),
        "step_us": duration,
        "router_busy_us": duration - wait,
        "router_waiting_us": wait,
        "replica_busy_us": replica,
        "router_waiting_pct": 100 * med([r[1] / r[0] for r in rows if r[0] > 0]),
        "replica_busy_pct": 100 * med([r[2] / r[0] for r in rows if r[0] > 0]),
    }


def draw(step: dict, resolution_us: float) -> str:
    """Two lanes of one step: the router (# computing, . waiting on the pool) and the replica (# computing, . idle)."""
    width = max(1, int(step["duration_us"] / resolution_us) + 1)

    def lane(busy: list[tuple[float, float]], invert: bool) -> str:
        cells = [invert] * width
        for a, b in busy:
            for i in range(int(a / resolution_us), min(width, int(b / resolution_us) + 1)):
                cells[i] = not invert
        return "".join("#" if c else "." for c in cells)

    return "\n".join(
        [
            f"router  |{lane(router_waiting(step), invert=True)}|  (# computing, . waiting on the expert pool)",
            f"replica |{lane(step['expert_forward'], invert=False)}|  (# computing, . idle)",
            f"one character = {resolution_us:g} us; step {step['duration_us']:.0f} us, "
            f"{len(step['layer_calls'])} layer calls in {len(set(step.get('micro_batch') or [0]))} micro-batch(es)",
        ]
    )


async def drive(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> None:
    import httpx

    queue = list(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            body = {
                "model": model,
                "prompt": f"Speak of the sea, my lord ({i}).",
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
                async for _ in reply.aiter_lines():
                    pass

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--routers", type=int, default=1)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a registered variable for every process of the stack (repeatable)",
    )
    p.add_argument("--resolution-us", type=float, default=100.0)
    p.add_argument("--name", default="step_timeline")
    args = p.parse_args(argv)

    from otlp_collector import Collector

    from expertmesh.core import settings
    from expertmesh.core.settings import free_port
    from expertmesh.stack import Stack

    settings.apply_process_defaults()
    receiver = Collector()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint  # every process of the stack inherits it
    extra_env = dict(item.split("=", 1) for item in args.env)
    work = Path(tempfile.mkdtemp(prefix="step-timeline-"))
    stack = Stack(
        args.model,
        port=free_port(),
        router_port=free_port(),
        routers=args.routers,
        log_dir=work,
        ray_port=free_port(),
        directory_port=free_port(),
        metrics_port=0,
        controller=False,
        extra_env=extra_env,
    )
    try:
        stack.start()
        asyncio.run(drive(stack.url, stack.model_name, args.concurrency, 8, 8))  # warm-up
        time.sleep(3)
        before = len(receiver.snapshot())
        asyncio.run(drive(stack.url, stack.model_name, args.concurrency, args.requests, args.max_tokens))
        time.sleep(6)  # the batch exporters flush every few seconds
        spans = receiver.snapshot()[before:]
    finally:
        stack.stop()
        receiver.stop()
    steps = [s for s in collect_steps(spans) if len(s["layer_calls"]) > 0]
    decode = [s for s in steps if s["expert_forward"]]
    summary = summarize(decode)
    typical = sorted(decode, key=lambda s: s["duration_us"])[len(decode) // 2] if decode else None
    picture = draw(typical, args.resolution_us) if typical else "(no traced step)"
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "typical_step": typical,
        "picture": picture,
        "steps": decode,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(picture)
    print(f"wrote {out}")
    return 0 if decode else 1


if __name__ == "__main__":
    raise SystemExit(main())
