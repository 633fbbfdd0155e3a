"""OpenAI servers for the tests that compare expertmesh's vLLM front end with vLLM's own server
(test_openai_frontend.py, test_openai_parity.py): the vLLM flags both servers of a pair share, starting and
stopping a server subprocess, and a real expert pool (directory + one ExpertServer holding every routed expert of a
checkpoint, gRPC on loopback, in the test process) for the router's remote experts.
"""

from __future__ import annotations

import contextlib
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


def start_server(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python ARGS` with stdout and stderr to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until GET url/v1/models answers 200; fails with the log's tail if the server exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


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
