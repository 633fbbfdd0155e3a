"""The data plane of an expert replica: `ExpertService` (the servicer) on its own grpc.aio server.

A replica holds the FFN weights of its group's (layer, expert) keys only (`ExpertWeights`, loaded lazily from
the checkpoint) and answers `Forward` for one layer per call: parse, `codec.decode_forward` (all validation),
`coalescer.Coalescer` (concurrent calls for one layer computed as ONE batch through `ExpertWeights.forward_batch`),
encode the reply. The server's loop claims grpc.aio's poller (`grpc_poller`).

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
from pathlib import Path

import grpc
import torch
from google.protobuf.message import DecodeError

from expertmesh.core import settings, telemetry
from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.codec import ExpertNotHeld, WireError, decode_forward, encode, encode_raw_into
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.loop_thread import LoopThread
from expertmesh.core.protos import expert_pb2
from expertmesh.experts.coalescer import (
    DEFAULT_INLINE_ROWS,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_WAIT_MS,
    Coalescer,
    DeadlineExpired,
)
from expertmesh.experts.grpc_poller import claim_grpc_poller, return_grpc_poller
from expertmesh.experts.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

SERVICE = "expertmesh.v1.ExpertService"
METRICS_FLUSH_SECONDS = 1.0

# SO_REUSEPORT is on by default in gRPC on Linux: two replicas could then "bind" the same port and split its
# traffic. Off, so a taken port fails and we try the next one in the range.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), *settings.grpc_message_options()]
# For clients of ExpertService (the router, tests, benchmarks): the same message-size limits as the server.
CHANNEL_OPTIONS = settings.grpc_message_options()


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


class ExpertServicer:
    """`ExpertService` over the weights of one replica's keys."""

    def __init__(
        self,
        weights: ExpertWeights,
        num_layers: int,
        replica_id: str,
        group: str,
        metrics: ReplicaMetrics,
        max_wait_ms: float,
        max_batch_rows: int,
        inline_rows: int = DEFAULT_INLINE_ROWS,
    ):
        self.weights = weights
        self.num_layers = num_layers
        self.replica_id = replica_id
        self.group = group
        self.metrics = metrics
        self.coalescer = Coalescer(weights, metrics, max_wait_ms, max_batch_rows, inline_rows)
        self._info = expert_pb2.InfoResponse(
            replica_id=replica_id,
            group=group,
            keys=keys_to_proto(weights.held),
            hidden_size=weights.hidden_size,
            dtype=encode(torch.empty(0, dtype=weights.dtype)).dtype,
            weight_bytes=weights.weight_bytes,
            compute_threads=torch.get_num_threads(),
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # Forward takes raw bytes (no request_deserializer) so an unparseable message is INVALID_ARGUMENT, not
        # the INTERNAL a failing generated deserializer would give.
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Forward": grpc.unary_unary_rpc_method_handler(
                    self.forward, response_serializer=expert_pb2.ForwardResponse.SerializeToString
                ),
                "Info": grpc.unary_unary_rpc_method_handler(
                    self.info,
                    request_deserializer=expert_pb2.InfoRequest.FromString,
                    response_serializer=expert_pb2.InfoResponse.SerializeToString,
                ),
            },
        )

    async def info(self, request, context) -> expert_pb2.InfoResponse:
        return self._info

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ForwardResponse:
        metadata = context.invocation_metadata()
        if metadata and any(k == "traceparent" for k, _ in metadata):  # a traced request: one span per call
            with telemetry.tracer().start_as_current_span(
                "expert forward",
                context=telemetry.extract_metadata(metadata),
                attributes={"expertmesh.replica": self.replica_id, "expertmesh.group": self.group},
            ):
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
                batch = decode_forward(
                    request,
                    held=self.weights.held,
                    hidden_size=self.weights.hidden_size,
                    num_layers=self.num_layers,
                    num_experts=self.weights.num_experts,
                )
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

    def __init__(
        self,
        checkpoint: str | Path | CheckpointReader,
        keys: dict[int, list[int]],
        *,
        replica_id: str = "",
        group: str = "",
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        inline_rows: int = DEFAULT_INLINE_ROWS,
        metrics_backend: str = "prometheus",
        dtype: torch.dtype | None = None,
        compute_threads: int = 0,
    ):
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
        self.servicer = ExpertServicer(
            self.weights,
            self.reader.info.num_layers,
            self.replica_id,
            self.group,
            self.metrics,
            self._max_wait_ms,
            self._max_batch_rows,
            self._inline_rows,
        )
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
        server = self._server
        assert server is not None, "stop() shuts down only a started server"
        await server.stop(grace)
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
