"""Route: which replica computes which (token, expert) assignment of one MoE layer. Pure functions and data.

No I/O, no gRPC, no clock: the dispatcher passes in what changes over time (the directory snapshot, the replicas
that failed in this call, the suspects it avoids, the rows each replica has in flight). Arrays are numpy: the
bookkeeping here is [N]-sized int work, where a numpy op is cheaper than a torch op.

Vocabulary: an *assignment* is one (token, expert) pair of a layer's top-k routing, numbered n = t * K + k over
the flattened [T, K] `topk_ids`; a *position* is such an n; a replica is named by its endpoint.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only the message type, for annotations
    from expertmesh.core.protos.expert_pb2 import DirectorySnapshot

_NO_SUSPECTS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Replica:
    replica_id: str
    endpoint: str
    keys: dict = field(hash=False, compare=False)  # layer -> frozenset of experts


@dataclass(frozen=True)
class SoleOwners:
    """Every expert of a layer has exactly one replica.

    owner: [E] int64, the replica index (into `RoutingTable.replicas`) of each expert.
    only: the endpoint when one replica holds the whole layer (the whole-layer form applies), else None.
    """

    owner: np.ndarray
    only: str | None


@dataclass
class RoutingTable:
    """Live, non-draining replicas per (layer, expert), from one directory snapshot."""

    version: int
    replicas: list[Replica]
    holders: dict[int, dict[int, list[int]]]  # layer -> expert -> indices into `replicas`
    _sole: dict = field(default_factory=dict, repr=False, compare=False)  # (layer, E) -> SoleOwners | None

    @classmethod
    def from_snapshot(cls, snap: DirectorySnapshot) -> RoutingTable:
        """Build the table.

        Parameters
        ----------
        snap: a directory snapshot (`expert_pb2.DirectorySnapshot`); draining entries are left out.

        Returns
        -------
        RoutingTable with replicas in replica_id order (so indices are stable for one snapshot).
        """
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

    @property
    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.replicas]

    def covers(self, layer: int, num_experts: int) -> bool:
        """Parameters: layer, num_experts. Returns: whether every expert 0..num_experts-1 has a live replica."""
        per_layer = self.holders.get(layer, {})
        return all(per_layer.get(e) for e in range(num_experts))

    def sole_owners(self, layer: int, num_experts: int) -> SoleOwners | None:
        """The sole-owner fast path's table, cached per snapshot.

        Parameters
        ----------
        layer, num_experts: the layer and its expert count.

        Returns
        -------
        SoleOwners if every expert of `layer` has exactly one replica, else None (some expert has none or several).
        """
        key = (layer, num_experts)
        if key not in self._sole:
            per_layer = self.holders.get(layer, {})
            owners: list[Sequence[int]] = [per_layer.get(e, ()) for e in range(num_experts)]
            if all(len(o) == 1 for o in owners):
                idx = [o[0] for o in owners]
                distinct = set(idx)
                self._sole[key] = SoleOwners(
                    np.asarray(idx, dtype=np.int64), self.replicas[idx[0]].endpoint if len(distinct) == 1 else None
                )
            else:
                self._sole[key] = None
        return self._sole[key]


def candidates(
    table: RoutingTable,
    layer: int,
    expert: int,
    excluded: Collection[str] = (),
    suspects: Collection[str] = _NO_SUSPECTS,
) -> list[int]:
    """The replicas that may compute `expert` of `layer` now.

    Parameters
    ----------
    table: the routing table.
    layer, expert: the key.
    excluded: endpoints that failed in this call (never used again in it).
    suspects: endpoints that failed recently; avoided while another candidate remains.

    Returns
    -------
    Replica indices (table order); empty if none is left.
    """
    live = [r for r in table.holders.get(layer, {}).get(expert, ()) if table.replicas[r].endpoint not in excluded]
    if len(live) > 1 and suspects:
        healthy = [r for r in live if table.replicas[r].endpoint not in suspects]
        live = healthy or live
    return live


def missing_experts(
    table: RoutingTable | None,
    layer: int,
    experts: list[int],
    excluded: Collection[str] = (),
    suspects: Collection[str] = _NO_SUSPECTS,
) -> list[int]:
    """Parameters: as `candidates`, for several experts (table None = no snapshot yet).
    Returns: the experts of `experts` without a candidate (all of them without a table)."""
    if table is None:
        return list(experts)
    return [e for e in experts if not candidates(table, layer, e, excluded, suspects)]


def describe_missing(table: RoutingTable | None, layers: Mapping[int, int]) -> str:
    """Parameters: table; layers {layer: num_experts}. Returns: a message naming the keys without a replica."""
    if table is None:
        return "any expert (no directory snapshot received yet)"
    out = []
    for layer, n in sorted(layers.items()):
        miss = [e for e in range(n) if not table.holders.get(layer, {}).get(e)]
        if miss:
            out.append(f"layer {layer} expert(s) {miss}")
    return "; ".join(out)


def replica_counts(table: RoutingTable | None, layers: Mapping[int, int]) -> dict[tuple[int, int], int]:
    """Parameters: table (None = no snapshot: every count 0); layers {layer: num_experts}.
    Returns: {(layer, expert): live replicas holding it} for every key of `layers`."""
    counts = {}
    for layer, n in sorted(layers.items()):
        per_layer = table.holders.get(layer, {}) if table is not None else {}
        for e in range(n):
            counts[(layer, e)] = len(per_layer.get(e, ()))
    return counts


def present_experts(ids: np.ndarray, counts: np.ndarray | None = None) -> list[int]:
    """Parameters: ids [n] expert per assignment; counts [E] its bincount if already made.
    Returns: the distinct experts, ascending."""
    if counts is None:
        counts = np.bincount(ids)
    return np.flatnonzero(counts).tolist()


def by_sole_owner(table: RoutingTable, owner: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The sole-owner fast path: one table lookup groups the assignments.

    Parameters
    ----------
    table: the routing table `owner` came from.
    owner: [E] replica index per expert (`SoleOwners.owner`).
    ids: [N] expert of each assignment.

    Returns
    -------
    {endpoint: [n_r] positions, ascending}, endpoints in replica order.
    """
    replica_of = owner[ids]  # [N] replica index per assignment
    return {table.replicas[r].endpoint: np.flatnonzero(replica_of == r) for r in np.unique(replica_of).tolist()}


def assign(
    table: RoutingTable,
    layer: int,
    ids: np.ndarray,
    pending: np.ndarray,
    *,
    counts: np.ndarray | None = None,
    excluded: Collection[str] = (),
    suspects: Collection[str] = _NO_SUSPECTS,
    inflight: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Group the pending assignments by replica.

    An expert with one candidate sends all its assignments there; an expert with several splits its assignments
    over them by `water_fill`, the load of a replica being its rows in flight plus the assignments it already got
    in this call (sole-owned first, then each multi-owner expert in id order).

    Parameters
    ----------
    table: the routing table; every expert in ids[pending] must have a candidate (`missing_experts` is empty).
    layer: the layer.
    ids: [N] expert of every assignment of the call.
    pending: [n] positions (into ids) still to compute, ascending.
    counts: [E] bincount of ids[pending] if the caller has it (the first round: all of them).
    excluded, suspects: as `candidates`.
    inflight: endpoint -> rows it has in flight from this process (absent = 0).

    Returns
    -------
    {endpoint: [n_r] positions (a subset of `pending`, ascending)}, endpoints in replica order.
    Raises LookupError if an expert has no candidate.
    """
    sub_ids = ids[pending]  # [n]
    if counts is None:
        counts = np.bincount(sub_ids)
    owner = np.full(counts.shape[0], -1, dtype=np.int64)  # [E] sole replica, -1 = several
    multi: list[tuple[int, list[int]]] = []
    for e in np.flatnonzero(counts).tolist():
        cands = candidates(table, layer, e, excluded, suspects)
        if not cands:
            raise LookupError(f"no live replica holds layer {layer} expert {e}")
        if len(cands) == 1:
            owner[e] = cands[0]
        else:
            multi.append((e, cands))
    replica_of = owner[sub_ids]  # [n] replica index per assignment
    if multi:
        inflight = inflight or {}
        load = {r: inflight.get(table.replicas[r].endpoint, 0) for _, c in multi for r in c}
        single = np.bincount(replica_of[replica_of >= 0], minlength=len(table.replicas))
        for r in load:
            load[r] += int(single[r])
        for e, cands in multi:
            where = np.flatnonzero(sub_ids == e)  # [n_e]
            quota = water_fill(where.shape[0], [load[r] for r in cands])
            start = 0
            for r, q in zip(cands, quota):
                replica_of[where[start : start + q]] = r
                load[r] += q
                start += q
    return {table.replicas[r].endpoint: pending[replica_of == r] for r in np.unique(replica_of).tolist()}


def water_fill(n: int, loads: list[int]) -> list[int]:
    """Split n items over bins so that the fullest bin ends as low as possible.

    The lowest bins are raised to the next level until the items run out; what is left at a common level is
    shared evenly, the remainder one each to the bins first in load order (ties: the earlier bin first).

    Parameters
    ----------
    n: items to place (>= 0).
    loads: the current load of each bin.

    Returns
    -------
    Items per bin (same order as `loads`), summing to exactly n.
    """
    quota = [0] * len(loads)
    if n <= 0 or not loads:
        return quota
    level = sorted(range(len(loads)), key=lambda i: loads[i])
    filled = [loads[i] for i in level]
    remaining = n
    k = 1
    while remaining > 0:
        while k < len(level) and filled[0] == filled[k]:
            k += 1
        room = (filled[k] - filled[0]) * k if k < len(level) else remaining
        give = min(room, remaining)
        each, extra = divmod(give, k)
        for j in range(k):
            add = each + (1 if j < extra else 0)
            quota[level[j]] += add
            filled[j] += add
        remaining -= give
    return quota
