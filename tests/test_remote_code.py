"""Nothing in a checkpoint runs code unless the user opts in: a checkpoint whose config asks for its own Python
(`auto_map` to a module in the checkpoint, a model type transformers does not know) is refused by the router with
vLLM's clear "trust_remote_code" error and the module never runs; `expertmesh serve` refuses it before starting
anything; only the router's `--trust-remote-code` (vLLM's own opt-in) lets the module run.

The module writes a marker file when imported: the marker is the proof of whether the code ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from expertmesh.core import settings

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture()
def remote_code_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(checkpoint directory asking for its own code, the marker file that code writes when it runs)."""
    checkpoint, marker = tmp_path / "asks-for-code", tmp_path / "remote-code-ran"
    shutil.copytree(DEMO, checkpoint)
    (checkpoint / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n"
        "    model_type = 'custom-moe'\n"
    )
    config = json.loads((checkpoint / "config.json").read_text())
    config |= {"model_type": "custom-moe", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint, marker


def _router_command(checkpoint: Path, *more: str) -> list[str]:
    command = [sys.executable, "-m", "expertmesh.router.openai_server", str(checkpoint), "--expert-mode", "local"]
    return command + ["--host", "127.0.0.1", "--port", str(free_port()), *more]


def test_router_refuses_remote_code_unless_opted_in(remote_code_checkpoint):
    checkpoint, marker = remote_code_checkpoint
    refused = subprocess.run(
        _router_command(checkpoint), capture_output=True, text=True, timeout=300, env=settings.child_env()
    )
    assert refused.returncode != 0
    assert "trust_remote_code=True" in refused.stderr and "contains custom code" in refused.stderr, refused.stderr
    assert not marker.exists(), "the checkpoint's code ran without the user's opt-in"

    # vLLM's own opt-in reaches vLLM: the code runs (the model's architecture is still the demo's, so the router
    # would go on to serve it; it is stopped once the marker shows the code ran)
    log = marker.parent / "opted-in.log"
    with open(log, "wb") as out:
        opted_in = subprocess.Popen(
            _router_command(checkpoint, "--trust-remote-code"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=settings.child_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and opted_in.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(opted_in.pid, signal.SIGKILL)
        opted_in.wait(timeout=30)


def test_serve_refuses_an_unknown_family_before_starting_anything(remote_code_checkpoint, tmp_path):
    checkpoint, marker = remote_code_checkpoint
    command = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(checkpoint), "--port", str(free_port())]
    env = settings.child_env() | {"HOME": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "custom-moe" in result.stderr, result.stderr[-3000:]
    assert not marker.exists()
