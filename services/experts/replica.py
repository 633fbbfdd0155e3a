"""The data plane of an expert replica: `ExpertService` (the servicer) on its own grpc.aio server.

A replica holds the FFN weights of its group's (layer, expert) keys only (`ExpertWeights`, loaded lazily from
the checkpoint) and answers calls for one layer each: parse, `codec.decode_forward` (all validation),
`coalescer.Coalescer` (concurrent calls for one layer computed as ONE batch through `ExpertWeights.forward_batch`),
encode the reply. One handler (`ExpertServicer._handle`) serves both ways in: `ForwardStream`, the router's data
plane (a long-lived stream per router, each message a call with its own id, deadline and trace context, answered
by a task of its own, replies matched by id), and unary `Forward` (tools, probes, the router with streams turned
off). The server's loop claims grpc.aio's poller (`grpc_poller`).

Errors: `WireError` -> INVALID_ARGUMENT, an unparseable message -> INVALID_ARGUMENT, `ExpertNotHeld` ->
NOT_FOUND; a call whose deadline passed while queued is dropped from its batch (DEADLINE_EXCEEDED, never
computed); a cancelled call is dropped too. On the stream these are the one message's reply (status code + details
in the ForwardReply) and the stream serves on. No bad call takes the server down.

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

from expertmesh.core import auth, settings, telemetry
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
# Routers ping their long-lived streams (EXPERTMESH_DISPATCH_KEEPALIVE_S): accept it.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), *settings.grpc_message_options(), *settings.grpc_keepalive_server_options()]
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
        # Forward and ForwardStream take raw bytes (no request_deserializer) so an unparseable message is
        # INVALID_ARGUMENT (on the stream: that message's reply), not the INTERNAL a failing generated deserializer
        # would give (on the stream it would end the whole stream).
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Forward": grpc.unary_unary_rpc_method_handler(
                    self.forward, response_serializer=expert_pb2.ForwardResponse.SerializeToString
                ),
                "ForwardStream": grpc.stream_stream_rpc_method_handler(
                    self.forward_stream, response_serializer=expert_pb2.ForwardReply.SerializeToString
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

    def _span(self, carrier: dict[str, str]):
        """The `expert forward` span of one traced call, parented to the router's layer span in `carrier`."""
        return telemetry.tracer().start_as_current_span(
            "expert forward",
            context=telemetry.extract_metadata(carrier.items()),
            attributes={"expertmesh.replica": self.replica_id, "expertmesh.group": self.group},
        )

    # -- unary Forward: tools, probes, and the router with EXPERTMESH_DISPATCH_STREAMS=0 --

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> expert_pb2.ForwardResponse:
        response = expert_pb2.ForwardResponse()
        metadata = context.invocation_metadata()
        if metadata and any(k == "traceparent" for k, _ in metadata):  # a traced request: one span per call
            with self._span(dict(metadata)):
                error = await self._handle(raw, context.time_remaining, response)
        else:
            error = await self._handle(raw, context.time_remaining, response)
        if error is not None:
            await context.abort(*error)
        return response

    # -- ForwardStream: the router's data plane, many calls in flight on one stream --

    async def forward_stream(self, messages, context: grpc.aio.ServicerContext) -> None:
        """Each message is answered by a task of its own (so calls on one stream, and on others, coalesce), replies
        in the order they finish. A bad message gets its error in its reply; the stream serves on. The caller
        closing its side ends the stream once every call in flight is answered; a cancelled stream cancels them."""
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        writing = asyncio.Lock()  # one write at a time on a stream; uncontended it costs no loop turn
        timers = self.coalescer.timers

        async def answer(raw: bytes, received: float) -> None:
            started = time.perf_counter()
            reply = await self._stream_call(raw, loop)
            try:
                async with writing:
                    written = time.perf_counter()
                    await context.write(reply)
                timers.stream_calls += 1
                timers.stream_seconds["receive"] += started - received
                timers.stream_seconds["write"] += time.perf_counter() - written
            except Exception as exc:  # the stream is gone; its other tasks are being cancelled with it
                log.debug("ForwardStream: reply %d not sent (%s)", reply.id, exc)

        try:
            async for raw in messages:
                task = loop.create_task(answer(raw, time.perf_counter()))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:  # the caller closed its side: answer what is in flight, then end the stream (OK)
                await asyncio.wait(set(pending))
        finally:
            if pending:  # cancelled (the caller went away): nothing outlives the stream
                tasks = set(pending)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_call(self, raw: bytes, loop: asyncio.AbstractEventLoop) -> expert_pb2.ForwardReply:
        reply = expert_pb2.ForwardReply()
        try:
            call = expert_pb2.ForwardCall.FromString(raw)
        except DecodeError as exc:  # the id is the first field the router writes: answer with it if it reads
            reply.id = leading_id(raw)
            reply.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            reply.message = f"unparseable ForwardCall: {exc}"
            self.metrics.call(0.0, "INVALID_ARGUMENT")
            return reply
        reply.id = call.id
        deadline = loop.time() + call.timeout_s if call.timeout_s > 0 else None
        time_remaining = (lambda: deadline - loop.time()) if deadline is not None else None
        try:
            async with asyncio.timeout_at(deadline):  # as gRPC cancels a unary handler at its deadline
                if call.traceparent:
                    with self._span({"traceparent": call.traceparent, "tracestate": call.tracestate}):
                        error = await self._handle(call.request, time_remaining, reply.response)
                else:
                    error = await self._handle(call.request, time_remaining, reply.response)
        except TimeoutError:
            error = (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
        except Exception as exc:  # a failed batch (kernel error): this call's reply, as a unary call's UNKNOWN status
            log.exception("ForwardStream call %d failed", call.id)
            error = (grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        if error is not None:
            reply.ClearField("response")
            reply.code = error[0].value[0]
            reply.message = error[1]
        return reply

    # -- the one handler of both --

    async def _handle(
        self,
        message: bytes | expert_pb2.ForwardRequest,
        time_remaining,
        response: expert_pb2.ForwardResponse,
    ) -> tuple[grpc.StatusCode, str] | None:
        """Parse (raw bytes) -> decode_forward (every check) -> coalescer -> the output encoded into `response`.
        None when answered, else the call's (status code, details). The same timers and metrics for every call."""
        start = time.perf_counter()
        code = "OK"
        self.coalescer.enter()
        seconds = self.coalescer.timers.seconds
        try:
            try:
                request = expert_pb2.ForwardRequest.FromString(message) if isinstance(message, bytes) else message
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
                return grpc.StatusCode.INVALID_ARGUMENT, msg
            except ExpertNotHeld as exc:
                code = "NOT_FOUND"
                return grpc.StatusCode.NOT_FOUND, f"{exc} (replica {self.replica_id})"
            try:
                output, rows = await self.coalescer.submit(batch, time_remaining)
            except DeadlineExpired:
                code = "DEADLINE_EXCEEDED"
                return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch started"
            r0 = time.perf_counter()
            response.batch_rows = rows
            encode_raw_into(response.output, batch.dtype, batch.hidden_data.shape, output)
            seconds["respond"] += time.perf_counter() - r0
            return None
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.coalescer.leave()
            elapsed = time.perf_counter() - start
            seconds["handler"] += elapsed
            self.coalescer.timers.calls += 1
            self.metrics.call(elapsed, code)


def leading_id(raw: bytes) -> int:
    """The id of a ForwardCall that does not parse as a whole, when its first field is the id (as the router
    writes it: field 1, varint); else 0."""
    if not raw or raw[0] != 0x08:
        return 0
    value, shift = 0, 0
    for byte in raw[1:11]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
    return 0


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
        device: str | torch.device | None = None,
    ):
        telemetry.init_tracing("expertmesh-experts")  # exports only when OTEL_EXPORTER_OTLP_ENDPOINT is set
        if compute_threads > 0:
            # torch's intra-op threads for the expert kernel (process-wide: meant for a replica's own process).
            # libgomp's workers spin-wait a few ms after each batch: busy CPU between calls. docs/benchmarks.md
            # measures 1 vs 2 on the dispatch round trip.
            torch.set_num_threads(compute_threads)
        reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
        self.reader = reader
        # device: where the weights live and the kernel runs (None: host memory; see ExpertWeights)
        keys = {int(k): list(v) for k, v in keys.items()}
        self.weights = ExpertWeights(reader, keys, dtype=dtype, device=device)
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
        self._server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=auth.server_interceptors(f"expert replica {self.replica_id}")
        )
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
        if self.servicer is not None:
            self.servicer.coalescer.close()
        self._loop.stop()
        self._loop = None
        self._server = None  # freed only now that its loop is closed (LoopThread.stop says why)

    def run_coroutine(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop (used by the Serve replica to reach the directory)."""
        assert self._loop is not None, "server not started"
        return self._loop.run(coro, timeout)

    def submit_coroutine(self, coro):
        assert self._loop is not None, "server not started"
        return self._loop.submit(coro)
