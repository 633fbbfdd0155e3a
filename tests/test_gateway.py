"""The gateway as the front door (gateway/app.py) over real HTTP, in front of a real router: vLLM's own OpenAI
server with the expertmesh plugin on the demo model, its routed experts computed by a real replica (a directory and
an ExpertServer in this process, gRPC on loopback). Three gateways, real subprocesses: one with API keys in front of
the router, one open in front of the router and a dead URL, one with an admission bound of 4.

What is the gateway's own (the OpenAI behaviour is vLLM's, compared with vLLM's server in test_openai_parity.py):
- API keys guard /v1/* and /experts, never /health or /metrics; a refused key is an OpenAI 401 with
  WWW-Authenticate, and a valid one reaches the router with the request unchanged;
- /health is 200 only when every router is up and every (layer, expert) has a live replica, and otherwise names
  what is wrong: a router that is down, experts that no replica holds;
- /experts sums the routers' routed tokens per (layer, expert); /metrics counts requests and the gateway's errors;
- a path the gateway does not serve, /v1 paths outside its OpenAI surface included, is its own OpenAI 404;
- admission control: 4x the bound at once gets 429 + Retry-After for the excess, and the admitted all complete;
- a 10 MB body gets 413 and a never-finishing one 408 while 32 streams run at their pace and /health stays fast;
- last: the only replica dies mid-service and the router keeps answering, the same text (it computes the experts
  itself, router/fallback.py: an exception in vLLM's forward pass would end its engine core), and goes back to the
  pool when a replica holds them again.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from openai_servers import expert_pool, gateway_args, router_args, start_server, stop_server, vllm_flags, wait_ready

from expertmesh.core import settings
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.discovery.directory import DirectoryClient

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
KEYS = ["key-one", "key-two"]
BOUND = 4  # the "bounded" gateway's admission bound (requests in flight per router)


def _dead_url() -> str:
    """A loopback URL nothing listens on (bound then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway")
    with expert_pool(DEMO) as (directory, replica):
        router_port = free_port()
        env = settings.child_env({"EXPERTMESH_MISSING_EXPERT_WAIT_S": "1", "EXPERTMESH_GATEWAY_BODY_TIMEOUT_S": "2"})
        # the engine core's dispatcher metrics, re-exported in the router's /metrics
        more = ("--router-metrics-port", str(free_port()), *vllm_flags("demo"))
        router = start_server(router_args(DEMO, directory, router_port, *more), logs / "router.log", env)
        router_url = f"http://127.0.0.1:{router_port}"
        gateways = []
        try:
            ports = {"keyed": free_port(), "open": free_port(), "bounded": free_port()}
            upstreams = {"keyed": [router_url], "open": [router_url, _dead_url()], "bounded": [router_url]}
            for name, port in ports.items():
                gw_env = dict(env, EXPERTMESH_API_KEYS=",".join(KEYS) if name == "keyed" else "")
                if name == "bounded":
                    gw_env["EXPERTMESH_GATEWAY_MAX_IN_FLIGHT"] = str(BOUND)
                gateways.append(start_server(gateway_args(upstreams[name], port), logs / f"gateway-{name}.log", gw_env))
            wait_ready(router_url, router, logs / "router.log")
            for (name, port), proc in zip(ports.items(), gateways, strict=True):
                wait_ready(f"http://127.0.0.1:{port}", proc, logs / f"gateway-{name}.log", 60, path="/metrics")
            yield {
                "router": router_url,
                "keyed": f"http://127.0.0.1:{ports['keyed']}",
                "open": f"http://127.0.0.1:{ports['open']}",
                "bounded": f"http://127.0.0.1:{ports['bounded']}",
                "directory": directory,
                "dead": upstreams["open"][1],
                "replica": replica,
            }
        finally:
            for proc in gateways:
                stop_server(proc)
            stop_server(router)


def _auth(key: str = KEYS[1]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _completion(url: str, headers: dict | None = None) -> httpx.Response:
    body = {"model": "demo", "prompt": "Speak, my lord.", "max_tokens": 6, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)


def test_keys_guard_v1_and_experts_but_not_health_or_metrics(stack):
    url = stack["keyed"]
    for headers, code in ((None, "missing_api_key"), (_auth("wrong"), "invalid_api_key")):
        for reply in (_completion(url, headers), httpx.get(f"{url}/v1/models", headers=headers, timeout=10)):
            assert reply.status_code == 401, reply.text
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.json()["error"]["code"] == code
        assert httpx.get(f"{url}/experts", headers=headers, timeout=10).status_code == 401
    ok = _completion(url, _auth())
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
    # the router answered the request as it was sent: the same as asking the router itself
    direct = _completion(stack["router"])
    assert ok.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert httpx.get(f"{url}/experts", headers=_auth(KEYS[0]), timeout=10).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200


def test_unknown_paths(stack):
    url = stack["open"]
    ours = httpx.get(f"{url}/no-such-path", timeout=10)
    assert ours.status_code == 404
    assert ours.json()["error"]["type"] == "not_found_error"
    # a /v1 path outside the OpenAI surface the gateway serves (proxy.SERVED): its own 404, never relayed
    relayed = sum(r["requests"] for r in httpx.get(f"{url}/proxy/routers", timeout=10).json()["routers"])
    for path in ("/v1/no-such-path", "/v1/responses"):
        other = httpx.post(f"{url}{path}", json={"model": "demo"}, timeout=10)
        assert other.status_code == 404
        assert other.json()["error"]["type"] == "not_found_error" and other.json()["error"]["code"] == "not_served"
    assert sum(r["requests"] for r in httpx.get(f"{url}/proxy/routers", timeout=10).json()["routers"]) == relayed


def test_health_names_a_dead_router_and_experts_without_replicas(stack):
    routers = httpx.get(f"{stack['open']}/health", timeout=10)
    assert routers.status_code == 503
    by_url = {r["url"]: r for r in routers.json()["routers"]}
    assert by_url[stack["router"]]["ok"] and by_url[stack["router"]]["missing_experts"] == 0
    assert not by_url[stack["dead"]]["ok"] and "router unreachable" in by_url[stack["dead"]]["detail"]
    assert routers.json()["status"] == "unavailable"

    healthy = httpx.get(f"{stack['keyed']}/health", timeout=10)
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
    # the only replica leaves the directory: every routed expert of the demo is uncovered until it is back
    directory = DirectoryClient(stack["directory"])
    try:
        entry = directory.snapshot().replicas[0]
        directory.deregister(entry.replica_id)
        keys = len(read_moe_info(DEMO).moe_layers) * read_moe_info(DEMO).num_experts
        deadline = time.monotonic() + 15
        while (missing := httpx.get(f"{stack['keyed']}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, missing.text
            time.sleep(0.2)
        assert missing.status_code == 503
        router = missing.json()["routers"][0]
        assert router["missing_experts"] == keys and "no live replica" in router["detail"]
    finally:
        directory.register(entry, lease_seconds=3600)
        directory.close()
    deadline = time.monotonic() + 15
    while httpx.get(f"{stack['keyed']}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "health did not come back with the replica"
        time.sleep(0.2)


def test_experts_and_metrics(stack):
    url = stack["keyed"]
    before = httpx.get(f"{url}/experts", headers=_auth(), timeout=10).json()
    assert _completion(url, _auth()).status_code == 200
    after = httpx.get(f"{url}/experts", headers=_auth(), timeout=10).json()
    info = read_moe_info(DEMO)
    assert len(after["experts"]) == len(info.moe_layers) * info.num_experts
    assert after["replicas"] == {"total": len(after["experts"]), "missing": 0}
    added = sum(r["routed_tokens"] for r in after["experts"]) - sum(r["routed_tokens"] for r in before["experts"])
    # top-k experts per token per MoE layer, for the prompt and the 6 generated tokens (the last one is not fed back)
    assert added > 0 and added % (info.top_k * len(info.moe_layers)) == 0
    assert after["routers"][0]["url"] == stack["router"] and after["routers"][0]["in_flight"] == 0

    assert _completion(url, _auth("wrong")).status_code == 401
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    ok = [line for line in metrics.splitlines() if line.startswith("expertmesh_gateway_requests_total{")]
    assert any('endpoint="/v1/{path:path}"' in line and 'status="200"' in line for line in ok), ok
    assert any('endpoint="/v1/{path:path}"' in line and 'status="401"' in line for line in ok), ok
    router = f'router="{stack["router"]}"'
    assert f"expertmesh_gateway_router_requests_in_flight{{{router}}} 0.0" in metrics
    assert f"expertmesh_gateway_router_up{{{router}}} 1.0" in metrics
    first_byte = [
        line
        for line in metrics.splitlines()
        if line.startswith('expertmesh_gateway_time_to_first_byte_seconds_count{path="/v1/completions"}')
    ]
    assert first_byte and float(first_byte[0].rsplit(" ", 1)[1]) >= 1, first_byte
    sent_prefix = f"expertmesh_gateway_router_requests_total{{{router}"
    sent = [line for line in metrics.splitlines() if line.startswith(sent_prefix)]
    assert sent and float(sent[0].rsplit(" ", 1)[1]) >= 2, sent
    errors = [line for line in metrics.splitlines() if line.startswith("expertmesh_gateway_errors_total{")]
    assert any('type="authentication_error"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in errors), errors


def test_overload_past_the_admission_bound_is_429_and_the_admitted_complete(stack):
    """4x the bound at once: the excess gets OpenAI's 429 with Retry-After at once, every admitted request completes
    in full, and afterwards the gateway admits again."""
    import concurrent.futures

    body = {"model": "demo", "prompt": "Speak, my lord.", "max_tokens": 48, "ignore_eos": True, "temperature": 0}

    def send(_):
        return httpx.post(f"{stack['bounded']}/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4 * BOUND) as pool:
        replies = list(pool.map(send, range(4 * BOUND)))
    admitted = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(admitted) + len(refused) == len(replies), [r.status_code for r in replies]
    assert len(admitted) >= BOUND and len(refused) >= 2 * BOUND, (len(admitted), len(refused))
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in admitted)
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert httpx.get(f"{stack['bounded']}/v1/models", timeout=10).status_code == 200  # reads are never refused
    assert send(0).status_code == 200  # nothing left in flight: admitted again


def test_huge_and_endless_bodies_are_refused_while_streams_run(stack):
    """A 10 MB prompt gets 413 and a body that never finishes gets 408 (after the 2 s body timeout of these
    gateways), neither reaches the router, and meanwhile 32 streams keep their pace and /health stays fast."""
    import asyncio

    url = stack["keyed"]
    host, port = url.removeprefix("http://").split(":")
    health_ms: list[float] = []
    gaps: list[float] = []

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "demo", "prompt": f"Stream {i}: speak", "max_tokens": 48, "ignore_eos": True, "stream": True}
        last = None
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=_auth()) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    # Encoded up front: json-encoding 10 MB inside the test's loop would stall the test's own clients, and the
    # health probe would time the test, not the gateway.
    huge_body = json.dumps({"model": "demo", "prompt": "x" * (10 * 1024 * 1024), "max_tokens": 1}).encode()

    async def huge(client: httpx.AsyncClient) -> httpx.Response:
        headers = {**_auth(), "Content-Type": "application/json"}
        return await client.post(f"{url}/v1/completions", content=huge_body, headers=headers)

    async def endless() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        writer.write((head + "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)  # until the gateway closes the connection
        writer.close()
        return answer

    def probe_health(until: threading.Event) -> None:
        # A thread and a client of its own: on the test's loop the probe would wait behind the 32 streams' lines.
        with httpx.Client(timeout=10) as client:
            while not until.is_set():
                t0 = time.monotonic()
                client.get(f"{url}/health")
                health_ms.append((time.monotonic() - t0) * 1000)
                until.wait(0.05)

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
            done = threading.Event()
            prober = threading.Thread(target=probe_health, args=(done,))
            prober.start()
            try:
                streams = [asyncio.create_task(stream(client, i)) for i in range(32)]
                await asyncio.sleep(0.5)  # the streams are running
                big, slow = await asyncio.gather(huge(client), endless())
                await asyncio.gather(*streams)
            finally:
                done.set()
                prober.join()
            return big, slow

    before = _router_metric(stack["router"], "vllm:request_success_total")
    big, slow = asyncio.run(main())
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error", big.text
    assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow, slow[:300]
    # only the 32 streams reached the router
    assert _router_metric(stack["router"], "vllm:request_success_total") - before == 32
    assert max(gaps) < 1.0, f"a stream waited {max(gaps):.2f} s between two tokens"
    assert len(health_ms) >= 5 and max(health_ms) < 100, health_ms


def _router_metric(router: str, name: str) -> float:
    text = httpx.get(f"{router}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_router_keeps_serving_when_the_only_replica_dies(stack):
    """Last: kills the module's replica (then brings another up)."""
    from expertmesh.core.protos import expert_pb2
    from expertmesh.experts.replica import ExpertServer, keys_to_proto

    url = stack["keyed"]
    before = _completion(url, _auth())
    assert _router_metric(stack["router"], "expertmesh_dispatch_fallback_assignments_total") == 0
    stack["replica"].stop(grace=0)  # dead, still listed in the directory: a crash before its lease runs out
    after = _completion(url, _auth())
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert _router_metric(stack["router"], "expertmesh_dispatch_fallback_assignments_total") > 0
    assert httpx.get(f"{stack['router']}/health", timeout=10).status_code == 200  # vLLM's engine core is alive

    info = read_moe_info(DEMO)
    keys = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
    revived = ExpertServer(DEMO, keys, replica_id="all-1", group="all")
    directory = DirectoryClient(stack["directory"])
    try:
        port = revived.start()
        directory.deregister("all-0")
        directory.register(
            expert_pb2.ReplicaEntry(
                replica_id="all-1", group="all", endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(keys)
            ),
            lease_seconds=3600,
        )
        time.sleep(1)  # the router's directory watch sees the change
        fallback = _router_metric(stack["router"], "expertmesh_dispatch_fallback_assignments_total")
        again = _completion(url, _auth())
        assert again.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        # the experts went to the new replica, not the router's own copies
        assert _router_metric(stack["router"], "expertmesh_dispatch_fallback_assignments_total") == fallback
        assert revived.metrics.text().count("expertmesh_replica_expert_tokens_total{") > 0
    finally:
        directory.close()
        revived.stop(grace=0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
