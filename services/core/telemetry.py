"""OpenTelemetry for every hop: tracer set-up, trace context in gRPC metadata, and the request registry
that lets batched model code (which serves many requests per step) parent its spans to a request's trace.

Export is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP/gRPC); otherwise the global tracer is
OpenTelemetry's no-op and a span costs a function call. Context crosses processes as W3C `traceparent`
in gRPC metadata (`inject_metadata` on the client, `extract_metadata` on the server).

One trace per request: gateway span → router `generate` → `decode-step` spans → `dispatch layer` spans →
replica `expert forward` spans. A decode step computes many requests at once; its span is parented to
one traced request in flight (round-robin), the others are attached as span links. Per-layer detail is
sampled: a step is traced when a traced request has arrived since the last traced step (every request's
prefill is seen) and otherwise every EXPERTMESH_TRACE_STEP_EVERY-th step (default 16); see
docs/benchmarks.md for what a traced step costs.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from expertmesh.core import settings

_initialised = False
_lock = threading.Lock()


def tracing_enabled() -> bool:
    return bool(settings.otlp_endpoint())


def init_tracing(service_name: str) -> None:
    """Install an OTLP-exporting tracer provider once per process, if OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    global _initialised
    with _lock:
        if _initialised or not tracing_enabled():
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        endpoint = settings.otlp_endpoint()
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=200)
        )
        trace.set_tracer_provider(provider)
        _initialised = True


def shutdown_tracing() -> None:
    """Flush spans (call before a process exits)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("expertmesh")


def inject_metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """The current (or given) trace context as gRPC metadata pairs (empty when nothing is traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_metadata(metadata) -> otel_context.Context:
    """Trace context from gRPC invocation metadata (a sequence of (key, value) pairs)."""
    return propagate.extract({k: v for k, v in (metadata or ()) if isinstance(v, str)})


class RequestRegistry:
    """Trace contexts of the requests in flight in this process, for spans of batched steps."""

    def __init__(self, every: int | None = None) -> None:
        self._contexts: dict[str, otel_context.Context] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        # Per-layer detail is sampled: a step is traced if a traced request arrived since the last traced step
        # (so every request's prefill is seen) or every `every`-th step otherwise.
        self.every = every or settings.trace_step_every()
        self._steps = 0
        self._arrived = False

    def add(self, request_id: str, ctx: otel_context.Context) -> None:
        if trace.get_current_span(ctx).get_span_context().trace_flags.sampled:
            with self._lock:
                self._contexts[request_id] = ctx
                self._arrived = True

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._contexts.pop(request_id, None)

    def step_parent(self) -> tuple[otel_context.Context | None, list[trace.Link]]:
        """(context to parent a step span to, links to the other traced requests); (None, []) when none."""
        with self._lock:
            if not self._contexts:
                return None, []
            self._steps += 1
            if not self._arrived and self._steps % self.every:
                return None, []
            self._arrived = False
            ctxs = list(self._contexts.values())
        first = next(self._turn) % len(ctxs)
        parent = ctxs[first]
        links = [trace.Link(trace.get_current_span(c).get_span_context()) for i, c in enumerate(ctxs) if i != first]
        return parent, links


# The router server adds requests here; the dispatcher (same process) parents decode-step spans to them.
requests_in_flight = RequestRegistry()


_in_step = contextvars.ContextVar("expertmesh_in_step", default=False)


def in_untraced_step() -> bool:
    """True inside a `step_span` that was not sampled: per-layer spans must not be made there."""
    return _in_step.get() and not trace.get_current_span().is_recording()


@contextlib.contextmanager
def step_span(name: str = "decode-step"):
    """A span for one batched engine step, parented to a traced request in flight (others linked); made
    current, so the step's per-layer dispatch spans nest under it. A no-op when the step is not sampled."""
    token = _in_step.set(True)
    try:
        parent, links = requests_in_flight.step_parent()
        if parent is None:
            yield None
            return
        with tracer().start_as_current_span(name, context=parent, links=links) as span:
            yield span
    finally:
        _in_step.reset(token)
