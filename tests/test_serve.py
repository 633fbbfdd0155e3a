"""End to end through `expertmesh serve` (a real subprocess on the demo model: Ray + expert pool, vLLM's own OpenAI
server as the router with the expertmesh plugin, the gateway's streaming proxy in front of it, the controller), with
the official `openai` SDK through the gateway and API keys on:

- greedy chat gives the same text twice; streaming gives the same text and usage; `response_format` json_schema
  output validates against the schema (vLLM options after `--` reached vLLM's parser: the structured-outputs
  backend, the model length);
- an unknown model gets vLLM's own 404 error body through the proxy; a request without a key gets the gateway's 401;
- /health reports every expert covered; /experts shows routed tokens > 0 (the router's counters: tokens the
  dispatcher sent to the pool's replicas) and the controller read the same counters (tokens/s > 0 in its history);
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


def test_ctrl_c_stops_everything(stack):
    proc = stack["proc"]
    before = descendants(proc.pid)
    assert len(before) >= 4  # router, its engine core, gateway, ray processes at least
    ctrl_c_leaves_nothing(proc, before, stack["url"])
