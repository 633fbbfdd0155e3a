"""The most disaggregation can give on this machine: monolithic step time over the expert core's own work per step.

`benchmarks/compare --pin` puts the router on core 0 and the expert pool on core 1, against monolithic vLLM on core 0
alone. However well the two halves overlap (ping-pong micro-batches, two engines), a decode step cannot take less
than the expert core's compute for it, so

    ceiling(c, m) = monolithic step time(c) / expert compute per step(c, m)

bounds full ÷ monolithic from above at concurrency c with the step's tokens split into m micro-batches (m = 1 is no
split; any overlap needs m >= 2). The router's core bounds it too: it still runs everything but the routed experts,

    router ceiling(c) = monolithic step time(c) / (monolithic step time(c) - expert compute per step(c, 1))

(an estimate: monolithic's own expert compute taken as the replica kernel's, vLLM's same CPU fused-MoE op). Both
bounds are generous: they count no hop, no router-side cost of splitting (vLLM's per-forward Python runs once per
micro-batch) and no replica Python, only the kernel; the ceiling is the lower of the two.

Measured in one run:
- monolithic: the router's engine in this process with local experts (`router_throughput.run_monolithic`: vLLM,
  eager, greedy, ignore_eos, `--rounds` batches of exactly c requests of `--max-tokens`), pinned to `--mono-core`;
  step time = wall / (rounds x max_tokens).
- expert compute: a process of its own pinned to `--expert-core`, one torch thread, every MoE layer's experts loaded
  as a replica loads them (`ExpertWeights`, the replica's kernel), timing `forward_batch` — the replica's whole
  compute for a call — for one step's worth of calls: every MoE layer, c tokens split into m calls of c/m tokens,
  top-k experts per token drawn uniformly (the benchmark model's gate is random).

    .venv/bin/python benchmarks/build_bench_model.py
    .venv/bin/python benchmarks/disaggregation_ceiling.py --model .cache/models/bench-moe
    # -> benchmarks/results/disaggregation_ceiling.json (one record per model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from expertmesh.core import settings  # stdlib only

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "disaggregation_ceiling.json"


def expert_step_ms(model: Path, concurrencies: list[int], micro_batches: list[int], repeats: int) -> dict:
    """{c: {m: median ms of one step's expert compute}} on this process's one core and one torch thread."""
    import numpy as np
    import torch

    from expertmesh.core.checkpoint import CheckpointReader, read_moe_info
    from expertmesh.core.codec import decode_forward, encode_forward
    from expertmesh.core.kernel import ExpertWeights

    torch.set_num_threads(1)
    info = read_moe_info(model)
    held = {layer: list(range(info.num_experts)) for layer in info.moe_layers}  # every MoE layer, as on core 1
    weights = ExpertWeights(CheckpointReader(model), held)
    rng = np.random.default_rng(0)

    def call(layer: int, tokens: int):
        """One whole-layer call of `tokens` tokens, decoded and validated as the replica does it."""
        hidden = torch.randn(tokens, info.hidden_size).to(weights.dtype)  # [T, H]
        ids = np.stack([rng.permutation(info.num_experts)[: info.top_k] for _ in range(tokens)]).reshape(-1)  # [T*K]
        gate = np.full(ids.shape, 1.0 / info.top_k, dtype=np.float32)  # [T*K]
        request = encode_forward(layer, hidden, None, ids, gate)
        return decode_forward(request, held=weights.held, hidden_size=info.hidden_size)

    out: dict = {}
    for c in concurrencies:
        out[str(c)] = {}
        for m in micro_batches:
            if c % m:
                continue
            # one step: every MoE layer, m calls of c/m tokens each (fresh inputs per repeat, built untimed)
            steps = [[call(layer, c // m) for layer in info.moe_layers for _ in range(m)] for _ in range(repeats + 2)]
            times = []
            for batches in steps:
                t0 = time.perf_counter()
                for batch in batches:
                    weights.forward_batch(batch)
                times.append(time.perf_counter() - t0)
            out[str(c)][str(m)] = round(statistics.median(times[2:]) * 1e3, 3)  # the first two warm up
            print(f"  experts c={c} m={m}: {out[str(c)][str(m)]:.2f} ms per step", flush=True)
    return out


def ceilings(mono_step_ms: dict[str, float], expert_step_ms: dict[str, dict[str, float]]) -> dict:
    """Per concurrency c (str keys, as in JSON): the expert core's bound by m (m >= 2: a split), the router core's
    bound, the ceiling (the lower of the two, by m) and the expert work per step relative to the unsplit step.

    mono_step_ms: {c: monolithic step ms}; expert_step_ms: {c: {m: expert compute ms per step}} (needs m = "1").
    """
    out = {}
    for c, by_m in expert_step_ms.items():
        mono, unsplit = mono_step_ms[c], by_m["1"]
        expert_bound = {m: round(mono / ms, 3) for m, ms in by_m.items() if int(m) >= 2}  # [m]
        router_bound = round(mono / (mono - unsplit), 3) if mono > unsplit else float("inf")
        out[c] = {
            "experts_bound": expert_bound,
            "router_bound": router_bound,
            "ceiling": {m: min(bound, router_bound) for m, bound in expert_bound.items()},
            "expert_work_vs_unsplit": {m: round(ms / unsplit, 3) for m, ms in by_m.items()},
            "expert_share_of_monolithic_step": round(unsplit / mono, 3),
        }
    return out


def main(argv=None) -> int:
    settings.apply_process_defaults(in_process_engine=True)  # before torch/vLLM: the engine runs in this process
    os.environ.setdefault("EXPERTMESH_ROUTER_METRICS_PORT", "0")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "bench-moe")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=2, help="monolithic: batches of c requests per concurrency")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20, help="expert compute: timed steps per (c, m)")
    p.add_argument("--mono-core", type=int, default=0)
    p.add_argument("--expert-core", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--experts-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"no checkpoint at {args.model} (build it: benchmarks/build_bench_model.py)")

    if args.experts_only:  # the child: expert compute on its own core, JSON on the last line of stdout
        os.sched_setaffinity(0, {args.expert_core})
        result = expert_step_ms(args.model, args.concurrency, args.micro_batches, args.repeats)
        print(json.dumps(result), flush=True)
        return 0

    sys.path.insert(0, str(REPO / "benchmarks"))
    import router_throughput

    child = [sys.executable, __file__, "--experts-only", "--model", str(args.model), "--repeats", str(args.repeats)]
    child += ["--expert-core", str(args.expert_core), "--concurrency", *map(str, args.concurrency)]
    child += ["--micro-batches", *map(str, args.micro_batches)]
    print(f"expert compute (own process, core {args.expert_core}):", flush=True)
    done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    experts = json.loads(done.stdout.strip().splitlines()[-1])

    os.sched_setaffinity(0, {args.mono_core})
    print(f"monolithic (local experts, core {args.mono_core}):", flush=True)
    mono_args = argparse.Namespace(
        compile=False, concurrency=args.concurrency, rounds=args.rounds, max_tokens=args.max_tokens
    )
    mono = router_throughput.run_monolithic(args.model, mono_args)
    mono_step_ms = router_throughput.decode_step_ms(mono, args.rounds, args.max_tokens)

    bounds = ceilings(mono_step_ms, experts)
    for c, bound in bounds.items():
        print(f"c={c}: monolithic step {mono_step_ms[c]:.2f} ms; {json.dumps(bound)}")

    from expertmesh.core.checkpoint import read_moe_info

    info = read_moe_info(args.model)
    record = {
        "benchmark": "disaggregation_ceiling",
        "model": str(args.model),
        "shape": {
            "hidden": info.hidden_size,
            "experts": info.num_experts,
            "top_k": info.top_k,
            "moe_layers": len(info.moe_layers),
        },
        "settings": {
            "cores": {"monolithic": args.mono_core, "experts": args.expert_core},
            "monolithic": {"rounds": args.rounds, "max_tokens": args.max_tokens},
            "expert_repeats": args.repeats,
        },
        "monolithic": mono,
        "monolithic_step_ms": mono_step_ms,
        "expert_step_ms": experts,
        "ceiling": bounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "unix_time": int(time.time()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [r for r in existing.get("runs", []) if r.get("model") != record["model"]] + [record]
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
