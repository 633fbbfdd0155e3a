"""Controller decisions (autoscaling with cooldowns, rebalancing a hot expert, plan merging, dead-replica bookkeeping)
on recorded counters.

The live behaviour through Ray Serve is tested in test_hot_experts.py; here the controller is driven tick by tick
with explicit times and its apply/registered/drain calls are recorded. A rebalance also gives every expert a second
holder where the pool has room (planner.add_redundancy), so one lost replica uncovers nothing."""

from __future__ import annotations

import numpy as np

from expertmesh.control.controller import (
    Autoscaler,
    Controller,
    ControllerSettings,
    LoadWindow,
    _summed_counts,
    group_loads,
    layer_imbalance,
    merge_plan,
)
from expertmesh.core.plan import Autoscaling, ExpertGroup, PlacementPlan

LAYERS = [0, 1]
E = 8


def _plan(target=100.0, max_replicas=4):
    return PlacementPlan(
        autoscaling=Autoscaling(target_tokens_per_second=target, upscale_delay_s=3, downscale_delay_s=10),
        groups=[
            ExpertGroup(name=f"l{layer}", keys={layer: list(range(E))}, min_replicas=1, max_replicas=max_replicas)
            for layer in LAYERS
        ],
    )


def test_load_window_rate():
    w = LoadWindow(window_s=10)
    assert w.rate() is None
    w.add(0.0, np.zeros((2, E)))
    w.add(2.0, np.full((2, E), 20.0))
    assert np.allclose(w.rate(), 10.0)
    for t in range(3, 30):
        w.add(float(t), np.full((2, E), 20.0 + 5.0 * (t - 2)))
    assert np.allclose(w.rate(), 5.0)  # old samples left the window


def test_group_loads_split_by_replicas_and_imbalance():
    plan = PlacementPlan(
        groups=[ExpertGroup(name="a", keys={0: list(range(E))}), ExpertGroup(name="hot", keys={0: [3]}, max_replicas=4)]
    )
    rate = np.zeros((1, E))
    rate[0, 3] = 300.0
    rate[0, 0] = 100.0
    loads = group_loads(plan, {"a": 1, "hot": 2}, rate, {0: 0})
    assert loads["hot"] == 200.0 and loads["a"] == 200.0
    imb = layer_imbalance(plan, {"a": 1, "hot": 2}, rate, {0: 0})
    assert abs(imb[0] - 200.0 / (400.0 / 3)) < 1e-9


def test_autoscaler_cooldowns_and_bounds():
    plan = _plan(target=100.0, max_replicas=3)
    auto = Autoscaler()
    cur = {"l0": 1, "l1": 1}
    loads = {"l0": 250.0, "l1": 0.0}
    assert auto.decide(plan, cur, loads, now=0.0) == cur  # wants 3, waits upscale_delay_s
    assert auto.decide(plan, cur, loads, now=2.9) == cur
    cur = auto.decide(plan, cur, loads, now=3.0)
    assert cur == {"l0": 3, "l1": 1}
    assert auto.decide(plan, cur, {"l0": 10_000.0, "l1": 0.0}, now=10.0)["l0"] == 3  # max bound
    idle = {"l0": 0.0, "l1": 0.0}
    assert auto.decide(plan, cur, idle, now=20.0) == cur  # down waits downscale_delay_s
    assert auto.decide(plan, cur, {"l0": 250.0, "l1": 0}, now=25.0) == cur  # load back: the down clock resets
    assert auto.decide(plan, cur, idle, now=26.0) == cur
    assert auto.decide(plan, cur, idle, now=36.0) == {"l0": 1, "l1": 1}  # idle -> minimum


def test_merge_plan_keeps_unchanged_groups():
    current = _plan()
    proposed = PlacementPlan(
        groups=[
            ExpertGroup(name="x", keys={0: list(range(E))}, initial_replicas=1),
            ExpertGroup(name="l1-e3", keys={1: [3]}, max_replicas=6, initial_replicas=3),
            ExpertGroup(name="l1-g1", keys={1: [0, 1, 2, 4, 5, 6, 7]}, initial_replicas=1),
        ]
    )
    merged, added, removed = merge_plan(current, proposed)
    assert [g.name for g in merged.groups] == ["l0", "l1-e3", "l1-g1"]
    assert added == ["l1-e3", "l1-g1"] and removed == ["l1"]
    again, added2, removed2 = merge_plan(merged, merged)
    assert again == merged and added2 == [] and removed2 == []


def running_holders(plan: PlacementPlan, replicas: dict[str, int]) -> dict[tuple[int, int], int]:
    """(layer, expert) -> replicas running it: each replica of each group holding the key (all distinct replicas)."""
    out: dict[tuple[int, int], int] = {}
    for g in plan.groups:
        for key in g.key_list():
            out[key] = out.get(key, 0) + replicas[g.name]
    return out


def hot_expert_controller(max_total_replicas: int = 64, min_holders: int = 2):
    """A controller on _plan() whose recorded counters say layer 1 expert 5 is hot (see the tests below)."""
    plan = _plan(target=100.0, max_replicas=4)
    counts = np.zeros((2, E))
    applied: list[tuple[PlacementPlan, dict]] = []
    drained: list[str] = []
    settings = ControllerSettings(
        interval_s=1,
        window_s=5,
        rebalance_cooldown_s=1000,
        drain_grace_s=0,
        min_tokens_per_s_to_rebalance=10,
        max_total_replicas=max_total_replicas,
        min_holders=min_holders,
    )
    ctl = Controller(
        plan,
        LAYERS,
        read_counts=lambda: counts.copy(),
        apply=lambda p, r: applied.append((p, dict(r))),
        registered=lambda: dict(applied[-1][1]) if applied else {},
        drain=drained.append,
        settings=settings,
    )
    return ctl, counts, applied, drained


def test_controller_splits_a_hot_expert_and_scales_only_it():
    ctl, counts, applied, drained = hot_expert_controller()
    t = 0.0
    for _ in range(30):  # layer 1 expert 5 takes 400 tokens/s, everything else 5 tokens/s
        counts += 5.0
        counts[1, 5] += 395.0
        ctl.tick(now=t)
        t += 1.0
    st = ctl.status()
    names = {g["name"] for g in st["plan"]["groups"]}
    assert "l0" in names  # the cold layer is untouched (no restart)
    hot = [g for g in st["plan"]["groups"] if g["keys"] == {"1": [5]} or g["keys"] == {1: [5]}]
    assert len(hot) == 1
    assert st["replicas"][hot[0]["name"]] >= 4  # 400 tok/s at 100 per replica
    # l0 kept its keys (its replica was not restarted) and got a second replica: the pool (64) has room for it
    assert st["replicas"]["l0"] == 2
    assert drained == ["l1"] and st["rebalances"] == 1
    # while the new groups came up, the old l1 group kept serving (transitional apply held both)
    transitional = [p for p, _ in applied if {"l1", hot[0]["name"]} <= {g.name for g in p.groups}]
    assert transitional
    # load goes away: everything scales back to the minimum, which is two replicas a group (the second holders)
    for _ in range(30):
        ctl.tick(now=t)
        t += 1.0
    assert all(n == 2 for n in ctl.status()["replicas"].values())
    assert min(running_holders(ctl.state.plan, ctl.state.replicas).values()) == 2


def test_rebalance_keeps_two_holders_per_expert():
    """Every expert of the regrouped plan runs on >= 2 replicas, during the hot spell and after it: with a spare
    replica per cold group (pool of 64), and with none (pool of 8, exactly what the regrouping starts with)."""
    for pool, copies in ((64, False), (8, True)):
        ctl, counts, applied, drained = hot_expert_controller(max_total_replicas=pool)
        t = 0.0
        for _ in range(30):
            counts += 5.0
            counts[1, 5] += 395.0
            ctl.tick(now=t)
            t += 1.0
        st = ctl.state
        assert st.rebalances == 1 and drained, pool
        assert [g.keys for g in st.plan.groups if g.keys == {1: [5]}], "the hot expert has a group of its own"
        holders = running_holders(st.plan, st.replicas)
        assert set(holders) == {(layer, e) for layer in LAYERS for e in range(E)}
        assert min(holders.values()) >= 2, (pool, holders)
        assert sum(st.replicas.values()) <= pool and sum(applied[-1][1].values()) <= pool
        # With no spare replica the cold groups hold each other's experts (one replica each, more memory);
        # with spare ones they keep their own keys and run two replicas.
        overlapping = any(len(names) > 1 for names in st.plan.holders().values())
        assert overlapping == copies, st.plan
        for _ in range(30):  # load goes away: the autoscaler's minimum keeps the second holders
            ctl.tick(now=t)
            t += 1.0
        assert min(running_holders(st.plan, ctl.state.replicas).values()) >= 2

    # min_holders 1 turns it off: the cold groups keep one replica, and everything scales back to one.
    ctl, counts, _, _ = hot_expert_controller(min_holders=1)
    t = 0.0
    for _ in range(30):
        counts += 5.0
        counts[1, 5] += 395.0
        ctl.tick(now=t)
        t += 1.0
    assert ctl.state.rebalances == 1 and ctl.state.replicas["l0"] == 1
    for _ in range(30):
        ctl.tick(now=t)
        t += 1.0
    assert set(ctl.state.replicas.values()) == {1}


def test_rebalance_and_autoscaling_stay_within_max_total_replicas():
    """The same hot expert as above, on a pool capped at the two replicas it has: no regrouping, no scale-up."""
    ctl, counts, applied, _ = hot_expert_controller(max_total_replicas=2)
    t = 0.0
    for _ in range(30):
        counts += 5.0
        counts[1, 5] += 395.0
        ctl.tick(now=t)
        t += 1.0
    st = ctl.status()
    assert applied == []  # nothing deployed: the regrouping and the scale-up both needed more than 2 replicas
    assert {g["name"] for g in st["plan"]["groups"]} == {"l0", "l1"} and st["rebalances"] == 0
    assert st["replicas"] == {"l0": 1, "l1": 1}


def test_local_replica_budget_is_half_the_cores_but_never_below_the_plan():
    from expertmesh.stack import local_replica_budget

    assert local_replica_budget(1, cores=2) == 1  # a 2-core laptop: the plan's one replica, no more
    assert local_replica_budget(1, cores=16) == 8
    assert local_replica_budget(4, cores=2) == 4  # the plan as given always fits
    assert local_replica_budget(1, cores=1) == 1


def test_counts_of_several_routers_are_summed_and_never_go_back():
    """`expertmesh serve --routers N`: the controller reads every router's cumulative counters and sums them; a router
    that cannot be read counts with its last reading, and one that restarted (its counts start again from zero)
    keeps what it had counted, so no window of the controller sees negative load."""
    readings = {
        "a": [np.array([[1.0, 2.0]]), np.array([[3.0, 2.0]]), np.array([[4.0, 4.0]])],
        "b": [np.array([[10.0, 0.0]]), RuntimeError("router b restarting"), np.array([[1.0, 1.0]])],
    }

    def reader(name):
        values = iter(readings[name])

        def read():
            value = next(values)
            if isinstance(value, Exception):
                raise value
            return value

        return read

    read = _summed_counts([reader("a"), reader("b")])
    assert read().tolist() == [[11.0, 2.0]]
    assert read().tolist() == [[13.0, 2.0]]  # b unreadable: its last reading stands
    assert read().tolist() == [[15.0, 5.0]]  # b restarted at [1, 1]: counted on top of its 10 before
    single = reader("a")
    assert _summed_counts([single]) is single  # one router: its own reader, unchanged


def test_dead_replicas_and_short_groups_are_in_the_status(caplog):
    """check_replicas: what `reap` deregistered shows in the status; a group with fewer live replicas than its count
    is in `short_groups` with how long, logged once after replace_after_s, and leaves it when its replacement
    registered. Probing deploys nothing (Serve replaces dead replicas itself)."""
    plan = _plan()
    applied: list[tuple[PlacementPlan, dict]] = []
    live = {"l0": 1, "l1": 1}
    dead: list[list[tuple[str, str, str]]] = [[], [("l1#a", "l1", "127.0.0.1:1 unreachable")]]
    ctl = Controller(
        plan,
        LAYERS,
        read_counts=lambda: np.zeros((2, E)),
        apply=lambda p, r: applied.append((p, dict(r))),
        registered=lambda: dict(live),
        drain=lambda group: None,
        settings=ControllerSettings(replace_after_s=5.0),
        reap=lambda: dead.pop(0) if dead else [],
    )
    assert ctl.check_replicas(now=0.0) == []
    assert ctl.status()["short_groups"] == {} and ctl.status()["dead_replicas"] == []
    live["l1"] = 0
    assert ctl.check_replicas(now=1.0) == [("l1#a", "l1", "127.0.0.1:1 unreachable")]
    assert [d["replica_id"] for d in ctl.status()["dead_replicas"]] == ["l1#a"]
    assert ctl.status()["short_groups"] == {"l1": 0.0}
    with caplog.at_level("WARNING", logger="expertmesh.controller"):
        ctl.check_replicas(now=5.9)
        assert not [r for r in caplog.records if "has 0 of 1 replicas live" in r.message]
        ctl.check_replicas(now=6.0)
        ctl.check_replicas(now=7.0)
        assert len([r for r in caplog.records if "has 0 of 1 replicas live" in r.message]) == 1
    assert ctl.status()["short_groups"] == {"l1": 6.0}
    live["l1"] = 1  # the replacement registered
    ctl.check_replicas(now=8.0)
    assert ctl.status()["short_groups"] == {} and applied == []


def test_rebalance_brings_the_hot_group_up_before_the_cold_regroupings():
    """The hot expert's own group is deployed (beside the current plan) and registered before the regrouped cold
    experts are started: its replicas do not share the cores with theirs."""
    ctl, counts, applied, drained = hot_expert_controller()
    t = 0.0
    for _ in range(30):
        counts += 5.0
        counts[1, 5] += 395.0
        ctl.tick(now=t)
        t += 1.0
    hot = next(g.name for g in ctl.state.plan.groups if g.keys == {1: [5]})
    first = next(i for i, (p, _) in enumerate(applied) if hot in {g.name for g in p.groups})
    names = {g.name for g in applied[first][0].groups}
    assert names == {"l0", "l1", hot}, names  # the current plan and the hot group, nothing else yet
    later = {g.name for g in applied[first + 1][0].groups}
    assert later > names  # then the cold regroupings next to them
