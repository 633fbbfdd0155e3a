"""One request, one trace, across every process of the serving path: the gateway's proxy, the router (vLLM's own
OpenAI server), the vLLM process that runs the model with the expertmesh plugin, and the expert replica.

Real parts, on loopback: a real OTLP/gRPC receiver (otlp_collector.py) that every process exports to; a real
expert directory and ExpertServer in this process (its spans exported from here, as `expertmesh-experts`); the
router as a subprocess (vLLM's AsyncLLM: engine core and model worker are its children) and the gateway as a
subprocess, both with OTEL_EXPORTER_OTLP_ENDPOINT pointing at the receiver.

- a request without trace context: the replica's `expert forward` span walks up, parent by parent, through
  `dispatch layer N` and `forward pass` (the model's process), the router's request span and the gateway's root
  span, all in one trace; the traced step has one dispatch span per MoE layer of the model, and vLLM's own
  `llm_request` span hangs under the router's span;
- a request that brings a client `traceparent`: the gateway's span is its child (same trace id), and the router's
  span is the gateway span's child, not the client's (the gateway forwards its own context);
- (fast, no vLLM) the sampling rule of forward-pass spans, on telemetry.StepTracer alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from openai_servers import expert_pool, gateway_args, router_args, start_server, stop_server, vllm_flags, wait_ready
from otlp_collector import Collector

from expertmesh.core import settings, telemetry
from expertmesh.core.checkpoint import read_moe_info

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
MODEL = "demo"
SPANS_TIMEOUT_S = 30
CHAT = "POST /v1/chat/completions"
VLLM_FLAGS = vllm_flags(MODEL)


def _traceparent(sampled: bool = True) -> tuple[dict[str, str], bytes]:
    """W3C headers of a new remote span, and its span id."""
    trace_id, span_id = os.urandom(16), os.urandom(8)
    return {"traceparent": f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"}, span_id


def test_forward_pass_spans_follow_the_sampling_rule():
    """telemetry.StepTracer alone (what step_tracing.py drives in the model's process): a step is traced when a
    traced request is new in it, else every `every`-th step; its parent is one traced request of the batch in turn,
    the others are links; unsampled or finished requests never make a step traced; per-layer spans only inside."""
    receiver = Collector()
    telemetry.init_tracing("expertmesh-test", receiver.endpoint, install_global=False)
    try:
        steps = telemetry.StepTracer(every=4)
        (a, a_id), (b, b_id) = _traceparent(), _traceparent()
        assert steps.add("a", a) and steps.add("b", b)
        assert not steps.add("unsampled", _traceparent(sampled=False)[0]) and not steps.add("plain", None)
        spans = []
        for i in range(8):
            with steps.step(["a", "unsampled", "b", "plain"], arrived=i == 0) as span:
                assert (steps.layer_parent() is not None) == (span is not None)
                spans.append(span)
        assert steps.layer_parent() is None
        assert [s is not None for s in spans] == [True, False, False, True, False, False, False, True]
        traced = [s for s in spans if s is not None]
        assert [s.parent.span_id.to_bytes(8, "big") for s in traced] == [a_id, b_id, a_id]
        assert [[link.context.span_id.to_bytes(8, "big") for link in s.links] for s in traced] == [
            [b_id],
            [a_id],
            [b_id],
        ]
        steps.remove(["a", "b"])
        with steps.step(["a", "b"], arrived=True) as span:
            assert span is None and steps.layer_parent() is None
    finally:
        telemetry.shutdown_tracing()
        receiver.stop()


@pytest.fixture(scope="module")
def collector():
    receiver = Collector()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def pool(collector):
    """The directory address of a real directory and one real ExpertServer holding every routed expert of the demo
    model, whose spans this process exports to `collector` (a provider of its own: OpenTelemetry's global one stays
    as the session had it)."""
    telemetry.init_tracing("expertmesh-experts", collector.endpoint, install_global=False)
    try:
        with expert_pool(DEMO) as (address, _replica):
            yield address
    finally:
        telemetry.shutdown_tracing()


@pytest.fixture(scope="module")
def gateway(pool, collector, tmp_path_factory):
    """The gateway's URL: gateway (subprocess) -> router (subprocess, remote experts) -> the pool above, every
    process exporting its spans to `collector`."""
    logs = tmp_path_factory.mktemp("trace-vllm-frontend")
    env = settings.child_env({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint})
    router_port, gateway_port = free_port(), free_port()
    router_url, gateway_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{gateway_port}"
    more = ("--counters-file", str(logs / "routed-tokens.npy"), "--router-metrics-port", "0", *VLLM_FLAGS)
    router = start_server(router_args(DEMO, pool, router_port, *more), logs / "router.log", env)
    procs = [router]
    try:
        wait_ready(router_url, router, logs / "router.log")
        procs.append(start_server(gateway_args([router_url], gateway_port), logs / "gateway.log", env))
        wait_ready(gateway_url, procs[-1], logs / "gateway.log", path="/health")
        yield gateway_url
    finally:
        for proc in reversed(procs):
            stop_server(proc)


def _chat(url: str, content: str, headers: dict[str, str] | None = None) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 4}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0


def _wait_for(collector: Collector, found) -> list:
    """Spans received so far, once `found(spans)` is true or SPANS_TIMEOUT_S passed (the caller asserts)."""
    deadline = time.monotonic() + SPANS_TIMEOUT_S
    while not found(spans := collector.snapshot()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return spans


def _chains_up(spans: list, start: str) -> list[list[tuple[str, object]]]:
    """From every span named `start`, the (service, span) chain up through its parents, as far as they arrived."""
    by_id = {s.span_id: (svc, s) for svc, s in spans}
    chains = []
    for svc, s in spans:
        if s.name != start:
            continue
        chain = [(svc, s)]
        while chain[-1][1].parent_span_id in by_id:
            chain.append(by_id[chain[-1][1].parent_span_id])
        chains.append(chain)
    return chains


def _children(spans: list, parent) -> list[tuple[str, object]]:
    return [(svc, s) for svc, s in spans if s.parent_span_id == parent.span_id]


def _attribute(span, key: str):
    value = next(a.value for a in span.attributes if a.key == key)
    return getattr(value, value.WhichOneof("value"))


def _to_gateway_root(spans: list) -> list[list[tuple[str, object]]]:
    """Chains from a replica span that end at a gateway root span."""
    return [
        c
        for c in _chains_up(spans, "expert forward")
        if c[-1][0] == "expertmesh-gateway" and c[-1][1].name == CHAT and not c[-1][1].parent_span_id
    ]


@pytest.mark.slow
def test_one_request_is_one_trace_from_gateway_to_expert_replica(gateway, collector):
    moe_layers = read_moe_info(DEMO).moe_layers
    _chat(gateway, "Speak, my lord.")

    def whole(spans) -> bool:  # a full chain, every layer of its forward pass, and vLLM's request span
        chains = _to_gateway_root(spans)
        return (
            bool(chains)
            and len(_children(spans, chains[0][2][1])) == len(moe_layers)
            and any(s.name == "llm_request" and s.trace_id == chains[0][0][1].trace_id for _, s in spans)
        )

    spans = _wait_for(collector, whole)
    chains = _to_gateway_root(spans)
    assert chains, f"no replica span connects to a gateway root span; names: {sorted({s.name for _, s in spans})}"
    chain = chains[0]
    names = [s.name for _, s in chain]
    services = [svc for svc, _ in chain]
    assert names[0] == "expert forward" and names[1].startswith("dispatch layer "), names
    assert names[2:] == ["forward pass", CHAT, CHAT], names
    # four processes: this one (the replica), the model's vLLM worker, the router's API server, the gateway
    assert services == [
        "expertmesh-experts",
        "expertmesh-engine",
        "expertmesh-engine",
        "expertmesh-router",
        "expertmesh-gateway",
    ], services
    trace_id = chain[0][1].trace_id
    assert {s.trace_id for _, s in chain} == {trace_id}
    in_trace = [(svc, s) for svc, s in spans if s.trace_id == trace_id]
    # one request: one gateway span and one router span in its trace
    assert [svc for svc, s in in_trace if s.name == CHAT].count("expertmesh-gateway") == 1
    assert [svc for svc, s in in_trace if s.name == CHAT].count("expertmesh-router") == 1
    # the traced forward pass dispatched every MoE layer of the model, each layer's span under it
    forward_pass = chain[2][1]
    layers = sorted(_attribute(s, "expertmesh.layer") for _, s in _children(spans, forward_pass))
    assert layers == moe_layers
    # vLLM's own request span (made in the router when the request finished) is in the same trace, under the
    # router's request span
    router_span = chain[3][1]
    assert [(svc, s.name) for svc, s in _children(spans, router_span) if s.name == "llm_request"] == [
        ("expertmesh-router", "llm_request")
    ]


@pytest.mark.slow
def test_a_client_traceparent_is_the_parent_of_the_gateway_span(gateway, collector):
    trace_id, client_span_id = os.urandom(16), os.urandom(8)
    _chat(gateway, "What news from Rome?", headers={"traceparent": f"00-{trace_id.hex()}-{client_span_id.hex()}-01"})

    def arrived(spans) -> bool:  # the replica's span and both request spans (they end last, with the answer)
        named = {(svc, s.name) for svc, s in spans if s.trace_id == trace_id}
        return {
            ("expertmesh-experts", "expert forward"),
            ("expertmesh-gateway", CHAT),
            ("expertmesh-router", CHAT),
        } <= named

    in_trace = [(svc, s) for svc, s in _wait_for(collector, arrived) if s.trace_id == trace_id]
    named = {(svc, s.name): s for svc, s in in_trace}
    assert arrived(in_trace), sorted(named)
    gateway_span, router_span = named["expertmesh-gateway", CHAT], named["expertmesh-router", CHAT]
    assert gateway_span.parent_span_id == client_span_id  # the client's context is the parent...
    assert router_span.parent_span_id == gateway_span.span_id  # ...and the router continues the gateway's span
    forward_passes = [s for svc, s in in_trace if s.name == "forward pass"]
    assert forward_passes and all(s.parent_span_id == router_span.span_id for s in forward_passes)
