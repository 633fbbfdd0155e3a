#!/usr/bin/env python
"""What tracing costs per decode step: the router's step span + one dispatch span per MoE layer, with tracing
off (no OTEL_EXPORTER_OTLP_ENDPOINT: OpenTelemetry's no-op tracer, and no traced request in flight) and on
(the SDK with a batching OTLP exporter to a real local TraceService receiver).

    .venv/bin/python benchmarks/tracing_overhead.py [--layers 4] [--steps 20000]

Writes benchmarks/results/tracing_overhead.json; docs/benchmarks.md summarises it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent import futures
from pathlib import Path

import grpc

RESULTS = Path(__file__).resolve().parent / "results" / "tracing_overhead.json"


def _receiver() -> tuple[grpc.Server, int, list]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[int] = []

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, received


def per_step_us(layers: int, steps: int) -> float:
    """Microseconds per decode step spent in the tracing calls the router makes (step span + layer spans)."""
    from opentelemetry import trace

    from expertmesh.core import telemetry

    start = time.perf_counter()
    for _ in range(steps):
        with telemetry.step_span():
            for layer in range(layers):
                if trace.get_current_span().is_recording():
                    with telemetry.tracer().start_as_current_span(f"dispatch layer {layer}"):
                        telemetry.inject_metadata()
                else:  # the dispatcher's check in an unsampled step
                    telemetry.in_untraced_step()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="MoE layers per step (the demo model has 4)")
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    from expertmesh.core import telemetry

    off = per_step_us(args.layers, args.steps)
    server, port, received = _receiver()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"127.0.0.1:{port}"
    telemetry.init_tracing("tracing-overhead-bench")
    # on, but no traced request in flight: only the registry check runs
    on_idle = per_step_us(args.layers, args.steps)
    # on, with a traced request in flight: a sampled step makes 1 + layers spans and exports them
    # the request's span lives in the server's handler; the engine thread (where steps run) has no current span
    with telemetry.tracer().start_span("request") as span:
        telemetry.requests_in_flight.add("r1", trace.set_span_in_context(span))
        every = telemetry.requests_in_flight.every
        on_traced = per_step_us(args.layers, args.steps // 10)  # sampled: every `every`-th step traced
        telemetry.requests_in_flight.every = 1
        on_every_step = per_step_us(args.layers, args.steps // 10)
        telemetry.requests_in_flight.every = every
        telemetry.requests_in_flight.remove("r1")
    telemetry.shutdown_tracing()
    server.stop(0)
    result = {
        "layers": args.layers,
        "steps": args.steps,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "us_per_step": {
            "tracing_off": round(off, 3),
            "on_no_traced_request": round(on_idle, 3),
            "on_traced_request_sampled": round(on_traced, 3),
            "on_traced_request_every_step": round(on_every_step, 3),
        },
        "trace_step_every": every,
        "spans_exported": sum(received),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from opentelemetry import trace

    raise SystemExit(main())
