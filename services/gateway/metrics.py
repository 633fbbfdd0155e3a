"""Prometheus metrics of the gateway (one registry per app, so several apps can live in one process).

Request-level metrics of the generation itself (tokens, TTFT, TPOT, queueing, KV cache) are vLLM's, on each router's
/metrics; the gateway measures what only it sees: the requests it answered, its own errors, the time until a router
started answering, and its view of each router (in flight, requests, refusals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RouterPoolCollector:
    """Per router, read from the pool when scraped: requests in flight from this gateway, requests sent, failures,
    and whether it is up (not cooling down after a refused connection)."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        in_flight = GaugeMetricFamily(
            "expertmesh_gateway_router_requests_in_flight", "Requests in flight to the router", labels=["router"]
        )
        up = GaugeMetricFamily("expertmesh_gateway_router_up", "1 unless it refused recently", labels=["router"])
        sent = CounterMetricFamily("expertmesh_gateway_router_requests", "Requests sent to it", labels=["router"])
        failed = CounterMetricFamily(
            "expertmesh_gateway_router_failures", "Requests the router refused or broke off", labels=["router"]
        )
        for r in self.pool.snapshot():
            in_flight.add_metric([r["url"]], r["in_flight"])
            up.add_metric([r["url"]], 1.0 if r["up"] else 0.0)
            sent.add_metric([r["url"]], r["requests"])
            failed.add_metric([r["url"]], r["failures"])
        yield from (in_flight, up, sent, failed)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "expertmesh_gateway_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "expertmesh_gateway_errors", "Errors returned, by endpoint and error type", ["endpoint", "type"], registry=r
        )
        self.first_byte = Histogram(
            "expertmesh_gateway_time_to_first_byte_seconds",
            "From a /v1 request's arrival to the router's response headers (queueing and prefill included for a "
            "non-streamed request; for a stream, until the router accepted it)",
            ["path"],
            buckets=FIRST_BYTE_BUCKETS,
            registry=r,
        )

    def watch_pool(self, pool) -> None:
        self.registry.register(RouterPoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)
