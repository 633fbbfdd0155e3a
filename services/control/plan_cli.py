"""`expertmesh plan`: a placement plan for a checkpoint, offline, from routed-token statistics.

    expertmesh plan --model DIR [--stats FILE] [--replicas N [--slots-per-device S]] [--current PLAN]
                    [--target-load T] [--max-total-replicas R] [--out FILE]

Reads only the checkpoint's structure (core/checkpoint.read_moe_info: config.json or params.json, and the expert
manifest) -- no weights. Prints the plan YAML (core/plan.py schema) to stdout or writes it to --out; a per-layer
summary (max/mean load, replicas, experts moved vs --current) and the plan's redundancy (the fewest replicas holding
any expert, the experts held by one replica and why) go to stderr.

Redundancy: where it is free, every expert gets a second holder, so losing one replica uncovers nothing. Fixed
budget: with --replicas >= 2 x experts, every expert gets >= 2 slots on distinct devices. Default plan and free
budget (planner.add_redundancy): in a pool of more than one replica (--max-total-replicas R; default: as many as
the plan starts with), a one-replica group gets a second replica while the pool has one to spare, else its
experts are copied onto another one-replica group with memory to spare (a replica holds at most
--slots-per-device experts). A pool of one replica keeps one holder per expert.

Modes:
  --replicas N   fixed budget: N expert slots per MoE layer on N / S devices of S slots (planner.plan_slots,
                 DeepSeek EPLB's setting). With --current, prefers plans that move few experts.
  (default)      free budget, per-expert autoscaling (planner.plan_autoscale): fewest replicas with
                 max/mean per-replica load <= --max-ratio; a replica holds at most --slots-per-device
                 experts (default: as many as the default plan puts in one group) and, with --target-load,
                 at most T routed tokens. Cold experts may share a hot expert's group (fewest replicas)
                 unless --exclusive-hot.
  No --stats and no --replicas: the default plan (core/plan.default_plan). No --stats with --replicas:
  uniform load.

Stats FILE (JSON): the per-(layer, expert) routed token counts -- a list of rows, or an object with that list
under "experts", as a router's `GET /expertmesh/experts` and the gateway's `GET /experts` answer (save one with
curl); camelCase names and counts as strings (protobuf's JSON form) are accepted too:

    [{"layer": 0, "expert": 3, "routed_tokens": 1520, "replicas": 1}, ...]
    {"experts": [{"layer": 0, "expert": 3, "routedTokens": "1520"}, ...], "uptimeSeconds": 12.5}

`layer` is the model's layer index (an MoE layer), `expert` the routed expert index; rows left out count
as 0 tokens; `replicas` is accepted and ignored. The router's counters are cumulative since it started:
for a moving window, give the difference of two snapshots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="MoE checkpoint directory (config.json, or Mistral's params.json)"
    )
    parser.add_argument("--stats", help="JSON routed-token counts per (layer, expert): see `expertmesh plan` docs")
    parser.add_argument("--replicas", type=int, help="fixed budget: expert slots per MoE layer (>= experts)")
    parser.add_argument(
        "--slots-per-device",
        type=int,
        help="experts one replica holds (fixed budget: default 1; free budget and the default plan's copies for "
        "redundancy: default 2 GiB of expert weights)",
    )
    parser.add_argument("--current", help="placement plan YAML now serving; the new plan moves few experts from it")
    parser.add_argument(
        "--target-load", type=float, help="free budget: routed tokens (over the stats window) one replica may carry"
    )
    parser.add_argument(
        "--max-ratio", type=float, default=1.10, help="free budget: max/mean per-replica load to reach (default 1.10)"
    )
    parser.add_argument(
        "--exclusive-hot",
        action="store_true",
        help="free budget: a hot expert's group holds it alone (scales alone; costs replicas)",
    )
    parser.add_argument(
        "--move-cost",
        type=float,
        default=0.1,
        help="fixed budget: imbalance (max/mean) worth moving every slot's expert (default 0.1)",
    )
    parser.add_argument(
        "--max-total-replicas",
        type=int,
        help="default plan / free budget: replicas the pool may run (default: as many as the plan starts with); "
        "spare ones give one-replica groups a second replica",
    )
    parser.add_argument("--out", help="write the plan YAML here instead of stdout")


def load_from_rows(rows, layers: list[int], num_experts: int) -> np.ndarray:
    """[len(layers), num_experts] routed tokens from ExpertLoad-like dicts; ValueError names the bad row."""
    if isinstance(rows, dict):
        if "experts" not in rows:
            raise ValueError('stats: expected a list of rows or an object with an "experts" list')
        rows = rows["experts"]
    if not isinstance(rows, list):
        raise ValueError("stats: expected a list of {layer, expert, routed_tokens} rows")
    row_of = {layer: i for i, layer in enumerate(layers)}
    load = np.zeros((len(layers), num_experts))
    seen: set[tuple[int, int]] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"stats row {i}: expected an object, got {type(row).__name__}")
        # Any JSON value: float() below is the check (protobuf JSON omits zeros)
        raw_tokens: Any = row.get("routed_tokens", row.get("routedTokens", 0))
        try:
            layer, expert = int(row.get("layer", 0)), int(row.get("expert", 0))
            tokens = float(raw_tokens)
        except (TypeError, ValueError):
            raise ValueError(f"stats row {i}: layer, expert and routed_tokens must be numbers: {row}") from None
        if layer not in row_of:
            raise ValueError(
                f"stats row {i}: layer {layer} is not an MoE layer of the model (MoE layers: "
                f"{layers[:8]}{'...' if len(layers) > 8 else ''})"
            )
        if not 0 <= expert < num_experts:
            raise ValueError(f"stats row {i}: expert {expert} outside [0, {num_experts})")
        if not math.isfinite(tokens) or tokens < 0:
            raise ValueError(f"stats row {i}: routed_tokens must be a non-negative number, got {tokens}")
        if (layer, expert) in seen:
            raise ValueError(f"stats row {i}: (layer {layer}, expert {expert}) appears twice")
        seen.add((layer, expert))
        load[row_of[layer], expert] = tokens
    return load


def read_stats(path: str | Path, layers: list[int], num_experts: int) -> np.ndarray:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read stats: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    try:
        return load_from_rows(data, layers, num_experts)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _plan_devices(plan, layers: list[int], num_experts: int) -> np.ndarray:
    """A PlacementPlan as slots [L, D, S] (one device per group replica), sized to fit it."""
    from expertmesh.control.planner import slots_from_plan

    per_layer = {layer: 0 for layer in layers}
    width = 1
    for g in plan.groups:
        for layer, experts in g.keys.items():
            per_layer[layer] = per_layer.get(layer, 0) + g.start_replicas
            width = max(width, len(experts))
    return slots_from_plan(plan, layers, num_experts, max(1, max(per_layer.values())), width)


def run(args: argparse.Namespace) -> int:
    from expertmesh.control import planner
    from expertmesh.core.checkpoint import read_moe_info
    from expertmesh.core.plan import default_plan, load_plan

    try:
        info = read_moe_info(args.model)
        layers, E = info.moe_layers, info.num_experts
        current = load_plan(args.current) if args.current else None
        if current is not None:
            current.check_covers(info)
        load = read_stats(args.stats, layers, E) if args.stats else None
        if args.max_total_replicas is not None and args.max_total_replicas < 1:
            raise ValueError(f"--max-total-replicas must be >= 1, got {args.max_total_replicas}")
        summary: list[str] = []
        # Memory per replica, in experts: the default plan's 2 GiB of expert weights per group.
        per_replica = max(1, min(E * len(layers), (2 << 30) // max(1, info.expert_bytes)))

        if load is None and args.replicas is None:
            plan, redundancy = planner.add_redundancy(
                default_plan(info), args.slots_per_device or per_replica, args.max_total_replicas
            )
            summary.append(
                f"default plan: {len(plan.groups)} groups, {sum(g.start_replicas for g in plan.groups)} replicas "
                "(give --stats or --replicas to plan from load)"
            )
        elif args.replicas is not None:
            S = args.slots_per_device or 1
            if args.replicas % S:
                raise ValueError(f"--replicas {args.replicas} is not a multiple of --slots-per-device {S}")
            D = args.replicas // S
            load = np.ones((len(layers), E)) if load is None else load
            cur_slots = None
            if current is not None:
                try:
                    cur_slots = planner.slots_from_plan(current, layers, E, D, S)
                except ValueError as exc:
                    raise ValueError(
                        f"--current {args.current}: {exc} (--replicas and --slots-per-device "
                        f"describe the layout it must fit)"
                    ) from None
            result = planner.plan_slots(load, D, S, current=cur_slots, move_cost=args.move_cost)
            plan = planner.to_placement_plan(result, layers, model=str(info.path))
            redundancy = planner.redundancy_of(
                plan,
                f"one device per layer (--replicas {args.replicas} / --slots-per-device {S})"
                if D < 2
                else f"--replicas {args.replicas} < 2 x {E} experts: no slot for every expert's second holder",
            )
            for row, layer in enumerate(layers):
                hot = np.flatnonzero(result.counts[row] > 1)
                summary.append(
                    f"layer {layer}: max/mean device load {result.imbalance[row]:.3f}, "
                    f"{D} devices x {S} slots, extra replicas for experts {hot.tolist()}"
                    + (f", {int(result.moved[row])} experts moved" if current is not None else "")
                )
        else:
            S = args.slots_per_device or min(E, per_replica)
            scaled_plan = planner.plan_autoscale(
                load, S, target_load=args.target_load, max_ratio=args.max_ratio, exclusive_hot=args.exclusive_hot
            )
            plan, redundancy = planner.add_redundancy(
                planner.to_placement_plan(scaled_plan, layers, model=str(info.path)), S, args.max_total_replicas
            )
            moved = None
            if current is not None:
                old, new = _plan_devices(current, layers, E), _plan_devices(plan, layers, E)
                D, S2 = max(old.shape[1], new.shape[1]), max(old.shape[2], new.shape[2])
                old, new = (
                    np.pad(x, ((0, 0), (0, D - x.shape[1]), (0, S2 - x.shape[2])), constant_values=-1)
                    for x in (old, new)
                )
                moved = planner.moved_experts(planner.match_devices(new, old, E), old, E)
            for row, layer in enumerate(layers):
                scaled = [
                    f"{g.name} {g.keys[layer]} x{g.start_replicas}"
                    for g in plan.groups
                    if layer in g.keys and g.start_replicas > 1
                ]
                summary.append(
                    f"layer {layer}: max/mean per-replica load {scaled_plan.imbalance[row]:.3f}, "
                    f"{int(scaled_plan.replicas[row])} replicas, groups with more than one: "
                    f"{', '.join(scaled) or 'none'}"
                    + (f", {int(moved[row])} experts moved" if moved is not None else "")
                )
        plan.check_covers(info)
        summary.append(redundancy.describe())
    except (ValueError, OSError) as exc:  # CheckpointError and pydantic's ValidationError are ValueErrors
        print(f"expertmesh plan: error: {exc}", file=sys.stderr)
        return 2

    text = plan.to_yaml()
    if args.out:
        Path(args.out).write_text(text)
        summary.append(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    print("\n".join(summary), file=sys.stderr)
    return 0
