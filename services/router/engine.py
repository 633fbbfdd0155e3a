"""vLLM's engine inside the router process, driven by one dedicated thread, with an asyncio front end.

Why not `AsyncLLM`: in vLLM 0.32 `AsyncLLM` always starts its `EngineCore` in a child process
(`AsyncMPClient`), whatever `VLLM_ENABLE_V1_MULTIPROCESSING` says. The model — and with it the expert
dispatcher, the routed-token counters and the registry of traced requests — must live in the router process
(they are read by the gRPC `Stats`/`Health` handlers and parent decode-step spans to `router.generate`), and a
laptop has no spare core for a second process. So the router runs `LLMEngine` with the in-process
`InprocClient` (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), the same scheduler/model runner/output processor that
`AsyncLLM` uses, and steps it from one thread:

    asyncio (gRPC handlers)  --commands (add/abort)-->  engine thread: add/abort, step(), step(), ...
                             <--RequestOutput deltas--  (one call_soon_threadsafe per step)

Every vLLM call happens on the engine thread (vLLM is not thread-safe); the engine is also built there, so
vLLM's CPU thread binding pins that thread only, not the event loop.

A step that raises (e.g. a routed expert with no live replica) fails every request in that step with the error
and aborts them in the engine; the engine keeps serving the requests that come after. A command that raises
while being applied (e.g. vLLM refusing a request at add time) fails that request alone.

The engine thread never touches state its callers own and may cancel: it answers only by scheduling deliveries
into the request's stream queue on the event loop (`call_soon_threadsafe`), and a stream that is gone (the
caller was cancelled or closed the iterator) simply receives nothing. A caller that goes away before its add is
applied removes its stream first and queues an abort behind the add, so the add is either skipped (no stream)
or applied and then aborted, in that order, on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from expertmesh.core import settings

# Must be set before vLLM reads its environment: the model runs in this process (see module docstring).
settings.apply_process_defaults(router=True)

from expertmesh.core import telemetry  # noqa: E402 - after the environment above
from expertmesh.router.vllm_args import engine_kwargs  # noqa: E402

if TYPE_CHECKING:  # annotations only: importing vLLM is deferred to the engine thread
    from vllm.v1.engine.llm_engine import LLMEngine

log = logging.getLogger("expertmesh.router.engine")


class EngineStepError(RuntimeError):
    """The engine failed while computing a step this request was part of."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (stopped or failed to start)."""


@dataclass
class EngineConfig:
    model: str
    max_model_len: int | None = None
    enforce_eager: bool = False
    served_model_name: str | None = None
    dtype: str | None = None  # None: the checkpoint's own dtype
    seed: int = 0
    hf_overrides: dict | None = None  # e.g. the remote-expert plugin's architecture override


class InprocAsyncEngine:
    """`LLMEngine` (in-process core) stepped by a dedicated thread; `generate()` is an async iterator of deltas."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> queue of RequestOutput | Exception
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        # Guards `_closed` against a generate() registering a stream while the exiting engine thread fails them all.
        self._lock = threading.Lock()
        self._closed = False
        # vLLM's LLMEngine, touched only on the engine thread (except read-only config)
        self.engine: LLMEngine | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self._active: set[str] = set()  # request ids added to the engine and not finished (engine thread only)
        self.num_unfinished = 0  # requests inside the engine, updated by the engine thread after every step
        self.step_failures = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, timeout: float = 600.0) -> None:
        """Build the engine on its thread and wait until it is ready (raises what engine creation raised)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineStopped(f"vLLM engine did not start within {timeout:.0f} s")
        if self._start_error is not None:
            raise self._start_error

    async def start_async(self, timeout: float = 600.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.start, loop, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set() and not self._stopping

    # ---- requests (event-loop side) --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params) -> AsyncIterator:
        """Yield vLLM `RequestOutput` deltas (`params.output_kind` must be DELTA) until the request finishes.

        Validation errors from vLLM (e.g. a token id outside the vocabulary) are raised before the first yield.
        Closing or cancelling the iterator aborts the request in the engine.
        """
        if not self.running:
            raise EngineStopped("the vLLM engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()  # RequestOutput | Exception, put only on this event loop
        with self._lock:
            if self._closed:
                raise EngineStopped("the vLLM engine is not running")
            self._streams[request_id] = stream
            self._commands.put(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread already took it out of vLLM (or never added it)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            # Stream first, then the abort: the engine thread then either skips the add (no stream) or applies
            # it and aborts it right after (commands run in order).
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _build(self) -> LLMEngine:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        cfg = self.config
        extra = {"hf_overrides": cfg.hf_overrides} if cfg.hf_overrides else {}
        args = EngineArgs(
            model=cfg.model,
            tokenizer=cfg.model,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            served_model_name=cfg.served_model_name,
            seed=cfg.seed,
            disable_log_stats=True,
            **engine_kwargs(cfg.model, dtype=cfg.dtype),  # dtype + attention backend, as the references use
            **extra,
        )
        return LLMEngine.from_engine_args(args, enable_multiprocessing=False)

    def _run(self) -> None:
        try:
            self.engine = engine = self._build()
            self.max_model_len = int(engine.model_config.max_model_len)
            self.vocab_size = int(engine.model_config.get_vocab_size())
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop_steps()
        except BaseException:
            log.exception("the vLLM engine thread failed")
            raise
        finally:
            with self._lock:
                self._closed = True  # no stream registers after this; adds still queued will never run
            self._fail_all(EngineStopped("the vLLM engine stopped"))
            try:
                engine.engine_core.shutdown()
            except Exception:  # best effort at exit
                log.exception("engine shutdown failed")

    def _built(self) -> LLMEngine:
        """The vLLM engine; used only on the engine thread, which builds it before applying any command."""
        engine = self.engine
        assert engine is not None, "the vLLM engine is used before it was built"
        return engine

    def _loop_steps(self) -> None:
        engine = self._built()
        while True:
            # Block for work when idle; otherwise take whatever arrived since the last step.
            idle = not engine.has_unfinished_requests()
            try:
                command = self._commands.get() if idle else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                self._apply_safely(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not engine.has_unfinished_requests():
                self.num_unfinished = 0
                continue
            try:
                with telemetry.step_span():
                    outputs = engine.step()
                self.num_unfinished = engine.get_num_unfinished_requests()
                for o in outputs:
                    if o.finished:
                        self._active.discard(o.request_id)
            except Exception as exc:  # one failed step fails its requests, not the server
                self.step_failures += 1
                log.error("engine step failed: %s", exc)
                self._fail_active(EngineStepError(str(exc) or type(exc).__name__))
                continue
            if outputs:
                self._deliver([(o.request_id, o) for o in outputs])

    def _apply_safely(self, command) -> None:
        """Apply one command; if that raises, fail its request alone (the engine thread carries on)."""
        try:
            self._apply(command)
        except Exception as exc:
            request_id = command[1] if len(command) > 1 else None
            if request_id is None:
                log.exception("applying engine command %r failed", command[0])
                return
            if command[0] != "add":
                log.exception("applying %s for request %s failed", command[0], request_id)
            self._active.discard(request_id)
            try:  # whatever part of it vLLM took in goes again
                self._built().abort_request([request_id], internal=False)
            except Exception:
                log.exception("abort of request %s after a failed %s failed", request_id, command[0])
            try:
                self.num_unfinished = self._built().get_num_unfinished_requests()
            except Exception:
                log.exception("counting unfinished requests failed")
            self._deliver([(request_id, exc)])

    def _apply(self, command) -> None:
        kind = command[0]
        engine = self._built()
        if kind == "add":
            _, request_id, prompt_token_ids, params = command
            if request_id not in self._streams:  # its caller went away before the add reached the engine
                return
            # A refusal (e.g. a token id outside the vocabulary) raises here: `_apply_safely` hands it to the caller.
            engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)
            self._active.add(request_id)
            self.num_unfinished = engine.get_num_unfinished_requests()
        elif kind == "abort":
            self._active.discard(command[1])
            engine.abort_request([command[1]], internal=False)
            self.num_unfinished = engine.get_num_unfinished_requests()
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def _fail_active(self, exc: BaseException) -> None:
        """Abort every request in the engine and end its stream with `exc` (after a failed step)."""
        request_ids = list(self._active)
        self._active.clear()
        if request_ids:
            try:
                self._built().abort_request(request_ids, internal=False)
            except Exception:
                log.exception("abort after a failed step failed")
        try:
            self.num_unfinished = self._built().get_num_unfinished_requests()
        except Exception:
            log.exception("counting unfinished requests failed")
        self._deliver([(rid, exc) for rid in request_ids])

    def _fail_all(self, exc: BaseException) -> None:
        """End every open stream with `exc` (the engine thread is exiting). The set of streams is read on the event
        loop, which owns it (reading it here could race with a caller registering or removing its own)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        streams = self._streams

        def put_all() -> None:
            for stream in list(streams.values()):
                stream.put_nowait(exc)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # loop closed while stopping
            pass

    def _deliver(self, items: list) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        streams = self._streams

        def put_all() -> None:
            for request_id, item in items:
                stream = streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # loop closed while stopping
            pass
