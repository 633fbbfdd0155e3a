"""Remote dispatch of one MoE layer's routed experts: the `expertmesh::remote_experts` op and the Dispatcher.

vLLM's FusedMoE has already gated (softmax/sigmoid, grouped top-k, correction bias, renormalisation, scaling
factor) when the plugin's quant method calls `torch.ops.expertmesh.remote_experts(hidden [T, H],
topk_weights [T, K], topk_ids [T, K], layer)`; the op returns the routed-expert output [T, H]
(sum_k w[t, k] * expert_{ids[t, k]}(hidden[t])), exactly what vLLM's local expert kernel returns. It is a
`torch.library.custom_op` so torch.compile treats it as opaque (its data-dependent grouping cannot be traced).

The Dispatcher (one per process, `get_dispatcher()`):
- watches the expert directory (`discovery.directory.DirectoryClient`) and keeps, per (layer, expert), the live
  non-draining replicas, plus one gRPC channel per replica endpoint;
- for one layer: counts the step's assignments (one bincount -> `counters.RoutedTokenCounters`), groups the
  (token, expert) assignments by replica — an expert with several replicas has its assignments split across
  them, balanced by rows each replica already has in flight plus rows given to it in this layer — and sends
  ONE Forward RPC per replica with all its tokens (distinct hidden rows + token_index/expert/weight arrays,
  `codec.encode_forward`); all of a layer's RPCs are in flight at once (sync gRPC futures);
- fast paths (the common case: every expert of the layer has exactly one live replica, cached per directory
  snapshot as an expert -> replica table): if one replica holds the whole layer (the default plan), the step's
  hidden states go as they are in one blocking RPC and its reply is the output (no grouping, no index_add);
  otherwise one table lookup groups the assignments — no per-expert Python loop, no load balancing;
- combines replica outputs with one `index_add_` per replica into an fp32 buffer;
- failover: a replica that errors or passes its deadline (`EXPERTMESH_DISPATCH_DEADLINE_S`, default 5 s) has
  its assignments resent to another replica holding the same experts (excluding every replica that failed in
  this call) and is avoided for `SUSPECT_SECONDS` while alternatives exist. If no replica holds an expert
  (after waiting up to `EXPERTMESH_MISSING_EXPERT_WAIT_S`, default 10 s, for the directory to change) the op
  raises `RemoteExpertError`: the affected step fails, nothing is computed without an expert a token was
  routed to.

Prometheus (in the process that runs the model): `expertmesh_routed_tokens_total{layer,expert}` (from the
counters file), `expertmesh_dispatch_seconds{replica}` (RPC latency), `expertmesh_dispatch_failovers_total
{replica}`; served on `EXPERTMESH_ROUTER_METRICS_PORT` (default core.defaults.ROUTER_METRICS_PORT; 0 = off).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from opentelemetry import trace

from expertmesh.core import defaults, telemetry
from expertmesh.core.codec import (DEFAULT_MAX_MESSAGE_BYTES, as_numpy, decode, decode_owned, encode_forward,
                                   encode_raw_into, whole_layer_index)
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc
from expertmesh.discovery.directory import DirectoryClient
from expertmesh.router.counters import RoutedTokenCounters, default_counters_path, install_prometheus

log = logging.getLogger("expertmesh.router.dispatch")

ENV_DEADLINE = "EXPERTMESH_DISPATCH_DEADLINE_S"
ENV_MISSING_WAIT = "EXPERTMESH_MISSING_EXPERT_WAIT_S"
ENV_METRICS_PORT = "EXPERTMESH_ROUTER_METRICS_PORT"
SUSPECT_SECONDS = 5.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]


class RemoteExpertError(RuntimeError):
    """A routed expert could not be computed by any replica (the affected requests must fail)."""


# ---- the custom op ------------------------------------------------------------------------------------------

@torch.library.custom_op("expertmesh::remote_experts", mutates_args=())
def remote_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   layer: int) -> torch.Tensor:
    """hidden [T, H], topk_weights [T, K], topk_ids [T, K] -> [T, H] routed-expert output of `layer`."""
    if hidden.device.type != "cpu":   # a GPU router: the wire codec works on host memory
        out = get_dispatcher().forward(layer, hidden.cpu(), topk_weights.cpu(), topk_ids.cpu())
        return out.to(hidden.device, non_blocking=True)
    return get_dispatcher().forward(layer, hidden, topk_weights, topk_ids)


@remote_experts.register_fake
def _remote_experts_fake(hidden, topk_weights, topk_ids, layer):
    return torch.empty_like(hidden)


# ---- the routing table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Replica:
    replica_id: str
    endpoint: str
    keys: dict = field(hash=False, compare=False)   # layer -> frozenset of experts


@dataclass
class RoutingTable:
    """Live, non-draining replicas per (layer, expert), from one directory snapshot."""

    version: int
    replicas: list[Replica]
    holders: dict[int, dict[int, list[int]]]   # layer -> expert -> indices into `replicas`

    @classmethod
    def from_snapshot(cls, snap: expert_pb2.DirectorySnapshot) -> "RoutingTable":
        replicas: list[Replica] = []
        holders: dict[int, dict[int, list[int]]] = {}
        for entry in sorted(snap.replicas, key=lambda e: e.replica_id):
            if entry.draining:
                continue
            keys = {int(k.layer): frozenset(int(e) for e in k.experts) for k in entry.keys}
            idx = len(replicas)
            replicas.append(Replica(entry.replica_id, entry.endpoint, keys))
            for layer, experts in keys.items():
                per_layer = holders.setdefault(layer, {})
                for e in experts:
                    per_layer.setdefault(e, []).append(idx)
        return cls(int(snap.version), replicas, holders)

    def covers(self, layer: int, num_experts: int) -> bool:
        per_layer = self.holders.get(layer, {})
        return all(per_layer.get(e) for e in range(num_experts))

    def sole_owners(self, layer: int, num_experts: int) -> "SoleOwners | None":
        """If every expert of `layer` has exactly one replica: that mapping (cached per snapshot), else None."""
        cache = self.__dict__.setdefault("_sole", {})
        key = (layer, num_experts)
        if key not in cache:
            per_layer = self.holders.get(layer, {})
            owners = [per_layer.get(e, ()) for e in range(num_experts)]
            if all(len(o) == 1 for o in owners):
                idx = [o[0] for o in owners]
                distinct = sorted(set(idx))
                cache[key] = SoleOwners(torch.tensor(idx, dtype=torch.int64),
                                        self.replicas[distinct[0]].endpoint if len(distinct) == 1 else None)
            else:
                cache[key] = None
        return cache[key]


@dataclass(frozen=True)
class SoleOwners:
    """Every expert of a layer has one replica: owner [E] replica index per expert; `only` = endpoint if one
    replica holds the whole layer."""

    owner: torch.Tensor
    only: str | None


# ---- the dispatcher ------------------------------------------------------------------------------------------

class _ReplicaLink:
    """One channel + stub per replica endpoint, and the rows it has in flight from this process."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.forward = expert_pb2_grpc.ExpertServiceStub(self.channel).Forward
        self.inflight_rows = 0

    def close(self) -> None:
        self.channel.close()


class _Metrics:
    """Prometheus objects of the dispatcher (created once per process: the default registry is global)."""

    _instance: "_Metrics | None" = None
    _lock = threading.Lock()

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.dispatch_seconds = Histogram(
            "expertmesh_dispatch_seconds", "Latency of one Forward RPC to an expert replica",
            ["replica"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.failovers = Counter("expertmesh_dispatch_failovers", "Forward RPCs that failed and were resent",
                                 ["replica"])
        self.current_counters: RoutedTokenCounters | None = None
        install_prometheus(lambda: self.current_counters)
        self._children: dict = {}

    @classmethod
    def get(cls) -> "_Metrics":
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Metrics()
            return cls._instance

    def observe(self, replica: str, seconds: float) -> None:
        child = self._children.get(replica)
        if child is None:
            child = self._children[replica] = self.dispatch_seconds.labels(replica=replica)
        child.observe(seconds)


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
        port = int(os.environ.get(ENV_METRICS_PORT, defaults.ROUTER_METRICS_PORT))
    if port == 0:
        return None
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=defaults.bind_host())
    except OSError as exc:
        log.warning("router metrics: port %d not available (%s); not serving metrics from the dispatcher", port, exc)
        return None
    _metrics_server_port = port
    return port


class Dispatcher:
    """Sends one MoE layer's (token, expert) assignments to the expert replicas and combines the results."""

    def __init__(self, directory: str, *, deadline_s: float | None = None, missing_wait_s: float | None = None,
                 counters_path: str | None = None, metrics: bool = True):
        self.directory = directory
        self.deadline_s = float(deadline_s if deadline_s is not None else os.environ.get(ENV_DEADLINE, 5.0))
        self.missing_wait_s = float(missing_wait_s if missing_wait_s is not None
                                    else os.environ.get(ENV_MISSING_WAIT, 10.0))
        self.counters_path = counters_path or default_counters_path()
        self._table: RoutingTable | None = None
        self._table_changed = threading.Condition()
        self._links: dict[str, _ReplicaLink] = {}
        self._suspect_until: dict[str, float] = {}
        self._layers: dict[int, int] = {}          # model layer -> num experts (registered by the quant method)
        self._model_key: object = None
        self._counters: RoutedTokenCounters | None = None
        self._closed = False
        self._stats_lock = threading.Lock()
        self.rpcs: dict[str, int] = {}              # endpoint -> Forward RPCs sent
        self.assignments: dict[str, int] = {}       # endpoint -> (token, expert) assignments sent
        self.failovers = 0
        self.layer_calls = 0
        self.timers = {"prepare": 0.0, "encode": 0.0, "wait": 0.0, "combine": 0.0}
        self._metrics = _Metrics.get() if metrics else None
        if metrics:
            serve_metrics()
        self._directory_client = DirectoryClient(directory)
        self._directory_client.watch(self._apply_snapshot)

    # -- model registration (from the quant method's create_weights) --

    def register_layer(self, model_key: object, layer: int, num_experts: int) -> None:
        """Called once per FusedMoE layer while vLLM builds a model; a new model_key starts a new layer set."""
        if model_key != self._model_key:
            self._model_key = model_key
            self._layers = {}
        self._layers[layer] = num_experts
        # (Re)create the counters file now, so readers see this model's layers as soon as the engine exists.
        self._counters = None
        self._ensure_counters()

    # -- directory --

    def _apply_snapshot(self, snap: expert_pb2.DirectorySnapshot) -> None:
        table = RoutingTable.from_snapshot(snap)
        for replica in table.replicas:
            if replica.endpoint not in self._links:
                self._links[replica.endpoint] = _ReplicaLink(replica.endpoint)
        with self._table_changed:
            self._table = table
            self._table_changed.notify_all()

    def wait_for_coverage(self, layers: dict[int, int], timeout: float) -> RoutingTable:
        """Block until every (layer, expert) in `layers` {layer: num_experts} has a live replica."""
        deadline = time.monotonic() + timeout
        with self._table_changed:
            while True:
                table = self._table
                if table is not None and all(table.covers(l, n) for l, n in layers.items()):
                    return table
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = self._missing(table, layers)
                    raise RemoteExpertError(
                        f"expert directory {self.directory}: no live replica for {missing} after {timeout:.0f}s")
                self._table_changed.wait(left)

    @staticmethod
    def _missing(table: RoutingTable | None, layers: dict[int, int]) -> str:
        if table is None:
            return "any expert (no directory snapshot received yet)"
        out = []
        for layer, n in sorted(layers.items()):
            miss = [e for e in range(n) if not table.holders.get(layer, {}).get(e)]
            if miss:
                out.append(f"layer {layer} expert(s) {miss}")
        return "; ".join(out)

    # -- one layer --

    def _ensure_counters(self) -> RoutedTokenCounters:
        if self._counters is None:
            sizes = set(self._layers.values())
            self._counters = RoutedTokenCounters.create(self.counters_path, sorted(self._layers), max(sizes))
            if self._metrics is not None:
                self._metrics.current_counters = self._counters
        return self._counters

    def forward(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_weights/topk_ids [T, K] -> [T, H] = sum_k w[t,k] * expert_{ids[t,k]}(hidden[t])."""
        t0 = time.perf_counter()
        T, H = hidden.shape
        K = topk_ids.shape[1]
        if T == 0:
            return torch.zeros((T, H), dtype=hidden.dtype)
        num_experts = self._layers.get(layer)
        if num_experts is None:
            raise RemoteExpertError(f"layer {layer} was not registered by the expertmesh quant method")
        # This runs once per MoE layer per step on the latency path: [N]-sized bookkeeping in numpy, and as few
        # torch calls as can be (each costs tens of us in situ, docs/benchmarks.md); the torch forms are made only
        # when the assignments must be grouped.
        ids_np = as_numpy(topk_ids).reshape(-1)               # [N] expert of each assignment (N = T*K)
        weights_np = as_numpy(topk_weights).reshape(-1)       # [N] (bf16/fp16 as fp32)
        counts = np.bincount(ids_np, minlength=num_experts)   # [E]
        self._ensure_counters().add(layer, counts)
        self.layer_calls += 1
        table = self._table
        sole = table.sole_owners(layer, num_experts) if table is not None else None
        self.timers["prepare"] += time.perf_counter() - t0

        span_ctx, metadata = self._trace(layer)
        try:
            excluded: set[str] = set()
            if sole is not None and sole.only is not None:
                result = self._whole_layer(layer, sole.only, hidden, ids_np, weights_np, K, excluded, metadata)
                if result is not None:
                    return result
            hidden = hidden.contiguous()
            ids = torch.from_numpy(ids_np).long()                # [N]
            weights = torch.from_numpy(weights_np.astype(np.float32, copy=False))   # [N] fp32
            out = torch.zeros((T, H), dtype=torch.float32)    # [T, H] fp32 accumulator
            pending = torch.arange(ids.numel())                # [n] assignment positions still to compute
            first = True
            while pending.numel():
                if first and sole is not None and not excluded:
                    groups = self._group_by_owner(table, sole.owner, ids)
                else:
                    groups = self._assign(layer, ids, pending,
                                          torch.from_numpy(counts) if pending.numel() == ids.numel() else None,
                                          excluded)
                first = False
                pending = self._round(layer, hidden, ids, weights, K, groups, out, excluded, metadata)
        finally:
            if span_ctx is not None:
                span_ctx.__exit__(None, None, None)
        return out.to(hidden.dtype)

    def _whole_layer(self, layer: int, endpoint: str, hidden: torch.Tensor, ids: np.ndarray,
                     weights: np.ndarray, K: int, excluded: set[str], metadata) -> torch.Tensor | None:
        """One replica holds every expert of the layer: send all rows as they are, one blocking RPC; its reply
        [T, H] is the output. None (endpoint added to `excluded`) if the call failed: the caller re-routes."""
        t0 = time.perf_counter()
        T = hidden.shape[0]
        token_index = self._token_index(T, K)                                    # [T*K] = t // K
        req = encode_forward(layer, hidden, token_index, ids, weights)
        link = self._links[endpoint]
        link.inflight_rows += T
        with self._stats_lock:
            self.rpcs[endpoint] = self.rpcs.get(endpoint, 0) + 1
            self.assignments[endpoint] = self.assignments.get(endpoint, 0) + ids.shape[0]
        sent = time.perf_counter()
        self.timers["encode"] += sent - t0
        try:
            resp = link.forward(req, timeout=self.deadline_s, metadata=metadata)
        except grpc.RpcError as exc:
            self.timers["wait"] += time.perf_counter() - sent
            link.inflight_rows -= T
            self._on_failure(endpoint, exc)
            excluded.add(endpoint)
            return None
        done = time.perf_counter()
        self.timers["wait"] += done - sent
        link.inflight_rows -= T
        if self._metrics is not None:
            self._metrics.observe(endpoint, done - sent)
        result = decode_owned(resp.output, "output")                             # [T, H], a copy we may write
        if result.shape != hidden.shape:
            self._on_failure(endpoint, RuntimeError(f"bad output shape {list(result.shape)}"))
            excluded.add(endpoint)
            return None
        # A copy the model may write into (the view is over the reply's immutable bytes), in hidden's dtype.
        out = result if result.dtype == hidden.dtype else result.to(hidden.dtype)
        self.timers["combine"] += time.perf_counter() - done
        return out

    def _token_index(self, T: int, K: int) -> expert_pb2.Tensor:
        """The encoded [T*K] int32 row of each assignment when all T rows are sent — `codec.whole_layer_index`, the
        bytes the replica recognises a whole-layer call by (message cached per (T, K))."""
        cache = self.__dict__.setdefault("_token_index_cache", {})
        ti = cache.get((T, K))
        if ti is None:
            if len(cache) > 4096:
                cache.clear()
            ti = cache[(T, K)] = expert_pb2.Tensor()
            encode_raw_into(ti, torch.int32, (T * K,), whole_layer_index(T, K))
        return ti

    def _group_by_owner(self, table: RoutingTable, owner: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every expert has one replica: assignment positions per replica endpoint from one table lookup."""
        t0 = time.perf_counter()
        replica_of = owner[ids]                                        # [N] replica index per assignment
        groups: dict[str, torch.Tensor] = {}
        for r in torch.unique(replica_of).tolist():
            groups[table.replicas[r].endpoint] = torch.nonzero(replica_of == r).flatten()
        self.timers["prepare"] += time.perf_counter() - t0
        return groups

    def _trace(self, layer: int):
        # Inside the engine's decode-step span (same thread): nest under it. Otherwise parent to a traced request.
        if trace.get_current_span().is_recording():
            parent, links = None, None
        elif telemetry.in_untraced_step():  # the engine's step was not sampled: no per-layer spans
            return None, None
        else:
            parent, links = telemetry.requests_in_flight.step_parent()
            if parent is None:
                return None, None
        cm = telemetry.tracer().start_as_current_span(f"dispatch layer {layer}", context=parent, links=links)
        cm.__enter__()
        return cm, telemetry.inject_metadata()

    def _candidates(self, table: RoutingTable, layer: int, expert: int, excluded: set[str]) -> list[int]:
        live = [r for r in table.holders.get(layer, {}).get(expert, ())
                if table.replicas[r].endpoint not in excluded]
        if len(live) > 1:   # avoid recently failed replicas while there is an alternative
            now = time.monotonic()
            healthy = [r for r in live if self._suspect_until.get(table.replicas[r].endpoint, 0.0) <= now]
            live = healthy or live
        return live

    def _table_for(self, layer: int, experts: list[int], excluded: set[str]) -> RoutingTable:
        """The current table if it has a candidate for every expert; else wait for the directory, then fail."""
        deadline = time.monotonic() + self.missing_wait_s
        with self._table_changed:
            while True:
                table = self._table
                if table is not None:
                    missing = [e for e in experts if not self._candidates(table, layer, e, excluded)]
                    if not missing:
                        return table
                left = deadline - time.monotonic()
                if left <= 0:
                    if table is None:
                        raise RemoteExpertError(f"no snapshot from expert directory {self.directory}")
                    raise RemoteExpertError(
                        f"no live replica holds layer {layer} expert(s) {missing}"
                        + (f" (failed in this step: {sorted(excluded)})" if excluded else "")
                        + "; the requests routed to them cannot be computed")
                self._table_changed.wait(left)

    def _assign(self, layer: int, ids: torch.Tensor, pending: torch.Tensor, counts: torch.Tensor | None,
                excluded: set[str]) -> dict[str, torch.Tensor]:
        """Group pending assignment positions by replica endpoint -> [n_r] positions (ascending)."""
        t0 = time.perf_counter()
        sub_ids = ids[pending]                                         # [n]
        if counts is None:
            counts = torch.bincount(sub_ids)
        present = torch.nonzero(counts).flatten().tolist()
        table = self._table_for(layer, present, excluded)
        owner = torch.full((int(counts.numel()),), -1, dtype=torch.int64)   # [E] sole replica, -1 = several
        multi: list[tuple[int, list[int]]] = []
        for e in present:
            cands = self._candidates(table, layer, e, excluded)
            if len(cands) == 1:
                owner[e] = cands[0]
            else:
                multi.append((e, cands))
        replica_of = owner[sub_ids]                                    # [n] replica index per assignment
        if multi:
            load = {r: self._links[table.replicas[r].endpoint].inflight_rows for _, c in multi for r in c}
            single_counts = torch.bincount(replica_of[replica_of >= 0], minlength=len(table.replicas)).tolist()
            for r in load:
                load[r] += single_counts[r]
            for e, cands in multi:
                where = torch.nonzero(sub_ids == e).flatten()          # [n_e]
                quota = _water_fill(where.numel(), [load[r] for r in cands])
                start = 0
                for r, q in zip(cands, quota):
                    replica_of[where[start:start + q]] = r
                    load[r] += q
                    start += q
        groups: dict[str, torch.Tensor] = {}
        for r in torch.unique(replica_of).tolist():
            groups[table.replicas[r].endpoint] = pending[replica_of == r]
        self.timers["prepare"] += time.perf_counter() - t0
        return groups

    def _round(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, K: int,
               groups: dict[str, torch.Tensor], out: torch.Tensor, excluded: set[str], metadata) -> torch.Tensor:
        """Send one RPC per replica (all in flight), combine into `out`; return positions that must be resent."""
        t0 = time.perf_counter()
        calls = []
        for endpoint, pos in groups.items():
            tok = pos // K                                              # [n_r] token of each assignment (sorted)
            rows, token_index = torch.unique_consecutive(tok, return_inverse=True)  # [T_r], [n_r]
            req = encode_forward(layer, hidden.index_select(0, rows), token_index, ids[pos], weights[pos])
            link = self._links[endpoint]
            link.inflight_rows += int(rows.numel())
            sent = time.perf_counter()
            fut = link.forward.future(req, timeout=self.deadline_s, metadata=metadata)
            calls.append((endpoint, link, pos, rows, fut, sent))
            with self._stats_lock:
                self.rpcs[endpoint] = self.rpcs.get(endpoint, 0) + 1
                self.assignments[endpoint] = self.assignments.get(endpoint, 0) + int(pos.numel())
        t1 = time.perf_counter()
        self.timers["encode"] += t1 - t0
        retry: list[torch.Tensor] = []
        wait = 0.0
        for endpoint, link, pos, rows, fut, sent in calls:
            w0 = time.perf_counter()
            try:
                resp = fut.result()
            except grpc.RpcError as exc:
                wait += time.perf_counter() - w0
                link.inflight_rows -= int(rows.numel())
                self._on_failure(endpoint, exc)
                excluded.add(endpoint)
                retry.append(pos)
                continue
            done = time.perf_counter()
            wait += done - w0
            link.inflight_rows -= int(rows.numel())
            if self._metrics is not None:
                self._metrics.observe(endpoint, done - sent)
            result = decode(resp.output, "output")                      # [T_r, H] read-only view
            if result.shape != (rows.numel(), out.shape[1]):
                self._on_failure(endpoint, RuntimeError(f"bad output shape {list(result.shape)}"))
                excluded.add(endpoint)
                retry.append(pos)
                continue
            c0 = time.perf_counter()
            out.index_add_(0, rows, result.to(torch.float32))
            self.timers["combine"] += time.perf_counter() - c0
        self.timers["wait"] += wait
        if not retry:
            return torch.empty(0, dtype=torch.int64)
        return torch.sort(torch.cat(retry)).values

    def _on_failure(self, endpoint: str, exc: BaseException) -> None:
        detail = f"{exc.code()}: {exc.details()}" if isinstance(exc, grpc.RpcError) else exc
        log.warning("expert replica %s failed (%s); resending its tokens to another replica", endpoint, detail)
        self._suspect_until[endpoint] = time.monotonic() + SUSPECT_SECONDS
        with self._stats_lock:
            self.failovers += 1
        if self._metrics is not None:
            self._metrics.failovers.labels(replica=endpoint).inc()

    # -- lifecycle / observability --

    def stats(self) -> dict:
        with self._stats_lock:
            return {"rpcs": dict(self.rpcs), "assignments": dict(self.assignments), "failovers": self.failovers,
                    "layer_calls": self.layer_calls, "timers": dict(self.timers)}

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.rpcs.clear()
            self.assignments.clear()
            self.failovers = 0
            self.layer_calls = 0
            self.timers = dict.fromkeys(self.timers, 0.0)

    @property
    def counters(self) -> RoutedTokenCounters | None:
        return self._counters

    def close(self) -> None:
        self._closed = True
        self._directory_client.close()
        for link in self._links.values():
            link.close()
        self._links.clear()


def _water_fill(n: int, loads: list[int]) -> list[int]:
    """Split n items over bins with current `loads` so the fullest bin ends as low as possible."""
    quota = [0] * len(loads)
    level = sorted(range(len(loads)), key=lambda i: loads[i])
    remaining = n
    # Raise the lowest bins to the next level until the items run out, then share the rest evenly.
    filled = [loads[i] for i in level]
    k = 1
    while remaining > 0:
        while k < len(level) and filled[0] == filled[k]:
            k += 1
        target = filled[k] if k < len(level) else None
        room = (target - filled[0]) * k if target is not None else remaining
        give = min(room, remaining)
        each, extra = divmod(give, k)
        for j in range(k):
            add = each + (1 if j < extra else 0)
            quota[level[j]] += add
            filled[j] += add
        remaining -= give
    return quota


_dispatcher: Dispatcher | None = None
_dispatcher_lock = threading.Lock()


def get_dispatcher(directory: str | None = None) -> Dispatcher:
    """The process's dispatcher for `directory` (default env EXPERTMESH_DIRECTORY); replaced if it changed."""
    global _dispatcher
    directory = directory or defaults.directory_address()
    d = _dispatcher
    if d is not None and d.directory == directory:
        return d
    with _dispatcher_lock:
        if _dispatcher is not None and _dispatcher.directory != directory:
            _dispatcher.close()
            _dispatcher = None
        if _dispatcher is None:
            _dispatcher = Dispatcher(directory)
        return _dispatcher


def reset_dispatcher() -> None:
    """Close the process's dispatcher (tests; switching pools)."""
    global _dispatcher
    with _dispatcher_lock:
        if _dispatcher is not None:
            _dispatcher.close()
            _dispatcher = None
