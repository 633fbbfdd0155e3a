"""Prometheus metrics of the gateway (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        self.in_progress = Gauge(
            "expertmesh_gateway_requests_in_progress", "Generation requests being served", ["endpoint"], registry=r
        )
        self.ttft = Histogram(
            "expertmesh_gateway_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "expertmesh_gateway_prompt_tokens", "Prompt tokens of served requests", ["endpoint"], registry=r
        )
        self.completion_tokens = Counter(
            "expertmesh_gateway_completion_tokens", "Tokens generated", ["endpoint"], registry=r
        )
        self.errors = Counter(
            "expertmesh_gateway_errors", "Errors returned, by endpoint and error type", ["endpoint", "type"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
