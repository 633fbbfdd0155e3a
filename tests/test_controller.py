"""Controller decisions (autoscaling with cooldowns, rebalancing a hot expert, plan merging) on recorded counters.

The live behaviour through Ray Serve is tested in test_hot_experts.py; here the controller is driven tick by tick
with explicit times and its apply/registered/drain calls are recorded."""

from __future__ import annotations

import numpy as np

from expertmesh.control.controller import (
    Autoscaler,
    Controller,
    ControllerSettings,
    LoadWindow,
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


def test_controller_splits_a_hot_expert_and_scales_only_it():
    plan = _plan(target=100.0, max_replicas=4)
    counts = np.zeros((2, E))
    applied: list[tuple[PlacementPlan, dict]] = []
    drained: list[str] = []
    settings = ControllerSettings(
        interval_s=1, window_s=5, rebalance_cooldown_s=1000, drain_grace_s=0, min_tokens_per_s_to_rebalance=10
    )
    ctl = Controller(
        plan,
        LAYERS,
        read_counts=lambda: counts.copy(),
        apply=lambda p, r: applied.append((p, dict(r))),
        registered=lambda: dict(applied[-1][1]),
        drain=drained.append,
        settings=settings,
    )
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
    assert st["replicas"]["l0"] == 1
    assert drained == ["l1"] and st["rebalances"] == 1
    # while the new groups came up, the old l1 group kept serving (transitional apply held both)
    transitional = [p for p, _ in applied if {"l1", hot[0]["name"]} <= {g.name for g in p.groups}]
    assert transitional
    # load goes away: everything scales back to the minimum
    for _ in range(30):
        ctl.tick(now=t)
        t += 1.0
    assert all(n == 1 for n in ctl.status()["replicas"].values())


def test_rebalance_and_autoscaling_stay_within_max_total_replicas():
    """The same hot expert as above, on a pool capped at the two replicas it has: no regrouping, no scale-up."""
    plan = _plan(target=100.0, max_replicas=4)
    counts = np.zeros((2, E))
    applied: list[tuple[PlacementPlan, dict]] = []
    settings = ControllerSettings(
        interval_s=1,
        window_s=5,
        rebalance_cooldown_s=1000,
        drain_grace_s=0,
        min_tokens_per_s_to_rebalance=10,
        max_total_replicas=2,
    )
    ctl = Controller(
        plan,
        LAYERS,
        read_counts=lambda: counts.copy(),
        apply=lambda p, r: applied.append((p, dict(r))),
        registered=lambda: dict(applied[-1][1]) if applied else {},
        drain=lambda name: None,
        settings=settings,
    )
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
