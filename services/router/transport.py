"""Transport: the router's links to the expert replicas. It moves request messages and knows nothing about experts.

One channel per replica endpoint and on it one long-lived bidirectional `ForwardStream` (opened on first use,
reopened after it broke), the rows each replica has in flight from this process (the router's routing balances by
them), one blocking call (`call`) or a round of calls all in flight at once (`start` then `finish`), the deadline
of every call, and the failover signal: an error reply, a passed deadline, a broken stream or a dead peer comes out
as `ReplicaFailed`, which the dispatcher answers by resending elsewhere. Each message on the stream is one call
with its own id (replies are matched by it, in whatever order they come), deadline and trace context (the
`metadata` the dispatcher passes: its traceparent). `EXPERTMESH_DISPATCH_STREAMS=0` sends each call as a unary
`Forward` instead (the replica answers both with one handler).

Also the Prometheus side of it: `expertmesh_dispatch_seconds{replica}` (RPC latency) and
`expertmesh_dispatch_failovers_total{replica}`, and the process's metrics HTTP endpoint (`serve_metrics`, on
`EXPERTMESH_ROUTER_METRICS_PORT`, default core.settings.ROUTER_METRICS_PORT; 0 = off).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import grpc

from expertmesh.core import auth, settings
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc

log = logging.getLogger("expertmesh.router.transport")

CHANNEL_OPTIONS = settings.grpc_message_options()


class ReplicaFailed(Exception):
    """The failover signal: a call to `endpoint` did not give a usable reply (`detail` says why)."""

    def __init__(self, endpoint: str, detail: str):
        super().__init__(f"{endpoint}: {detail}")
        self.endpoint = endpoint
        self.detail = detail


class TransportMetrics:
    """Prometheus objects of the router's replica calls (created once per process: the default registry is global)."""

    _instance: TransportMetrics | None = None
    _lock = threading.Lock()

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.dispatch_seconds = Histogram(
            "expertmesh_dispatch_seconds",
            "Latency of one Forward RPC to an expert replica",
            ["replica"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.failovers = Counter(
            "expertmesh_dispatch_failovers", "Forward RPCs that failed and were resent", ["replica"]
        )
        self.fallback_assignments = Counter(
            "expertmesh_dispatch_fallback_assignments",
            "(token, expert) assignments the router computed itself: no live replica held the expert",
            ["layer"],
        )
        self._children: dict = {}

    @classmethod
    def get(cls) -> TransportMetrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = TransportMetrics()
            return cls._instance

    def observe(self, replica: str, seconds: float) -> None:
        child = self._children.get(replica)
        if child is None:  # a labels() lookup per call costs more than the observation
            child = self._children[replica] = self.dispatch_seconds.labels(replica=replica)
        child.observe(seconds)

    def failover(self, replica: str) -> None:
        self.failovers.labels(replica=replica).inc()

    def fallback(self, layer: int, assignments: int) -> None:
        self.fallback_assignments.labels(layer=str(layer)).inc(assignments)


# Which client the router's data plane uses, measured (benchmarks/dispatch_roundtrip.py's layer call, 64 tokens x
# 128 fp32, one replica in its own process, 2-core VM, 3 runs of 4 x 1000 interleaved calls, medians in ms):
#   sync gRPC bidi stream, queue-fed request iterator + reader thread   0.608  0.688  0.729
#   grpc.aio bidi stream on a LoopThread, concurrent futures           0.651  0.719  0.764
#   unary, blocking call (today's whole-layer path)                    0.674  0.744  0.794
#   unary, .future() (today's round path)                              0.806  0.911  0.921
# so the stream is the sync one, and streams are on by default (EXPERTMESH_DISPATCH_STREAMS).
STREAM_METHOD = "/expertmesh.v1.ExpertService/ForwardStream"
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_END = object()  # put on a stream's request queue: the request iterator ends (the stream is half-closed)


class _Reply:
    """A call's slot on a stream: the reader thread (or a break) fills it, the caller waits on it."""

    __slots__ = ("event", "reply", "error")

    def __init__(self):
        self.event = threading.Event()
        self.reply: expert_pb2.ForwardReply | None = None
        self.error: str | None = None


class ForwardStream:
    """One bidirectional ForwardStream to a replica: calls go in through a queue (gRPC's sync API reads requests
    from an iterator, on a thread of its own), replies come back on a reader thread and are matched by id. When
    the stream breaks every call pending on it fails (and the link opens a new stream for the next call)."""

    def __init__(self, endpoint: str, channel: grpc.Channel):
        self.endpoint = endpoint
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, _Reply] = {}
        self._lock = threading.Lock()  # `broken` and `_pending` change together (a call never waits on a dead stream)
        self._ids = itertools.count(1)  # 0 is the replica's answer to a message whose id it could not read
        self.broken = False
        self.detail = ""  # why it broke (the status the replica ended it with)
        method = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=expert_pb2.ForwardCall.SerializeToString,
            response_deserializer=expert_pb2.ForwardReply.FromString,
        )
        self._call = method(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read, name=f"forward-stream-{endpoint}", daemon=True)
        self._reader.start()

    def send(self, request: expert_pb2.ForwardRequest, timeout_s: float, metadata) -> tuple[int, _Reply] | None:
        """Put one call on the stream; (id, its slot), or None if the stream is broken already."""
        call = expert_pb2.ForwardCall(request=request, timeout_s=timeout_s)
        for key, value in metadata or ():  # the unary call's trace metadata, as the message's own fields
            if key == "traceparent":
                call.traceparent = value
            elif key == "tracestate":
                call.tracestate = value
        slot = _Reply()
        with self._lock:
            if self.broken:
                return None
            call.id = call_id = next(self._ids)
            self._pending[call_id] = slot
        self._requests.put(call)
        return call_id, slot

    def wait(self, call_id: int, slot: _Reply, timeout: float) -> expert_pb2.ForwardResponse:
        """The call's response; ReplicaFailed for an error reply, a broken stream or a passed deadline (then its
        late reply is dropped)."""
        if not slot.event.wait(max(timeout, 0.0)):
            with self._lock:
                self._pending.pop(call_id, None)
            if not slot.event.is_set():
                raise ReplicaFailed(self.endpoint, f"{grpc.StatusCode.DEADLINE_EXCEEDED}: no reply within the deadline")
        if slot.error is not None:
            raise ReplicaFailed(self.endpoint, slot.error)
        reply = slot.reply
        assert reply is not None  # the event is set with a reply or an error
        if reply.code:
            raise ReplicaFailed(self.endpoint, f"{_STATUS.get(reply.code, reply.code)}: {reply.message}")
        return reply.response

    def _read(self) -> None:
        detail = "stream ended by the replica"
        try:
            for reply in self._call:
                slot = self._pending.pop(reply.id, None)  # None: a call past its deadline (dropped)
                if slot is not None:
                    slot.reply = reply
                    slot.event.set()
        except grpc.RpcError as exc:
            detail = f"{exc.code()}: stream broke: {exc.details()}"
        except Exception as exc:  # never leave calls waiting on a stream nobody reads
            log.exception("ForwardStream reader for %s", self.endpoint)
            detail = f"stream reader failed: {exc!r}"
        self._break(detail)

    def _break(self, detail: str) -> None:
        with self._lock:
            self.broken, self.detail = True, detail
            failed, self._pending = self._pending, {}
        self._requests.put(_END)  # gRPC's request-iterator thread waits on the queue: let it end
        for slot in failed.values():
            slot.error = detail
            slot.event.set()

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()


class ReplicaLink:
    """One channel per replica endpoint: its ForwardStream (opened on first use, reopened after it broke) or its
    unary Forward, and the rows it has in flight from this process."""

    def __init__(self, endpoint: str, streams: bool):
        self.endpoint = endpoint
        # + HTTP/2 keepalive: a replica that stopped answering (host gone, process frozen, a middlebox dropped the
        # idle connection) breaks the stream while it is idle, and the next call opens a new one
        options = CHANNEL_OPTIONS + settings.grpc_keepalive_options()
        self.channel = auth.insecure_channel(endpoint, options=options)  # + the cluster credential
        self.forward = expert_pb2_grpc.ExpertServiceStub(self.channel).Forward
        self.streams = streams
        self._stream: ForwardStream | None = None
        self._stream_lock = threading.Lock()
        self.inflight_rows = 0

    def send(self, request: expert_pb2.ForwardRequest, timeout_s: float, metadata):
        """Put one call on the stream, opening a new stream if there is none or it broke."""
        stream = self._stream
        for _ in range(2):  # a stream that broke since we last looked: once more on a new one
            if stream is None or stream.broken:
                with self._stream_lock:
                    if self._stream is None or self._stream.broken:
                        self._stream = ForwardStream(self.endpoint, self.channel)
                    stream = self._stream
            sent = stream.send(request, timeout_s, metadata)
            if sent is not None:
                return stream, *sent
        # e.g. UNAUTHENTICATED (no or a wrong cluster credential): say so, not only that it broke
        raise ReplicaFailed(
            self.endpoint,
            f"{grpc.StatusCode.UNAVAILABLE}: stream broke as it opened ({stream.detail if stream else 'no stream'})",
        )

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.channel.close()


class InFlight:
    """One call of a round, started by `Transport.start`, to be finished by `Transport.finish`."""

    __slots__ = ("link", "rows", "future", "sent", "stream", "call_id", "slot")

    def __init__(self, link: ReplicaLink, rows: int, sent: float):
        self.link, self.rows, self.sent = link, rows, sent
        self.future: grpc.Future | None = None  # unary
        self.stream: ForwardStream | None = None  # on a stream: the stream, the call's id and its reply slot
        self.call_id = 0
        self.slot: _Reply | None = None

    @property
    def endpoint(self) -> str:
        return self.link.endpoint


class Transport:
    """Links to replica endpoints; calls with a deadline, each on the replica's stream (or unary Forward with
    streams off); any failure -> ReplicaFailed."""

    def __init__(self, deadline_s: float, metrics: TransportMetrics | None = None, streams: bool | None = None):
        self.deadline_s = deadline_s
        self.metrics = metrics
        self.streams = settings.dispatch_streams() if streams is None else streams
        self._links: dict[str, ReplicaLink] = {}

    def connect(self, endpoint: str) -> None:
        """Open a link to `endpoint` unless there is one (links are kept: a replica may come back)."""
        if endpoint not in self._links:
            self._links[endpoint] = ReplicaLink(endpoint, self.streams)

    def inflight_rows(self) -> dict[str, int]:
        """endpoint -> rows in flight from this process now."""
        return {endpoint: link.inflight_rows for endpoint, link in self._links.items()}

    def call(
        self, endpoint: str, request: expert_pb2.ForwardRequest, rows: int, metadata=None
    ) -> expert_pb2.ForwardResponse:
        """One blocking call of `rows` rows. Raises ReplicaFailed."""
        link = self._links[endpoint]
        if link.streams:
            return self.finish(self.start(endpoint, request, rows, metadata))
        link.inflight_rows += rows
        sent = time.perf_counter()
        try:
            response = link.forward(request, timeout=self.deadline_s, metadata=metadata)
        except grpc.RpcError as exc:
            raise ReplicaFailed(endpoint, f"{exc.code()}: {exc.details()}") from exc
        finally:
            link.inflight_rows -= rows
        if self.metrics is not None:
            self.metrics.observe(endpoint, time.perf_counter() - sent)
        return response

    def start(self, endpoint: str, request: expert_pb2.ForwardRequest, rows: int, metadata=None) -> InFlight:
        """Start one call of a round (all of a round's calls are in flight at once); `finish` collects it. A call
        that cannot be sent (its stream broke as it opened) raises ReplicaFailed from `finish`, as any other."""
        link = self._links[endpoint]
        link.inflight_rows += rows
        call = InFlight(link, rows, time.perf_counter())
        if link.streams:
            try:
                call.stream, call.call_id, call.slot = link.send(request, self.deadline_s, metadata)
            except ReplicaFailed as exc:
                call.slot = _Reply()
                call.slot.error = exc.detail
                call.slot.event.set()
        else:
            call.future = link.forward.future(request, timeout=self.deadline_s, metadata=metadata)
        return call

    def finish(self, call: InFlight) -> expert_pb2.ForwardResponse:
        """Wait for a started call's reply (until its deadline). Raises ReplicaFailed."""
        try:
            if call.slot is not None:
                if call.stream is None:  # never sent
                    raise ReplicaFailed(call.endpoint, call.slot.error or "not sent")
                timeout = self.deadline_s - (time.perf_counter() - call.sent)
                response = call.stream.wait(call.call_id, call.slot, timeout)
            else:
                assert call.future is not None  # started as a unary call
                try:
                    response = call.future.result()
                except grpc.RpcError as exc:
                    raise ReplicaFailed(call.endpoint, f"{exc.code()}: {exc.details()}") from exc
        finally:
            call.link.inflight_rows -= call.rows
        if self.metrics is not None:
            self.metrics.observe(call.endpoint, time.perf_counter() - call.sent)
        return response

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


_metrics_server_port: int | None = None


def serve_metrics(port: int | None = None) -> int | None:
    """Start the Prometheus HTTP endpoint of this process once (port from env / defaults; 0 disables).

    Returns the port serving, or None. If the port is taken (e.g. the router server already serves the same
    default registry there) this logs and carries on: the metrics are in the shared registry either way.
    """
    global _metrics_server_port
    if _metrics_server_port is not None:
        return _metrics_server_port
    if port is None:
        port = settings.router_metrics_port()
    if port == 0:
        return None
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=settings.bind_host())
    except OSError as exc:
        log.warning("router metrics: port %d not available (%s); not serving metrics from the dispatcher", port, exc)
        return None
    _metrics_server_port = port
    return port
