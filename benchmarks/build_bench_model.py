"""Build the disaggregation benchmark model: a random Mixtral-shaped fp32 checkpoint big enough that its experts,
not per-step overheads, dominate a decode step (not shipped: ~0.8 GiB, built in ~20 s).

Shape (issue 17): hidden 1024, 8 experts of intermediate 2048 per MoE layer, top-2, 4 MoE layers, 8 attention heads
of 128 (2 KV heads), the test suite's offline byte-level tokenizer. Weights are random (std 0.08, as the tiny test
checkpoints): the text is noise, so benchmarks run it with `--ignore-eos` for exactly max_tokens per request.

    .venv/bin/python benchmarks/build_bench_model.py [--out .cache/models/bench-moe]
    benchmarks/compare --model .cache/models/bench-moe --pin --ignore-eos ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny-checkpoint builder
from tiny import build_tiny_checkpoint  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "models" / "bench-moe"
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=2048,  # per expert
    num_local_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=4,  # every Mixtral layer is an MoE layer
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
)


def build(out: Path) -> Path:
    """The checkpoint at `out` (built unless a complete one is there already)."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return build_tiny_checkpoint("mixtral", out, seed=0, overrides=SHAPE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    path = build(args.out)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"{path}: {size / 2**20:.0f} MiB of safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
