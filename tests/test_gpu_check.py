"""scripts/gpu_check.py, the prepared device check (issue 17), run here on the CPU in a subprocess whose vLLM and Ray
imports are blocked: every correctness check passes, the replica's weights are on the requested device, the layer
call over the router's stream is timed against the stream echo and the kernel alone, and nothing tried to import
either. Also `ExpertWeights(device=...)` itself: "cpu" is the default path exactly, and a non-CPU device (here the
meta device: no GPU on this machine) puts the stacks and the torch kernel there.

Not testable here: real CUDA numbers and a device kernel whose output is copied back to the host (the meta device
holds no data to copy); that is what the script is for on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.kernel import ExpertWeights

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
ROWS = (1, 16)
ITERS = 5

# Runs the script as __main__ behind a meta-path finder that refuses vllm and ray (both installed here): the device
# machine has neither. Any attempt, even a probe through importlib.util.find_spec, is recorded and printed.
RUNNER = """
import importlib.abc, json, runpy, sys
BLOCKED = ("vllm", "ray")
attempts = []

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"gpu_check must not import {name}")
        return None

assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {name} through")
print("BLOCKER-ACTIVE", json.dumps(attempts), file=sys.stderr, flush=True)
attempts.clear()
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("BLOCKED-ATTEMPTS", json.dumps(attempts), file=sys.stderr, flush=True)
"""


def test_gpu_check_passes_on_cpu_without_vllm_or_ray(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", RUNNER, str(SCRIPT), "--out", str(out), "--device", "cpu"]
    cmd += ["--iters", str(ITERS), "--warmup", "1", "--rows", ",".join(map(str, ROWS)), "--no-bench"]
    cmd += ["--workdir", str(tmp_path)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stderr.splitlines() if " " in line}
    assert json.loads(lines["BLOCKER-ACTIVE"]) == ["vllm", "ray"]  # the blocker refused both before the run
    assert json.loads(lines["BLOCKED-ATTEMPTS"]) == []  # and the script never tried either
    assert "PASS" in proc.stdout

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] is True and "error" not in report
    assert report["device"] == "cpu" and report["device_name"] and report["torch"]
    assert report["forbidden_modules_loaded"] == []
    model = report["models"]["tiny"]
    assert model["replica_kernel"] == "torch"
    placement = model["placement"]
    assert placement["device"] == "cpu" and placement["replica_on_device"] is True
    assert placement["weights_device"] == ["cpu"] and placement["expert_weights_device"] == "cpu"
    assert placement["weight_bytes"] > 0

    checks = report["checks"]
    expected = {"no_vllm_or_ray_loaded", "tiny.weights_on_device"}
    for layer in model["moe_layers"]:
        for rows in ROWS:
            prefix = f"tiny.layer{layer}.rows{rows}"
            expected |= {
                f"{prefix}.replica_vs_transformers",
                f"{prefix}.reply_bytes_equal_direct_kernel",
                f"{prefix}.device_kernel_vs_transformers",
            }
    assert set(checks) == expected
    for name, check in checks.items():
        assert check["passed"] is True, (name, check)
        if "tol" in check:
            assert 0 <= check["max_abs_err"] <= check["tol"] <= 1e-4, (name, check)

    assert set(model["timings"]) == {str(r) for r in ROWS}
    for rows, entry in model["timings"].items():
        for op in ("layer_call", "echo", "kernel", "kernel_host_io"):
            stats = entry[op]
            assert stats["n"] == ITERS, (rows, op)
            assert 0 < stats["min_us"] <= stats["median_us"] <= stats["p90_us"], (rows, op, stats)
        # the echo carries what the transport puts on its stream: the request and the call's id and deadline
        assert entry["stream_message_bytes"] > entry["request_bytes"] > 0
        ratios = entry["ratios"]
        assert set(ratios) == {
            "layer_call_over_echo",
            "layer_call_over_kernel",
            "kernel_host_io_over_kernel",
            "overhead_us",
        }
        assert all(value > 0 for key, value in ratios.items() if key != "overhead_us"), ratios
        # a layer call carries the echo's bytes and runs the kernel: it cannot be faster than either alone
        assert entry["layer_call"]["median_us"] > entry["kernel"]["median_us"], entry
        assert entry["layer_call"]["median_us"] > entry["echo"]["median_us"], entry


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("mixtral"))
    return reader, {layer: list(range(reader.info.num_experts)) for layer in reader.info.moe_layers}


def _assignments(reader, rows: int, top_k: int = 2, seed: int = 0):
    """hidden [rows, H], expert [rows*K] (distinct per row), weight [rows*K]: a whole-layer call's inputs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, reader.info.hidden_size, generator=g)
    expert = torch.stack([torch.randperm(reader.info.num_experts, generator=g)[:top_k] for _ in range(rows)])
    weight = torch.rand(rows * top_k, generator=g)
    return hidden, expert.flatten().numpy(), weight.numpy()


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_expert_weights_on_cpu_device_is_the_default(mixtral, kernel):
    reader, keys = mixtral
    default = ExpertWeights(reader, keys, kernel=kernel)
    on_cpu = ExpertWeights(reader, keys, kernel=kernel, device="cpu")
    assert on_cpu.device == default.device == torch.device("cpu")
    assert on_cpu.kernel == default.kernel
    for layer in keys:
        assert torch.equal(on_cpu.w13[layer], default.w13[layer]) and torch.equal(on_cpu.w2[layer], default.w2[layer])
        hidden, expert, weight = _assignments(reader, rows=5, seed=layer)
        got = on_cpu.forward(layer, hidden, None, expert, weight)
        assert got.device.type == "cpu"
        assert torch.equal(got, default.forward(layer, hidden, None, expert, weight))


def test_expert_weights_on_a_non_cpu_device(mixtral, monkeypatch):
    """The meta device stands in for a GPU: shapes and placement, no values. The torch kernel is chosen even where
    the fused one is asked for by default (it is vLLM's CPU op), and asking for "fused" there is an error."""
    reader, keys = mixtral
    monkeypatch.delenv("EXPERTMESH_EXPERT_KERNEL", raising=False)
    weights = ExpertWeights(reader, keys, device="meta")
    assert weights.kernel == "torch" and weights.device == torch.device("meta")
    assert all(t.is_meta for d in (weights.w13, weights.w2) for t in d.values())
    host = ExpertWeights(reader, keys, kernel="torch")
    assert {layer: t.shape for layer, t in weights.w13.items()} == {layer: t.shape for layer, t in host.w13.items()}
    assert weights.weight_bytes == host.weight_bytes
    layer = min(keys)
    hidden, expert, weight = _assignments(reader, rows=7)
    out = weights.forward(layer, hidden.to("meta"), None, expert, weight)  # the kernel runs on the device
    assert out.is_meta and out.shape == hidden.shape and out.dtype == hidden.dtype
    token_index = np.repeat(np.arange(7), 2)
    out = weights.forward(layer, hidden.to("meta"), token_index, expert, weight)
    assert out.is_meta and out.shape == hidden.shape
    # A host hidden goes to the device and its output comes back: on the meta device there is nothing to copy back,
    # so this fails exactly at the copy to the host (the kernel ran on the device).
    with pytest.raises(NotImplementedError, match="meta"):
        weights.forward(layer, hidden, None, expert, weight)
    with pytest.raises(RuntimeError, match="fused expert kernel cannot run"):
        ExpertWeights(reader, keys, kernel="fused", device="meta")
