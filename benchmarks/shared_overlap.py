"""Decode throughput with the shared experts computed in the shadow of the routed call vs before it, same run.

Models with shared experts (tiny random Qwen2-MoE and DeepSeek-V2, fp32; --shared-size widens their shared
experts), the router's engine in this process (vLLM's compiled mode by default, --eager for eager), the routed
experts on an expert pool of one ExpertServer process per group of the default plan (router_throughput.py's
ProcessPool: replicas in their own processes, as Serve runs them). For each family the engine is built with
EXPERTMESH_SHARED_EXPERTS_OVERLAP off and on, alternating, --repeats times each (the setting is read when vLLM
builds the model); each engine runs router_throughput.measure: `--rounds` batches of exactly c requests per
concurrency c, tokens/s = generated tokens / wall time. Reported: tok/s per setting and concurrency (mean and every
repeat), and on/off.

    .venv/bin/python benchmarks/shared_overlap.py [--families qwen2_moe deepseek_v2] [--eager] [--shared-size N]

Results: benchmarks/results/shared_overlap.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from expertmesh.core import settings  # noqa: E402 - stdlib only

settings.apply_process_defaults(in_process_engine=True)  # the engine runs in this process, as in the router
os.environ.setdefault("EXPERTMESH_ROUTER_METRICS_PORT", "0")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # router_throughput: the pool and the measurement
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-checkpoint builder

from router_throughput import ProcessPool, make_llm, measure  # noqa: E402
from tiny import build_tiny_checkpoint  # noqa: E402

RESULTS = HERE / "results" / "shared_overlap.json"
SHARED_SIZE_KEY = {"qwen2_moe": "shared_expert_intermediate_size", "deepseek_v2": "n_shared_experts"}


def checkpoint(family: str, shared_size: int | None, root: Path) -> Path:
    overrides = {}
    if shared_size:  # Qwen2-MoE: the shared expert's intermediate size; DeepSeek: shared experts of 64 each
        overrides[SHARED_SIZE_KEY[family]] = shared_size if family == "qwen2_moe" else max(1, shared_size // 64)
    path = root / f"{family}-shared{shared_size or 0}"
    if not (path / "config.json").exists():
        build_tiny_checkpoint(family, path, overrides=overrides)
    return path


def run_engine(path: Path, address: str, overlap: bool, args) -> tuple[dict, dict]:
    from expertmesh.router import dispatch, plugin

    settings.export("EXPERTMESH_SHARED_EXPERTS_OVERLAP", overlap)
    dispatch.reset_dispatcher()
    plugin.configure_remote(address)
    llm = make_llm(path, not args.eager, max(args.concurrency))
    d = dispatch.get_dispatcher(address)
    d.reset_stats()
    result = measure(llm, args.concurrency, args.rounds, args.max_tokens)
    stats = d.stats()
    calls = max(1, stats["layer_calls"])
    profile = {k: round(v / calls * 1e6, 1) for k, v in stats["timers"].items()}
    del llm
    gc.collect()
    dispatch.reset_dispatcher()
    return result, profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["qwen2_moe", "deepseek_v2"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="engines per setting (alternating off, on)")
    parser.add_argument("--eager", action="store_true", help="eager vLLM (default: its compiled mode)")
    parser.add_argument("--shared-size", type=int, default=None, help="wider shared experts (intermediate size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="expertmesh-shared-overlap-"))
    runs = []
    for family in args.families:
        path = checkpoint(family, args.shared_size, root)
        print(f"{family} ({path}); {'eager' if args.eager else 'compiled'}", flush=True)
        pool = ProcessPool(path)
        per: dict[str, list[dict]] = {"off": [], "on": []}
        profiles: dict[str, list[dict]] = {"off": [], "on": []}
        try:
            for rep in range(args.repeats):
                for overlap in (False, True):
                    name = "on" if overlap else "off"
                    print(f"  overlap {name} (repeat {rep + 1}):", flush=True)
                    result, profile = run_engine(path, pool.address, overlap, args)
                    per[name].append(result)
                    profiles[name].append(profile)
        finally:
            pool.stop()
        mean = {
            name: {
                str(c): round(statistics.mean(r[str(c)]["tokens_per_s"] for r in results), 1) for c in args.concurrency
            }
            for name, results in per.items()
        }
        ratio = {c: round(mean["on"][c] / mean["off"][c], 3) for c in mean["on"]}
        print(f"  tok/s off {mean['off']} on {mean['on']}; on/off {ratio}", flush=True)
        from expertmesh.core.checkpoint import read_moe_info

        info = read_moe_info(path)
        config = json.loads((path / "config.json").read_text())
        runs.append(
            {
                "family": family,
                "model": (
                    f"tiny random {family} fp32 ({len(info.moe_layers)} MoE layers, hidden {info.hidden_size}, "
                    f"{info.num_experts} experts top-{info.top_k}, shared: "
                    + ", ".join(f"{k}={config[k]}" for k in SHARED_SIZE_KEY.values() if k in config)
                    + ")"
                ),
                "mode": "eager" if args.eager else "compiled",
                "tokens_per_s_mean": mean,
                "on_over_off": ratio,
                "tokens_per_s_each": {
                    name: [{c: r[c]["tokens_per_s"] for c in r} for r in rs] for name, rs in per.items()
                },
                "dispatcher_us_per_layer_call": profiles,
            }
        )
    record = {
        "benchmark": "shared_overlap",
        "pool": "one ExpertServer process per group of the default plan",
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "unix_time": int(time.time()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
