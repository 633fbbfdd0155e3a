"""Decode throughput of the router: remote experts (vLLM + expert pool) vs monolithic local experts, same run.

Model: a tiny random Mixtral (fp32, 2 MoE layers, hidden 128, 8 experts top-2), or --model DIR (e.g. models/demo:
4 MoE layers, hidden 128). For each concurrency c in --concurrency (default 1, 8, 32), `--rounds` batches of
exactly c requests (short prompts, --max-tokens generated tokens each, ignore_eos) go through one vLLM engine
(single process, `max_num_seqs` = max concurrency); tokens/s = generated tokens / wall time.

    remote       router with `EXPERTMESH_EXPERT_MODE=remote`; the experts (default placement plan: one group per
                 MoE layer) served by
                   --pool procs   (default) one ExpertServer per group, each in its OWN process (what a Serve
                                  replica runs, without Ray's start-up cost), registered in a directory
                   --pool ray     a Ray Serve pool (`LocalPool`), replicas in their own processes
                   --pool inproc  ExpertServers in this process (shares the router's GIL: not realistic)
    monolithic   the same engine settings, experts computed by vLLM in-process (local-experts mode)

Both are measured in the same run (monolithic first). Time breakdown per MoE layer call, from the dispatcher's
timers (prepare = bincount + grouping, encode = slicing + protobuf + send, wait = RPC round trip, combine =
copy/index_add) and, with --pool procs, the replicas' own timers (validate, queue = coalescing wait, compute,
respond, handler), plus the step-time difference to monolithic.

    .venv/bin/python benchmarks/router_throughput.py [--model models/demo] [--compile] [--pool procs|ray|inproc]

Results: benchmarks/results/router_throughput.json (see docs/benchmarks.md, "Router throughput").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from expertmesh.core import settings  # noqa: E402 - stdlib only

settings.apply_process_defaults(in_process_engine=True)  # the engine runs in this process, as in the router
os.environ.setdefault("EXPERTMESH_ROUTER_METRICS_PORT", "0")


RESULTS = Path(__file__).resolve().parent / "results" / "router_throughput.json"


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"The quick brown fox {i + offset} jumps over the lazy dog" for i in range(n)]


def measure(llm, concurrencies: list[int], rounds: int, max_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(max(concurrencies)), params, use_tqdm=False)  # warm-up
    out = {}
    for c in concurrencies:
        generated = 0
        t0 = time.perf_counter()
        for r in range(rounds):
            results = llm.generate(prompts(c, offset=r * c), params, use_tqdm=False)
            generated += sum(len(o.outputs[0].token_ids) for o in results)
        seconds = time.perf_counter() - t0
        out[str(c)] = {"tokens": generated, "seconds": round(seconds, 4), "tokens_per_s": round(generated / seconds, 1)}
        print(
            f"  concurrency {c:>3}: {generated / seconds:8.1f} tok/s ({generated} tokens in {seconds:.2f}s)", flush=True
        )
    return out


def decode_step_ms(measured: dict, rounds: int, max_tokens: int) -> dict[str, float]:
    """`measure`'s result -> {c: ms per decode step}. Decode steps are (almost) all the wall time: each round is
    max_tokens steps of c sequences."""
    steps = rounds * max_tokens
    return {c: round(v["seconds"] / steps * 1e3, 3) for c, v in measured.items()}


def make_llm(path: Path, compile_: bool, max_seqs: int):
    from vllm import LLM

    from expertmesh.router.vllm_args import engine_kwargs

    # dtype and attention backend as the router's engine picks them for this checkpoint
    return LLM(
        str(path), enforce_eager=not compile_, max_model_len=512, max_num_seqs=max_seqs, seed=0, **engine_kwargs(path)
    )


def _replica_main(model: str, directory: str, group: str, keys_json: str) -> None:
    """--replica-server: one ExpertServer for one group in this process; prints 'ready', then, when stdin closes,
    its data-plane timers as one JSON line."""
    from expertmesh.core.protos import expert_pb2
    from expertmesh.discovery.directory import DirectoryClient
    from expertmesh.experts.replica import ExpertServer, keys_to_proto

    # If the engine thread that spawned us was bound to a core (vLLM's CPU worker may bind), we would inherit the
    # mask and share the router's core: replicas stand for other hardware, so they get every core of the machine.
    inherited = sorted(os.sched_getaffinity(0))
    pinned = os.environ.get("BENCH_REPLICA_CPUS")  # --pin: the expert cores
    os.sched_setaffinity(0, [int(c) for c in pinned.split(",")] if pinned else range(os.cpu_count()))
    now = sorted(os.sched_getaffinity(0))
    print(f"replica {group}: inherited CPU affinity {inherited}, now {now}", file=sys.stderr)
    keys = {int(k): v for k, v in json.loads(keys_json).items()}
    server = ExpertServer(model, keys, replica_id=group, group=group)
    port = server.start("127.0.0.1", 0)
    with DirectoryClient(directory) as client:
        client.register(
            expert_pb2.ReplicaEntry(
                replica_id=group, group=group, endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(keys)
            ),
            lease_seconds=3600,
        )
    print("ready", flush=True)
    sys.stdin.read()
    print(json.dumps(server.servicer.coalescer.timers.snapshot()), flush=True)
    server.stop(grace=0)


class ProcessPool:
    """A directory (this process) + one ExpertServer process per group of the default plan."""

    def __init__(self, path: Path, layers_per_group: int | None = None, cpus: list[int] | None = None):
        import subprocess

        from expertmesh.core.checkpoint import read_moe_info
        from expertmesh.core.plan import default_plan
        from expertmesh.discovery.directory import DirectoryServer

        self.directory = DirectoryServer()
        self.address = f"127.0.0.1:{self.directory.start()}"
        self.procs = []
        for g in default_plan(read_moe_info(path), layers_per_group=layers_per_group).groups:
            keys = json.dumps({str(k): v for k, v in g.keys.items()})
            self.procs.append(
                (
                    g.name,
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--replica-server",
                            g.name,
                            "--directory",
                            self.address,
                            "--keys",
                            keys,
                            "--model",
                            str(path),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        env=dict(os.environ, OMP_NUM_THREADS="1", BENCH_REPLICA_CPUS=",".join(map(str, cpus or []))),
                    ),
                )
            )
        for name, p in self.procs:
            line = p.stdout.readline().strip()
            if line != b"ready":
                raise RuntimeError(f"replica {name} did not start: {line!r}")

    def timers(self) -> dict:
        """Stop the replicas and return their timers {group: snapshot}."""
        out = {}
        for name, p in self.procs:
            p.stdin.close()
            out[name] = json.loads(p.stdout.readline())
            p.wait(10)
        self.procs = []
        return out

    def stop(self) -> None:
        for _, p in self.procs:
            p.kill()
            p.wait(10)
        self.procs = []
        self.directory.stop()


def run_remote(path: Path, args) -> tuple[dict, dict]:
    from expertmesh.router import dispatch, plugin

    pool_cm = None
    proc_pool = None
    if args.pool == "procs":
        proc_pool = ProcessPool(path, args.layers_per_group, cpus=args.pin[1] if args.pin else None)
        address = proc_pool.address
        servers = []
    elif args.pool == "ray":
        from expertmesh.experts.pool import LocalPool

        pool_cm = LocalPool.private(path)
        t = time.perf_counter()
        pool_cm.start()
        print(f"  Ray Serve pool ready in {time.perf_counter() - t:.1f}s at {pool_cm.directory_address}", flush=True)
        address = pool_cm.directory_address
        servers = []
    else:
        from expertmesh.core.checkpoint import read_moe_info
        from expertmesh.core.protos import expert_pb2
        from expertmesh.discovery.directory import DirectoryClient, DirectoryServer
        from expertmesh.experts.replica import ExpertServer, keys_to_proto

        info = read_moe_info(path)
        directory = DirectoryServer()
        address = f"127.0.0.1:{directory.start()}"
        client = DirectoryClient(address)
        servers = [directory]
        for layer in info.moe_layers:
            keys = {layer: list(range(info.num_experts))}
            server = ExpertServer(path, keys, replica_id=f"l{layer}", group=f"l{layer}")
            port = server.start()
            client.register(
                expert_pb2.ReplicaEntry(
                    replica_id=f"l{layer}", group=f"l{layer}", endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(keys)
                ),
                lease_seconds=3600,
            )
            servers.append(server)
        client.close()
    try:
        plugin.configure_remote(address)
        llm = make_llm(path, args.compile, max(args.concurrency))
        d = dispatch.get_dispatcher(address)
        d.reset_stats()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        result = measure(llm, args.concurrency, args.rounds, args.max_tokens)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        stats = d.stats()
        calls = max(1, stats["layer_calls"])
        profile = {
            "layer_calls": stats["layer_calls"],
            "rpcs": sum(stats["rpcs"].values()),
            "us_per_layer_call": {k: round(v / calls * 1e6, 1) for k, v in stats["timers"].items()},
            "failovers": stats["failovers"],
        }
        if proc_pool is not None:
            profile["replicas"] = proc_pool.timers()  # includes the warm-up round
        del llm
        gc.collect()
        dispatch.reset_dispatcher()
        return result, profile
    finally:
        if proc_pool is not None:
            proc_pool.stop()
        if pool_cm is not None:
            pool_cm.stop()
        for s in servers:
            s.stop()


def run_monolithic(path: Path, args) -> dict:
    from expertmesh.router import plugin

    plugin.configure_local()
    llm = make_llm(path, args.compile, max(args.concurrency))
    result = measure(llm, args.concurrency, args.rounds, args.max_tokens)
    del llm
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode (else eager)")
    parser.add_argument("--pool", choices=["procs", "ray", "inproc"], default="procs")
    parser.add_argument(
        "--layers-per-group",
        type=int,
        default=None,
        help="cap on MoE layers per expert group (1 = one group per layer; default: the default plan)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        nargs="+",
        default=[1],
        help="remote runs with EXPERTMESH_MICRO_BATCHES = each of these, same run (default 1 = off)",
    )
    parser.add_argument(
        "--pin",
        type=lambda t: tuple([int(c) for c in part.split(",")] for part in t.split(":")),
        default=None,
        metavar="ROUTER:EXPERTS",
        help="cores of this process (the engine: router or monolithic) and of the replica processes, e.g. 0:1",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the remote run (prints the top entries)")
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny random Mixtral built here)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replica-server", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replica_server:
        _replica_main(str(args.model), args.directory, args.replica_server, args.keys)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-checkpoint builder
    from tiny import build_tiny_checkpoint

    path = args.model or Path(tempfile.mkdtemp(prefix="expertmesh-bench-")) / "mixtral"
    if not (path / "config.json").exists():
        build_tiny_checkpoint("mixtral", path)
    if args.pin:
        os.sched_setaffinity(0, args.pin[0])  # the engine (and vLLM's worker, inline) on the router's cores
    print(f"model {path}; compile={args.compile}; pool={args.pool}; pin={args.pin}", flush=True)
    print("monolithic (local experts):", flush=True)
    mono = run_monolithic(path, args)
    by_m = {}
    for m in args.micro_batches:
        os.environ["EXPERTMESH_MICRO_BATCHES"] = str(m)
        print(f"remote experts ({args.pool} pool), micro-batches {m}:", flush=True)
        by_m[m] = run_remote(path, args)
    os.environ.pop("EXPERTMESH_MICRO_BATCHES", None)
    remote, profile = by_m[args.micro_batches[0]]
    from expertmesh.core.checkpoint import read_moe_info

    info = read_moe_info(path)
    ratio = {c: round(remote[c]["tokens_per_s"] / mono[c]["tokens_per_s"], 3) for c in mono}
    mono_ms, remote_ms = (decode_step_ms(r, args.rounds, args.max_tokens) for r in (mono, remote))
    step_ms = {c: {"monolithic": mono_ms[c], "remote": remote_ms[c]} for c in mono}
    for v in step_ms.values():
        v["extra_us_per_layer_call"] = round((v["remote"] - v["monolithic"]) * 1e3 / len(info.moe_layers), 1)
    print("remote / monolithic:", ratio, "step ms:", step_ms, "dispatcher:", json.dumps(profile), flush=True)
    for m, (r, _) in by_m.items():
        over = {c: round(r[c]["tokens_per_s"] / mono[c]["tokens_per_s"], 3) for c in mono}
        print(f"micro-batches {m}: remote / monolithic", over)
    record = {
        "benchmark": "router_throughput",
        "model": (
            f"{'models/demo' if args.model else 'tiny random mixtral'} fp32 ({len(info.moe_layers)} MoE layers, "
            f"hidden {info.hidden_size}, {info.num_experts} experts top-{info.top_k})"
        ),
        "mode": "compiled" if args.compile else "eager",
        "pool": args.pool,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "monolithic": mono,
        "remote": remote,
        "remote_over_monolithic": ratio,
        "pin": None if args.pin is None else {"router": args.pin[0], "experts": args.pin[1]},
        "micro_batches": {
            str(m): {
                "remote": r,
                "remote_over_monolithic": {c: round(r[c]["tokens_per_s"] / mono[c]["tokens_per_s"], 3) for c in mono},
                "dispatcher_profile": prof,
            }
            for m, (r, prof) in by_m.items()
        },
        "step_ms": step_ms,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "dispatcher_profile": profile,
        "unix_time": int(time.time()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = existing.get("runs", []) if isinstance(existing, dict) else []
    key = ("mode", "pool", "model", "pin")
    same = lambda r: all(r.get(k) == record[k] for k in key)  # noqa: E731
    runs = [r for r in runs if not same(r)] + [record]
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
