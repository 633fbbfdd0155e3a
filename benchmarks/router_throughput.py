"""Decode throughput of the router: remote experts (vLLM + expert pool) vs monolithic local experts, same run.

Tiny Mixtral (fp32, 2 MoE layers, 8 experts top-2). For each concurrency c in --concurrency (default 1, 8, 32),
`--rounds` batches of exactly c requests (short prompts, --max-tokens generated tokens each, ignore_eos) go through
one vLLM engine (single process, `max_num_seqs` = max concurrency); tokens/s = generated tokens / wall time.

    remote       router with `EXPERTMESH_EXPERT_MODE=remote`, experts in a Ray Serve pool (`LocalPool`, one replica
                 per MoE layer in its own process, direct gRPC) — or, with --pool inproc, ExpertServers in this
                 process (no Ray; shares this process's GIL)
    monolithic   the same engine settings, experts computed by vLLM in-process (local-experts mode)

The dispatcher's own timers (prepare = grouping/bincount, encode = slicing + protobuf + send, wait = RPC round
trip incl. replica compute and coalescing, combine = index_add) are recorded per layer call for the profile.

    .venv/bin/python benchmarks/router_throughput.py [--compile] [--pool ray|inproc] [--out FILE]

Results: benchmarks/results/router_throughput.json (see docs/benchmarks.md, "Router throughput").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("EXPERTMESH_ROUTER_METRICS_PORT", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "router_throughput.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"The quick brown fox {i + offset} jumps over the lazy dog" for i in range(n)]


def measure(llm, concurrencies: list[int], rounds: int, max_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(max(concurrencies)), params, use_tqdm=False)   # warm-up
    out = {}
    for c in concurrencies:
        generated = 0
        t0 = time.perf_counter()
        for r in range(rounds):
            results = llm.generate(prompts(c, offset=r * c), params, use_tqdm=False)
            generated += sum(len(o.outputs[0].token_ids) for o in results)
        seconds = time.perf_counter() - t0
        out[str(c)] = {"tokens": generated, "seconds": round(seconds, 4), "tokens_per_s": round(generated / seconds, 1)}
        print(f"  concurrency {c:>3}: {generated / seconds:8.1f} tok/s ({generated} tokens in {seconds:.2f}s)",
              flush=True)
    return out


def make_llm(path: Path, compile_: bool, max_seqs: int):
    from vllm import LLM

    return LLM(str(path), dtype="float32", enforce_eager=not compile_, max_model_len=512, max_num_seqs=max_seqs,
               seed=0)


def run_remote(path: Path, args) -> tuple[dict, dict]:
    from expertmesh.router import dispatch, plugin

    pool_cm = None
    if args.pool == "ray":
        from expertmesh.experts.pool import LocalPool

        lo = free_port()
        pool_cm = LocalPool(path, gcs_port=free_port(), dashboard_port=free_port(), directory_port=free_port(),
                            metrics_port=free_port(), replica_ports=(lo, lo), num_cpus=2)
        t = time.perf_counter()
        pool_cm.start()
        print(f"  Ray Serve pool ready in {time.perf_counter() - t:.1f}s at {pool_cm.directory_address}", flush=True)
        address = pool_cm.directory_address
        servers = []
    else:
        from expertmesh.core.checkpoint import read_moe_info
        from expertmesh.core.protos import expert_pb2
        from expertmesh.experts.directory import DirectoryClient, DirectoryServer
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
            client.register(expert_pb2.ReplicaEntry(replica_id=f"l{layer}", group=f"l{layer}",
                                                    endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(keys)),
                            lease_seconds=3600)
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
        del llm
        gc.collect()
        dispatch.reset_dispatcher()
        return result, profile
    finally:
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
    parser.add_argument("--pool", choices=["ray", "inproc"], default="ray")
    parser.add_argument("--profile", action="store_true", help="cProfile the remote run (prints the top entries)")
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny random Mixtral built here)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from expertmesh.core.tiny import build_tiny_checkpoint

    path = args.model or Path(tempfile.mkdtemp(prefix="expertmesh-bench-")) / "mixtral"
    if not (path / "config.json").exists():
        build_tiny_checkpoint("mixtral", path)
    print(f"model {path}; compile={args.compile}; pool={args.pool}", flush=True)
    print("monolithic (local experts):", flush=True)
    mono = run_monolithic(path, args)
    print(f"remote experts ({args.pool} pool):", flush=True)
    remote, profile = run_remote(path, args)
    ratio = {c: round(remote[c]["tokens_per_s"] / mono[c]["tokens_per_s"], 3) for c in mono}
    print("remote / monolithic:", ratio, "dispatcher:", profile, flush=True)
    record = {
        "benchmark": "router_throughput",
        "model": "tiny mixtral fp32 (2 MoE layers, hidden 128, 8 experts top-2)",
        "mode": "compiled" if args.compile else "eager",
        "pool": args.pool,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "monolithic": mono,
        "remote": remote,
        "remote_over_monolithic": ratio,
        "dispatcher_profile": profile,
        "unix_time": int(time.time()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = existing.get("runs", []) if isinstance(existing, dict) else []
    runs = [r for r in runs if (r.get("mode"), r.get("pool")) != (record["mode"], record["pool"])] + [record]
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
