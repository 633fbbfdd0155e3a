"""scripts/gpu_check.py, the prepared device check (issue 17), run here on the CPU in a subprocess whose vLLM and Ray
imports are blocked: every correctness check passes, every timing is positive, and nothing tried to import either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert model["placement"]["replica_on_device"] is True
    assert model["placement"]["stacks_moved_by_hand"].startswith("forward ran")

    checks = report["checks"]
    expected = {"no_vllm_or_ray_loaded"}
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
        for op in ("layer_call", "echo", "replica_kernel", "device_kernel"):
            stats = entry[op]
            assert stats["n"] == ITERS, (rows, op)
            assert 0 < stats["min_us"] <= stats["median_us"] <= stats["p90_us"], (rows, op, stats)
        assert entry["request_bytes"] > 0
        assert all(value > 0 for key, value in entry["ratios"].items() if key != "overhead_us"), entry["ratios"]
        # a layer call carries the echo's bytes and runs the kernel: it cannot be faster than the kernel alone
        assert entry["layer_call"]["median_us"] > entry["replica_kernel"]["median_us"], entry
