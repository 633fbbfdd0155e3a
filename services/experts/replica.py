"""The data plane of an expert replica: `ExpertService` on its own grpc.aio server, with per-layer coalescing.

A replica holds the FFN weights of its group's (layer, expert) keys only (`ExpertWeights`, loaded lazily from
the checkpoint) and answers `Forward` for one layer per call. Concurrent calls for the same layer (many router
steps in flight) are computed as ONE batch: a layer's batch starts when it reaches `max_batch_rows` rows, or
`max_wait_ms` after its first call arrived, or at once when no other Forward is in flight on this replica (a
lone caller never waits). While a batch computes, new calls queue up and form the next batch. Small batches
(<= `inline_rows`) compute on the event loop itself (a thread hop would cost more than the matmuls); bigger ones on
a compute thread, so the loop keeps taking in calls meanwhile.

Errors: `WireError` -> INVALID_ARGUMENT, an unparseable message -> INVALID_ARGUMENT, `ExpertNotHeld` ->
NOT_FOUND; a call whose deadline passed while queued is dropped from its batch (DEADLINE_EXCEEDED, never
computed); a cancelled call is dropped too. No bad call takes the server down.

Usable without Ray (tests, the router's in-process pool):

    server = ExpertServer("/models/tiny", {0: [0, 1, 2, 3]})
    port = server.start("127.0.0.1", 0)   # or a (lo, hi) port range
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from expertmesh.core import telemetry
from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.codec import (DEFAULT_MAX_MESSAGE_BYTES, ExpertNotHeld, ForwardBatch, WireError, decode_forward,
                                   encode, encode_raw_into)
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.protos import expert_pb2
from expertmesh.core.loop_thread import LoopThread
from expertmesh.experts.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

SERVICE = "expertmesh.v1.ExpertService"
DEFAULT_MAX_WAIT_MS = 1.0
DEFAULT_MAX_BATCH_ROWS = 4096
# Batches up to this many rows are computed on the event loop itself: for them a hop to the compute thread (and
# the GIL hand-offs it brings) costs more than the matmuls. Bigger batches go to the compute thread so the loop
# keeps taking in calls (which then form the next batch).
DEFAULT_INLINE_ROWS = 256
METRICS_FLUSH_SECONDS = 1.0

# SO_REUSEPORT is on by default in gRPC on Linux: two replicas could then "bind" the same port and split its
# traffic. Off, so a taken port fails and we try the next one in the range.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]
# For clients of ExpertService (the router, tests, benchmarks): the same message-size limits as the server.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]


def keys_to_proto(keys: dict[int, list[int]] | dict[int, frozenset[int]]) -> list[expert_pb2.ExpertKeys]:
    return [expert_pb2.ExpertKeys(layer=layer, experts=sorted(experts)) for layer, experts in sorted(keys.items())]


def keys_from_proto(keys) -> dict[int, list[int]]:
    return {int(k.layer): sorted(int(e) for e in k.experts) for k in keys}


def bind_port(server: grpc.aio.Server, host: str, port: int | tuple[int, int]) -> int:
    """Bind `host:port`, or the first free port of the range (lo, hi) starting at a random offset."""
    if isinstance(port, int):
        return server.add_insecure_port(f"{host}:{port}")
    lo, hi = port
    candidates = list(range(lo, hi + 1))
    start = random.randrange(len(candidates))
    for p in candidates[start:] + candidates[:start]:
        try:
            return server.add_insecure_port(f"{host}:{p}")
        except RuntimeError:
            continue
    raise RuntimeError(f"no free port in {lo}-{hi} on {host}")


def claim_grpc_poller() -> list[tuple[asyncio.AbstractEventLoop, int, object]]:
    """Make the running loop the only one grpc.aio's completion-queue poller wakes; returns what to give back.

    grpc.aio has one poller per process, and every event loop that ever created a grpc.aio object watches its
    wake-up socket: every bound loop wakes for every event of every RPC in the process, and whichever reads first
    runs the events or forwards the other loops' ones with call_soon_threadsafe. In a Serve replica, Ray's own loop
    is bound (Serve's inter-deployment gRPC server), so each Forward woke a second Python thread that competed for
    the GIL and the two cores, and sometimes took the detour through it (docs/benchmarks.md). Taking the socket
    away from the other loops keeps delivery intact — this loop's handler forwards their events, which grpc does
    already. This reaches into grpc's poller (the reader it registers on each bound loop is
    functools.partial(PollerCompletionQueue._handle_events, loop)); grpcio is pinned, and if that reader is not
    found nothing is changed. Call on the server's loop after the server started.
    """
    import functools
    import gc

    from grpc._cython import cygrpc

    loop = asyncio.get_running_loop()
    fd = handle_events = None
    for key in loop._selector.get_map().values():
        callback = getattr(key.data[0], "_callback", None) if key.data and key.data[0] is not None else None
        if isinstance(callback, functools.partial) and isinstance(getattr(callback.func, "__self__", None),
                                                                   cygrpc.PollerCompletionQueue):
            fd, handle_events = key.fd, callback.func
    if fd is None:
        return []
    taken: list[tuple[asyncio.AbstractEventLoop, int, object]] = []

    def take(other: asyncio.AbstractEventLoop) -> None:   # runs on `other`'s own thread
        # False: it had no reader there. uvloop returns None either way: give such a loop the reader back too.
        if other.remove_reader(fd) is not False:
            taken.append((other, fd, functools.partial(handle_events, other)))

    for obj in gc.get_objects():   # event loops register nowhere; a one-off scan per replica
        # type(), not isinstance(): some module proxies warn or raise when their __class__ is read. Ray's own
        # loop is a uvloop Loop, not a selector loop: both are AbstractEventLoops.
        if issubclass(type(obj), asyncio.AbstractEventLoop) and obj is not loop and not obj.is_closed():
            obj.call_soon_threadsafe(take, obj)
    return taken


def return_grpc_poller(taken: list[tuple[asyncio.AbstractEventLoop, int, object]]) -> None:
    """Give the poller's socket back to the loops `claim_grpc_poller` took it from (before this loop stops)."""
    for loop, fd, callback in taken:
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.add_reader, fd, callback)


class DeadlineExpired(Exception):
    """The call's deadline passed before its batch started."""


@dataclass
class _Call:
    batch: ForwardBatch
    future: asyncio.Future
    deadline: float | None  # loop time
    rows: int
    queued: float = 0.0     # perf_counter when submitted (for the queue-wait timer)


class DataPlaneTimers:
    """Cumulative seconds per stage of Forward calls on this replica (profiling; benchmarks read `snapshot()`).

    validate: parse + codec checks; queue: submit -> its batch starts (coalescing wait); compute: the batch's
    kernel time (counted once per call it served); respond: output encoding; handler: the whole handler.
    """

    STAGES = ("validate", "queue", "compute", "respond", "handler")

    def __init__(self):
        self.calls = 0
        self.batches = 0
        self.seconds = dict.fromkeys(self.STAGES, 0.0)

    def snapshot(self) -> dict:
        calls = max(1, self.calls)
        return {"calls": self.calls, "batches": self.batches,
                "us_per_call": {k: round(v / calls * 1e6, 1) for k, v in self.seconds.items()}}


@dataclass
class _LayerQueue:
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    first_arrival: float = 0.0
    draining: bool = False


class Coalescer:
    """Per-(layer, dtype) queues of validated calls, computed as one batch each on a single compute thread."""

    def __init__(self, weights: ExpertWeights, metrics: ReplicaMetrics, max_wait_ms: float, max_batch_rows: int,
                 inline_rows: int = DEFAULT_INLINE_ROWS):
        self.weights = weights
        self.inline_rows = inline_rows
        self.metrics = metrics
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_rows = max_batch_rows
        self.in_flight = 0  # Forward calls inside the handler (any layer)
        self.timers = DataPlaneTimers()
        self._queues: dict[tuple[int, torch.dtype], _LayerQueue] = {}
        self._changed = asyncio.Event()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-compute")

    def enter(self) -> None:
        self.in_flight += 1
        self._changed.set()

    def leave(self) -> None:
        self.in_flight -= 1
        self._changed.set()

    async def submit(self, batch: ForwardBatch, context: grpc.aio.ServicerContext | None = None
                     ) -> tuple[bytes, int]:
        """The call's output [T, H] as raw bytes (the batch's dtype) and the rows of the batch it was computed in.
        `context` gives the deadline of a call that has to queue (a lone call is computed at once, never reads it)."""
        key = (batch.layer, batch.dtype)
        q = self._queues.get(key)
        def alone() -> bool:
            return self.in_flight == 1 and (q is None or not q.calls) and batch.rows <= self.inline_rows

        # One loop turn lets calls gRPC has already received enter their handlers; if this is still the only call
        # on the replica there is nothing to coalesce with: compute it right here (no queue entry, drain task or
        # future, each of which costs the lone caller more loop turns).
        if alone():
            await asyncio.sleep(0)
        if alone():
            started = time.perf_counter()
            outputs, rows = self._run(batch.layer, [batch])
            self.timers.seconds["compute"] += time.perf_counter() - started
            self.timers.batches += 1
            return outputs[0], rows
        if q is None:
            q = self._queues[key] = _LayerQueue()
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining() if context is not None else None
        deadline = None if remaining is None else loop.time() + remaining
        call = _Call(batch, loop.create_future(), deadline, batch.rows, time.perf_counter())
        if not q.calls:
            q.first_arrival = loop.time()
        q.calls.append(call)
        q.rows += call.rows
        self._changed.set()
        if not q.draining:
            q.draining = True
            loop.create_task(self._drain(key, q))
        return await call.future

    def _should_wait(self, q: _LayerQueue, now: float) -> bool:
        return (q.rows < self.max_batch_rows
                and self.in_flight > len(q.calls)           # someone else may still join this layer's batch
                and now < q.first_arrival + self.max_wait_s)

    def _take(self, q: _LayerQueue, now: float) -> list[_Call]:
        taken, rows, keep = [], 0, []
        for call in q.calls:
            if call.future.done():  # cancelled (client gone / deadline enforced by gRPC)
                continue
            if call.deadline is not None and now >= call.deadline:
                call.future.set_exception(DeadlineExpired())
                continue
            if not taken or rows + call.rows <= self.max_batch_rows:
                taken.append(call)
                rows += call.rows
            else:
                keep.append(call)
        q.calls = keep
        q.rows = sum(c.rows for c in keep)
        q.first_arrival = now
        return taken

    async def _drain(self, key, q: _LayerQueue) -> None:
        loop = asyncio.get_running_loop()
        try:
            while q.calls:
                while self._should_wait(q, loop.time()):
                    self._changed.clear()
                    remaining = q.first_arrival + self.max_wait_s - loop.time()
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=max(remaining, 0.0))
                    except asyncio.TimeoutError:
                        break
                calls = self._take(q, loop.time())
                if not calls:
                    continue
                started = time.perf_counter()
                seconds = self.timers.seconds
                for call in calls:
                    seconds["queue"] += started - call.queued
                try:
                    batches = [c.batch for c in calls]
                    if sum(c.rows for c in calls) <= self.inline_rows:
                        outputs, rows = self._run(key[0], batches)
                    else:
                        outputs, rows = await loop.run_in_executor(self._compute, self._run, key[0], batches)
                except Exception as exc:  # a kernel failure fails this batch's calls, never the server
                    log.exception("expert batch failed")
                    for call in calls:
                        if not call.future.done():
                            call.future.set_exception(exc)
                    continue
                seconds["compute"] += (time.perf_counter() - started) * len(calls)
                self.timers.batches += 1
                for call, out in zip(calls, outputs):
                    if not call.future.done():
                        call.future.set_result((out, rows))
        finally:
            q.draining = False

    def _run(self, layer: int, batches: list[ForwardBatch]) -> tuple[list[bytes], int]:
        """Compute batches of one layer as one: [sum T, H] through the kernel, split back per batch (as raw bytes)."""
        if len(batches) == 1:
            batch = batches[0]
        else:
            offsets = np.cumsum([0] + [b.rows for b in batches[:-1]])
            batch = ForwardBatch(
                layer,
                np.concatenate([b.hidden_data for b in batches]),                                   # [sum T, H]
                batches[0].dtype,
                np.concatenate([b.token_index + off for b, off in zip(batches, offsets)]),           # [sum N]
                np.concatenate([b.expert for b in batches]),                                         # [sum N]
                np.concatenate([b.weight for b in batches]),                                         # [sum N]
                # whole-layer calls with one K stay one: their shifted indices are again t // K
                whole_layer=all(b.whole_layer for b in batches)
                and len({b.expert.shape[0] // max(1, b.rows) for b in batches}) == 1)
        out = self.weights.forward_batch(batch)                                                 # [sum T, H] bytes
        rows = batch.rows
        self.metrics.batch(layer, rows, batch.expert, self.weights.num_experts)
        if len(batches) == 1:
            return [out], rows
        row_bytes = len(out) // max(1, rows)
        return [out[off * row_bytes:(off + b.rows) * row_bytes] for b, off in zip(batches, offsets.tolist())], rows

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)


class ExpertServicer:
    """`ExpertService` over the weights of one replica's keys."""

    def __init__(self, weights: ExpertWeights, num_layers: int, replica_id: str, group: str,
                 metrics: ReplicaMetrics, max_wait_ms: float, max_batch_rows: int,
                 inline_rows: int = DEFAULT_INLINE_ROWS):
        self.weights = weights
        self.num_layers = num_layers
        self.replica_id = replica_id
        self.group = group
        self.metrics = metrics
        self.coalescer = Coalescer(weights, metrics, max_wait_ms, max_batch_rows, inline_rows)
        self._info = expert_pb2.InfoResponse(
            replica_id=replica_id, group=group, keys=keys_to_proto(weights.held),
            hidden_size=weights.hidden_size, dtype=encode(torch.empty(0, dtype=weights.dtype)).dtype,
            weight_bytes=weights.weight_bytes,
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # Forward takes raw bytes (no request_deserializer) so an unparseable message is INVALID_ARGUMENT, not
        # the INTERNAL a failing generated deserializer would give.
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Forward": grpc.unary_unary_rpc_method_handler(
                self.forward, response_serializer=expert_pb2.ForwardResponse.SerializeToString),
            "Info": grpc.unary_unary_rpc_method_handler(
                self.info, request_deserializer=expert_pb2.InfoRequest.FromString,
                response_serializer=expert_pb2.InfoResponse.SerializeToString),
        })

    async def info(self, request, context) -> expert_pb2.InfoResponse:
        return self._info

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ForwardResponse:
        metadata = context.invocation_metadata()
        if metadata and any(k == "traceparent" for k, _ in metadata):  # a traced request: one span per call
            with telemetry.tracer().start_as_current_span(
                    "expert forward", context=telemetry.extract_metadata(metadata),
                    attributes={"expertmesh.replica": self.replica_id, "expertmesh.group": self.group}):
                return await self._forward(raw, context)
        return await self._forward(raw, context)

    async def _forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ForwardResponse:
        start = time.perf_counter()
        code = "OK"
        self.coalescer.enter()
        seconds = self.coalescer.timers.seconds
        try:
            try:
                request = expert_pb2.ForwardRequest.FromString(raw)
                batch = decode_forward(request, held=self.weights.held, hidden_size=self.weights.hidden_size,
                                       num_layers=self.num_layers, num_experts=self.weights.num_experts)
                seconds["validate"] += time.perf_counter() - start
            except (WireError, DecodeError) as exc:
                code = "INVALID_ARGUMENT"
                msg = str(exc) if isinstance(exc, WireError) else f"unparseable ForwardRequest: {exc}"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)
            except ExpertNotHeld as exc:
                code = "NOT_FOUND"
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc} (replica {self.replica_id})")
            try:
                output, rows = await self.coalescer.submit(batch, context)
            except DeadlineExpired:
                code = "DEADLINE_EXCEEDED"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch started")
            r0 = time.perf_counter()
            response = expert_pb2.ForwardResponse(batch_rows=rows)
            encode_raw_into(response.output, batch.dtype, batch.hidden_data.shape, output)
            seconds["respond"] += time.perf_counter() - r0
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.coalescer.leave()
            elapsed = time.perf_counter() - start
            seconds["handler"] += elapsed
            self.coalescer.timers.calls += 1
            self.metrics.call(elapsed, code)


class ExpertServer:
    """One ExpertService grpc.aio server on its own event-loop thread (no Ray needed)."""

    def __init__(self, checkpoint: str | Path | CheckpointReader, keys: dict[int, list[int]], *,
                 replica_id: str = "", group: str = "", max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, inline_rows: int = DEFAULT_INLINE_ROWS,
                 metrics_backend: str = "prometheus", dtype: torch.dtype | None = None, compute_threads: int = 0):
        telemetry.init_tracing("expertmesh-experts")  # exports only when OTEL_EXPORTER_OTLP_ENDPOINT is set
        if compute_threads > 0:
            # torch's intra-op threads for the expert kernel (process-wide: meant for a replica's own process).
            # libgomp's workers spin-wait a few ms after each batch: busy CPU between calls. docs/benchmarks.md
            # measures 1 vs 2 on the dispatch round trip.
            torch.set_num_threads(compute_threads)
        reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
        self.reader = reader
        self.weights = ExpertWeights(reader, {int(k): list(v) for k, v in keys.items()}, dtype=dtype)
        self.metrics = ReplicaMetrics(group or "standalone", metrics_backend)
        self.replica_id = replica_id or f"standalone-{id(self):x}"
        self.group = group
        self._max_wait_ms = max_wait_ms
        self._max_batch_rows = max_batch_rows
        self._inline_rows = inline_rows
        self._loop: LoopThread | None = None
        self._server: grpc.aio.Server | None = None
        self.servicer: ExpertServicer | None = None
        self._claimed: list = []
        self.port: int | None = None
        self.host: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, host: str = "127.0.0.1", port: int | tuple[int, int] = 0) -> int:
        """Bind and start serving; returns the bound port."""
        self._loop = LoopThread(f"expert-server-{self.replica_id}")
        self.port = self._loop.run(self._start(host, port))
        # Everything allocated so far (modules, weights, the server) lives as long as the replica: keep it out of
        # the cyclic GC's scans, which otherwise land on Forward calls (vLLM's engine does the same after init,
        # vllm.utils.gc_utils.freeze_gc_heap).
        gc.collect()
        gc.freeze()
        self.host = host
        return self.port

    async def _start(self, host: str, port) -> int:
        self.servicer = ExpertServicer(self.weights, self.reader.info.num_layers, self.replica_id, self.group,
                                       self.metrics, self._max_wait_ms, self._max_batch_rows, self._inline_rows)
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        self._server.add_generic_rpc_handlers((self.servicer.generic_handler(),))
        bound = bind_port(self._server, host, port)
        await self._server.start()
        try:
            self._claimed = claim_grpc_poller()
        except Exception:  # a latency optimisation only: never a reason for a replica not to start
            log.warning("could not claim grpc.aio's poller for the data-plane loop", exc_info=True)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics())
        return bound

    async def _shutdown(self, grace: float) -> None:
        self._flusher.cancel()
        await self._server.stop(grace)
        return_grpc_poller(self._claimed)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self.metrics.flush()

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.alive and self._server is not None

    def stop(self, grace: float = 1.0) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            try:
                self._loop.run(self._shutdown(grace), timeout=grace + 5)
                self.metrics.flush()
            except Exception:  # stopping must not fail the caller's shutdown
                log.exception("stopping the expert server")
            self._server = None
        if self.servicer is not None:
            self.servicer.coalescer.close()
        self._loop.stop()
        self._loop = None

    def run_coroutine(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop (used by the Serve replica to reach the directory)."""
        assert self._loop is not None, "server not started"
        return self._loop.run(coro, timeout)

    def submit_coroutine(self, coro):
        assert self._loop is not None, "server not started"
        return self._loop.submit(coro)
