"""The router as vLLM's own OpenAI server (router/openai_server.py) and the gateway's streaming proxy
(gateway/proxy.py).

One module-scoped setup (about a minute of start-up on two cores): a real expert directory and a real ExpertServer
(gRPC on loopback, in this process) holding every routed expert of the demo model; the router as a subprocess
(vLLM's AsyncLLM, engine core in its own child process, plugin in remote mode) against it; and, beside it, vLLM's
own OpenAI server on the same checkpoint with local experts — what a user would run instead, and the reference.

- a greedy chat through the router equals vLLM's own server's, word for word; the experts were computed by the
  replica (its Forward calls), and the engine core's routed-token counters and dispatcher metrics are readable
  from outside that process (the counters file, the router's /metrics);
- `response_format` json_schema returns JSON valid against the schema;
- the proxy relays SSE unchanged (same events as the router's own stream), skips a router that refuses
  connections, and answers an OpenAI-shaped 503 when no router accepts;
- through the gateway as its command line runs it: hundreds of streams that disconnect at random points (before
  the first byte, after a few tokens, mid-way; some read to the end) leave nothing running or queued in the engine,
  and their aborts reached it (fewer tokens generated than the requests asked for); the router serves the same
  greedy answer afterwards; and vLLM's own benchmark client (`vllm bench serve`,
  benchmarks/vllm_bench_serve.sh) completes every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import free_port
from openai_servers import (
    expert_pool,
    gateway_args,
    reference_args,
    router_args,
    start_server,
    stop_server,
    vllm_flags,
    wait_ready,
)

from expertmesh.core import settings
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.experts.replica import ExpertServer
from expertmesh.router.counters import RoutedTokenCounters

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
MODEL = "demo"
PROMPTS = ["Speak, my lord.", "What news from Rome?", "Good morrow, sweet queen."]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "alive": {"type": "boolean"}},
    "required": ["name", "alive"],
    "additionalProperties": False,
}
VLLM_FLAGS = vllm_flags(MODEL)


@pytest.fixture(scope="module")
def pool():
    """A real directory and one real ExpertServer holding every routed expert of the demo model."""
    with expert_pool(DEMO) as pool:
        yield pool


@pytest.fixture(scope="module")
def servers(pool, tmp_path_factory):
    """(router URL, vLLM reference URL, counters file, router metrics port), both servers started side by side."""
    directory, _server = pool
    logs = tmp_path_factory.mktemp("openai-frontend")
    counters_file = str(logs / "routed-tokens.npy")
    router_port, reference_port, metrics_port = free_port(), free_port(), free_port()
    # the router's own settings come from its flags; the reference must not load the plugin in remote mode
    env = settings.child_env({"EXPERTMESH_EXPERT_MODE": "local"})
    more = ("--counters-file", counters_file, "--router-metrics-port", str(metrics_port), *VLLM_FLAGS)
    router = start_server(router_args(DEMO, directory, router_port, *more), logs / "router.log", env)
    reference = start_server(reference_args(DEMO, reference_port, *VLLM_FLAGS), logs / "reference.log", env)
    try:
        router_url, reference_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{reference_port}"
        wait_ready(router_url, router, logs / "router.log")
        wait_ready(reference_url, reference, logs / "reference.log")
        yield router_url, reference_url, counters_file, metrics_port
    finally:
        stop_server(router)
        stop_server(reference)


def _chat(url: str, content: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body | extra, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _metric(text: str, name: str) -> float:
    """Sum of every sample of `name` in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_greedy_chat_equals_vllm_local_and_experts_were_remote(servers, pool):
    router_url, reference_url, counters_file, metrics_port = servers
    _directory, replica = pool
    before = RoutedTokenCounters.open(counters_file).snapshot().sum()
    for prompt in PROMPTS:
        ours, theirs = _chat(router_url, prompt), _chat(reference_url, prompt)
        assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"], prompt
        assert ours["usage"] == theirs["usage"]
        assert ours["usage"]["completion_tokens"] > 0

    # The engine core (a child of the router) counted the routed tokens into the file this process reads:
    # top-2 of 8 experts, every MoE layer, every prompt and generated token.
    counters = RoutedTokenCounters.open(counters_file)
    info = read_moe_info(DEMO)
    assert counters.layers == list(info.moe_layers)
    assert counters.snapshot().sum() > before
    # ... and the replica in this process computed every one of them: its per-(layer, expert) counts are the router's.
    computed = replica_tokens(replica)
    for row, layer in enumerate(counters.layers):
        for expert, count in enumerate(counters.snapshot()[row]):
            assert computed.get((layer, expert), 0.0) == float(count), (layer, expert)

    # The dispatcher's metrics: served by the engine-core process itself, and re-exported in the router's /metrics.
    engine_core = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    router_metrics = httpx.get(f"{router_url}/metrics", timeout=10).text
    for page in (engine_core, router_metrics):
        assert _metric(page, "expertmesh_dispatch_seconds_count") > 0
        assert _metric(page, "expertmesh_routed_tokens_total") == float(counters.snapshot().sum())
    assert "vllm:" in router_metrics  # vLLM's own metrics are still there
    assert httpx.get(f"{router_url}/expertmesh/counters", timeout=10).json()["total"] == int(counters.snapshot().sum())


def replica_tokens(replica: ExpertServer) -> dict[tuple[int, int], float]:
    """(layer, expert) -> routed tokens the in-process replica computed (its own Prometheus counters)."""
    from prometheus_client.parser import text_string_to_metric_families

    tokens = {}
    for family in text_string_to_metric_families(replica.metrics.text()):
        for sample in family.samples:
            if sample.name == "expertmesh_replica_expert_tokens_total":
                key = (int(sample.labels["layer"]), int(sample.labels["expert"]))
                tokens[key] = tokens.get(key, 0.0) + sample.value
    return tokens


def test_response_format_json_schema_is_valid(servers):
    router_url = servers[0]
    for prompt in PROMPTS:
        reply = _chat(
            router_url,
            prompt,
            max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}},
        )
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


# ---- the proxy ---------------------------------------------------------------------------------------------------


def _refusing_url() -> str:
    """A loopback URL nothing listens on (bound then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Uvicorn:
    """A uvicorn server for an app in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _sse_events(url: str, body: dict) -> tuple[str, list[dict]]:
    """(content-type, the events' JSON with the per-request fields id/created removed) of a streamed chat."""
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        content_type = reply.headers["content-type"]
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                events.append({"done": True})
                continue
            event = json.loads(data)
            event.pop("id", None)
            event.pop("created", None)
            events.append(event)
    return content_type, events


def test_proxy_streams_sse_unchanged_and_skips_a_dead_router(servers):
    from expertmesh.core.settings import GatewaySettings
    from expertmesh.gateway.app import create_app

    router_url = servers[0]
    dead = _refusing_url()
    app = create_app([dead, router_url], settings=GatewaySettings(router_cooldown_s=60, api_keys=[]))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": True,  # vLLM's extension: exactly max_tokens, so the usage is known
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with _Uvicorn(app) as proxy_url:
        direct_type, direct = _sse_events(router_url, body)
        for _ in range(2):  # the first goes to the dead router first (round robin of equals), then is retried
            proxy_type, proxied = _sse_events(proxy_url, body)
            assert proxy_type == direct_type
            assert direct_type.startswith("text/event-stream")
            assert proxied == direct
        assert direct[-1] == {"done": True} and direct[-2]["usage"]["completion_tokens"] == 16
        routers = {r["url"]: r for r in httpx.get(f"{proxy_url}/proxy/routers", timeout=10).json()["routers"]}
        assert routers[dead]["failures"] == 1 and not routers[dead]["up"]  # refused once, then cooled down
        assert routers[router_url]["requests"] == 2 and routers[router_url]["in_flight"] == 0

        # non-streamed JSON passes through too, with the router's status codes (a 404 model stays a 404)
        plain = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
        ok = httpx.post(f"{proxy_url}/v1/chat/completions", json=plain, timeout=120)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 16
        missing = httpx.post(f"{proxy_url}/v1/chat/completions", json=plain | {"model": "nope"}, timeout=60)
        assert missing.status_code == 404 and "error" in missing.json()

    with _Uvicorn(create_app([_refusing_url(), _refusing_url()], api_keys=[])) as proxy_url:
        reply = httpx.post(f"{proxy_url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        error = reply.json()["error"]
        assert error["code"] == "no_router_available" and error["type"] == "server_error"


# ---- the gateway as its CLI runs it: disconnects under load, vLLM's benchmark client -------------------------------


@pytest.fixture(scope="module")
def gateway(servers, tmp_path_factory):
    """URL of the gateway as a user starts it (`python -m expertmesh.gateway.app --router URL`), in front of the
    module's router."""
    router_url = servers[0]
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    port = free_port()
    env = settings.child_env()
    env.pop("EXPERTMESH_API_KEYS", None)  # open, whatever the shell running the tests has
    proc = start_server(gateway_args([router_url], port), log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, timeout_s=60)
        yield url
    finally:
        stop_server(proc)


# The storm: enough streams that disconnects land at every stage of a request (in the gateway before the router
# answered, in the router before the engine has it, queued, mid-decode), at a concurrency that keeps the engine's
# batch full; every stream asks for exactly STORM_TOKENS tokens (ignore_eos), so the work a full run would cost is
# known and the work the aborts saved can be measured.
STORM_STREAMS = 240
STORM_CONCURRENCY = 48
STORM_TOKENS = 96
DRAIN_TIMEOUT_S = 30


@dataclass(frozen=True)
class _Disconnect:
    """Where one stream of the storm leaves: `before_s` seconds after sending (before the first byte), or once
    `after_tokens` completion tokens arrived, or never (both None: read to the end)."""

    before_s: float | None = None
    after_tokens: int | None = None


@dataclass
class _StreamOutcome:
    plan: _Disconnect
    tokens: int = 0  # completion tokens received (vLLM's continuous usage stats)
    done: bool = False  # the stream ended with data: [DONE]
    finish_reason: str | None = None


def _storm_plans(seed: int) -> list[_Disconnect]:
    """A fifth of the streams leave before the first byte, three tenths after 0-8 tokens (0: right after the
    headers), three tenths mid-way, a fifth read to the end; seeded, so a failure replays."""
    rng = random.Random(seed)
    plans = []
    for _ in range(STORM_STREAMS):
        draw = rng.random()
        if draw < 0.2:
            plans.append(_Disconnect(before_s=rng.uniform(0.0, 0.05)))
        elif draw < 0.5:
            plans.append(_Disconnect(after_tokens=rng.randint(0, 8)))
        elif draw < 0.8:
            plans.append(_Disconnect(after_tokens=rng.randint(STORM_TOKENS // 4, STORM_TOKENS // 2)))
        else:
            plans.append(_Disconnect())
    return plans


async def _storm_stream(client: httpx.AsyncClient, url: str, prompt: str, plan: _Disconnect) -> _StreamOutcome:
    """One streamed chat that leaves where `plan` says (leaving the `stream` block closes the connection)."""
    outcome = _StreamOutcome(plan)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": STORM_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }

    async def read() -> None:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200, await reply.aread()
            if plan.after_tokens == 0:
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome.done = True
                    return
                event = json.loads(line[len("data: ") :])
                if event.get("usage"):
                    outcome.tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
                if plan.after_tokens is not None and outcome.tokens >= plan.after_tokens:
                    return

    if plan.before_s is None:
        await read()
    else:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(read(), plan.before_s)
    return outcome


async def _storm(url: str, plans: list[_Disconnect]) -> list[_StreamOutcome]:
    """Every plan's stream through `url`, at most STORM_CONCURRENCY at a time."""
    slots = asyncio.Semaphore(STORM_CONCURRENCY)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=STORM_CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(i: int, plan: _Disconnect) -> _StreamOutcome:
            async with slots:
                return await _storm_stream(client, url, f"{PROMPTS[i % len(PROMPTS)]} ({i})", plan)

        return await asyncio.gather(*(one(i, plan) for i, plan in enumerate(plans)))


def _proxied_requests(gateway_url: str) -> tuple[int, int]:
    """(requests the gateway sent to its router, requests in flight there) from /proxy/routers."""
    (router,) = httpx.get(f"{gateway_url}/proxy/routers", timeout=10).json()["routers"]
    return router["requests"], router["in_flight"]


def test_disconnect_storm_through_the_gateway_leaves_nothing_running(servers, gateway):
    """Issue 16: clients that go away at random points under load never stop the engine; afterwards nothing is
    left running or queued in it, the gateway holds nothing in flight, and the stack serves as before."""
    router_url = servers[0]
    greedy_before = _chat(gateway, PROMPTS[1])
    metrics_before = httpx.get(f"{router_url}/metrics", timeout=10).text
    sent_before, _ = _proxied_requests(gateway)

    started = time.monotonic()
    outcomes = asyncio.run(_storm(gateway, _storm_plans(seed=16)))
    storm_s = time.monotonic() - started

    # The streams read to the end are whole: every token, finish_reason length, then [DONE].
    full = [o for o in outcomes if o.plan == _Disconnect()]
    assert len(full) >= STORM_STREAMS // 10
    for outcome in full:
        assert outcome.done and outcome.tokens == STORM_TOKENS and outcome.finish_reason == "length", outcome
    left = [o for o in outcomes if o.plan != _Disconnect()]
    assert not any(o.done for o in left)
    assert sum(o.tokens == 0 for o in left) >= STORM_STREAMS // 10  # many left before any token arrived

    # Every request is gone from the engine, soon: vLLM's own gauges (queued and running) come back to 0.
    storm_ended = time.monotonic()
    deadline = storm_ended + DRAIN_TIMEOUT_S
    while True:
        metrics_after = httpx.get(f"{router_url}/metrics", timeout=10).text
        running = _metric(metrics_after, "vllm:num_requests_running")
        waiting = _metric(metrics_after, "vllm:num_requests_waiting")
        sent_after, in_flight = _proxied_requests(gateway)
        if running == waiting == in_flight == 0:
            break
        assert time.monotonic() < deadline, f"after {DRAIN_TIMEOUT_S} s: {running=} {waiting=} {in_flight=}"
        time.sleep(0.2)
    drain_s = time.monotonic() - storm_ended

    # The disconnects reached the engine as aborts: had they not, every request the gateway sent would have run to
    # its STORM_TOKENS tokens (ignore_eos). The engine made at least what the clients read, and the aborts saved
    # at least half of what they could (what was sent times STORM_TOKENS, less what clients read).
    generated = _metric(metrics_after, "vllm:generation_tokens_total") - _metric(
        metrics_before, "vllm:generation_tokens_total"
    )
    read = sum(o.tokens for o in outcomes)
    unaborted = (sent_after - sent_before) * STORM_TOKENS
    print(f"storm {storm_s:.1f} s, drained in {drain_s:.1f} s; tokens: {read=} {generated=} {unaborted=}")
    assert read <= generated
    assert unaborted - generated >= 0.5 * (unaborted - read)

    # The stack still serves, the same greedy answer as before, from the same router process (never restarted).
    greedy_after = _chat(gateway, PROMPTS[1])
    assert greedy_after["choices"][0]["message"] == greedy_before["choices"][0]["message"]
    assert greedy_after["usage"] == greedy_before["usage"]
    assert httpx.get(f"{router_url}/health", timeout=10).status_code == 200
    assert _metric(metrics_after, "process_start_time_seconds") == _metric(metrics_before, "process_start_time_seconds")


def test_vllm_bench_serve_through_the_gateway(gateway, tmp_path):
    """vLLM's own benchmark client (`vllm bench serve`, as benchmarks/vllm_bench_serve.sh runs it) against the
    gateway: every request completes with all its tokens, and they went through the gateway."""
    sent_before, _ = _proxied_requests(gateway)
    prompts, concurrency, tokens = 16, 4, 16
    sizes = {"RUNS": f"{prompts}:{concurrency}", "INPUT_LEN": tokens, "OUTPUT_LEN": tokens}
    env = settings.child_env(sizes | {"RESULT_DIR": tmp_path, "LABEL": "test", "PYTHON": sys.executable})
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_bench_serve.sh"
    run = subprocess.run(
        ["bash", str(script), gateway, str(DEMO)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    result = json.loads((tmp_path / f"test-in{tokens}-out{tokens}-n{prompts}-c{concurrency}.json").read_text())
    assert result["num_prompts"] == result["completed"] == prompts, result
    assert result["failed"] == 0
    assert result["total_output_tokens"] == prompts * tokens  # EOS ignored: every token asked for
    assert result["max_concurrency"] == concurrency
    assert result["model_id"] == str(DEMO)  # the model the router lists, read through the gateway
    assert _proxied_requests(gateway)[0] - sent_before >= prompts
