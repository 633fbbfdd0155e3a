"""Per-layer coalescing of an expert replica's Forward calls: concurrent calls for one layer computed as one batch.

A layer's batch starts when it reaches `max_batch_rows` rows, or `max_wait_ms` after its first call arrived, or at
once when no other Forward is in flight on this replica (a lone caller never waits). While a batch computes, new
calls queue up and form the next batch. Small batches (<= `inline_rows`) compute on the event loop itself (a thread
hop would cost more than the matmuls); bigger ones on a compute thread, so the loop keeps taking in calls meanwhile.
A call whose deadline passed while queued is dropped from its batch (`DeadlineExpired`, never computed). The batch
goes through the replica's one kernel interface, `ExpertWeights.forward_batch`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from expertmesh.core.codec import ForwardBatch
from expertmesh.core.kernel import ExpertWeights
from expertmesh.experts.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_MS = 1.0
DEFAULT_MAX_BATCH_ROWS = 4096
# Batches up to this many rows are computed on the event loop itself: for them a hop to the compute thread (and
# the GIL hand-offs it brings) costs more than the matmuls. Bigger batches go to the compute thread so the loop
# keeps taking in calls (which then form the next batch).
DEFAULT_INLINE_ROWS = 256


class DeadlineExpired(Exception):
    """The call's deadline passed before its batch started."""


@dataclass
class _Call:
    batch: ForwardBatch
    future: asyncio.Future
    deadline: float | None  # loop time
    rows: int
    queued: float = 0.0  # perf_counter when submitted (for the queue-wait timer)


class DataPlaneTimers:
    """Cumulative seconds per stage of Forward calls on this replica (profiling; benchmarks read `snapshot()`).

    validate: parse + codec checks; queue: submit -> its batch starts (coalescing wait); compute: the batch's
    kernel time (counted once per call it served); respond: output encoding; handler: the whole handler.
    Calls on a ForwardStream also have the two steps around the handler (per stream call): receive: the message
    read -> its handler starts (the loop turn of its task); write: the reply handed to gRPC -> written.
    """

    STAGES = ("validate", "queue", "compute", "respond", "handler")
    STREAM_STAGES = ("receive", "write")

    def __init__(self):
        self.calls = 0
        self.batches = 0
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.stream_calls = 0
        self.stream_seconds = dict.fromkeys(self.STREAM_STAGES, 0.0)

    def snapshot(self) -> dict:
        calls, stream_calls = max(1, self.calls), max(1, self.stream_calls)
        return {
            "calls": self.calls,
            "batches": self.batches,
            "us_per_call": {k: round(v / calls * 1e6, 1) for k, v in self.seconds.items()},
            "stream_calls": self.stream_calls,
            "us_per_stream_call": {k: round(v / stream_calls * 1e6, 1) for k, v in self.stream_seconds.items()},
        }


@dataclass
class _LayerQueue:
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    first_arrival: float = 0.0
    draining: bool = False


class Coalescer:
    """Per-(layer, dtype) queues of validated calls, computed as one batch each on a single compute thread."""

    def __init__(
        self,
        weights: ExpertWeights,
        metrics: ReplicaMetrics,
        max_wait_ms: float,
        max_batch_rows: int,
        inline_rows: int = DEFAULT_INLINE_ROWS,
    ):
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

    async def submit(
        self, batch: ForwardBatch, time_remaining: Callable[[], float | None] | None = None
    ) -> tuple[bytes, int]:
        """The call's output [T, H] as raw bytes (the batch's dtype) and the rows of the batch it was computed in.
        `time_remaining()` gives the seconds left to a call that has to queue, None = no deadline (a unary call's
        `context.time_remaining`, a stream message's own; a lone call is computed at once and never asks)."""
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
        remaining = time_remaining() if time_remaining is not None else None
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
        return (
            q.rows < self.max_batch_rows
            and self.in_flight > len(q.calls)  # someone else may still join this layer's batch
            and now < q.first_arrival + self.max_wait_s
        )

    def _take(self, q: _LayerQueue, now: float) -> list[_Call]:
        taken: list[_Call] = []
        rows, keep = 0, []
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
            # whole-layer calls with one K stay one: stacked, their rows are again n // K (no index to build)
            whole = all(b.whole_layer for b in batches) and len({b.top_k for b in batches}) == 1
            batch = ForwardBatch(
                layer,
                np.concatenate([b.hidden_data for b in batches]),  # [sum T, H]
                batches[0].dtype,
                None if whole else np.concatenate([b.row_index() + off for b, off in zip(batches, offsets)]),
                np.concatenate([b.expert for b in batches]),  # [sum N]
                np.concatenate([b.weight for b in batches]),  # [sum N]
                whole_layer=whole,
            )
        out = self.weights.forward_batch(batch)  # [sum T, H] bytes
        rows = batch.rows
        self.metrics.batch(layer, rows, batch.expert, self.weights.num_experts)
        if len(batches) == 1:
            return [out], rows
        row_bytes = len(out) // max(1, rows)
        return [out[off * row_bytes : (off + b.rows) * row_bytes] for b, off in zip(batches, offsets.tolist())], rows

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)
