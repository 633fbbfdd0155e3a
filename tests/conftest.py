"""Shared fixtures: tiny random checkpoints per family (built once per test session), free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from expertmesh.core.settings import apply_process_defaults  # noqa: E402 - light: no torch/vLLM import

# OMP_NUM_THREADS=1 etc. before anything imports torch: vLLM pins its worker thread, and two OpenMP threads
# fighting over it make CPU work many times slower (core/settings.py PROCESS_DEFAULTS).
apply_process_defaults()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

from tiny import FAMILIES, build_tiny_checkpoint  # noqa: E402

from expertmesh.core.settings import free_port  # noqa: E402,F401 - tests import it from here


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, **overrides) -> Path of a tiny random fp32 checkpoint, cached per session."""
    cache: dict = {}

    def get(family: str, seed: int = 0, **overrides):
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{family}-s{seed}" + (
                "-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else ""
            )
            cache[key] = build_tiny_checkpoint(family, tmp_path_factory.mktemp(name), seed=seed, overrides=overrides)
        return cache[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def serve_flags(port: int) -> list[str]:
    """`expertmesh serve` flags for a private stack: the gateway on `port`, every other server on a free port."""
    return [
        "--port",
        str(port),
        "--router-port",
        str(free_port()),
        "--ray-port",
        str(free_port()),
        "--directory-port",
        str(free_port()),
        "--metrics-port",
        "0",
    ]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...) and every process of its session: what a test
    checks is gone after stopping a stack it started."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid,sid"], capture_output=True, text=True).stdout.split("\n")[1:]
    rows = [tuple(int(x) for x in line.split()) for line in out if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        nxt = {p for p, pp, _, _ in rows if pp in frontier} - found
        found |= nxt
        frontier = nxt
    return found | {p for p, _, _, sid in rows if sid == pid}


def ctrl_c_leaves_nothing(proc: subprocess.Popen, before: set[int], url: str) -> None:
    """Ctrl-C `expertmesh serve` as a user would: it exits 0, none of the processes it had (`before`) is left
    running, and its gateway at `url` no longer answers."""
    import httpx

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    time.sleep(1)
    alive = [
        p
        for p in before
        if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()
    ]
    assert not alive, f"left behind: {alive}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


@contextlib.contextmanager
def running_serve(cmd: list[str], env: dict, work: Path, timeout: float, what: str = "expertmesh serve"):
    """Start `expertmesh serve` (`cmd`, stderr to work/serve.log) and wait for its ready-to-paste curl line; yield
    (process, curl line). Afterwards, if a test did not stop it: Ctrl-C as a user would, then SIGKILL its session,
    and stop any pool whose state file under `work` says its stop never ran."""
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        curl = proc.stdout.readline()  # the ready-to-paste curl is printed once everything is up
        while not curl.startswith("curl") and proc.poll() is None and time.monotonic() < deadline:
            curl = proc.stdout.readline()
        if not curl.startswith("curl"):
            proc.kill()
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(work.rglob("*.log")))
            pytest.fail(f"{what} did not come up:\n{logs}")
        yield proc, curl
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        for state in (work / ".cache" / "expertmesh").rglob("pool-*.json"):  # a pool whose stop never ran
            from expertmesh.experts.pool import stop_session

            stop_session(json.loads(state.read_text())["session_id"])
