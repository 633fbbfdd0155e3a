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
and aborts them in the engine; the engine keeps serving the requests that come after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

# Must be set before vLLM reads its environment: the model runs in this process (see module docstring).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from expertmesh.core import telemetry  # noqa: E402 - after the environment above

log = logging.getLogger("expertmesh.router.engine")


class EngineStepError(RuntimeError):
    """The engine failed while computing a step this request was part of."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (stopped or failed to start)."""


def checkpoint_dtype(model_dir: str) -> str:
    """The dtype the checkpoint was saved in ("float32", "bfloat16", ...), "auto" if not recorded.

    vLLM's "auto" picks bf16 on CPU even for an fp32 checkpoint; exactness tests need the checkpoint's own dtype.
    """
    config = Path(model_dir) / "config.json"
    if not config.exists():
        return "auto"
    data = json.loads(config.read_text())
    dtype = data.get("dtype") or data.get("torch_dtype")
    if dtype is None and isinstance(data.get("text_config"), dict):
        dtype = data["text_config"].get("dtype") or data["text_config"].get("torch_dtype")
    return str(dtype) if dtype else "auto"


@dataclass
class EngineConfig:
    model: str
    max_model_len: int | None = None
    enforce_eager: bool = False
    served_model_name: str | None = None
    dtype: str | None = None          # None: the checkpoint's own dtype
    seed: int = 0
    hf_overrides: dict | None = None  # e.g. the remote-expert plugin's architecture override


class InprocAsyncEngine:
    """`LLMEngine` (in-process core) stepped by a dedicated thread; `generate()` is an async iterator of deltas."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}   # request id -> queue of RequestOutput | Exception
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self.engine = None            # vllm LLMEngine, touched only on the engine thread (except read-only config)
        self.max_model_len = 0
        self.vocab_size = 0
        self._active: set[str] = set()  # request ids added to the engine and not finished (engine thread only)
        self.num_unfinished = 0       # requests inside the engine, updated by the engine thread after every step
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
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            added: Future = Future()
            self._commands.put(("add", request_id, prompt_token_ids, params, added))
            await asyncio.wrap_future(added)
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True      # the engine thread already aborted it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _build(self):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        cfg = self.config
        extra = {"hf_overrides": cfg.hf_overrides} if cfg.hf_overrides else {}
        args = EngineArgs(
            model=cfg.model,
            tokenizer=cfg.model,
            dtype=cfg.dtype or checkpoint_dtype(cfg.model),
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            served_model_name=cfg.served_model_name,
            seed=cfg.seed,
            disable_log_stats=True,
            **extra,
        )
        return LLMEngine.from_engine_args(args, enable_multiprocessing=False)

    def _run(self) -> None:
        try:
            self.engine = self._build()
            self.max_model_len = int(self.engine.model_config.max_model_len)
            self.vocab_size = int(self.engine.model_config.get_vocab_size())
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop_steps()
        finally:
            stopped = EngineStopped("the vLLM engine stopped")
            while True:   # adds still queued will never run: release their callers
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add" and not command[-1].done():
                    command[-1].set_exception(stopped)
            self._fail_all(stopped)
            try:
                self.engine.engine_core.shutdown()
            except Exception:  # best effort at exit
                log.exception("engine shutdown failed")

    def _loop_steps(self) -> None:
        engine = self.engine
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
                self._apply(command)
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
            except Exception as exc:  # one failed step fails its requests, not the server
                self.step_failures += 1
                log.error("engine step failed: %s", exc)
                self._fail_active(EngineStepError(str(exc) or type(exc).__name__))
                continue
            self.num_unfinished = engine.get_num_unfinished_requests()
            if outputs:
                for o in outputs:
                    if o.finished:
                        self._active.discard(o.request_id)
                self._deliver([(o.request_id, o) for o in outputs])

    def _apply(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_token_ids, params, added = command
            if request_id not in self._streams:   # cancelled before it reached the engine
                added.set_result(None)
                return
            try:
                self.engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)
            except Exception as exc:
                added.set_exception(exc)
                return
            self._active.add(request_id)
            added.set_result(None)
            self.num_unfinished = self.engine.get_num_unfinished_requests()
        elif kind == "abort":
            self._active.discard(command[1])
            self.engine.abort_request([command[1]], internal=False)
            self.num_unfinished = self.engine.get_num_unfinished_requests()

    def _fail_active(self, exc: BaseException) -> None:
        """Abort every request in the engine and end its stream with `exc` (after a failed step)."""
        request_ids = list(self._active)
        self._active.clear()
        if request_ids:
            try:
                self.engine.abort_request(request_ids, internal=False)
            except Exception:
                log.exception("abort after a failed step failed")
        self.num_unfinished = self.engine.get_num_unfinished_requests()
        self._deliver([(rid, exc) for rid in request_ids])

    def _fail_all(self, exc: BaseException) -> None:
        """End every open stream with `exc` (the engine thread is exiting)."""
        self._deliver([(rid, exc) for rid in list(self._streams)])

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
