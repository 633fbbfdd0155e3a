"""OpenTelemetry for every hop: tracer set-up, trace context over HTTP and gRPC, and the spans of batched engine
steps, which serve many requests at once but belong to one request's trace.

Export is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP/gRPC); otherwise the tracer is OpenTelemetry's
no-op and a span costs a function call. Context crosses processes as W3C `traceparent`: in HTTP headers
(`TraceRequests`, an ASGI middleware) and in gRPC metadata (`inject_metadata` / `extract_metadata`).

One trace per request, across the processes of the serving path:

    gateway   `POST /v1/chat/completions`  (TraceRequests in the gateway; its traceparent goes to the router)
    router    `POST /v1/chat/completions`  (TraceRequests on vLLM's app; vLLM reads the rewritten traceparent
              `llm_request`                 as the request's trace headers and hands them to its engine core,
                                            and emits its own `llm_request` span when the request finishes)
    engine    `forward pass`               (`engine_steps`: the process that runs the model, one batched step)
              `dispatch layer N`           (router/dispatch.py, one per MoE layer of a traced step)
    replica   `expert forward`             (experts/replica.py, parent from the RPC metadata)

A forward pass computes many requests at once: its span is parented to one traced request in the batch
(round-robin), the others are attached as span links. Per-layer detail is sampled: a step is traced when a traced
request is new in the batch (every request's prefill is seen) and otherwise every EXPERTMESH_TRACE_STEP_EVERY-th
step (default 16); see docs/benchmarks.md for what a traced step costs. How the request's trace context reaches
the process that runs the model is router/step_tracing.py's business.

One tracer provider per process and service name (`init_tracing`). vLLM installs OpenTelemetry's global provider
itself in its engine-core and worker processes (before plugins load) when its tracing is on; there expertmesh's
spans keep a provider of their own, so they carry expertmesh's service name.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from expertmesh.core import settings

_lock = threading.Lock()
_provider = None  # expertmesh's TracerProvider in this process (global or private), once init_tracing ran
_tracer: trace.Tracer | None = None


def tracing_enabled() -> bool:
    return bool(settings.otlp_endpoint())


def init_tracing(service_name: str, endpoint: str | None = None, *, install_global: bool = True) -> None:
    """An OTLP-exporting tracer provider for expertmesh's spans in this process, once; a no-op without an endpoint
    (`endpoint`, default OTEL_EXPORTER_OTLP_ENDPOINT).

    The provider becomes OpenTelemetry's global one when `install_global` and none is installed yet; otherwise
    (vLLM's own provider in its engine processes, or a test process that must stay as it was) it stays private to
    `tracer()`, and the spans still carry `service_name`."""
    global _provider, _tracer
    with _lock:
        endpoint = endpoint or settings.otlp_endpoint()
        if _provider is not None or not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
        provider = TracerProvider(resource=resource, id_generator=_urandom_ids())
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=200)
        )
        if install_global and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)
        _provider, _tracer = provider, provider.get_tracer("expertmesh")


def _urandom_ids():
    """Span and trace ids from os.urandom. OpenTelemetry's default draws them from the global `random`, which vLLM
    seeds with the model's seed in its worker processes: ids there repeat (across workers, routers and restarts,
    and with vLLM's own spans), and a span's children get mixed up with unrelated spans."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class UrandomIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            return int.from_bytes(os.urandom(8), "big") or 1

        def generate_trace_id(self) -> int:
            return int.from_bytes(os.urandom(16), "big") or 1

    return UrandomIds()


def shutdown_tracing() -> None:
    """Flush and stop expertmesh's provider (call before a process exits); `tracer()` is the global one after."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return _tracer or trace.get_tracer("expertmesh")


# ---- context over the wire ---------------------------------------------------------------------------------


def inject_metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """The current (or given) trace context as gRPC metadata pairs (empty when nothing is traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_metadata(metadata) -> otel_context.Context:
    """Trace context from gRPC invocation metadata (a sequence of (key, value) pairs)."""
    return propagate.extract({k: v for k, v in (metadata or ()) if isinstance(v, str)})


def sampled_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The trace context of W3C headers ({"traceparent": ..., ...}) when they carry a sampled one, else None."""
    if not headers or "traceparent" not in headers:
        return None
    ctx = propagate.extract(headers)
    span_context = trace.get_current_span(ctx).get_span_context()
    return ctx if span_context.is_valid and span_context.trace_flags.sampled else None


class TraceRequests:
    """ASGI middleware: a SERVER span `METHOD /path` per HTTP request under `prefixes`, parented to the request's
    own `traceparent` (a client's, or the hop before), and current while the app runs (the whole answer, streamed
    or not). The request's `traceparent`/`tracestate` headers are replaced by this span's before the app sees them,
    so whatever the app forwards (the gateway's proxy) or hands on (vLLM's trace headers) continues this span."""

    def __init__(self, app, prefixes: tuple[str, ...] = ("/v1/",)):
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        incoming = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        span = tracer().start_span(
            f"{method} {path}",
            context=propagate.extract(incoming),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        if carrier:  # (nothing when tracing is off: the incoming context then passes through untouched)
            replaced = {k.encode("latin-1") for k in carrier}
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in replaced]
            headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]
            scope = dict(scope, headers=headers)

        async def send_traced(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
                await self.app(scope, receive, send_traced)
        finally:
            span.end()


# ---- batched engine steps ----------------------------------------------------------------------------------


class StepTracer:
    """Spans of the batched steps of the process that runs the model, in the traces of the requests they serve.

    The engine tells it which traced requests exist (`add`, with their W3C headers; `remove` when they finish) and
    wraps each forward pass in `step(batch)`; inside a sampled step, `layer_parent()` is the context the per-layer
    spans nest under (None elsewhere: no per-layer span)."""

    def __init__(self, every: int | None = None, name: str = "forward pass") -> None:
        self.every = every or settings.trace_step_every()
        self.name = name
        self._contexts: dict[str, otel_context.Context] = {}  # request id -> its sampled trace context
        self._lock = threading.Lock()
        self._steps = 0
        self._turn = itertools.count()
        self._current: contextvars.ContextVar[otel_context.Context | None] = contextvars.ContextVar(
            "expertmesh_step", default=None
        )

    def add(self, request_id: str, headers: Mapping[str, str] | None) -> bool:
        """Register a request's trace context (only a sampled one is kept); True if it was kept."""
        ctx = sampled_context(headers)
        if ctx is not None:
            with self._lock:
                self._contexts[request_id] = ctx
        return ctx is not None

    def remove(self, request_ids: Iterable[str]) -> None:
        if not self._contexts:
            return
        with self._lock:
            for request_id in request_ids:
                self._contexts.pop(request_id, None)

    @property
    def traced_requests(self) -> int:
        return len(self._contexts)

    def _parent(self, batch: Iterable[str], arrived: bool) -> tuple[otel_context.Context, list[trace.Link]] | None:
        """(parent, links) when this step is sampled and has a traced request, else None."""
        with self._lock:
            if not self._contexts:
                return None
            self._steps += 1
            if not arrived and self._steps % self.every:
                return None
            ctxs = [c for c in map(self._contexts.get, batch) if c is not None]
        if not ctxs:
            return None
        first = next(self._turn) % len(ctxs)
        links = [trace.Link(trace.get_current_span(c).get_span_context()) for i, c in enumerate(ctxs) if i != first]
        return ctxs[first], links

    @contextlib.contextmanager
    def step(self, batch: Iterable[str], *, arrived: bool = False, attributes: Mapping[str, int] | None = None):
        """Around one forward pass over the requests `batch` (ids); `arrived`: a traced request is new in it.
        A span (and per-layer spans inside) only when the step is sampled and a traced request is in the batch."""
        chosen = self._parent(batch, arrived)
        if chosen is None:
            yield None
            return
        parent, links = chosen
        attrs = dict(attributes or {}, **{"expertmesh.traced_requests": len(links) + 1})
        span = tracer().start_span(self.name, context=parent, links=links, attributes=attrs)
        token = self._current.set(trace.set_span_in_context(span))
        try:
            with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
                yield span
        finally:
            self._current.reset(token)

    def layer_parent(self) -> otel_context.Context | None:
        """The context of the sampled step running in this thread (per-layer spans nest under it), else None."""
        return self._current.get()


# The process that runs the model: router/step_tracing.py feeds it, router/dispatch.py reads `layer_parent()`.
engine_steps = StepTracer()
