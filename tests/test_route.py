"""Route: the pure routing functions of the router (no I/O): tables from directory snapshots, candidates with
exclusion and suspects, sole-owner and whole-layer fast paths, the multi-owner split, water-fill."""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.core.protos import expert_pb2
from expertmesh.router import route


def _snapshot(*replicas, version: int = 1) -> expert_pb2.DirectorySnapshot:
    """replicas: (replica_id, {layer: experts}[, draining])."""
    entries = []
    for rid, keys, *rest in replicas:
        entries.append(
            expert_pb2.ReplicaEntry(
                replica_id=rid,
                endpoint=f"{rid}:1",
                draining=bool(rest and rest[0]),
                keys=[expert_pb2.ExpertKeys(layer=l, experts=sorted(e)) for l, e in keys.items()],
            )
        )
    return expert_pb2.DirectorySnapshot(version=version, replicas=entries)


def _table(*replicas) -> route.RoutingTable:
    return route.RoutingTable.from_snapshot(_snapshot(*replicas))


def test_table_from_snapshot_skips_draining_and_orders_by_id():
    t = _table(("b", {0: [2, 3]}), ("a", {0: [0, 1, 2], 1: [0]}), ("c", {0: [0]}, True))
    assert t.version == 1 and t.endpoints == ["a:1", "b:1"]
    assert t.holders[0] == {0: [0], 1: [0], 2: [0, 1], 3: [1]} and t.holders[1] == {0: [0]}
    assert t.covers(0, 4) and not t.covers(0, 5) and not t.covers(2, 1)


def test_whole_layer_detection_and_sole_owners():
    one = _table(("a", {0: range(4)}))
    assert one.sole_owners(0, 4).only == "a:1"  # one replica holds the layer: whole-layer form
    split = _table(("a", {0: [0, 1]}), ("b", {0: [2, 3]}))
    sole = split.sole_owners(0, 4)
    assert sole.only is None and sole.owner.tolist() == [0, 0, 1, 1]
    assert split.sole_owners(0, 4) is sole  # cached per snapshot
    shared = _table(("a", {0: range(4)}), ("b", {0: [3]}))
    assert shared.sole_owners(0, 4) is None  # expert 3 has two replicas
    assert one.sole_owners(0, 5) is None  # expert 4 has none


def test_sole_owner_fast_path_groups_by_one_lookup():
    t = _table(("a", {0: [0, 1]}), ("b", {0: [2, 3]}))
    ids = np.array([3, 0, 1, 2, 0, 3], dtype=np.int32)
    groups = route.by_sole_owner(t, t.sole_owners(0, 4).owner, ids)
    assert list(groups) == ["a:1", "b:1"]
    assert groups["a:1"].tolist() == [1, 2, 4] and groups["b:1"].tolist() == [0, 3, 5]


def test_candidates_exclusion_and_suspects():
    t = _table(("a", {0: [0, 1]}), ("b", {0: [0]}), ("c", {0: [0]}))
    assert route.candidates(t, 0, 0) == [0, 1, 2]
    assert route.candidates(t, 0, 0, excluded={"a:1"}) == [1, 2]
    assert route.candidates(t, 0, 0, suspects={"a:1", "b:1"}) == [2]
    # suspects are avoided only while another candidate is left; excluded ones never come back in the call
    assert route.candidates(t, 0, 0, suspects={"a:1", "b:1", "c:1"}) == [0, 1, 2]
    assert route.candidates(t, 0, 1, suspects={"a:1"}) == [0]
    assert route.candidates(t, 0, 1, excluded={"a:1"}) == []
    assert route.candidates(t, 1, 0) == []


def test_missing_expert_reporting():
    t = _table(("a", {0: [0, 1]}), ("b", {0: [1]}))
    assert route.missing_experts(t, 0, [0, 1, 2]) == [2]
    assert route.missing_experts(t, 0, [0, 1], excluded={"a:1"}) == [0]
    assert route.missing_experts(None, 0, [0, 1]) == [0, 1]
    assert route.describe_missing(t, {0: 4, 1: 1}) == "layer 0 expert(s) [2, 3]; layer 1 expert(s) [0]"
    assert route.describe_missing(None, {0: 1}).startswith("any expert")
    assert route.replica_counts(t, {0: 3}) == {(0, 0): 1, (0, 1): 2, (0, 2): 0}
    assert route.replica_counts(None, {0: 2}) == {(0, 0): 0, (0, 1): 0}
    with pytest.raises(LookupError, match="layer 0 expert 2"):
        route.assign(t, 0, np.array([0, 2]), np.arange(2))


@pytest.mark.parametrize(
    "n, loads, want",
    [
        (6, [0, 0, 0], [2, 2, 2]),  # balanced
        (7, [0, 0, 0], [3, 2, 2]),  # remainder to the first in load order (ties: the earlier bin)
        (5, [4, 0], [0, 5]),  # the empty bin first, until it reaches the other
        (10, [4, 0], [3, 7]),  # level 7 each
        (3, [5, 1, 1], [0, 2, 1]),  # ties at the bottom share; the full one gets none
        (0, [1, 2], [0, 0]),
        (4, [3], [4]),
    ],
)
def test_water_fill(n, loads, want):
    got = route.water_fill(n, loads)
    assert got == want and sum(got) == n


def test_water_fill_ends_level_and_exact_on_random_loads():
    rng = np.random.default_rng(0)
    for _ in range(200):
        loads = rng.integers(0, 50, size=int(rng.integers(1, 6))).tolist()
        n = int(rng.integers(0, 200))
        quota = route.water_fill(n, loads)
        assert sum(quota) == n and min(quota) >= 0
        final = [l + q for l, q in zip(loads, quota)]
        # no item could move from the fullest bin that received one to a lower bin and lower the peak
        receivers = [f for f, q in zip(final, quota) if q]
        if receivers:
            assert max(receivers) - min(final) <= 1


def test_multi_owner_split_balances_by_inflight_and_given_rows():
    # expert 0 on a and b; expert 1 only on a: a already gets expert 1's 4 rows in this call
    t = _table(("a", {0: [0, 1]}), ("b", {0: [0]}))
    ids = np.array([0, 1] * 4 + [0] * 4, dtype=np.int64)  # expert 0: 8 assignments, expert 1: 4
    pending = np.arange(ids.shape[0])
    groups = route.assign(t, 0, ids, pending, counts=np.bincount(ids, minlength=2))
    # loads a=4 (sole-owned), b=0: of expert 0's 8, b gets 6 and a 2 (both end at 6)
    assert sorted(groups) == ["a:1", "b:1"]
    a, b = groups["a:1"], groups["b:1"]
    assert (ids[b] == 0).all() and b.shape[0] == 6 and a.shape[0] == 6
    assert np.array_equal(np.sort(np.concatenate([a, b])), pending)  # each position exactly once
    assert (np.diff(a) > 0).all() and (np.diff(b) > 0).all()  # ascending
    # rows already in flight count: b busy -> a takes most of expert 0
    busy = route.assign(t, 0, ids, pending, inflight={"b:1": 10})
    # loads a=4, b=10: a takes 6 to reach 10, the last 2 are shared -> a 4 + 7, b 1
    assert busy["a:1"].shape[0] == 11 and busy["b:1"].shape[0] == 1
    # a subset of positions (a failover round): only those, routed around the excluded replica
    retry = route.assign(t, 0, ids, np.array([0, 2, 9]), excluded={"a:1"})
    assert list(retry) == ["b:1"] and retry["b:1"].tolist() == [0, 2, 9]
    # suspects avoided while another holder exists
    avoid = route.assign(t, 0, ids, np.array([0, 2, 9]), suspects={"b:1"})
    assert list(avoid) == ["a:1"]


def test_multi_owner_split_is_even_with_equal_loads():
    t = _table(("a", {0: [0]}), ("b", {0: [0]}), ("c", {0: [0]}))
    ids = np.zeros(10, dtype=np.int32)
    groups = route.assign(t, 0, ids, np.arange(10))
    assert [g.tolist() for g in groups.values()] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert route.present_experts(np.array([3, 1, 3])) == [1, 3]
