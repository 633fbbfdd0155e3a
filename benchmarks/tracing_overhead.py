#!/usr/bin/env python
"""What tracing costs per forward pass in the process that runs the model: the `forward pass` span of a batched
step (`telemetry.engine_steps`, driven by router/step_tracing.py's wrapper of vLLM's `execute_model`) and one
`dispatch layer N` span per MoE layer (made the way `Dispatcher._trace` in router/dispatch.py makes it).

Each simulated step is a decode step of BATCH requests (one token each) through the real wrapper
(`step_tracing._wrap_execute_model`, fed a real vLLM `SchedulerOutput`) around a stand-in forward pass that makes
only the tracing calls of its MoE layer calls (no model, no RPC). The cases:

  off_no_endpoint                       no OTEL_EXPORTER_OTLP_ENDPOINT: the plugin installs no wrapper, so a step is
                                        only the dispatcher's per-layer check (`engine_steps.layer_parent()`);
  on_no_traced_request_in_flight        tracing on (the SDK, a batching OTLP exporter to a real local TraceService
                                        receiver), the wrapper installed, no traced request known to the engine;
  on_traced_request_untraced_steps      one traced request in the batch, steps never sampled: the sampling check;
  on_traced_request_default_sampling    the same with the default sampling (EXPERTMESH_TRACE_STEP_EVERY, 16):
                                        1 + layers spans on every 16th step, mean over all steps;
  on_traced_request_every_step_traced   every step sampled: what one traced step costs (1 + layers spans, export).

The traced request arrives (its headers on the scheduler output, as step_tracing.py's scheduler wrapper puts them)
before the timed steps; each case is timed ROUNDS times (the on cases interleaved round by round) and the median
round is reported, with the 1-minute load average before and after (the machine may be shared).

    .venv/bin/python benchmarks/tracing_overhead.py [--layers 4] [--steps 20000]

Writes benchmarks/results/tracing_overhead.json; docs/benchmarks.md summarises it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from expertmesh.core import settings, telemetry
from expertmesh.router import step_tracing

RESULTS = Path(__file__).resolve().parent / "results" / "tracing_overhead.json"
BATCH = 8  # requests in each decode step; one of them is the traced request in the traced cases
ROUNDS = 5
TRACED_REQUEST = "r0"
NEVER = 10**12  # a sampling period no run reaches: steps with a traced request that are never sampled


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


class StandInForwardPass:
    """A forward pass that makes only the tracing calls of its `layers` MoE layer calls, and counts the spans
    that it and the step wrapper made."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.spans_made = 0

    def dispatch_trace(self, layer: int, tokens: int):
        """What the dispatcher does per layer call: (span, RPC metadata) inside a sampled forward pass."""
        from expertmesh.router.dispatch import trace_layer_call

        return trace_layer_call(layer, tokens)

    def __call__(self, worker, scheduler_output) -> None:
        tokens = scheduler_output.total_num_scheduled_tokens
        for layer in range(self.layers):
            span, _metadata = self.dispatch_trace(layer, tokens)
            if span is not None:  # dispatch.py ends it after the layer's RPCs
                self.spans_made += 1 + (layer == 0)  # (+ the step's `forward pass` span, once)
                span.end()


def _scheduler_output(arriving: dict[str, dict[str, str]] | None = None):
    """A real vLLM SchedulerOutput of a decode step of BATCH requests; `arriving`: {request id: W3C headers} of
    new traced requests, the attribute step_tracing.py's scheduler wrapper sets."""
    from vllm.v1.core.sched.output import SchedulerOutput

    output = SchedulerOutput.make_empty()
    output.num_scheduled_tokens = {f"r{i}": 1 for i in range(BATCH)}
    output.total_num_scheduled_tokens = BATCH
    if arriving:
        setattr(output, step_tracing.ATTRIBUTE, arriving)
    return output


def per_step_us(execute_model: Callable, scheduler_output, steps: int) -> float:
    """Microseconds per step of `execute_model(worker, scheduler_output)`, over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        execute_model(None, scheduler_output)
    return (time.perf_counter() - start) / steps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="MoE layers per step (the demo model has 4)")
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    load_before = os.getloadavg()[0]
    forward_pass = StandInForwardPass(args.layers)
    decode = _scheduler_output()
    rounds: dict[str, list[float]] = {}

    # off: the plugin installs the wrapper only when tracing is on (plugin.register), so only dispatch's check runs
    assert not telemetry.tracing_enabled()
    rounds["off_no_endpoint"] = [per_step_us(forward_pass, decode, args.steps) for _ in range(ROUNDS)]

    server, port, received = _receiver()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"127.0.0.1:{port}"
    telemetry.init_tracing("tracing-overhead-bench")
    execute_model = step_tracing._wrap_execute_model(forward_pass)  # what step_tracing.install() puts on the worker
    steps = telemetry.engine_steps
    every = settings.trace_step_every()
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}  # the request's span, in the router's API server
    arrival = _scheduler_output({TRACED_REQUEST: headers})
    traced_cases = {  # name: (sampling period, steps timed)
        "on_traced_request_untraced_steps": (NEVER, args.steps),
        "on_traced_request_default_sampling": (every, args.steps),
        "on_traced_request_every_step_traced": (1, args.steps // 10),
    }
    for _ in range(ROUNDS):
        assert steps.traced_requests == 0
        rounds.setdefault("on_no_traced_request_in_flight", []).append(per_step_us(execute_model, decode, args.steps))
        for name, (period, timed) in traced_cases.items():
            steps.every = period
            execute_model(None, arrival)  # the request's first step (traced: it is new in the batch)
            assert steps.traced_requests == 1
            rounds.setdefault(name, []).append(per_step_us(execute_model, decode, timed))
            steps.remove([TRACED_REQUEST])  # (vLLM: finished_req_ids of a later step)
    steps.every = every
    telemetry.shutdown_tracing()  # flushes: every span the exporter did not drop has reached the receiver
    server.stop(0)
    load_after = os.getloadavg()[0]

    result = {
        "layers": args.layers,
        "steps": args.steps,
        "batch": BATCH,
        "rounds": ROUNDS,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "us_per_step": {name: round(statistics.median(times), 3) for name, times in rounds.items()},
        "us_per_step_rounds": {name: [round(t, 3) for t in times] for name, times in rounds.items()},
        "trace_step_every": every,
        "spans_made": forward_pass.spans_made,
        "spans_exported": sum(received),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
