"""Expert placement planner: how many replicas each (layer, expert) gets and which replicas share a device.

Pure NumPy, vectorised across layers (the loops run over replicas, devices or swap rounds, never over
layers), so planning all 58 MoE layers of DeepSeek-V3 takes milliseconds. Two modes:

`plan_slots(load, num_devices, slots_per_device, current=None, move_cost=0.1)` -> SlotPlan
    Fixed budget, the EPLB setting: every layer has `num_devices` devices with `slots_per_device` expert
    slots each (P = D x S slots, P >= E). Inputs: `load` [L, E], routed tokens per (layer, expert) over a
    moving window; `current` [L, D, S] expert id per slot (-1 = empty) of the plan now serving, or None.
    Output: `counts` [L, E] replicas per expert (>= 1, hot experts more, sum = P; >= 2 when P >= 2E and
    D >= 2, so one lost device uncovers nothing), `slots` [L, D, S] the expert in each slot (one device never
    holds two replicas of one expert), `device_load` [L, D] with an expert's tokens split evenly over its
    replicas, and `moved` [L] = expert weights a device must load to go from `current` to this plan. Steps:
      1. counts: repeatedly give one more replica to the expert with the highest load per replica (the
         choice minimising the busiest replica; EPLB's counts) -- computed by bisecting the threshold on
         load / k instead of looping over replicas.
      2. packing: longest-processing-time first (heaviest replica to the least-loaded device with a free
         slot), then swaps of replicas between devices while they lower the busiest (bounded rounds).
         This is where we beat EPLB's packing, which stops after the greedy pass.
      3. moves: three candidates per layer -- keep `current` (0 moves), repair `current` (swap replicas
         only where counts changed, then refine), plan afresh (devices relabelled to overlap `current`
         most). Each scores max/mean device load + move_cost x moved / P; the lowest wins, ties to the
         fewest moves. So a plan equal to `current` under unchanged load moves nothing.

`plan_autoscale(load, max_experts_per_replica, target_load=None, max_ratio=1.10)` -> GroupPlan
    Free budget, per-expert autoscaling: experts are grouped into deployments (a group's replicas all
    hold the group's experts; a replica holds at most `max_experts_per_replica` experts) and each group
    gets a replica count, so that the busiest replica carries at most `max_ratio` x the mean per-replica
    load with the fewest replicas (and at most `target_load` tokens, if given). A hot expert opens a group
    with ceil(load / capacity) replicas whose spare capacity cold experts may fill (or not, with
    `exclusive_hot`: then it scales alone); cold experts are packed first-fit-decreasing into one-replica
    groups. The replica count is searched per layer (gallop, then bisect).
    Output: `group_of` [L, E] group index of each expert, `group_replicas` [L, G] (0 = no such group),
    `group_load` [L, G].

`add_redundancy(plan, max_keys_per_replica, max_total_replicas=None)` -> (PlacementPlan, Redundancy)
    A second holder for every (layer, expert) key where it is free: when the pool has more than one replica,
    a spare replica of the pool (a group's second replica) or a one-replica group with memory to spare (a
    copy of the keys) holds it too; where neither is there the key keeps one holder and the report says why.
    `redundancy_of(plan)` is the report alone: the fewest holders of any key and the keys with a single one.

`to_placement_plan(result, layers)` turns either result into the shared `PlacementPlan` (core/plan.py):
group `l{layer}-e{expert}` for a single-expert group, `l{layer}-d{device}` / `l{layer}-g{group}` otherwise;
in slot mode, devices holding the same experts become one group with that many replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertmesh.core.plan import ExpertGroup, PlacementPlan

_EMPTY = -1  # expert id of an empty slot


@dataclass
class SlotPlan:
    counts: np.ndarray  # [L, E] replicas per expert
    slots: np.ndarray  # [L, D, S] expert id in each slot
    device_load: np.ndarray  # [L, D] routed tokens per device, expert load split evenly over its replicas
    moved: np.ndarray  # [L] expert weights newly loaded onto a device vs the current plan

    @property
    def imbalance(self) -> np.ndarray:
        """[L] max / mean device load (1.0 = perfect; 1.0 for a layer without load)."""
        return _ratio(self.device_load)


@dataclass
class GroupPlan:
    group_of: np.ndarray  # [L, E] group index of each expert
    group_replicas: np.ndarray  # [L, G] replicas of each group, 0 where a layer has fewer groups
    group_load: np.ndarray  # [L, G] routed tokens per group (all replicas together)

    @property
    def replicas(self) -> np.ndarray:
        """[L] total replicas per layer."""
        return self.group_replicas.sum(1)

    @property
    def counts(self) -> np.ndarray:
        """[L, E] replicas holding each expert."""
        return np.take_along_axis(self.group_replicas, self.group_of, 1)

    @property
    def imbalance(self) -> np.ndarray:
        """[L] max / mean per-replica load (mean over all replicas of the layer)."""
        per_replica = np.where(self.group_replicas > 0, self.group_load / np.maximum(self.group_replicas, 1), 0.0)
        total = self.group_load.sum(1)
        mean = total / np.maximum(self.replicas, 1)
        return np.where(total > 0, per_replica.max(1) / np.where(mean > 0, mean, 1.0), 1.0)


def _ratio(device_load: np.ndarray) -> np.ndarray:
    mean = device_load.mean(-1)
    return np.where(mean > 0, device_load.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def _check_load(load) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2 or load.shape[1] == 0:
        raise ValueError(f"load must be [layers, experts], got shape {list(load.shape)}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and non-negative")
    return load


# ---------------------------------------------------------------- slot mode (fixed budget)


def replica_counts(load: np.ndarray, num_slots: int, max_per_expert: int, min_per_expert: int = 1) -> np.ndarray:
    """[L, E] replicas per expert: >= min_per_expert each, sum = num_slots, greedy on the highest load per replica.

    Giving expert e its (k+1)-th replica has priority load[e] / k, decreasing in k, so the greedy choices
    are the `num_slots - m E` largest of load[:, :, None] / k for k >= m = min_per_expert. Instead of sorting
    those L x E x K values we bisect the threshold tau (64 steps over [L, E]): an expert has
    clip(floor(load / tau) - m + 1, 0, K) of them >= tau. Near-ties at the threshold go round-robin by expert
    id (so zero-load layers spread evenly).

    Parameters
    ----------
    load: [L, E] routed tokens per (layer, expert), >= 0.
    num_slots: replicas to hand out per layer (>= min_per_expert x E).
    max_per_expert: cap on one expert's replicas (e.g. the number of devices, one replica per device).
    min_per_expert: floor on one expert's replicas (2: every expert survives the loss of one device).

    Returns
    -------
    [L, E] int64 replica counts, each in [min_per_expert, max_per_expert], each row summing to num_slots.
    """
    L, E = load.shape
    m = int(min_per_expert)
    if not 1 <= m <= max_per_expert or num_slots < m * E:
        raise ValueError(f"cannot give {E} experts {m} replicas each within {num_slots} slots, {max_per_expert} max")
    extra = num_slots - m * E
    if extra == 0:
        return np.full((L, E), m, dtype=np.int64)
    K = min(extra, max_per_expert - m)  # more replicas than devices would share one

    def at_least(tau: np.ndarray) -> np.ndarray:  # [L, E] priorities >= tau per expert
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.floor(load / tau[:, None]) - (m - 1)
        n = np.clip(np.nan_to_num(n, nan=0.0, posinf=K), 0, K)
        return np.where(tau[:, None] > 0, n, K).astype(np.int64)

    lo = np.zeros(L)  # at_least(lo).sum() >= extra
    hi = load.max(1) * (1 + 1e-9) + 1e-300  # at_least(hi).sum() < extra
    for _ in range(64):
        mid = (lo + hi) / 2
        enough = at_least(mid).sum(1) >= extra
        lo, hi = np.where(enough, mid, lo), np.where(enough, hi, mid)
    base = at_least(hi)  # [L, E] surely chosen
    tied = at_least(lo) - base  # [L, E] chosen round-robin up to `extra`
    left = extra - base.sum(1)  # [L]
    for r in range(K):
        want = tied > r
        give = want & (np.cumsum(want, 1) <= left[:, None])
        base += give
        left -= give.sum(1)
        if not left.any():
            break
    return m + base


def _holds(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, D, E] replicas of each expert per device (empty slots ignored)."""
    L, D, S = slots.shape
    flat = np.arange(L * D)[:, None] * (num_experts + 1) + np.where(slots < 0, num_experts, slots).reshape(L * D, S)
    counts = np.bincount(flat.ravel(), minlength=L * D * (num_experts + 1))
    return counts.reshape(L, D, num_experts + 1)[:, :, :num_experts]


def _device_load(slots: np.ndarray, replica_load: np.ndarray) -> np.ndarray:
    """[L, D] from slots [L, D, S] and per-replica load [L, E]."""
    return _item_load(slots, replica_load).sum(-1)


def _pack_lpt(counts: np.ndarray, replica_load: np.ndarray, D: int, S: int) -> np.ndarray:
    """Heaviest replica first onto the least-loaded device with a free slot not holding that expert."""
    L, E = counts.shape
    rows = np.arange(L)
    # [L, P] expert per replica
    experts: np.ndarray = np.repeat(np.tile(np.arange(E), L), counts.ravel()).reshape(L, -1)
    item = np.take_along_axis(replica_load, experts, 1)  # [L, P]
    order = np.argsort(-item, axis=1, kind="stable")
    experts = np.take_along_axis(experts, order, 1)
    item = np.take_along_axis(item, order, 1)
    dev_load = np.zeros((L, D))
    fill = np.zeros((L, D), dtype=np.int64)
    holds = np.zeros((L, D, E), dtype=bool)
    slots = np.full((L, D, S), _EMPTY, dtype=np.int64)
    for i in range(experts.shape[1]):
        e = experts[:, i]
        full = fill >= S
        cost = np.where(full | holds[rows, :, e], np.inf, dev_load)  # [L, D]
        # Only if every free device already holds e (counts <= D makes that rare) share a device.
        cost = np.where(np.isinf(cost).all(1, keepdims=True), np.where(full, np.inf, dev_load), cost)
        d = cost.argmin(1)
        slots[rows, d, fill[rows, d]] = e
        fill[rows, d] += 1
        dev_load[rows, d] += item[:, i]
        holds[rows, d, e] = True
    return slots


def _item_load(slots: np.ndarray, replica_load: np.ndarray) -> np.ndarray:
    """[L, D, S] load of the replica in each slot (0 for an empty slot)."""
    L = slots.shape[0]
    item = np.take_along_axis(replica_load, np.maximum(slots, 0).reshape(L, -1), 1).reshape(slots.shape)
    return np.where(slots >= 0, item, 0.0)


def _apply_swaps(slots, holds, t, dev_a, sa, dev_b, sb) -> None:
    """Swap slots (t, dev_a, sa) <-> (t, dev_b, sb) in place, keeping holds [L, D, E] in step."""
    xa, xb = slots[t, dev_a, sa], slots[t, dev_b, sb]
    slots[t, dev_a, sa], slots[t, dev_b, sb] = xb, xa
    for dev, gone, came in ((dev_a, xa, xb), (dev_b, xb, xa)):
        holds[t[gone >= 0], dev[gone >= 0], gone[gone >= 0]] = False
        holds[t[came >= 0], dev[came >= 0], came[came >= 0]] = True


def _refine_swaps(
    slots: np.ndarray, replica_load: np.ndarray, pair_rounds: int = 8, max_rounds: int = 40, min_gain: float = 1e-4
) -> np.ndarray:
    """Swap replicas between devices while that lowers the busiest device; never two replicas of one
    expert on a device. Each round is one array expression over all layers still improving.

    Phase 1 (fast, parallel; `pair_rounds`): pair the i-th busiest device with the (i + shift)-th least
    busy and take, per pair, the swap that best evens the two out -- all pairs at once, so a layer levels
    in a few rounds; the shift moves on when a pairing has nothing left to give.
    Phase 2 (finish; at most `max_rounds`): all S x D x S swaps with the busiest device, the best taken
    while it lowers it by more than `min_gain` x the mean. Both rounds are bounded so planning time is.
    """
    slots = slots.copy()
    L, D, S = slots.shape
    E = replica_load.shape[1]
    holds = _holds(slots, E) > 0  # [L, D, E]
    # A swap must lower the busiest device by min_gain x the mean device load (default 0.01%: less is
    # noise next to the load's own drift; plan_slots raises it to the cost of the two weights it moves).
    tol = min_gain * np.maximum(_device_load(slots, replica_load).mean(1), 1e-12)  # [L]
    h = D // 2
    active = np.arange(L)
    stall = np.zeros(L, dtype=np.int64)  # rounds without a swap; also shifts the pairing
    for _ in range(pair_rounds if h else 0):
        sl = slots[active]
        item = _item_load(sl, replica_load[active])  # [A, D, S]
        dev = item.sum(-1)  # [A, D]
        order = np.argsort(dev, 1, kind="stable")
        heavy = order[:, ::-1][:, :h]  # [A, h] busiest first
        shifted = (np.arange(h)[None, :] + stall[active][:, None]) % h
        light = np.take_along_axis(order[:, :h], shifted, 1)  # [A, h] partner of each
        r = np.arange(active.size)[:, None]
        a, b = item[r, heavy], item[r, light]  # [A, h, S]
        ea, eb = sl[r, heavy], sl[r, light]
        top = dev[r, heavy]  # [A, h]
        new_hi = top[..., None, None] - a[..., :, None] + b[..., None, :]  # [A, h, S, S]
        new_lo = dev[r, light][..., None, None] + a[..., :, None] - b[..., None, :]
        worst = np.maximum(new_hi, new_lo)
        t3 = active[:, None, None]
        a_on_lo = holds[t3, light[..., None], np.maximum(ea, 0)] & (ea >= 0)  # [A, h, S]
        b_on_hi = holds[t3, heavy[..., None], np.maximum(eb, 0)] & (eb >= 0)
        bad = a_on_lo[..., :, None] | b_on_hi[..., None, :] | (ea[..., :, None] == eb[..., None, :])
        worst = np.where(bad, np.inf, worst).reshape(active.size, h, S * S)
        best = worst.argmin(-1)  # [A, h]
        gain = top - np.take_along_axis(worst, best[..., None], -1)[..., 0]
        take = gain > tol[active][:, None]  # [A, h]
        li, pi = np.nonzero(take)
        sa, sb = np.divmod(best[li, pi], S)
        _apply_swaps(slots, holds, active[li], heavy[li, pi], sa, light[li, pi], sb)
        moved_any = take.any(1)
        stall[active] = np.where(moved_any, 0, stall[active] + 1)
        active = active[stall[active] < h]  # a full cycle of pairings without a swap: done
        if not active.size:
            break

    active = np.arange(L)
    for _ in range(max_rounds):
        sl = slots[active]
        A = active.size
        rows = np.arange(A)
        item = _item_load(sl, replica_load[active])  # [A, D, S]
        dev = item.sum(-1)  # [A, D]
        m = dev.argmax(1)
        top = dev[rows, m]  # [A]
        a, ea = item[rows, m], sl[rows, m]  # [A, S] leaving m
        new_m = top[:, None, None, None] - a[:, :, None, None] + item[:, None, :, :]  # [A, S, D, S]
        new_d = dev[:, None, :, None] + a[:, :, None, None] - item[:, None, :, :]  # [A, S, D, S]
        worst = np.maximum(new_m, new_d)
        t3 = active[:, None, None]
        a_on_d = holds[t3, np.arange(D)[None, None, :], np.maximum(ea, 0)[:, :, None]] & (ea >= 0)[:, :, None]
        b_on_m = holds[t3, m[:, None, None], np.maximum(sl, 0)] & (sl >= 0)  # [A, D, S]
        bad = (
            a_on_d[:, :, :, None]
            | b_on_m[:, None, :, :]
            | (ea[:, :, None, None] == sl[:, None, :, :])
            | (np.arange(D) == m[:, None])[:, None, :, None]
        )
        worst = np.where(bad, np.inf, worst).reshape(A, -1)
        best = worst.argmin(1)
        gain = top - worst[rows, best]
        take = gain > tol[active]
        if not take.any():
            break
        sa, d, sb = np.unravel_index(best[take], (S, D, S))
        _apply_swaps(slots, holds, active[take], m[take], sa, d, sb)
        active = active[take]
    return slots


def moved_experts(new_slots: np.ndarray, old_slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L] expert weights a device must newly load to go from old to new (devices matched as given).

    Parameters
    ----------
    new_slots, old_slots: [L, D, S] expert id per (layer, device, slot), -1 = empty.
    num_experts: E, the experts per layer.

    Returns
    -------
    [L] int count per layer of (device, expert) pairs held in `new_slots` and not in `old_slots`.
    """
    gained = _holds(new_slots, num_experts) - _holds(old_slots, num_experts)
    return np.maximum(gained, 0).sum((1, 2))


def match_devices(new_slots: np.ndarray, old_slots: np.ndarray, num_experts: int) -> np.ndarray:
    """Relabel new devices (greedy max-overlap matching per layer) so that few weights move.

    Parameters
    ----------
    new_slots, old_slots: [L, D, S] expert id per (layer, device, slot), -1 = empty.
    num_experts: E, the experts per layer.

    Returns
    -------
    [L, D, S] `new_slots` with its devices permuted per layer (same placement, different device labels).
    """
    L, D, S = new_slots.shape
    new_h = (_holds(new_slots, num_experts) > 0).astype(np.float32)
    old_h = (_holds(old_slots, num_experts) > 0).astype(np.float32)
    overlap = np.einsum("lie,lje->lij", new_h, old_h)  # [L, Dnew, Dold]
    rows = np.arange(L)
    target = np.empty((L, D), dtype=np.int64)
    for _ in range(D):
        flat = overlap.reshape(L, -1).argmax(1)
        i, j = np.divmod(flat, D)
        target[rows, i] = j
        overlap[rows, i, :] = -1.0
        overlap[rows, :, j] = -1.0
    out = np.empty_like(new_slots)
    out[rows[:, None], target] = new_slots
    return out


def _repair(current: np.ndarray, counts: np.ndarray, replica_load: np.ndarray) -> np.ndarray:
    """Change only the replicas whose counts changed: surplus replicas on the busiest devices (and empty
    slots) are freed, then deficit replicas, heaviest first, go to the least-loaded freed slot."""
    L, D, S = current.shape
    E = counts.shape[1]
    rows = np.arange(L)
    slots = current.copy()
    have = _holds(current, E).sum(1)  # [L, E]
    surplus = have - counts  # >0 drop, <0 add
    dev_load = _device_load(current, replica_load)  # [L, D]
    # Rank each expert's replicas by device load, busiest first; free the first `surplus` of them.
    flat = slots.reshape(L, D * S)
    layer_of: np.ndarray = np.repeat(rows, D * S)  # [L*D*S]
    e_flat = flat.ravel()
    load_flat: np.ndarray = np.repeat(dev_load.reshape(-1), S)  # [L*D*S]
    order = np.lexsort((-load_flat, e_flat, layer_of))
    key = layer_of[order] * (E + 1) + e_flat[order]
    start = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(order.size) - np.repeat(start, np.diff(np.r_[start, order.size]))
    ranks = np.empty_like(rank)
    ranks[order] = rank
    excess = np.where(e_flat >= 0, surplus[layer_of, np.maximum(e_flat, 0)], 0)
    free = (e_flat < 0) | (ranks < excess)
    flat = np.where(free, _EMPTY, e_flat).reshape(L, D * S)
    slots = flat.reshape(L, D, S)
    # Deficit replicas, heaviest first.
    need = np.maximum(-surplus, 0)  # [L, E]
    n_need = need.sum(1)
    if n_need.max(initial=0) == 0:
        return slots
    width = int(n_need.max())
    layer_of = np.repeat(np.repeat(rows, E), need.ravel())  # every needed replica
    expert_of: np.ndarray = np.repeat(np.tile(np.arange(E), L), need.ravel())
    order = np.lexsort((-replica_load[layer_of, expert_of], layer_of))  # per layer, heaviest first
    layer_of, expert_of = layer_of[order], expert_of[order]
    position = np.arange(layer_of.size) - np.repeat(np.cumsum(n_need) - n_need, n_need)
    add = np.full((L, width), _EMPTY, dtype=np.int64)  # [L, width] padded with -1
    add[layer_of, position] = expert_of
    dev_load = _device_load(slots, replica_load)
    holds = _holds(slots, E) > 0
    for i in range(width):
        e = add[:, i]
        go = e >= 0
        has_free = (slots == _EMPTY).any(-1)  # [L, D]
        cost = np.where(has_free & ~holds[rows, :, np.maximum(e, 0)], dev_load, np.inf)
        cost = np.where(np.isinf(cost).all(1, keepdims=True), np.where(has_free, dev_load, np.inf), cost)
        d = cost.argmin(1)
        s = (slots[rows, d] == _EMPTY).argmax(1)
        t = rows[go]
        slots[t, d[go], s[go]] = e[go]
        dev_load[t, d[go]] += replica_load[t, e[go]]
        holds[t, d[go], e[go]] = True
    return slots


def plan_slots(load, num_devices: int, slots_per_device: int = 1, current=None, move_cost: float = 0.1) -> SlotPlan:
    """Replica counts and device placement for a fixed slot budget; the steps are in the module docstring.

    Parameters
    ----------
    load: [L, E] routed tokens per (layer, expert) over a moving window (array-like, >= 0).
    num_devices: D devices per layer; slots_per_device: S expert slots per device (D x S >= E).
    current: [L, D, S] expert id per slot of the plan now serving (-1 = empty), or None for a fresh plan.
    move_cost: weight of moved expert weights (per slot) against load imbalance when choosing among candidates.

    Returns
    -------
    SlotPlan: counts [L, E], slots [L, D, S], device_load [L, D], moved [L].
    """
    load = _check_load(load)
    L, E = load.shape
    D, S = int(num_devices), int(slots_per_device)
    P = D * S
    if D < 1 or S < 1:
        raise ValueError("num_devices and slots_per_device must be >= 1")
    if P < E:
        raise ValueError(f"{D} devices x {S} slots = {P} slots cannot hold {E} experts (need >= {E})")
    if P > E * D:
        raise ValueError(f"{P} slots > {E} experts x {D} devices: some device would hold an expert twice")
    # Redundancy where the budget has room for it: with >= 2 slots per expert every expert gets two devices, so
    # losing one device uncovers nothing (the extra slots go to the hottest experts after that).
    floor = 2 if D >= 2 and P >= 2 * E else 1
    counts = replica_counts(load, P, D, min_per_expert=floor)  # [L, E]
    replica_load = load / counts  # [L, E]
    fresh = _refine_swaps(_pack_lpt(counts, replica_load, D, S), replica_load)
    if current is None:
        return SlotPlan(counts, fresh, _device_load(fresh, replica_load), np.zeros(L, dtype=np.int64))

    current = np.asarray(current, dtype=np.int64)
    if current.shape != (L, D, S):
        raise ValueError(f"current placement has shape {list(current.shape)}, expected {[L, D, S]}")
    if ((current < _EMPTY) | (current >= E)).any():
        raise ValueError(f"current placement has expert ids outside [0, {E}) (or -1 for an empty slot)")
    cur_counts = _holds(current, E).sum(1)  # [L, E]
    keep_valid = (cur_counts >= floor).all(1)  # every expert still served (twice, where the budget allows)
    cur_replica_load = load / np.maximum(cur_counts, 1)

    candidates = [
        current,
        # Swaps away from `current` move two weights each: only those worth their move cost.
        _refine_swaps(_repair(current, counts, replica_load), replica_load, min_gain=max(1e-4, 2 * move_cost / P)),
        match_devices(fresh, current, E),
    ]
    loads = [_device_load(current, cur_replica_load)] + [_device_load(c, replica_load) for c in candidates[1:]]
    moved = np.stack([moved_experts(c, current, E) for c in candidates])  # [3, L]
    score = np.stack([_ratio(dl) for dl in loads]) + move_cost * moved / P  # [3, L]
    score[0, ~keep_valid] = np.inf
    pick = np.lexsort((moved, score), axis=0)[0]  # [L] ties -> fewer moves
    rows = np.arange(L)
    slots = np.stack(candidates)[pick, rows]
    chosen_counts = np.where((pick == 0)[:, None], cur_counts, counts)
    return SlotPlan(chosen_counts, slots, np.stack(loads)[pick, rows], moved[pick, rows])


# ---------------------------------------------------------------- autoscale mode (free budget)


def _group_ffd(load: np.ndarray, capacity: np.ndarray, max_keys: int, exclusive_hot: bool = False) -> GroupPlan:
    """Hot experts (load > capacity) open a group with ceil(load / capacity) replicas; every other expert,
    heaviest first, joins the first group with room (load and key count) -- a hot group too, unless
    `exclusive_hot` -- else opens a one-replica group."""
    L, E = load.shape
    rows = np.arange(L)
    order = np.argsort(-load, axis=1, kind="stable")  # [L, E]
    w = np.take_along_axis(load, order, 1)
    cap = capacity[:, None]  # [L, 1]
    hot = w > cap  # [L, E]
    reps = np.where(hot, np.ceil(w / cap), 1.0).astype(np.int64)  # [L, E]
    room = np.full((L, E), -1.0)  # spare tokens per group; -1 = unopened or out of key slots
    g_keys = np.zeros((L, E), dtype=np.int64)
    g_reps = np.zeros((L, E), dtype=np.int64)
    n_groups = np.zeros(L, dtype=np.int64)
    group_sorted = np.empty((L, E), dtype=np.int64)
    for i in range(E):
        wi = w[:, i]
        fits = room >= wi[:, None]
        join = fits.any(1) & ~hot[:, i]
        g = np.where(join, fits.argmax(1), n_groups)
        opened = rows[~join]
        room[opened, g[opened]] = reps[opened, i] * capacity[opened] * (1 + 1e-12)
        g_reps[opened, g[opened]] = reps[opened, i]
        n_groups[opened] += 1
        g_keys[rows, g] += 1
        closed = (g_keys[rows, g] >= max_keys) | (hot[:, i] & exclusive_hot)
        room[rows, g] = np.where(closed, -1.0, room[rows, g] - wi)
        group_sorted[:, i] = g
    g_load = np.zeros((L, E))
    np.add.at(g_load, (rows[:, None], group_sorted), w)
    group_of = np.empty_like(group_sorted)
    np.put_along_axis(group_of, order, group_sorted, 1)
    return GroupPlan(group_of, g_reps, g_load)


def plan_autoscale(
    load,
    max_experts_per_replica: int,
    target_load: float | None = None,
    max_ratio: float = 1.10,
    exclusive_hot: bool = False,
) -> GroupPlan:
    """Fewest replicas per layer with max/mean per-replica load <= max_ratio; see the module docstring.

    For a candidate replica count N the per-replica capacity is min(max_ratio * W / N, target_load)
    (W = the layer's load) and packing at that capacity gives a plan; N is feasible when that plan's
    max/mean <= max_ratio (always so when it needs N' <= N replicas: max <= capacity, mean >= W / N).
    N >= lo + 11 E is feasible for max_ratio = 1.10 (hot groups need <= W / capacity + E replicas), so
    we gallop up from the lower bound and bisect, per layer, all layers at once (exclusive_hot: scan).

    Parameters
    ----------
    load: [L, E] routed tokens per (layer, expert) over a moving window (array-like, >= 0).
    max_experts_per_replica: most experts one replica (group) may hold.
    target_load: optional cap on the tokens one replica carries; None = only the max/mean bound.
    max_ratio: bound on the busiest replica's load over the mean per-replica load.
    exclusive_hot: a hot expert's group holds it alone (its replicas scale alone, no cold expert is
    copied along) -- costs replicas: the spare capacity left by rounding its count up stays unused.

    Returns
    -------
    GroupPlan: group_of [L, E], group_replicas [L, G] (0 = no such group), group_load [L, G].
    """
    load = _check_load(load)
    L, E = load.shape
    S = int(max_experts_per_replica)
    if S < 1:
        raise ValueError("max_experts_per_replica must be >= 1")
    if max_ratio <= 1.0:
        raise ValueError("max_ratio must be > 1.0")
    if target_load is not None and target_load <= 0:
        raise ValueError("target_load must be > 0")
    total = load.sum(1)  # [L]
    lo = np.full(L, -(-E // S), dtype=np.int64)  # key limit
    if target_load is not None:
        lo = np.maximum(lo, np.ceil(total / target_load).astype(np.int64))
    hi = lo + int(np.ceil(E * max_ratio / (max_ratio - 1.0))) + 1
    zero = total <= 0

    def feasible(n: np.ndarray) -> tuple[np.ndarray, GroupPlan]:
        cap = max_ratio * total / n
        if target_load is not None:
            cap = np.minimum(cap, target_load)
        plan = _group_ffd(load, np.where(zero, 1.0, cap), S, exclusive_hot)
        return plan.imbalance <= max_ratio * (1 + 1e-12), plan

    ok, _ = feasible(lo)
    done = ok | zero
    if exclusive_hot:
        # Feasibility is not monotone here (rounding hot counts up wastes more or less capacity as N
        # moves), so bisection misses the good windows: scan up in 4% steps instead.
        n = lo.copy()
        while not done.all():
            n = np.where(done, n, np.minimum(hi, np.maximum(n + 1, np.ceil(n * 1.04).astype(np.int64))))
            ok, _ = feasible(n)
            done |= ok
        ok, best = feasible(n)
        assert ok.all()
        return best
    # Gallop up from the lower bound in growing steps (the answer is usually within a few x of it).
    step = np.maximum(lo // 4, 1)
    while True:
        todo = ~done & (lo + step < hi)
        if not todo.any():
            break
        probe = np.where(todo, lo + step, lo)
        ok, _ = feasible(probe)
        hi = np.where(todo & ok, probe, hi)
        lo = np.where(todo & ~ok, probe, lo)
        step = np.where(todo & ~ok, step + step // 2 + 1, step)
        if not (todo & ~ok).any():
            break
    while True:
        todo = ~done & (hi - lo > 1)
        if not todo.any():
            break
        mid = np.where(todo, (lo + hi) // 2, hi)
        ok, _ = feasible(mid)
        hi = np.where(todo & ok, mid, hi)
        lo = np.where(todo & ~ok, mid, lo)
    ok, best = feasible(np.where(done, lo, hi))
    assert ok.all()
    return best


# ---------------------------------------------------------------- redundancy (a second holder per expert)


@dataclass
class Redundancy:
    """How many replicas hold each (layer, expert) key of a plan, counted at each group's floor.

    A group's floor is max(1, min_replicas): what the autoscaler never goes below, so what a key can count on
    after load drops. A key held by two groups, or by one group of >= 2 replicas, survives one replica's loss.
    """

    min_holders: int  # fewest replicas holding any key (0 for an empty plan)
    single: list[tuple[int, int]]  # keys held by one replica only, sorted
    reason: str | None = None  # why those keys have one holder (None when there are none, or nobody said)

    def describe(self) -> str:
        """One line for `expertmesh plan` and the controller's log."""
        if not self.single:
            return f"redundancy: every expert has >= {self.min_holders} holders (one replica may fail)"
        by_layer: dict[int, list[int]] = {}
        for layer, expert in self.single:
            by_layer.setdefault(layer, []).append(expert)
        listed = "; ".join(f"layer {layer}: {_ranges(experts)}" for layer, experts in by_layer.items())
        return (
            f"redundancy: min holders per expert {self.min_holders}; {len(self.single)} experts with a single "
            f"holder ({listed})" + (f": {self.reason}" if self.reason else "")
        )


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive ids
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _floor(group: ExpertGroup) -> int:
    return max(1, group.min_replicas)


def redundancy_of(plan: PlacementPlan, reason: str | None = None) -> Redundancy:
    """Holders per key at each group's floor (see `Redundancy`); `reason` is kept if some key has one holder."""
    holders: dict[tuple[int, int], int] = {}
    for g in plan.groups:
        for key in g.key_list():
            holders[key] = holders.get(key, 0) + _floor(g)
    single = sorted(key for key, n in holders.items() if n < 2)
    return Redundancy(min(holders.values(), default=0), single, reason if single else None)


def add_redundancy(
    plan: PlacementPlan, max_keys_per_replica: int, max_total_replicas: int | None = None
) -> tuple[PlacementPlan, Redundancy]:
    """Give every (layer, expert) key a second holder where that is free, so one replica's loss uncovers nothing.

    The pool is `max_total_replicas` replicas (None: as many as the plan starts with); a replica holds at most
    `max_keys_per_replica` expert weights (the per-replica memory budget: the default plan's 2 GiB, the
    planner's max_experts_per_replica). Steps, for keys held by one replica (at the groups' floors):
      1. a group that already starts with >= 2 replicas keeps 2 (min_replicas 2): no new replica;
      2. a one-replica group gets a second replica (min_replicas 2; keys unchanged, so a running group is not
         restarted) while the pool has a spare one, biggest groups first;
      3. the keys left are copied onto another group that the plan starts with one replica (raised in step 2
         or not) with room for them (groups overlap; the router splits an expert's tokens over its holders),
         the group with the most room first;
      4. what still has one holder stays so, and the report says why (a pool of one replica, or no spare
         replica and no replica with room). A plan of one replica in a pool of one is returned unchanged.
    Only groups the plan starts with one replica take copies (step 3): a hot expert's group (the controller's
    exclusive_hot) stays its own, and its many replicas would each need the copy.

    Parameters
    ----------
    plan: the placement plan (any source: default plan, planner, a file).
    max_keys_per_replica: most (layer, expert) keys one replica may hold.
    max_total_replicas: most replicas the pool may start with, or None for the plan's own count.

    Returns
    -------
    (plan with the second holders, its Redundancy report).
    """
    total = sum(g.start_replicas for g in plan.groups)
    budget = total if max_total_replicas is None else max(int(max_total_replicas), total)
    if budget <= 1:
        return plan, redundancy_of(plan, "the pool is one replica (a second holder needs a second replica)")
    groups = [g.model_dump() for g in plan.groups]  # mutable copies; validated again at the end
    holders: dict[tuple[int, int], int] = {}
    for g in plan.groups:
        for key in g.key_list():
            holders[key] = holders.get(key, 0) + _floor(g)

    def raise_to_two(i: int) -> None:
        g = groups[i]
        g["min_replicas"] = max(2, g["min_replicas"])
        g["max_replicas"] = max(2, g["max_replicas"])
        if g["initial_replicas"] is not None:
            g["initial_replicas"] = max(2, g["initial_replicas"])
        for key in plan.groups[i].key_list():
            holders[key] += 2 - _floor(plan.groups[i])

    def lone_keys(i: int) -> list[tuple[int, int]]:
        return [key for key in plan.groups[i].key_list() if holders[key] < 2]

    for i, g in enumerate(plan.groups):  # 1. already two replicas at the start: keep two
        if g.start_replicas >= 2 and lone_keys(i):
            raise_to_two(i)
    used = total
    for i in sorted(range(len(groups)), key=lambda i: -len(plan.groups[i].key_list())):  # 2. spare replicas
        if used < budget and lone_keys(i):
            raise_to_two(i)
            used += 1
    # 3. copies onto groups that start with one replica, where they have room (memory: max_keys_per_replica)
    size = [len(g.key_list()) for g in plan.groups]
    hosts = [i for i, g in enumerate(plan.groups) if g.start_replicas == 1]
    for i in sorted(range(len(groups)), key=lambda i: -len(lone_keys(i))):
        lone = lone_keys(i)
        for h in sorted((h for h in hosts if h != i), key=lambda h: (size[h], h)):
            room = max_keys_per_replica - size[h]
            if not lone or room <= 0:
                break
            taken, lone = lone[:room], lone[room:]
            for layer, expert in taken:
                groups[h]["keys"].setdefault(layer, []).append(expert)
                holders[(layer, expert)] += 1
            size[h] += len(taken)
    redundant = PlacementPlan(
        version=plan.version,
        model=plan.model,
        autoscaling=plan.autoscaling,
        groups=[ExpertGroup.model_validate(g) for g in groups],
    )
    reason = (
        f"no spare replica (the pool's {budget} are in use) and no one-replica group with room for a copy "
        f"(at most {max_keys_per_replica} experts per replica)"
    )
    return redundant, redundancy_of(redundant, reason)


# ---------------------------------------------------------------- conversion to the shared plan schema


def to_placement_plan(
    result: SlotPlan | GroupPlan, layers: list[int], model: str | None = None, max_replicas_factor: float = 2.0
) -> PlacementPlan:
    """The planner's result as a PlacementPlan; `layers[i]` is the model layer id of row i of the load.

    Slot mode: one group per set of devices holding the same experts in a layer (min = max = initial =
    that many replicas: a fixed layout). Autoscale mode: one group per planned group with
    initial_replicas = the planned count, min 1 and max ceil(count x max_replicas_factor), so the
    per-group autoscaler can follow load from there.

    Parameters
    ----------
    result: a SlotPlan (plan_slots) or a GroupPlan (plan_autoscale).
    layers: model layer id of each row of the planner's arrays.
    model: the checkpoint the plan is for (recorded in the plan), or None.
    max_replicas_factor: autoscale mode's max_replicas over the planned count.

    Returns
    -------
    PlacementPlan covering every (layer, expert) of the result exactly once per group layout.
    """
    groups: list[ExpertGroup] = []
    if isinstance(result, SlotPlan):
        if len(layers) != result.slots.shape[0]:
            raise ValueError(f"{len(layers)} layer ids for a plan of {result.slots.shape[0]} layers")
        for row, layer in enumerate(layers):
            seen: dict[tuple[int, ...], list[int]] = {}
            for d, experts in enumerate(result.slots[row].tolist()):
                key = tuple(sorted({e for e in experts if e >= 0}))
                if key:
                    seen.setdefault(key, []).append(d)
            for key, devices in seen.items():
                name = f"l{layer}-e{key[0]}" if len(key) == 1 else f"l{layer}-d{devices[0]}"
                n = len(devices)
                groups.append(
                    ExpertGroup(name=name, keys={layer: list(key)}, min_replicas=n, max_replicas=n, initial_replicas=n)
                )
    elif isinstance(result, GroupPlan):
        if len(layers) != result.group_of.shape[0]:
            raise ValueError(f"{len(layers)} layer ids for a plan of {result.group_of.shape[0]} layers")
        for row, layer in enumerate(layers):
            members: dict[int, list[int]] = {}
            for e, g in enumerate(result.group_of[row].tolist()):
                members.setdefault(g, []).append(e)
            for g in sorted(members, key=lambda g: members[g][0]):
                experts = members[g]
                n = int(result.group_replicas[row, g])
                name = f"l{layer}-e{experts[0]}" if len(experts) == 1 else f"l{layer}-g{g}"
                groups.append(
                    ExpertGroup(
                        name=name,
                        keys={layer: experts},
                        min_replicas=1,
                        max_replicas=max(n, int(np.ceil(n * max_replicas_factor))),
                        initial_replicas=n,
                    )
                )
    else:
        raise TypeError(f"expected a SlotPlan or GroupPlan, got {type(result).__name__}")
    return PlacementPlan(model=model, groups=groups)


def slots_from_plan(
    plan: PlacementPlan, layers: list[int], num_experts: int, num_devices: int, slots_per_device: int
) -> np.ndarray:
    """A PlacementPlan read as a device layout: each replica of a group is a device holding the group's experts.

    Parameters
    ----------
    plan: the placement plan; layers: the MoE layer ids, in row order.
    num_experts: E; num_devices: D; slots_per_device: S of the layout to fill.

    Returns
    -------
    [L, D, S] expert id per slot (-1 = empty). Raises ValueError if the plan names an unknown layer or expert,
    or needs more devices or slots than given.
    """
    L, D, S = len(layers), num_devices, slots_per_device
    row_of = {layer: i for i, layer in enumerate(layers)}
    devices: list[list[list[int]]] = [[] for _ in layers]
    for g in plan.groups:
        for layer, experts in g.keys.items():
            if layer not in row_of:
                raise ValueError(f"group {g.name}: layer {layer} is not an MoE layer of the model")
            bad = [e for e in experts if e >= num_experts]
            if bad:
                raise ValueError(f"group {g.name}: expert ids {bad} >= {num_experts} in layer {layer}")
            if len(experts) > S:
                raise ValueError(
                    f"group {g.name} holds {len(experts)} experts of layer {layer}, more than {S} slots per device"
                )
            devices[row_of[layer]].extend([list(experts)] * g.start_replicas)
    slots: np.ndarray = np.full((L, D, S), _EMPTY, dtype=np.int64)  # [L, D, S]
    for row, devs in enumerate(devices):
        if len(devs) > D:
            raise ValueError(f"layer {layers[row]}: the plan has {len(devs)} replicas, the layout {D} devices")
        for d, experts in enumerate(devs):
            slots[row, d, : len(experts)] = experts
    return slots
