"""Transport: the router's links to the expert replicas. It moves request messages and knows nothing about experts.

One channel + stub per replica endpoint, the rows each has in flight from this process (the router's routing
balances by them), one blocking call (`call`) or a round of calls all in flight at once (`start` then `finish`),
the deadline of every call, and the failover signal: any RpcError (an error status, a passed deadline, a dead
peer) comes out as `ReplicaFailed`, which the dispatcher answers by resending elsewhere.

Also the Prometheus side of it: `expertmesh_dispatch_seconds{replica}` (RPC latency) and
`expertmesh_dispatch_failovers_total{replica}`, and the process's metrics HTTP endpoint (`serve_metrics`, on
`EXPERTMESH_ROUTER_METRICS_PORT`, default core.settings.ROUTER_METRICS_PORT; 0 = off).
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from expertmesh.core import settings
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


class ReplicaLink:
    """One channel + stub per replica endpoint, and the rows it has in flight from this process."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.forward = expert_pb2_grpc.ExpertServiceStub(self.channel).Forward
        self.inflight_rows = 0

    def close(self) -> None:
        self.channel.close()


class InFlight:
    """One call of a round, started by `Transport.start`, to be finished by `Transport.finish`."""

    __slots__ = ("link", "rows", "future", "sent")

    def __init__(self, link: ReplicaLink, rows: int, future, sent: float):
        self.link, self.rows, self.future, self.sent = link, rows, future, sent

    @property
    def endpoint(self) -> str:
        return self.link.endpoint


class Transport:
    """Links to replica endpoints; Forward calls with a deadline; RpcError -> ReplicaFailed."""

    def __init__(self, deadline_s: float, metrics: TransportMetrics | None = None):
        self.deadline_s = deadline_s
        self.metrics = metrics
        self._links: dict[str, ReplicaLink] = {}

    def connect(self, endpoint: str) -> None:
        """Open a link to `endpoint` unless there is one (links are kept: a replica may come back)."""
        if endpoint not in self._links:
            self._links[endpoint] = ReplicaLink(endpoint)

    def inflight_rows(self) -> dict[str, int]:
        """endpoint -> rows in flight from this process now."""
        return {endpoint: link.inflight_rows for endpoint, link in self._links.items()}

    def call(
        self, endpoint: str, request: expert_pb2.ForwardRequest, rows: int, metadata=None
    ) -> expert_pb2.ForwardResponse:
        """One blocking Forward of `rows` rows. Raises ReplicaFailed."""
        link = self._links[endpoint]
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
        """Start one Forward of a round (all of a round's calls are in flight at once); `finish` collects it."""
        link = self._links[endpoint]
        link.inflight_rows += rows
        sent = time.perf_counter()
        return InFlight(link, rows, link.forward.future(request, timeout=self.deadline_s, metadata=metadata), sent)

    def finish(self, call: InFlight) -> expert_pb2.ForwardResponse:
        """Wait for a started call's reply. Raises ReplicaFailed."""
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
