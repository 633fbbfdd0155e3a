"""Placement planner (services/control/planner.py) and `expertmesh plan`: pure NumPy, no Ray, no vLLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertmesh.cli import main as cli_main
from expertmesh.control import planner
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import default_plan, load_plan

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is not a package: load DeepSeek's EPLB re-implementation by path (no sys.path change).
_spec = importlib.util.spec_from_file_location("reference_eplb", REPO / "benchmarks" / "reference_eplb.py")
reference_eplb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_eplb)


def zipf_load(layers: int, experts: int, s: float, seed: int, total: float = 65536.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    share = 1.0 / np.arange(1, experts + 1) ** s
    load = np.empty((layers, experts))
    for layer in range(layers):
        load[layer, rng.permutation(experts)] = np.round(total * share / share.sum())
    return load


def check_slot_plan(plan: planner.SlotPlan, load: np.ndarray, D: int, S: int) -> None:
    L, E = load.shape
    assert plan.slots.shape == (L, D, S)
    assert (plan.slots >= 0).all() and (plan.slots < E).all()  # every slot used
    assert (plan.counts >= 1).all() and (plan.counts.sum(1) == D * S).all()  # the budget, exactly
    holds = planner._holds(plan.slots, E)
    assert (holds <= 1).all()  # no expert twice on a device
    assert (holds.sum(1) == plan.counts).all()
    expected = planner._device_load(plan.slots, load / plan.counts)
    assert np.allclose(plan.device_load, expected)
    assert np.allclose(plan.device_load.sum(1), load.sum(1))  # every token lands somewhere


def test_uniform_load_gives_an_even_plan():
    load = np.full((3, 8), 100.0)
    plan = planner.plan_slots(load, num_devices=4, slots_per_device=4)  # 16 slots: 2 per expert
    check_slot_plan(plan, load, 4, 4)
    assert (plan.counts == 2).all()
    assert np.allclose(plan.device_load, 200.0) and np.allclose(plan.imbalance, 1.0)
    free = planner.plan_autoscale(load, max_experts_per_replica=2)
    assert (free.replicas == 4).all() and (free.counts == 1).all() and np.allclose(free.imbalance, 1.0)


def test_one_hot_expert_gets_the_extra_replicas():
    load = np.full((2, 8), 100.0)
    load[1, 5] = 1000.0
    plan = planner.plan_slots(load, num_devices=6, slots_per_device=2)  # 4 extra slots
    check_slot_plan(plan, load, 6, 2)
    assert plan.counts[1, 5] == 5 and (np.delete(plan.counts[1], 5) == 1).all()
    # Layer 0 is uniform: its 4 extras spread over 4 experts, one each.
    assert sorted(plan.counts[0].tolist()) == [1] * 4 + [2] * 4
    # 1700 tokens on 6 devices: 4 devices carry a 200-token replica of expert 5 (+ a cold expert),
    # the two others 2 cold experts; the busiest is 300 (1000 / 5 + 100) and nothing does better.
    assert plan.device_load[1].max() == pytest.approx(300.0)

    # Free budget: the hot expert alone gets more replicas (exclusive), or cold experts may fill its
    # group's spare capacity (default, fewest replicas); either way max/mean <= 1.10.
    alone = planner.plan_autoscale(load, max_experts_per_replica=4, exclusive_hot=True)
    assert alone.counts[1, 5] > 1 and (np.delete(alone.counts[1], 5) == 1).all()
    assert (alone.counts[0] == 1).all() and (alone.imbalance <= 1.10 + 1e-9).all()
    shared = planner.plan_autoscale(load, max_experts_per_replica=4)
    assert shared.counts[1, 5] == shared.counts[1].max() > 1
    assert (shared.imbalance <= 1.10 + 1e-9).all() and (shared.replicas <= alone.replicas).all()


@pytest.mark.parametrize("D,S", [(8, 9), (16, 5), (70, 1)])
def test_budget_and_layout_respected(D, S):
    load = zipf_load(4, 64, 1.1, seed=D)
    load[2] = 0.0  # an idle layer
    load[3, :60] = 0.0  # a layer with 4 busy experts
    plan = planner.plan_slots(load, D, S)
    check_slot_plan(plan, load, D, S)
    assert (plan.counts <= D).all()
    assert np.allclose(plan.imbalance[2], 1.0)


def test_autoscale_meets_ratio_with_few_replicas():
    load = zipf_load(5, 64, 1.2, seed=3)
    S = 6
    free = planner.plan_autoscale(load, max_experts_per_replica=S)
    assert (free.imbalance <= 1.10 + 1e-9).all()
    keys_per_group = np.stack([np.bincount(g, minlength=64) for g in free.group_of])
    assert (keys_per_group <= S).all()
    assert ((keys_per_group > 0) == (free.group_replicas > 0)).all()  # every group holds experts
    assert np.allclose(free.group_load.sum(1), load.sum(1))
    assert (free.replicas >= -(-64 // S)).all()
    # Fewest at this grouping rule: packing for one replica less than the count found needs more.
    n = free.replicas - 1
    fewer = planner._group_ffd(load, 1.10 * load.sum(1) / n, S)
    assert (fewer.replicas > n).all()
    # A capacity target caps every replica's load.
    target = load.sum(1).max() / 40
    capped = planner.plan_autoscale(load, S, target_load=target)
    per_replica = capped.group_load / np.maximum(capped.group_replicas, 1)
    assert per_replica.max() <= target * (1 + 1e-9) and (capped.imbalance <= 1.10 + 1e-9).all()
    assert (capped.replicas >= 40).all()


def test_at_least_as_balanced_as_deepseek_eplb():
    for s, (D, S) in [(0.8, (16, 9)), (1.2, (32, 5))]:
        load = zipf_load(6, 128, s, seed=7)
        phy2log, _, logcnt = reference_eplb.rebalance_experts(load, D * S, 1, 1, D)
        eplb = planner._ratio(planner._device_load(phy2log.reshape(6, D, S), load / logcnt))
        ours = planner.plan_slots(load, D, S)
        check_slot_plan(ours, load, D, S)
        assert (ours.imbalance <= eplb + 1e-9).all(), (ours.imbalance, eplb)


def test_replan_with_unchanged_load_moves_nothing():
    load = zipf_load(4, 32, 1.0, seed=1)
    plan = planner.plan_slots(load, 8, 5)
    again = planner.plan_slots(load, 8, 5, current=plan.slots)
    assert (again.moved == 0).all() and (again.slots == plan.slots).all()
    # The same placement with devices and slots listed in another order is the same placement.
    shuffled = plan.slots[:, ::-1, ::-1]
    assert (planner.plan_slots(load, 8, 5, current=shuffled).moved == 0).all()

    # After drift the plan rebalances, and moving weights is a cost: it moves fewer than a fresh plan.
    rng = np.random.default_rng(2)
    drifted = load.copy()
    for layer in range(4):
        chosen = rng.choice(32, 8, replace=False)
        drifted[layer, chosen] = load[layer, rng.permutation(chosen)]
    kept = planner._ratio(planner._device_load(plan.slots, drifted / plan.counts))
    moved = planner.plan_slots(drifted, 8, 5, current=plan.slots)
    check_slot_plan(moved, drifted, 8, 5)
    fresh = planner.plan_slots(drifted, 8, 5)
    fresh_moves = planner.moved_experts(planner.match_devices(fresh.slots, plan.slots, 32), plan.slots, 32)
    assert (moved.imbalance <= kept + 1e-9).all() and (moved.imbalance < kept).any()
    assert moved.moved.sum() > 0 and moved.moved.sum() <= fresh_moves.sum()
    assert (moved.moved == planner.moved_experts(moved.slots, plan.slots, 32)).all()
    frugal = planner.plan_slots(drifted, 8, 5, current=plan.slots, move_cost=5.0)
    assert frugal.moved.sum() < moved.moved.sum()


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="cannot hold"):
        planner.plan_slots(np.ones((1, 8)), 2, 3)
    with pytest.raises(ValueError, match="non-negative"):
        planner.plan_slots(-np.ones((1, 8)), 4, 2)
    with pytest.raises(ValueError, match="shape"):
        planner.plan_slots(np.ones((1, 8)), 4, 2, current=np.zeros((1, 2, 4), dtype=int))


def write_mixtral_config(path: Path, layers: int = 2, experts: int = 8) -> Path:
    """A config-only Mixtral checkpoint directory: all `expertmesh plan` reads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "num_hidden_layers": layers,
                "num_local_experts": experts,
                "num_experts_per_tok": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 256,
                "hidden_act": "silu",
                "torch_dtype": "float32",
            }
        )
    )
    return path


def test_to_placement_plan_covers_every_key(tmp_path):
    info = read_moe_info(write_mixtral_config(tmp_path / "ckpt", layers=3, experts=8))
    load = zipf_load(3, 8, 1.2, seed=4)
    slot_plan = planner.plan_slots(load, 4, 3)
    free = planner.plan_autoscale(load, 3)
    for result in (slot_plan, free):
        plan = planner.to_placement_plan(result, info.moe_layers, model=str(info.path))
        plan.check_covers(info)
        assert all(g.name.startswith(f"l{next(iter(g.keys))}-") for g in plan.groups)
        replicas = {}
        for g in plan.groups:
            for key in g.key_list():
                replicas[key] = replicas.get(key, 0) + g.start_replicas
        assert replicas == {(layer, e): int(result.counts[layer, e]) for layer, e in info.keys()}
        plan.save(tmp_path / "plan.yaml")
        assert load_plan(tmp_path / "plan.yaml") == plan
    # Read back as a device layout, the slot plan is the same placement (0 moves).
    plan = planner.to_placement_plan(slot_plan, info.moe_layers)
    back = planner.slots_from_plan(plan, info.moe_layers, 8, 4, 3)
    assert (planner.moved_experts(back, slot_plan.slots, 8) == 0).all()
    with pytest.raises(ValueError, match="slots per device"):
        planner.slots_from_plan(plan, info.moe_layers, 8, 4, 2)


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    rc = cli_main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_cli_on_a_config_only_checkpoint(tmp_path, capsys):
    ckpt = write_mixtral_config(tmp_path / "mixtral")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]
    rows = [{"layer": layer, "expert": e, "routed_tokens": 100, "replicas": 1} for layer in (0, 1) for e in range(8)]
    rows[8 + 3]["routed_tokens"] = 1500  # layer 1, expert 3 is hot
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(rows))

    out = tmp_path / "plan.yaml"
    rc, _, err = run_cli(
        "--model", str(ckpt), "--stats", str(stats), "--replicas", "12", "--out", str(out), capsys=capsys
    )
    assert rc == 0, err
    plan = load_plan(out)
    plan.check_covers(read_moe_info(ckpt))
    holders = {key: sum(g.start_replicas for g in plan.groups if key in g.key_list()) for key in plan.holders()}
    assert holders[(1, 3)] == 5 and all(n == 1 for key, n in holders.items() if key[0] == 1 and key != (1, 3))
    assert "extra replicas for experts [3]" in err

    # Re-planning from that plan with the same stats moves nothing and prints the same plan.
    rc, again, err = run_cli(
        "--model", str(ckpt), "--stats", str(stats), "--replicas", "12", "--current", str(out), capsys=capsys
    )
    assert rc == 0, err
    assert err.count(", 0 experts moved") == 2 and again == out.read_text()

    # Free budget, stats in protobuf's JSON form of StatsResponse (camelCase, uint64 as strings, zeros omitted).
    proto_json = {
        "experts": [
            {"layer": r["layer"], "expert": r["expert"], "routedTokens": str(r["routed_tokens"])}
            for r in rows
            if r["layer"] or r["expert"]
        ],
        "uptimeSeconds": 3.5,
    }
    stats.write_text(json.dumps(proto_json))
    rc, text, err = run_cli(
        "--model", str(ckpt), "--stats", str(stats), "--target-load", "400", "--exclusive-hot", capsys=capsys
    )
    assert rc == 0, err
    free = load_plan_text(tmp_path, text)
    free.check_covers(read_moe_info(ckpt))
    hot = [g for g in free.groups if (1, 3) in g.key_list()]
    assert len(hot) == 1 and hot[0].start_replicas >= 4 and hot[0].name == "l1-e3"
    assert all(g.start_replicas == 1 for g in free.groups if g is not hot[0])


def load_plan_text(tmp_path: Path, text: str):
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    return load_plan(path)


def test_plan_cli_errors_are_clear(tmp_path, capsys):
    ckpt = write_mixtral_config(tmp_path / "mixtral")
    stats = tmp_path / "stats.json"
    for rows, message in [
        ([{"layer": 7, "expert": 0, "routed_tokens": 1}], "layer 7 is not an MoE layer"),
        ([{"layer": 0, "expert": 8, "routed_tokens": 1}], "expert 8 outside [0, 8)"),
        ([{"layer": 0, "expert": 1, "routed_tokens": -5}], "non-negative"),
        ([{"layer": 0, "expert": 1, "routed_tokens": 1}] * 2, "appears twice"),
        ({"rows": []}, '"experts" list'),
    ]:
        stats.write_text(json.dumps(rows))
        rc, out, err = run_cli("--model", str(ckpt), "--stats", str(stats), capsys=capsys)
        assert rc == 2 and out == "" and message in err, err
    stats.write_text("{not json")
    rc, _, err = run_cli("--model", str(ckpt), "--stats", str(stats), capsys=capsys)
    assert rc == 2 and "not valid JSON" in err
    rc, _, err = run_cli("--model", str(tmp_path), capsys=capsys)
    assert rc == 2 and "no config.json" in err
    rc, _, err = run_cli("--model", str(ckpt), "--replicas", "6", capsys=capsys)
    assert rc == 2 and "cannot hold 8 experts" in err
    two_per_device = planner.to_placement_plan(planner.plan_slots(np.ones((2, 8)), 4, 2), [0, 1])
    two_per_device.save(tmp_path / "current.yaml")
    rc, _, err = run_cli(
        "--model", str(ckpt), "--replicas", "8", "--current", str(tmp_path / "current.yaml"), capsys=capsys
    )
    assert rc == 2 and "more than 1 slots per device" in err and "--slots-per-device" in err
    rc, _, err = run_cli(
        "--model",
        str(ckpt),
        "--replicas",
        "8",
        "--slots-per-device",
        "2",
        "--current",
        str(tmp_path / "current.yaml"),
        capsys=capsys,
    )
    assert rc == 0 and err.count(", 0 experts moved") == 2, err


def test_plan_entry_point_prints_the_default_plan(tmp_path):
    """The installed `expertmesh` script, end to end: no stats -> the shared default plan."""
    ckpt = write_mixtral_config(tmp_path / "mixtral")
    exe = Path(sys.executable).parent / "expertmesh"
    proc = subprocess.run([str(exe), "plan", "--model", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = load_plan_text(tmp_path, proc.stdout)
    info = read_moe_info(ckpt)
    assert plan == default_plan(info)  # exactly the shared default (both layers fit one group here)
    assert [g.name for g in plan.groups] == ["l0-1"]
    plan.check_covers(info)


# ---------------------------------------------------------------- redundancy: a second holder per expert


def holders_by_replica(plan) -> dict[tuple[int, int], list[tuple[str, int]]]:
    """(layer, expert) -> the distinct replicas (group, index) holding it at each group's floor."""
    out: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for g in plan.groups:
        for key in g.key_list():
            out.setdefault(key, []).extend((g.name, i) for i in range(max(1, g.min_replicas)))
    return out


def test_redundancy_gives_every_expert_two_holders_where_the_pool_has_room(tmp_path):
    info = read_moe_info(write_mixtral_config(tmp_path / "ckpt", layers=2, experts=8))
    per_layer = default_plan(info, layers_per_group=1)  # two groups, l0 and l1: a pool of two replicas
    assert [g.name for g in per_layer.groups] == ["l0", "l1"]
    before = planner.redundancy_of(per_layer)
    assert before.min_holders == 1 and len(before.single) == 16

    # Ample memory (a replica may hold both layers), no spare replica: the two groups hold each other's layer.
    copied, report = planner.add_redundancy(per_layer, max_keys_per_replica=16)
    assert sum(g.start_replicas for g in copied.groups) == 2  # no new replica: the copies cost memory only
    held = holders_by_replica(copied)
    assert set(held) == set(info.keys()) and all(len(set(h)) == len(h) >= 2 for h in held.values())
    assert report.min_holders == 2 and report.single == [] and "every expert has >= 2 holders" in report.describe()
    copied.check_covers(info)

    # Tight memory (one layer per replica) but two spare replicas: each group runs two replicas of its own keys.
    doubled, report = planner.add_redundancy(per_layer, max_keys_per_replica=8, max_total_replicas=4)
    assert [(g.name, g.keys, g.min_replicas, g.start_replicas) for g in doubled.groups] == [
        ("l0", {0: list(range(8))}, 2, 2),
        ("l1", {1: list(range(8))}, 2, 2),
    ]
    assert report.min_holders == 2 and not report.single

    # Tight memory and no spare replica: nothing changes, and the report names the experts and says why.
    kept, report = planner.add_redundancy(per_layer, max_keys_per_replica=8)
    assert kept == per_layer
    assert report.min_holders == 1 and report.single == sorted(info.keys())
    assert "no spare replica" in report.reason and "at most 8 experts per replica" in report.reason
    assert "16 experts with a single holder (layer 0: 0-7; layer 1: 0-7)" in report.describe()

    # One spare replica: l0 takes it, and l1's experts are copied onto l0 (room for 8 more on each replica).
    mixed, report = planner.add_redundancy(per_layer, max_keys_per_replica=16, max_total_replicas=3)
    assert [(g.name, sorted(g.keys), g.start_replicas) for g in mixed.groups] == [("l0", [0, 1], 2), ("l1", [1], 1)]
    assert report.single == [] and min(len(h) for h in holders_by_replica(mixed).values()) >= 2
    # Room for 4 more experts per replica: half of l1 gets its second holder; the report names the other half.
    partial, report = planner.add_redundancy(per_layer, max_keys_per_replica=12, max_total_replicas=3)
    assert sum(g.start_replicas for g in partial.groups) == 3
    assert report.single == [(1, e) for e in range(4, 8)] and "(layer 1: 4-7)" in report.describe()


def test_redundancy_leaves_a_pool_of_one_replica_alone(tmp_path):
    info = read_moe_info(write_mixtral_config(tmp_path / "ckpt", layers=2, experts=8))
    whole = default_plan(info)  # both layers in one group of one replica: the 2-core laptop's pool
    assert sum(g.start_replicas for g in whole.groups) == 1
    for budget in (None, 1):
        same, report = planner.add_redundancy(whole, max_keys_per_replica=1000, max_total_replicas=budget)
        assert same == whole and report.min_holders == 1 and len(report.single) == 16
        assert "the pool is one replica" in report.reason
    # The same plan in a pool of two: the group runs two replicas.
    two, report = planner.add_redundancy(whole, max_keys_per_replica=16, max_total_replicas=2)
    assert [(g.keys, g.min_replicas, g.start_replicas) for g in two.groups] == [(whole.groups[0].keys, 2, 2)]
    assert report.single == []


def test_redundancy_keeps_a_hot_group_at_two_and_copies_nothing_into_it(tmp_path):
    """A hot expert's group already runs several replicas: a floor of 2 keeps them (no new replica), and no cold
    expert is copied into it (its every replica would need the copy)."""
    load = np.full((1, 8), 10.0)
    load[0, 5] = 400.0
    plan = planner.to_placement_plan(planner.plan_autoscale(load, 8, target_load=100.0, exclusive_hot=True), [0])
    hot = next(g for g in plan.groups if g.keys == {0: [5]})
    assert hot.start_replicas >= 4 and hot.min_replicas == 1
    total = sum(g.start_replicas for g in plan.groups)
    redundant, report = planner.add_redundancy(plan, max_keys_per_replica=8)
    assert sum(g.start_replicas for g in redundant.groups) == total
    by_name = {g.name: g for g in redundant.groups}
    assert by_name[hot.name].keys == {0: [5]} and by_name[hot.name].min_replicas == 2
    # The cold experts have nowhere to go: one cold group, no spare replica, no other one-replica group.
    assert report.single == [(0, e) for e in range(8) if e != 5] and "no spare replica" in report.reason


def test_slot_plans_give_every_expert_two_devices_when_the_budget_allows():
    load = zipf_load(3, 8, 1.4, seed=5)  # skewed: the fewest-replicas optimum would give cold experts one slot
    unbounded = planner.replica_counts(load, 20, 10)  # floor 1
    assert (unbounded == 1).any()
    plan = planner.plan_slots(load, num_devices=10, slots_per_device=2)  # 20 slots >= 2 x 8 experts
    check_slot_plan(plan, load, 10, 2)
    assert (plan.counts >= 2).all() and plan.counts.sum(1).tolist() == [20] * 3
    assert (planner._holds(plan.slots, 8) <= 1).all()  # two replicas of an expert are on two devices
    # Re-planning from that layout under unchanged load keeps it (the kept candidate is redundant too).
    assert (planner.plan_slots(load, 10, 2, current=plan.slots).moved == 0).all()
    # 12 slots < 16: the budget has no room for a second replica of every expert; hot experts get the extras.
    tight = planner.plan_slots(load, num_devices=6, slots_per_device=2)
    check_slot_plan(tight, load, 6, 2)
    assert (tight.counts == 1).any()


def test_plan_cli_shows_the_redundancy(tmp_path, capsys):
    ckpt = write_mixtral_config(tmp_path / "mixtral")
    rc, text, err = run_cli("--model", str(ckpt), capsys=capsys)  # the default plan: one group, one replica
    assert rc == 0, err
    assert load_plan_text(tmp_path, text) == default_plan(read_moe_info(ckpt))
    assert "redundancy: min holders per expert 1; 16 experts with a single holder" in err
    assert "(layer 0: 0-7; layer 1: 0-7): the pool is one replica" in err

    rc, text, err = run_cli("--model", str(ckpt), "--max-total-replicas", "2", capsys=capsys)
    assert rc == 0, err
    plan = load_plan_text(tmp_path, text)
    assert [(g.min_replicas, g.start_replicas) for g in plan.groups] == [(2, 2)]
    assert "redundancy: every expert has >= 2 holders" in err and "1 groups, 2 replicas" in err

    rc, text, err = run_cli("--model", str(ckpt), "--replicas", "16", capsys=capsys)
    assert rc == 0 and "redundancy: every expert has >= 2 holders" in err, err
    rc, text, err = run_cli("--model", str(ckpt), "--replicas", "12", capsys=capsys)
    assert rc == 0, err
    assert "8 experts with a single holder (layer 0: 4-7; layer 1: 4-7)" in err
    assert "--replicas 12 < 2 x 8 experts" in err
    rc, _, err = run_cli("--model", str(ckpt), "--max-total-replicas", "0", capsys=capsys)
    assert rc == 2 and "--max-total-replicas must be >= 1" in err


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "granitemoehybrid", "mistral_large_3"])
def test_plan_cli_plans_further_families(family, tiny_checkpoint, tmp_path, capsys):
    """`expertmesh plan` on families named nowhere in expertmesh: the structure comes from the expert manifest
    (Llama 4: MoE every other layer; Granite 4.0-H: Mamba2 layers without experts; Mistral Large 3 in Mistral's
    format: params.json, the first layer dense)."""
    ckpt = tiny_checkpoint(family)
    info = read_moe_info(ckpt)
    out = tmp_path / "plan.yaml"
    rc, _, err = run_cli("--model", str(ckpt), "--out", str(out), capsys=capsys)
    assert rc == 0, err
    plan = load_plan(out)
    plan.check_covers(info)
    assert {layer for layer, _ in plan.holders()} == set(info.moe_layers)
    if family == "llama4_text":
        assert info.moe_layers == [1, 3]
