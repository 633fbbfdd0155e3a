"""Prometheus metrics of an expert replica: routed tokens per (layer, expert), coalesced batch sizes, call latency.

Two backends, same names and labels: inside Ray, `ray.util.metrics` (exported by every Ray node's metrics agent,
`--metrics-export-port`, with Ray's `ray_` prefix); outside Ray (tests, the router's in-process servers), a
private `prometheus_client` registry per server, rendered with `ReplicaMetrics.text()`.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: prometheus_client is imported by the backend that uses it
    import prometheus_client

BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class ReplicaMetrics:
    def __init__(self, group: str, backend: str = "prometheus"):
        self.group = group
        self.backend = backend
        # Per call, `call` and `batch` only append to a deque (append/popleft are thread-safe: the compute thread
        # records batches too); `flush()` turns them into counter increments and histogram observations (the server
        # flushes every second, and before every scrape). Recording them per call added measurably to the replica's
        # round trip (docs/benchmarks.md): eight labelled counter increments per call cost as much as the matmuls.
        self._pending_batches: deque[tuple[int, int, np.ndarray, int]] = deque()
        self._pending_calls: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()  # one flush at a time
        self._children: dict[tuple, prometheus_client.Histogram] = {}  # labelled histogram children
        if backend == "ray":
            from ray.util import metrics as rm

            self._tokens = rm.Counter(
                "expertmesh_replica_expert_tokens",
                "routed tokens computed per (layer, expert)",
                tag_keys=("group", "layer", "expert"),
            )
            self._rows = rm.Histogram(
                "expertmesh_replica_batch_rows",
                "rows per coalesced batch",
                boundaries=list(BATCH_ROWS_BUCKETS),
                tag_keys=("group", "layer"),
            )
            self._calls = rm.Histogram(
                "expertmesh_replica_forward_seconds",
                "Forward latency inside the replica",
                boundaries=list(LATENCY_BUCKETS),
                tag_keys=("group", "code"),
            )
            self.registry = None
        else:
            import prometheus_client as pc

            self.registry = pc.CollectorRegistry()
            self._tokens = pc.Counter(
                "expertmesh_replica_expert_tokens",
                "routed tokens computed per (layer, expert)",
                ("group", "layer", "expert"),
                registry=self.registry,
            )
            self._rows = pc.Histogram(
                "expertmesh_replica_batch_rows",
                "rows per coalesced batch",
                ("group", "layer"),
                buckets=BATCH_ROWS_BUCKETS,
                registry=self.registry,
            )
            self._calls = pc.Histogram(
                "expertmesh_replica_forward_seconds",
                "Forward latency inside the replica",
                ("group", "code"),
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )

    def _inc(self, metric, value: float, tags: dict) -> None:
        if self.backend == "ray":
            metric.inc(value, tags=tags)
        else:
            metric.labels(**tags).inc(value)

    def _observe(self, metric, value: float, tags: dict) -> None:
        if self.backend == "ray":
            metric.observe(value, tags=tags)
            return
        key = (id(metric), *tags.values())  # a labels() lookup per call costs more than the observation
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**tags)
        child.observe(value)

    def batch(self, layer: int, rows: int, expert: np.ndarray, num_experts: int) -> None:
        """One computed batch: its row count, and its assignments' expert ids [N] (counted per expert on flush)."""
        self._pending_batches.append((layer, rows, expert, num_experts))

    def call(self, seconds: float, code: str) -> None:
        """One Forward call's latency inside the replica and its status code (observed on flush)."""
        self._pending_calls.append((seconds, code))

    def flush(self) -> None:
        """Record everything since the last flush: batch rows, call latencies, token counts per (layer, expert)."""
        with self._lock:
            # As many as are there now; whatever is appended meanwhile waits for the next flush (never lost).
            batches = [self._pending_batches.popleft() for _ in range(len(self._pending_batches))]
            calls = [self._pending_calls.popleft() for _ in range(len(self._pending_calls))]
            per_layer: dict[int, list[np.ndarray]] = {}
            sizes: dict[int, int] = {}
            for layer, rows, expert, num_experts in batches:
                self._observe(self._rows, rows, {"group": self.group, "layer": str(layer)})
                per_layer.setdefault(layer, []).append(expert)
                sizes[layer] = num_experts
            for seconds, code in calls:
                self._observe(self._calls, seconds, {"group": self.group, "code": code})
            for layer, experts in per_layer.items():
                counts = np.bincount(np.concatenate(experts), minlength=sizes[layer])  # [E]
                for expert in np.flatnonzero(counts).tolist():
                    self._inc(
                        self._tokens,
                        int(counts[expert]),
                        {"group": self.group, "layer": str(layer), "expert": str(expert)},
                    )

    def text(self) -> str:
        """Prometheus exposition text (prometheus backend only; Ray's agent serves the ray backend)."""
        if self.registry is None:
            raise RuntimeError("ray-backed metrics are exported by the Ray node's metrics agent")
        import prometheus_client as pc

        self.flush()
        return pc.generate_latest(self.registry).decode()
