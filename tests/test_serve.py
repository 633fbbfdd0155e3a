"""End to end through `expertmesh serve` (a real subprocess on the demo model: Ray + expert pool, vLLM's own OpenAI
server as the router with the expertmesh plugin, the gateway's streaming proxy in front of it, the controller), with
the official `openai` SDK through the gateway and API keys on:

- greedy chat gives the same text twice; streaming gives the same text and usage; `response_format` json_schema
  output validates against the schema (vLLM options after `--` reached vLLM's parser: the structured-outputs
  backend, the model length);
- an unknown model gets vLLM's own 404 error body through the proxy; a request without a key gets the gateway's 401;
- /health reports every expert covered; /experts shows routed tokens > 0 (the router's counters: tokens the
  dispatcher sent to the pool's replicas) and the controller read the same counters (tokens/s > 0 in its history);
- the router SIGKILLed: serve restarts it, the gateway answers 503 + Retry-After meanwhile, then the same text;
- the only expert replica SIGKILLed under 64 greedy streams: all complete with the undisturbed text, and no client
  waits 3 s between two tokens (the router computes the experts itself until the replacement registers);
- Ctrl-C stops everything: no process of the stack is left, the gateway is gone.

Parity with vLLM's own server is tests/test_openai_frontend.py's job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import ctrl_c_leaves_nothing, descendants, free_port, running_serve, serve_flags

from expertmesh.core.checkpoint import read_moe_info

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
KEY = "serve-vllm-test-key"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "alive": {"type": "boolean"}},
    "required": ["name", "alive"],
    "additionalProperties": False,
}
VLLM_OPTIONS = [
    "--max-model-len",
    "512",
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
    "--disable-uvicorn-access-log",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "EXPERTMESH_API_KEYS": KEY,
            # read often; never regroup or scale the demo's experts during the test (that is test_stack.py's job)
            "EXPERTMESH_CONTROLLER_SETTINGS": json.dumps(
                {"interval_s": 1.0, "window_s": 4.0, "imbalance_threshold": 1e9, "hot_expert_skew": 1e9}
            ),
            "HOME": str(work),  # logs and pool state files land in the test's own directory
            # ... but vLLM keeps its own cache (its model inspection of the architecture, seconds to minutes)
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm"),
        }
    )
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(DEMO), *serve_flags(port)]
    cmd += ["--", *VLLM_OPTIONS]
    with running_serve(cmd, env, work, 300, "expertmesh serve") as (proc, _curl):
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "work": work}


def _client(stack, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=stack["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_chat_greedy_streaming_and_json_schema_through_the_gateway(stack):
    client = _client(stack)
    assert [m.id for m in client.models.list().data] == ["demo"]
    messages = [{"role": "user", "content": "Speak, my lord."}]
    first, second = (
        client.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0) for _ in range(2)
    )
    text = first.choices[0].message.content
    assert text and text == second.choices[0].message.content
    assert 1 <= first.usage.completion_tokens <= 16
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 2  # relayed as events, not one body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == first.usage.prompt_tokens

    structured = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Name a king, and whether he lives."}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "king", "schema": SCHEMA, "strict": True}},
    )
    jsonschema.validate(json.loads(structured.choices[0].message.content), SCHEMA)


def test_errors_unknown_model_is_vllms_404_and_keys_are_required(stack):
    import openai

    client = _client(stack)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    reply = httpx.post(
        stack["url"] + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=_auth(),
        timeout=30,
    )
    assert reply.status_code == 404
    error = reply.json()["error"]
    # vLLM's own error shape, relayed unchanged
    assert error["type"] == "NotFoundError" and error["code"] == 404 and error["param"] == "model", error
    assert "no-such-model" in error["message"]

    with pytest.raises(openai.AuthenticationError):
        _client(stack, key="wrong").models.list()
    unauth = httpx.get(stack["url"] + "/experts", timeout=10)
    assert unauth.status_code == 401


def test_health_experts_and_controller_read_the_routers_counters(stack):
    info = read_moe_info(DEMO)
    health = httpx.get(stack["url"] + "/health", timeout=10)
    assert health.status_code == 200, health.text
    assert health.json()["routers"][0]["missing_experts"] == 0

    client = _client(stack)
    client.completions.create(model="demo", prompt="To be, or not to be", max_tokens=8, temperature=0)
    body = httpx.get(stack["url"] + "/experts", headers=_auth(), timeout=10).json()
    rows = body["experts"]
    assert {(r["layer"], r["expert"]) for r in rows} == {
        (layer, e) for layer in info.moe_layers for e in range(info.num_experts)
    }
    assert all(r["replicas"] >= 1 for r in rows), rows  # the pool's replicas hold every routed expert
    # The counters count what the dispatcher sent to the replicas over gRPC: top-k assignments per token per layer,
    # every layer saw tokens. In remote mode nothing else computes routed experts, so the replicas did the work.
    per_layer = {layer: sum(r["routed_tokens"] for r in rows if r["layer"] == layer) for layer in info.moe_layers}
    assert all(n > 0 for n in per_layer.values()), per_layer
    assert len(set(per_layer.values())) == 1  # each token goes to top_k experts of every MoE layer
    assert next(iter(per_layer.values())) % info.top_k == 0

    # The controller reads the same counters over the router's /expertmesh/counters: tokens/s > 0 shows up.
    deadline = time.monotonic() + 30
    seen = 0.0
    while time.monotonic() < deadline and seen <= 0:
        client.completions.create(model="demo", prompt="Once more unto the breach", max_tokens=8, temperature=0)
        controller = httpx.get(stack["url"] + "/experts", headers=_auth(), timeout=10).json()["controller"] or {}
        seen = max((h["tokens_per_s"] for h in controller.get("history", [])), default=0.0)
    assert seen > 0, controller
    metrics = httpx.get(stack["url"] + "/metrics", timeout=10).text
    assert "/v1/{path:path}" in metrics  # the gateway counted the proxied requests


def _replica_pids(stack) -> list[int]:
    """The expert replicas' processes of the stack (Ray names them `ray::ServeReplica:<app>:<group>`)."""
    return [
        pid
        for pid in descendants(stack["proc"].pid)
        if "ServeReplica" in _cmdline(pid) and "ExpertDirectory" not in _cmdline(pid)
    ]


async def _streams(url: str, prompts: list[str], max_tokens: int, on_progress=None) -> list[dict]:
    """Stream a greedy completion per prompt, all at once: per prompt {"text", "gap": the longest wait between two
    chunks in s, "tokens": completion tokens by the final usage, "done": whether [DONE] came}."""
    import asyncio

    async def one(client, prompt: str) -> dict:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        text, gap, last, done, tokens = [], 0.0, None, False, None
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=_auth()) as reply:
            assert reply.status_code == 200, await reply.aread()
            async for line in reply.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if not event["choices"]:
                    continue
                now = time.monotonic()
                gap, last = (max(gap, now - last) if last is not None else 0.0), now
                text.append(event["choices"][0]["text"])
                if on_progress is not None:
                    on_progress()
        return {"text": "".join(text), "gap": gap, "tokens": tokens, "done": done}

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


def test_killing_the_only_replica_under_64_streams_loses_nothing(stack):
    """SIGKILL the demo's only expert replica while 64 greedy streams run: every stream completes with the text of
    an undisturbed run, and no client waits more than 3 s between two tokens (the router computes the experts
    itself until Serve's replacement registers: router/fallback.py)."""
    import asyncio
    import signal
    import threading

    names = ["lord", "queen", "fool", "friend"]
    prompts = [f"Request {i}: what news from Rome, good {names[i % 4]}?" for i in range(64)]
    undisturbed = asyncio.run(_streams(stack["url"], prompts, 32))
    replicas = _replica_pids(stack)
    assert len(replicas) == 1, replicas  # the demo's default plan: one replica holds every routed expert
    chunks = {"n": 0}
    killed = threading.Event()

    def kill_once_streaming():
        chunks["n"] += 1
        if chunks["n"] == 64 * 4 and not killed.is_set():  # every stream a few tokens in, on average
            killed.set()
            os.kill(replicas[0], signal.SIGKILL)

    disturbed = asyncio.run(_streams(stack["url"], prompts, 32, kill_once_streaming))
    assert killed.is_set()
    assert all(r["done"] for r in disturbed)
    assert [r["text"] for r in disturbed] == [r["text"] for r in undisturbed]
    longest = max(r["gap"] for r in disturbed)
    assert longest < 3.0, f"a client waited {longest:.1f} s between two tokens"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_killed_router_is_restarted_and_the_gateway_answers_503_meanwhile(stack):
    """SIGKILL the router (vLLM's API server process): `expertmesh serve` stays up, its gateway answers 503 with
    Retry-After while the router is down, what the router left behind (engine core, worker) is gone, and a new
    router serves the same greedy text."""
    import signal

    body = {"model": "demo", "prompt": "Once more unto the breach", "max_tokens": 8, "temperature": 0}
    url = stack["url"] + "/v1/completions"
    want = httpx.post(url, json=body, headers=_auth(), timeout=60).json()["choices"][0]["text"]
    routers = [p for p in descendants(stack["proc"].pid) if "expertmesh.router.openai_server" in _cmdline(p)]
    assert len(routers) == 1, routers
    left_behind = descendants(routers[0])
    os.kill(routers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (reply := httpx.post(url, json=body, headers=_auth(), timeout=60)).status_code != 503:
        assert time.monotonic() < deadline, (reply.status_code, reply.text)
        time.sleep(0.2)
    assert reply.headers["retry-after"] == "1" and reply.json()["error"]["code"] == "no_router_available"
    deadline = time.monotonic() + 300  # vLLM starts again (tens of seconds on 2 cores)
    while (reply := httpx.post(url, json=body, headers=_auth(), timeout=60)).status_code != 200:
        assert stack["proc"].poll() is None, "expertmesh serve exited"
        assert time.monotonic() < deadline, (reply.status_code, reply.text)
        time.sleep(1)
    assert reply.json()["choices"][0]["text"] == want
    assert not [p for p in left_behind if _cmdline(p)], "the killed router's children are still running"


def test_ctrl_c_lets_streams_in_flight_finish_then_stops_everything(stack):
    """Ctrl-C while 8 streams are mid-way: each still gets all its tokens (the gateway drains before the router
    stops), then nothing of the stack is left."""
    import asyncio
    import threading

    proc = stack["proc"]
    before = descendants(proc.pid)
    assert len(before) >= 4  # router, its engine core, gateway, ray processes at least
    chunks = {"n": 0}
    midway = threading.Event()

    def count():
        chunks["n"] += 1
        if chunks["n"] >= 8 * 8:
            midway.set()

    results: list = []
    prompts = [f"Stream {i} before the curtain falls" for i in range(8)]
    streams = threading.Thread(target=lambda: results.append(asyncio.run(_streams(stack["url"], prompts, 64, count))))
    streams.start()
    assert midway.wait(timeout=120), "the streams did not get going"
    ctrl_c_leaves_nothing(proc, before, stack["url"])
    streams.join(timeout=60)
    assert results, "the streams did not finish"
    # every stream got its 64 tokens (ignore_eos) and its [DONE]: none was cut by the shutdown
    assert [(r["tokens"], r["done"]) for r in results[0]] == [(64, True)] * 8
