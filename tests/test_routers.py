"""`expertmesh serve --routers 2` with its parts pinned (`--cpus`), end to end on the demo model:

- the gateway spreads requests over both routers (each its own vLLM engine) and every answer is the greedy text one
  router gives alone;
- the controller reads both routers' counters (its load is their sum);
- `--cpus router=0 --cpus gateway=0 --cpus pool=1`: every router process (API server, engine core, worker) and the
  gateway run on core 0 only, Ray and every expert replica on core 1 only — attention and experts on separate cores,
  as on separate machines;
- Ctrl-C stops every process of the stack.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ctrl_c_leaves_nothing, descendants, free_port, running_serve, serve_flags

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
PROMPTS = [f"Speak of the {w}, my lord." for w in ("sea", "crown", "night", "sword", "rose", "king", "storm", "moon")]
TOKEN = "routers-test-cluster-token"  # the stack's cluster credential (given, so the test can call routers directly)
INTERNAL = {"Authorization": f"Bearer {TOKEN}"}


def _two_free_ports() -> int:
    """A port p with p and p + 1 free (the routers' ports: --router-port and the next one)."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert len(os.sched_getaffinity(0)) >= 2, "this test pins attention and experts to two different cores"
    work = tmp_path_factory.mktemp("routers")
    port, router_port = free_port(), _two_free_ports()
    # A user's shell, not this test process's: earlier tests here ran vLLM engines in-process and pinned a counters
    # file (settings.apply_process_defaults(in_process_engine=True), plugin.configure_remote).
    leaked = ("VLLM_ENABLE_V1_MULTIPROCESSING", "EXPERTMESH_COUNTERS_FILE")
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    env.update(
        {
            # read often; never regroup or scale the demo's experts during the test
            "EXPERTMESH_CONTROLLER_SETTINGS": json.dumps(
                {"interval_s": 1.0, "window_s": 4.0, "imbalance_threshold": 1e9, "hot_expert_skew": 1e9}
            ),
            "HOME": str(work),
            "EXPERTMESH_CLUSTER_TOKEN": TOKEN,
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm"),
        }
    )
    flags = serve_flags(port)
    flags[flags.index("--router-port") + 1] = str(router_port)
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(DEMO), *flags, "--routers", "2"]
    cmd += ["--cpus", "router=0", "--cpus", "gateway=0", "--cpus", "pool=1", "--", "--max-model-len", "512"]
    with running_serve(cmd, env, work, 420, "expertmesh serve --routers 2") as (proc, _curl):
        yield {
            "proc": proc,
            "url": f"http://127.0.0.1:{port}",
            "routers": [f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{router_port + 1}"],
            "work": work,
        }


def _complete(url: str, prompt: str) -> str:
    """Greedy text from the gateway (no key needed: none configured) or straight from a router (with the cluster
    credential: a router serves only the cluster's own parts)."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=INTERNAL, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_the_gateway_spreads_requests_over_both_routers_with_the_same_answers(stack):
    alone = {p: _complete(stack["routers"][0], p) for p in PROMPTS}  # one router, one request at a time
    assert {p: _complete(stack["routers"][1], p) for p in PROMPTS} == alone  # the other router: the same model
    before = {r["url"]: r["requests"] for r in httpx.get(f"{stack['url']}/proxy/routers").json()["routers"]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        through = dict(zip(PROMPTS * 2, pool.map(lambda p: _complete(stack["url"], p), PROMPTS * 2), strict=True))
    assert through == alone
    after = {r["url"]: r["requests"] for r in httpx.get(f"{stack['url']}/proxy/routers").json()["routers"]}
    assert set(after) == set(stack["routers"])
    assert all(after[url] > before.get(url, 0) for url in stack["routers"]), (before, after)
    assert sum(after.values()) - sum(before.values()) == 2 * len(PROMPTS)


def _controller_rates(stack) -> list[float]:
    status = Path(stack["work"]) / ".cache" / "expertmesh" / "logs" / "controller-status.json"
    try:
        return [h.get("tokens_per_s", 0.0) for h in json.loads(status.read_text()).get("history", [])]
    except (OSError, ValueError):
        return []


def test_a_router_serves_only_the_clusters_own_parts(stack):
    """Calling a router directly (past the gateway's keys) needs the cluster credential; probes stay open."""
    router = stack["routers"][0]
    body = {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        for method, path, payload in (("POST", "/v1/completions", body), ("GET", "/expertmesh/counters", None)):
            reply = httpx.request(method, f"{router}{path}", json=payload, headers=headers, timeout=30)
            assert reply.status_code == 401, (path, headers, reply.text)
            assert reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{router}/health", timeout=10).status_code == 200
    assert httpx.get(f"{router}/expertmesh/counters", headers=INTERNAL, timeout=10).status_code == 200


def test_the_controller_counts_the_load_of_the_second_router_too(stack):
    """Load through the second router alone (straight to it, not through the gateway): the controller sees it, so it
    reads that router's counters and not only the first's."""
    deadline = time.monotonic() + 60
    while not (_controller_rates(stack) and _controller_rates(stack)[-1] == 0):  # earlier tests' load has passed
        assert time.monotonic() < deadline, (
            f"the controller's load never went back to 0: {_controller_rates(stack)[-5:]}"
        )
        time.sleep(1)
    seen = len(_controller_rates(stack))
    deadline = time.monotonic() + 60
    while not any(rate > 0 for rate in _controller_rates(stack)[seen:]):
        assert time.monotonic() < deadline, (
            f"the controller did not see the second router's load: {_controller_rates(stack)[-5:]}"
        )
        for p in PROMPTS[:4]:
            _complete(stack["routers"][1], p)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_routers_and_gateway_on_core_0_and_the_expert_pool_on_core_1(stack):
    pids = descendants(stack["proc"].pid)
    roles: dict[str, list[int]] = {"router": [], "gateway": [], "pool": []}
    for pid in pids:
        cmd = _cmdline(pid)
        if "expertmesh.router.openai_server" in cmd or cmd.startswith("VLLM::"):
            roles["router"].append(pid)
        elif "expertmesh.gateway.app" in cmd:
            roles["gateway"].append(pid)
        elif "raylet" in cmd or "gcs_server" in cmd or cmd.startswith("ray::"):
            roles["pool"].append(pid)
    # two routers: each an API server, an engine core and its worker; the replicas are Ray workers (ray::...)
    assert len(roles["router"]) >= 6 and roles["gateway"] and any(_cmdline(p).startswith("ray::") for p in pids), {
        k: [_cmdline(p)[:60] for p in v] for k, v in roles.items()
    }
    for role, cores in (("router", {0}), ("gateway", {0}), ("pool", {1})):
        for pid in roles[role]:
            try:
                assert os.sched_getaffinity(pid) == cores, (role, pid, _cmdline(pid)[:80])
            except ProcessLookupError:  # a short-lived helper process ended meanwhile
                continue


async def _streams(url: str, prompts: list[str], max_tokens: int, on_progress=None) -> list[dict]:
    """Stream greedy completions of every prompt at once; per prompt: text, token chunks, events, error events."""
    import asyncio

    progress = [0] * len(prompts)

    async def one(i: int, client: httpx.AsyncClient) -> dict:
        body = {"model": "demo", "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text, errors, done = "", [], False
        async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
            assert reply.status_code == 200, await reply.aread()
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                text += event["choices"][0]["text"]
                progress[i] += 1
                if on_progress is not None:
                    on_progress(progress)
        return {"text": text, "errors": errors, "done": done}

    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(one(i, client) for i in range(len(prompts))))


def _router_pid(port: int) -> int:
    """The API-server process of the router on `port` (its engine core and worker share its process group)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        cmd = _cmdline(pid)
        if "expertmesh.router.openai_server" in cmd and f"--port {port} " in f"{cmd} ":
            return pid
    raise AssertionError(f"no router process on port {port}")


def test_killing_a_router_mid_stream_migrates_its_streams_with_nothing_lost(stack):
    """SIGKILL one router (its whole process group) while 32 greedy streams run: every stream completes, with the
    text of an undisturbed run: the ones on the dead router went on on the other from their last streamed token.
    Then `expertmesh serve` restarts the dead router."""
    import asyncio
    import signal

    prompts = [f"{p} Tell it again, {i}." for i, p in enumerate(PROMPTS * 4)]
    undisturbed = asyncio.run(_streams(stack["url"], prompts, 48))
    assert all(r["done"] and not r["errors"] for r in undisturbed)
    victim = stack["routers"][1]
    pid = _router_pid(int(victim.rsplit(":", 1)[1]))
    before = httpx.get(f"{stack['url']}/proxy/routers", timeout=10).json()["migrations"]
    killed: list[bool] = []

    def kill_once_every_stream_is_under_way(progress):
        if not killed and min(progress) >= 4:
            killed.append(True)
            os.killpg(pid, signal.SIGKILL)

    disturbed = asyncio.run(_streams(stack["url"], prompts, 48, kill_once_every_stream_is_under_way))
    assert killed, "the router was never killed"
    assert [r["errors"] for r in disturbed] == [[]] * len(prompts)
    assert all(r["done"] for r in disturbed)
    assert [r["text"] for r in disturbed] == [r["text"] for r in undisturbed]
    migrations = httpx.get(f"{stack['url']}/proxy/routers", timeout=10).json()["migrations"] - before
    assert migrations >= 1  # the victim had streams mid-answer (least-in-flight spreads 32 streams over both)
    deadline = time.monotonic() + 240
    while True:  # supervised: the stack starts the router again
        try:
            if httpx.get(f"{victim}/v1/models", headers=INTERNAL, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the killed router was not restarted"
        time.sleep(2)
    assert _complete(victim, PROMPTS[0]) == _complete(stack["routers"][0], PROMPTS[0])


def test_ctrl_c_stops_both_routers_and_everything_else(stack):
    before = descendants(stack["proc"].pid)
    ctrl_c_leaves_nothing(stack["proc"], before, stack["url"])
