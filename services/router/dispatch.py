"""Remote dispatch of one MoE layer's routed experts: the `expertmesh::remote_experts` op and the Dispatcher.

vLLM's FusedMoE has already gated (softmax/sigmoid, grouped top-k, correction bias, renormalisation, scaling
factor) when the plugin's quant method calls `torch.ops.expertmesh.remote_experts(hidden [T, H],
topk_weights [T, K], topk_ids [T, K], layer)`; the op returns the routed-expert output [T, H]
(sum_k w[t, k] * expert_{ids[t, k]}(hidden[t])), exactly what vLLM's local expert kernel returns. It is a
`torch.library.custom_op` so torch.compile treats it as opaque (its data-dependent grouping cannot be traced).
The same call also comes in two halves, `remote_experts_begin` (route, encode, send; returns a handle) and
`remote_experts_end` (wait, combine, failover), so the plugin computes a layer's shared experts while its routed
experts are in flight (EXPERTMESH_SHARED_EXPERTS_OVERLAP); `Dispatcher.forward` is `end(begin(...))`.

The Dispatcher (one per process, `get_dispatcher()`) runs one layer call as explicit stages, each in its own home:

  count    one bincount of the step's assignments -> `counters.RoutedTokenCounters` (Prometheus, controller);
  route    `route.py` (pure): which replica computes which assignment, from the routing table of the latest
           directory snapshot (`discovery.directory.DirectoryClient` watch). Fast paths first: one replica holds
           the whole layer (the default plan) -> the whole-layer form; every expert has one replica -> one table
           lookup; else experts with several replicas are split over them by water-fill on rows in flight;
  encode   `codec.encode_forward`: one ForwardRequest per replica (the whole-layer form sends hidden as it is and
           no token index at all; otherwise the distinct rows + token_index/expert/weight arrays);
  transport `transport.py`: a round of calls all in flight at once over each replica's long-lived stream, with a
           deadline (`EXPERTMESH_DISPATCH_DEADLINE_S`, default 5 s); an error reply, a passed deadline or a broken
           stream comes back as `ReplicaFailed`;
  combine  the whole-layer reply is the output; otherwise one `index_add_` per replica into an fp32 buffer.

`begin` runs count -> route -> encode -> send (the whole-layer call, or the first round) and returns a
`LayerCall`; `end` computes the router's own share (fallback, below), waits for the replies and combines them.
Failover is a loop around route -> encode -> transport -> combine, in `end`: a failed replica's assignments go back
to route with that replica excluded for the rest of this call, and not called for `SUSPECT_SECONDS` after (a dead
replica stays listed until its lease ends). If no replica is left for an expert (after waiting up to
`EXPERTMESH_MISSING_EXPERT_WAIT_S`, default 1 s, once per gap, for the directory to change) the router computes that
expert's assignments itself from the checkpoint (`fallback.py`, weights loaded on demand and dropped when replicas
return): an exception here would end vLLM's engine core and every request with it. Only a model without a local
checkpoint to read raises `RemoteExpertError`.

Prometheus (in the process that runs the model): `expertmesh_routed_tokens_total{layer,expert}` (from the
counters file), and the transport's `expertmesh_dispatch_seconds{replica}`, `expertmesh_dispatch_failovers_total
{replica}`; served on `EXPERTMESH_ROUTER_METRICS_PORT` (`transport.serve_metrics`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import numpy as np
import torch
from opentelemetry import trace

from expertmesh.core import settings, telemetry
from expertmesh.core.codec import as_numpy, decode, decode_owned, encode_forward
from expertmesh.core.protos import expert_pb2
from expertmesh.discovery.directory import DirectoryClient
from expertmesh.router import micro_batches, route
from expertmesh.router.counters import RoutedTokenCounters, default_counters_path, install_prometheus
from expertmesh.router.fallback import LocalExperts, resolve_checkpoint
from expertmesh.router.route import RoutingTable, SoleOwners
from expertmesh.router.transport import InFlight, ReplicaFailed, Transport, TransportMetrics, serve_metrics

log = logging.getLogger("expertmesh.router.dispatch")

SUSPECT_SECONDS = 5.0
LOCAL = "router-local"  # the group of assignments the router computes itself (no replica holds their experts)


class RemoteExpertError(RuntimeError):
    """A routed expert could not be computed by any replica (the affected requests must fail)."""


def trace_layer_call(layer: int, tokens: int) -> tuple[trace.Span | None, list[tuple[str, str]] | None]:
    """(span, RPC metadata carrying it) of one layer call inside a sampled forward pass, else (None, None).

    The forward pass is traced by step_tracing.py (telemetry.engine_steps) in this thread; the replicas'
    `expert forward` spans parent to this span through the metadata."""
    parent = telemetry.engine_steps.layer_parent()
    if parent is None:
        return None, None
    attributes = {"expertmesh.layer": layer, "expertmesh.tokens": tokens}
    if (part := micro_batches.current_micro_batch()) is not None:
        attributes["expertmesh.micro_batch"] = part  # a split step: which micro-batch (benchmarks/step_timeline.py)
    span = telemetry.tracer().start_span(f"dispatch layer {layer}", context=parent, attributes=attributes)
    return span, telemetry.inject_metadata(trace.set_span_in_context(span))


def _end_span(span: trace.Span | None, exc: BaseException | None) -> None:
    if span is None:
        return
    if exc is not None:
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()


class Round:
    """One round of per-replica calls in flight: (positions [n_r], rows [T_r], started call) per replica, the
    positions the router computes itself (LOCAL), and those whose call could not even be started."""

    __slots__ = ("calls", "local", "retry")

    def __init__(self, local: np.ndarray | None):
        self.calls: list[tuple[np.ndarray, np.ndarray, InFlight]] = []
        self.local = local
        self.retry: list[np.ndarray] = []


class LayerCall:
    """One layer call between `Dispatcher.begin` and `Dispatcher.end`: its inputs, routing state and what is in
    flight (the whole-layer call, or the current per-replica round and its fp32 accumulator)."""

    __slots__ = (
        "layer",
        "hidden",
        "ids",
        "weights",
        "K",
        "counts",
        "table",
        "sole",
        "excluded",
        "span",
        "metadata",
        "whole",
        "round",
        "out",
        "result",
    )

    def __init__(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: np.ndarray,
        weights: np.ndarray,
        K: int,
        counts: np.ndarray | None,
        table: RoutingTable | None,
        sole: SoleOwners | None,
        excluded: set[str],
    ):
        self.layer = layer
        self.hidden = hidden  # [T, H]
        self.ids = ids  # [N] expert of each assignment
        self.weights = weights  # [N] gate weight of each assignment
        self.K = K
        self.counts = counts  # [E] assignments per expert
        self.table = table
        self.sole = sole
        self.excluded = excluded  # replicas not to call in this call
        self.span: trace.Span | None = None
        self.metadata: list[tuple[str, str]] | None = None  # trace context for the replicas' spans
        self.whole: InFlight | None = None  # the whole-layer call in flight
        self.round: Round | None = None  # the first per-replica round in flight
        self.out: torch.Tensor | None = None  # [T, H] fp32 accumulator of the per-replica form
        self.result: torch.Tensor | None = None

    @classmethod
    def done(cls, layer: int, result: torch.Tensor) -> LayerCall:
        empty: np.ndarray = np.empty(0, dtype=np.int64)
        call = cls(layer, result, empty, empty, 0, None, None, None, set())
        call.result = result
        return call


# ---- the custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("expertmesh::remote_experts", mutates_args=())
def remote_experts(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: int
) -> torch.Tensor:
    """hidden [T, H], topk_weights [T, K], topk_ids [T, K] -> [T, H] routed-expert output of `layer`."""
    d = get_dispatcher()
    if hidden.device.type != "cpu":  # a GPU router: the wire codec works on host memory
        call = d.begin(layer, hidden.cpu(), topk_weights.cpu(), topk_ids.cpu())
        micro_batches.hand_off()
        return d.end(call).to(hidden.device, non_blocking=True)
    call = d.begin(layer, hidden, topk_weights, topk_ids)
    micro_batches.hand_off()  # a split step: the next micro-batch runs while this call is in the pool
    return d.end(call)


@remote_experts.register_fake
def _remote_experts_fake(hidden, topk_weights, topk_ids, layer):
    return torch.empty_like(hidden)


# The same call in two halves, so the router computes something else (a model's shared experts) while the
# replicas work: `remote_experts_begin` routes, encodes and sends, and returns a handle [1] (int64, host memory) to
# the call in flight; `remote_experts_end(handle, hidden, after)` waits, combines and fails over, and returns what
# `remote_experts` would. Every begin is ended, on the thread that began it, before the next layer's begin.
#
# The order in a compiled graph: inductor schedules independent nodes as it likes, and put the shared experts
# before begin (measured: vLLM's compiled Qwen2-MoE graph). So begin is declared to mutate `overlap_input` (it
# does not write it), which orders every later reader of that tensor - the shared experts' input - after the send,
# and end takes `after` (the shared experts' output), which orders it after them. Neither costs a copy where
# nothing reads the old version of `overlap_input` (functionalization re-inplaces the declared write).


@torch.library.custom_op("expertmesh::remote_experts_begin", mutates_args=("overlap_input",))
def remote_experts_begin(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: int, overlap_input: torch.Tensor
) -> torch.Tensor:
    """Start `layer`'s routed experts for hidden [T, H], topk_weights/topk_ids [T, K]; -> handle [1] int64.
    `overlap_input`: what is computed while the call is in flight reads it (never written, see above)."""
    d = get_dispatcher()
    if hidden.device.type != "cpu":
        hidden, topk_weights, topk_ids = hidden.cpu(), topk_weights.cpu(), topk_ids.cpu()
    handle = d.handle(d.begin(layer, hidden, topk_weights, topk_ids))
    # A split step: the next micro-batch runs now, and this one's shared experts after (vLLM keeps one shared-
    # expert output slot per step, read right after apply: nothing else may run between them).
    micro_batches.hand_off()
    return handle


@remote_experts_begin.register_fake
def _remote_experts_begin_fake(hidden, topk_weights, topk_ids, layer, overlap_input):
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("expertmesh::remote_experts_end", mutates_args=())
def remote_experts_end(handle: torch.Tensor, hidden: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Finish the call `handle` (remote_experts_begin of this `hidden`) -> [T, H] routed-expert output; `after`
    (what was computed while it was in flight) is only waited for."""
    d = get_dispatcher()
    out = d.end(d.take(handle))
    if hidden.device.type != "cpu":
        return out.to(hidden.device, non_blocking=True)
    return out


@remote_experts_end.register_fake
def _remote_experts_end_fake(handle, hidden, after):
    return torch.empty_like(hidden)


# ---- the routed-token counters on Prometheus (one collector per process: the default registry is global) -------

_export_lock = threading.Lock()
_exported: dict = {"installed": False, "counters": None}


def _export_counters(counters: RoutedTokenCounters | None = None, *, install_only: bool = False) -> None:
    with _export_lock:
        if not _exported["installed"]:
            install_prometheus(lambda: _exported["counters"])
            _exported["installed"] = True
        if not install_only:
            _exported["counters"] = counters


# ---- the dispatcher ------------------------------------------------------------------------------------------


class Dispatcher:
    """Sends one MoE layer's (token, expert) assignments to the expert replicas and combines the results."""

    def __init__(
        self,
        directory: str,
        *,
        deadline_s: float | None = None,
        missing_wait_s: float | None = None,
        counters_path: str | None = None,
        metrics: bool = True,
    ):
        self.directory = directory
        self.missing_wait_s = float(missing_wait_s if missing_wait_s is not None else settings.missing_expert_wait_s())
        self.counters_path = counters_path or default_counters_path()
        self._metrics = metrics
        self._transport = Transport(
            float(deadline_s if deadline_s is not None else settings.dispatch_deadline_s()),
            TransportMetrics.get() if metrics else None,
        )
        self._table: RoutingTable | None = None  # from the latest directory snapshot
        self._table_changed = threading.Condition()
        self._suspect_until: dict[str, float] = {}  # endpoint -> monotonic time it stops being avoided
        self._layers: dict[int, int] = {}  # model layer -> num experts (registered by the quant method)
        self._model_key: object = None
        self._counters: RoutedTokenCounters | None = None
        self._fallback: LocalExperts | None = None  # set_checkpoint: experts no replica holds, computed here
        self._checkpoint_model: str | None = None  # the model set_checkpoint last resolved
        self._missing_since: dict[tuple[int, int], float] = {}  # (layer, expert) -> monotonic time first missing
        self.fallback_assignments = 0
        self._closed = False
        self._stats_lock = threading.Lock()
        self.rpcs: dict[str, int] = {}  # endpoint -> Forward RPCs sent
        self.assignments: dict[str, int] = {}  # endpoint -> (token, expert) assignments sent
        self.failovers = 0
        self.layer_calls = 0
        self.timers = {"prepare": 0.0, "encode": 0.0, "wait": 0.0, "combine": 0.0}
        self._in_flight: dict[int, LayerCall] = {}  # begun by remote_experts_begin, not yet ended
        self._call_ids = itertools.count()
        # When a list: ("begin" | "end", layer, perf_counter time) of every layer call (tests, benchmarks: what runs
        # while a call is in flight).
        self.timeline: list[tuple[str, int, float]] | None = None
        if metrics:
            _export_counters(install_only=True)
            serve_metrics()
        self._directory_client = DirectoryClient(directory)
        self._directory_client.watch(self._apply_snapshot)

    # -- what others read (router server: Health / Stats; tests) --

    @property
    def deadline_s(self) -> float:
        return self._transport.deadline_s

    @deadline_s.setter
    def deadline_s(self, value: float) -> None:
        self._transport.deadline_s = float(value)

    @property
    def table(self) -> RoutingTable | None:
        """The routing table of the latest directory snapshot (None before the first one)."""
        return self._table

    @property
    def layers(self) -> dict[int, int]:
        """A copy of {model layer: routed experts} registered by the quant method."""
        return dict(self._layers)

    def replica_counts(self) -> dict[tuple[int, int], int]:
        """{(layer, expert): live replicas holding it} for every registered layer (0 = not covered)."""
        return route.replica_counts(self._table, self._layers)

    @property
    def counters(self) -> RoutedTokenCounters | None:
        return self._counters

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

    def _ensure_counters(self) -> RoutedTokenCounters:
        if self._counters is None:
            sizes = set(self._layers.values())
            self._counters = RoutedTokenCounters.create(self.counters_path, sorted(self._layers), max(sizes))
            if self._metrics:
                _export_counters(self._counters)
        return self._counters

    # -- directory --

    def set_checkpoint(self, model: str) -> None:
        """The checkpoint (vLLM's `model`: a directory or a cached hub id) to compute experts from when no replica
        holds them; without one, a missing expert fails the step."""
        if model == self._checkpoint_model:  # every MoE layer's quant method sets it: resolve it once
            return
        self._checkpoint_model = model
        path = resolve_checkpoint(model)
        if path is None:
            log.warning("%s: no local checkpoint; an expert no replica holds will fail the step", model)
        elif self._fallback is None or self._fallback.checkpoint != path:
            self._fallback = LocalExperts(path)

    def _apply_snapshot(self, snap: expert_pb2.DirectorySnapshot) -> None:
        table = RoutingTable.from_snapshot(snap)
        for endpoint in table.endpoints:
            self._transport.connect(endpoint)
        with self._table_changed:
            self._table = table
            self._missing_since = {
                k: t for k, t in self._missing_since.items() if route.missing_experts(table, k[0], [k[1]])
            }
            self._table_changed.notify_all()
        if self._fallback is not None:
            self._fallback.release_covered(lambda layer, experts: not route.missing_experts(table, layer, experts))

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
                    raise RemoteExpertError(
                        f"expert directory {self.directory}: no live replica for "
                        f"{route.describe_missing(table, layers)} after {timeout:.0f}s"
                    )
                self._table_changed.wait(left)

    def _suspects(self) -> frozenset[str]:
        """Endpoints that failed within the last SUSPECT_SECONDS."""
        if not self._suspect_until:
            return frozenset()
        now = time.monotonic()
        return frozenset(e for e, until in self._suspect_until.items() if until > now)

    def _table_for(self, layer: int, experts: list[int], excluded: set[str]) -> tuple[RoutingTable | None, list[int]]:
        """(the current table, the experts of `experts` without a candidate in it). While such an expert has been
        missing for less than `missing_wait_s`, wait for the directory; after that the missing experts are the
        router's own (fallback) — or, with no checkpoint to compute them from, RemoteExpertError."""
        with self._table_changed:
            while True:
                table = self._table
                missing = route.missing_experts(table, layer, experts, excluded)
                if not missing:  # without a table every expert is missing (experts is not empty)
                    return table, []
                now = time.monotonic()
                for e in missing:
                    self._missing_since.setdefault((layer, e), now)
                # One wait per gap, not per layer: a replica's death uncovers all its layers at once, and the layers
                # of a step come one after another (cleared when the directory covers the keys again).
                first = min(self._missing_since.values())
                left = first + self.missing_wait_s - now
                if left <= 0:
                    if self._fallback is not None:
                        return table, missing
                    if table is None:
                        raise RemoteExpertError(f"no snapshot from expert directory {self.directory}")
                    raise RemoteExpertError(
                        f"no live replica holds layer {layer} expert(s) {missing}"
                        + (f" (failed in this step: {sorted(excluded)})" if excluded else "")
                        + "; the requests routed to them cannot be computed"
                    )
                self._table_changed.wait(left)

    # -- one layer: count -> route -> encode -> transport -> combine, failover around it --

    def forward(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], topk_weights/topk_ids [T, K] -> [T, H] = sum_k w[t,k] * expert_{ids[t,k]}(hidden[t])."""
        return self.end(self.begin(layer, hidden, topk_weights, topk_ids))

    def begin(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> LayerCall:
        """Count, route, encode and send one layer call; the replicas work until `end(call)` collects it."""
        t0 = time.perf_counter()
        T, H = hidden.shape
        if self.timeline is not None:
            self.timeline.append(("begin", layer, t0))
        if T == 0:
            return LayerCall.done(layer, torch.zeros((T, H), dtype=hidden.dtype))
        num_experts = self._layers.get(layer)
        if num_experts is None:
            raise RemoteExpertError(f"layer {layer} was not registered by the expertmesh quant method")
        # This runs once per MoE layer per step on the latency path: [N]-sized bookkeeping in numpy, and as few
        # torch calls as can be (each costs tens of us in situ, docs/benchmarks.md).
        ids = as_numpy(topk_ids).reshape(-1)  # [N] expert of each assignment (N = T*K)
        weights = as_numpy(topk_weights).reshape(-1)  # [N] (bf16/fp16 as fp32)
        counts = np.bincount(ids, minlength=num_experts)  # [E]
        self._ensure_counters().add(layer, counts)
        self.layer_calls += 1
        table = self._table
        sole = table.sole_owners(layer, num_experts) if table is not None else None
        self.timers["prepare"] += time.perf_counter() - t0

        span, metadata = trace_layer_call(layer, T)
        # Replicas not to call: those that fail in this call, and from the start those that failed within
        # SUSPECT_SECONDS (a dead replica stays listed until its lease ends; calling it at every layer of every
        # step would only fail again, and where it was the only holder the router computes its experts).
        call = LayerCall(layer, hidden, ids, weights, topk_ids.shape[1], counts, table, sole, set(self._suspects()))
        call.span, call.metadata = span, metadata
        try:
            if sole is not None and sole.only is not None and sole.only not in call.excluded:  # whole-layer form
                call.whole = self._whole_layer_start(call, sole.only)
                if call.whole is not None:
                    return call
            self._start_routed(call)
        except BaseException as exc:
            _end_span(span, exc)
            raise
        return call

    def end(self, call: LayerCall) -> torch.Tensor:
        """Wait for a begun call's replies and combine them, re-routing what failed -> [T, H] in hidden's dtype."""
        try:
            if call.result is None:
                call.result = self._finish(call)
        except BaseException as exc:
            _end_span(call.span, exc)
            raise
        _end_span(call.span, None)
        if self.timeline is not None:
            self.timeline.append(("end", call.layer, time.perf_counter()))
        return call.result

    def handle(self, call: LayerCall) -> torch.Tensor:
        """A begun call as a tensor a custom op can return (remote_experts_begin): [1] int64 id; `take` redeems it."""
        key = next(self._call_ids)
        self._in_flight[key] = call
        return torch.tensor([key], dtype=torch.int64)

    def take(self, handle: torch.Tensor) -> LayerCall:
        return self._in_flight.pop(int(handle.item()))

    def _finish(self, call: LayerCall) -> torch.Tensor:
        if call.whole is not None:
            out = self._whole_layer_finish(call, call.whole)
            call.whole = None
            if out is not None:
                return out
            self._start_routed(call)  # the replica failed (now excluded): route every assignment again
        assert call.round is not None and call.out is not None
        pending = self._collect_round(call, call.round)
        while pending.shape[0]:  # failover: re-route what a failed replica had
            groups = self._route(call.table, call.sole, call.layer, call.ids, pending, None, call.excluded)
            pending = self._collect_round(call, self._send_round(call, groups))
        return call.out.to(call.hidden.dtype)

    def _start_routed(self, call: LayerCall) -> None:
        """The first round of the per-replica form: route every assignment, send one request per replica."""
        call.hidden = call.hidden.contiguous()
        call.weights = call.weights.astype(np.float32, copy=False)  # [N] fp32
        call.out = torch.zeros(call.hidden.shape, dtype=torch.float32)  # [T, H] fp32 accumulator
        pending = np.arange(call.ids.shape[0])  # [n] assignment positions still to compute
        groups = self._route(call.table, call.sole, call.layer, call.ids, pending, call.counts, call.excluded)
        call.round = self._send_round(call, groups)

    def _route(
        self,
        table: RoutingTable | None,
        sole: SoleOwners | None,
        layer: int,
        ids: np.ndarray,
        pending: np.ndarray,
        counts: np.ndarray | None,
        excluded: set[str],
    ) -> dict[str, np.ndarray]:
        """Route: pending positions -> {endpoint: [n_r] positions}, and {LOCAL: positions} for experts no replica
        holds (after waiting for the directory, see `_table_for`)."""
        t0 = time.perf_counter()
        groups: dict[str, np.ndarray]
        if sole is not None and not excluded and counts is not None:  # first round, one replica per expert
            assert table is not None  # `sole` comes from the table
            groups = route.by_sole_owner(table, sole.owner, ids)
        else:
            if counts is None:
                counts = np.bincount(ids[pending])
            table, missing = self._table_for(layer, route.present_experts(ids, counts), excluded)
            local: np.ndarray = np.empty(0, dtype=np.int64)  # [n_local] positions the router computes itself
            if missing:
                is_local = np.isin(ids[pending], missing)  # [n]
                local, pending, counts = pending[is_local], pending[~is_local], None
            groups = {}
            if pending.shape[0]:
                assert table is not None  # some expert has a candidate
                groups = route.assign(
                    table,
                    layer,
                    ids,
                    pending,
                    counts=counts,
                    excluded=excluded,  # holds every suspect too (see forward)
                    inflight=self._transport.inflight_rows(),
                )
            if local.shape[0]:
                groups[LOCAL] = local
        self.timers["prepare"] += time.perf_counter() - t0
        return groups

    def _whole_layer_start(self, call: LayerCall, endpoint: str) -> InFlight | None:
        """Encode -> send the whole layer to its one replica. None (endpoint added to `excluded`) if the call could
        not be started: the caller routes per replica."""
        t0 = time.perf_counter()
        # whole-layer form: no token index on the wire
        req = encode_forward(call.layer, call.hidden, None, call.ids, call.weights)
        self._count_sent(endpoint, call.ids.shape[0])
        try:
            started = self._transport.start(endpoint, req, call.hidden.shape[0], call.metadata)
        except ReplicaFailed as exc:
            self._on_failure(endpoint, exc.detail, call.excluded)
            started = None
        self.timers["encode"] += time.perf_counter() - t0
        return started

    def _whole_layer_finish(self, call: LayerCall, started: InFlight) -> torch.Tensor | None:
        """Wait for the whole-layer reply; it [T, H] is the output. None (endpoint added to `excluded`) if the call
        failed: the caller re-routes."""
        w0 = time.perf_counter()
        try:
            resp = self._transport.finish(started)
        except ReplicaFailed as exc:
            self.timers["wait"] += time.perf_counter() - w0
            self._on_failure(started.endpoint, exc.detail, call.excluded)
            return None
        done = time.perf_counter()
        self.timers["wait"] += done - w0
        result = decode_owned(resp.output, "output")  # [T, H], a copy we may write
        if result.shape != call.hidden.shape:
            self._on_failure(started.endpoint, f"bad output shape {list(result.shape)}", call.excluded)
            return None
        # A copy the model may write into (the view is over the reply's immutable bytes), in hidden's dtype.
        out = result if result.dtype == call.hidden.dtype else result.to(call.hidden.dtype)
        self.timers["combine"] += time.perf_counter() - done
        return out

    def _send_round(self, call: LayerCall, groups: dict[str, np.ndarray]) -> Round:
        """Encode one request per replica and send them all (in flight at once); the router's own share (LOCAL) is
        left for `_collect_round`, computed while the replicas work."""
        t0 = time.perf_counter()
        sent = Round(groups.pop(LOCAL, None))
        K = call.K
        for endpoint, pos in groups.items():
            rows, token_index = np.unique(pos // K, return_inverse=True)  # [T_r] tokens (pos ascending), [n_r]
            req = encode_forward(
                call.layer,
                call.hidden.index_select(0, torch.from_numpy(rows)),
                token_index,
                call.ids[pos],
                call.weights[pos],
            )
            self._count_sent(endpoint, pos.shape[0])
            try:
                started = self._transport.start(endpoint, req, rows.shape[0], call.metadata)
            except ReplicaFailed as exc:
                self._on_failure(endpoint, exc.detail, call.excluded)
                sent.retry.append(pos)
                continue
            sent.calls.append((pos, rows, started))
        self.timers["encode"] += time.perf_counter() - t0
        return sent

    def _collect_round(self, call: LayerCall, sent: Round) -> np.ndarray:
        """Compute the router's own share, wait for the round's replies and combine them into `call.out`; return the
        positions that must be re-routed (ascending)."""
        out = call.out
        assert out is not None
        if sent.local is not None:
            self._compute_locally(call.layer, call.hidden, call.ids, call.weights, call.K, sent.local, out)
        retry = sent.retry
        wait = 0.0
        for pos, rows, started in sent.calls:
            w0 = time.perf_counter()
            try:
                resp = self._transport.finish(started)
            except ReplicaFailed as exc:
                wait += time.perf_counter() - w0
                self._on_failure(started.endpoint, exc.detail, call.excluded)
                retry.append(pos)
                continue
            c0 = time.perf_counter()
            wait += c0 - w0
            result = decode(resp.output, "output")  # [T_r, H] read-only view
            if result.shape != (rows.shape[0], out.shape[1]):
                self._on_failure(started.endpoint, f"bad output shape {list(result.shape)}", call.excluded)
                retry.append(pos)
                continue
            out.index_add_(0, torch.from_numpy(rows), result.to(torch.float32))
            self.timers["combine"] += time.perf_counter() - c0
        self.timers["wait"] += wait
        if not retry:
            return np.empty(0, dtype=np.int64)
        return np.sort(np.concatenate(retry))

    def _compute_locally(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: np.ndarray,
        weights: np.ndarray,
        K: int,
        pos: np.ndarray,
        out: torch.Tensor,
    ) -> None:
        """The assignments at `pos` [n] (experts no replica holds), computed from the checkpoint, added into out."""
        assert self._fallback is not None  # _table_for returns missing experts only with a fallback
        rows, token_index = np.unique(pos // K, return_inverse=True)  # [T_r], [n]
        result = self._fallback.forward(
            layer, hidden.index_select(0, torch.from_numpy(rows)), token_index, ids[pos], weights[pos]
        )  # [T_r, H]
        out.index_add_(0, torch.from_numpy(rows), result.to(torch.float32))
        with self._stats_lock:
            self.fallback_assignments += int(pos.shape[0])
        if self._transport.metrics is not None:
            self._transport.metrics.fallback(layer, int(pos.shape[0]))

    def _count_sent(self, endpoint: str, assignments: int) -> None:
        with self._stats_lock:
            self.rpcs[endpoint] = self.rpcs.get(endpoint, 0) + 1
            self.assignments[endpoint] = self.assignments.get(endpoint, 0) + assignments

    def _on_failure(self, endpoint: str, detail: str, excluded: set[str]) -> None:
        log.warning("expert replica %s failed (%s); resending its tokens to another replica", endpoint, detail)
        excluded.add(endpoint)
        self._suspect_until[endpoint] = time.monotonic() + SUSPECT_SECONDS
        with self._stats_lock:
            self.failovers += 1
        if self._transport.metrics is not None:
            self._transport.metrics.failover(endpoint)

    # -- lifecycle / observability --

    def stats(self) -> dict:
        with self._stats_lock:
            return {
                "rpcs": dict(self.rpcs),
                "assignments": dict(self.assignments),
                "failovers": self.failovers,
                "fallback_assignments": self.fallback_assignments,
                "fallback_held": self._fallback.held() if self._fallback is not None else {},
                "layer_calls": self.layer_calls,
                "timers": dict(self.timers),
            }

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.rpcs.clear()
            self.assignments.clear()
            self.failovers = 0
            self.fallback_assignments = 0
            self.layer_calls = 0
            self.timers = dict.fromkeys(self.timers, 0.0)

    def close(self) -> None:
        self._closed = True
        self._directory_client.close()
        self._transport.close()


_dispatcher: Dispatcher | None = None
_dispatcher_lock = threading.Lock()


def get_dispatcher(directory: str | None = None) -> Dispatcher:
    """The process's dispatcher for `directory` (default env EXPERTMESH_DIRECTORY); replaced if it changed."""
    global _dispatcher
    directory = directory or settings.directory_address()
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
