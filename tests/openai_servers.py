"""OpenAI servers for the tests that compare expertmesh's vLLM front end with vLLM's own server
(test_openai_frontend.py, test_openai_parity.py): the vLLM flags both servers of a pair share, starting and
stopping a server subprocess, and a real expert pool (directory + one ExpertServer holding every routed expert of a
checkpoint, gRPC on loopback, in the test process) for the router's remote experts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.protos import expert_pb2
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer
from expertmesh.experts.replica import ExpertServer, keys_to_proto

START_TIMEOUT_S = 240


def vllm_flags(served_name: str) -> list[str]:
    """vLLM options shared by both servers of a pair: fp32 (the checkpoints' dtype), eager, JSON without free
    whitespace (a small model otherwise fills the token budget with blanks inside a grammar that allows them)."""
    return [
        "--served-model-name",
        served_name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--disable-uvicorn-access-log",
    ]


def router_args(model: Path | str, directory: str, port: int, *more: str) -> list[str]:
    """`python -m` arguments of a router (vLLM's OpenAI server with the plugin) on loopback `port`, its routed experts
    computed by the pool whose directory is `directory`; `more`: further router or vLLM options."""
    return [
        *("-m", "expertmesh.router.openai_server", str(model), "--expert-mode", "remote", "--directory", directory),
        *("--host", "127.0.0.1", "--port", str(port), *more),
    ]


def reference_args(model: Path | str, port: int, *more: str) -> list[str]:
    """`python -m` arguments of vLLM's own OpenAI server on `model` (local experts, no expertmesh code), loopback
    `port`; `more`: further vLLM options."""
    return [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *more,
    ]


def gateway_args(routers: list[str], port: int) -> list[str]:
    """`python -m` arguments of a gateway on loopback `port` in front of `routers` (base URLs)."""
    return [
        "-m",
        "expertmesh.gateway.app",
        *(a for url in routers for a in ("--router", url)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start_server(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python ARGS` with stdout and stderr to `log`, in a session of its own (so `stop_server` finds what it
    started: vLLM's engine core and worker)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def wait_ready(
    url: str, proc: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S, path: str = "/v1/models"
) -> None:
    """Until GET url+path answers 200; fails with the log's tail if the server exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (vLLM's own shutdown), then SIGKILL whatever is left of its session (engine core, worker)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def expert_pool(checkpoint: Path) -> Iterator[tuple[str, ExpertServer]]:
    """(directory host:port, the replica): a real directory and one real ExpertServer holding every routed expert
    of `checkpoint`, registered in it."""
    info = read_moe_info(checkpoint)
    keys = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
    directory = DirectoryServer()
    address = f"127.0.0.1:{directory.start()}"
    client = DirectoryClient(address)
    server = ExpertServer(checkpoint, keys, replica_id="all-0", group="all")
    try:
        port = server.start()
        client.register(
            expert_pb2.ReplicaEntry(
                replica_id="all-0", group="all", endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(keys)
            ),
            lease_seconds=3600,
        )
        yield address, server
    finally:
        server.stop(grace=0)
        client.close()
        directory.stop()
