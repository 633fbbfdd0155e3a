"""The expert controller: per-group autoscaling by routed load, and live rebalancing of hot experts.

Every `interval_s` it reads the router's cumulative routed-token counters (the JSON of the router's
`GET /expertmesh/counters`, router/openai_server.py), turns them into tokens/s per (layer, expert) over a moving
window, and decides:

* **Autoscaling** (every tick): a group's load is the tokens/s of its keys (a key held by several groups is
  split in proportion to their replicas, as the router splits it); desired replicas =
  ceil(load / target_tokens_per_second), clamped to the group's [min_replicas, max_replicas]. A change
  must persist for `upscale_delay_s` (up) or `downscale_delay_s` (down) before it is applied; an idle
  group goes to its minimum.
* **Rebalancing** (when the busiest replica of a layer carries more than `imbalance_threshold` x the mean
  per-replica load, or a layer needing more than one replica's capacity has an expert above
  `hot_expert_skew` x the layer's mean expert load; at most once per `rebalance_cooldown_s`): the planner
  (`planner.plan_autoscale(..., exclusive_hot=True)`) regroups experts so each hot expert gets a group of
  its own with more replicas, and cold experts are not copied along; then every expert gets a second holder
  where the pool has room (`planner.add_redundancy`: a second replica within `max_total_replicas`, else a
  copy on a one-replica group within `max_experts_per_replica`), so one lost replica uncovers nothing. Groups
  whose keys are unchanged keep their name and replicas (nothing restarts; a floor of 2 may add a replica);
  new groups are deployed and must register in the directory before the old groups they replace are
  drained (directory Drain: the router stops sending them new work) and then removed. A request never
  waits on a removed replica.

* **Dead replicas** (every `probe_interval_s` on a thread of its own once `start()`ed, so neither a rebalance nor an
  unreadable router delays it; at the start of every tick when a caller steps `tick()` itself, as the controller
  service does): every replica in the directory gets an `ExpertService.Info` call with a short deadline
  (`ReplicaProber`). One that refuses the connection (its process is gone), answers as another replica (its port
  was taken by a new one), or misses `probe_misses` deadlines in a row is deregistered at once: the directory's
  Watch tells every router within milliseconds, instead of after the lease. Serve restarts the dead actor itself
  (its health check, every second in the local pool, sees it die); groups with fewer live replicas than their
  count are in the status (`short_groups`) and logged after `replace_after_s`. The replacement registers only
  once it is warm (experts/app.py: weights loaded, one Forward run). docs/benchmarks.md measures kill ->
  replacement serving.

Applying is declarative: the whole Serve config for (plan, replica counts) goes to Serve at once. Each group
is its own Serve application whose args never change, so Serve adds/removes replicas of a changed group and
leaves every other replica running (re-running `serve.run` would restart them all).

`Controller.status()` (load, replicas, the last plan, history) feeds the gateway's `/experts` and the plots.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertmesh.core.plan import ExpertGroup, PlacementPlan

log = logging.getLogger("expertmesh.controller")

ENV_CONTROLLER_SETTINGS = "EXPERTMESH_CONTROLLER_SETTINGS"  # JSON object of ControllerSettings fields


@dataclass
class ControllerSettings:
    interval_s: float = 2.0
    window_s: float = 10.0  # moving window of the load estimate
    imbalance_threshold: float = 1.5  # max/mean per-replica load that triggers a rebalance
    hot_expert_skew: float = 3.0  # an expert with this x its layer's mean load is "hot"
    rebalance_cooldown_s: float = 30.0
    min_tokens_per_s_to_rebalance: float = 50.0  # do not regroup on noise
    max_experts_per_replica: int = 64
    max_total_replicas: int = 64  # safety cap on the whole pool
    max_replicas_per_group: int = 8  # cap on what the planner gives one group (memory: a replica each)
    # Holders a rebalance gives every expert where the pool has room (planner.add_redundancy adds at most a second
    # one): 2 = one lost replica uncovers nothing; 1 = no redundancy (each group scales down to one replica).
    min_holders: int = 2
    drain_grace_s: float = 3.0  # after draining, before removing (in-flight RPCs finish)
    register_timeout_s: float = 180.0  # new groups must register within this
    probe_interval_s: float = 1.0  # how often every registered replica gets an Info call (0 = never)
    probe_timeout_s: float = 1.0  # the Info call's deadline
    probe_misses: int = 2  # missed deadlines in a row that make a replica dead (a refused connection is dead at once)
    replace_after_s: float = 15.0  # a group short of live replicas this long is logged (Serve did not replace them)


class LoadWindow:
    """Tokens/s per key from cumulative counter snapshots over a moving window."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque[tuple[float, np.ndarray]] = deque()

    def add(self, t: float, cumulative: np.ndarray) -> None:
        self.samples.append((t, cumulative.astype(np.float64)))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> np.ndarray | None:
        """[L, E] tokens/s over the window, or None before two samples."""
        if len(self.samples) < 2:
            return None
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return np.maximum(c1 - c0, 0.0) / (t1 - t0)


def group_loads(
    plan: PlacementPlan, replicas: dict[str, int], rate: np.ndarray, layer_row: dict[int, int]
) -> dict[str, float]:
    """Tokens/s carried by each group: a key's rate split over its holders in proportion to their replicas."""
    holders: dict[tuple[int, int], list[str]] = plan.holders()
    out = {g.name: 0.0 for g in plan.groups}
    for (layer, expert), names in holders.items():
        r = float(rate[layer_row[layer], expert])
        total = sum(max(replicas.get(n, 0), 0) for n in names)
        for n in names:
            share = replicas.get(n, 0) / total if total else 1.0 / len(names)
            out[n] += r * share
    return out


def layer_imbalance(
    plan: PlacementPlan, replicas: dict[str, int], rate: np.ndarray, layer_row: dict[int, int]
) -> dict[int, float]:
    """Per layer: max over replicas of per-replica load / mean per-replica load (1.0 = balanced)."""
    loads = group_loads(plan, replicas, rate, layer_row)
    per_layer: dict[int, list[tuple[float, int]]] = {}
    for g in plan.groups:
        n = max(replicas.get(g.name, 0), 1)
        for layer in g.keys:
            # a multi-layer group is charged to each of its layers with its full load (conservative)
            per_layer.setdefault(layer, []).append((loads[g.name] / n, n))
    out = {}
    for layer, items in per_layer.items():
        total_load = sum(load * n for load, n in items)
        total_replicas = sum(n for _, n in items)
        mean = total_load / total_replicas if total_replicas else 0.0
        out[layer] = max(load for load, _ in items) / mean if mean > 0 else 1.0
    return out


class Autoscaler:
    """Per-group replica targets with up/down cooldowns."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, float]] = {}  # group -> (desired, since)

    def decide(
        self, plan: PlacementPlan, current: dict[str, int], loads: dict[str, float], now: float
    ) -> dict[str, int]:
        out = dict(current)
        for g in plan.groups:
            scaling = plan.autoscaling_for(g)
            load = loads.get(g.name, 0.0)
            want = math.ceil(load / scaling.target_tokens_per_second) if load > 0 else 0
            # never below one: a decode step cannot wait for a replica to start from zero
            want = max(1, g.min_replicas, min(g.max_replicas, want))
            have = current.get(g.name, g.start_replicas)
            if want == have:
                self.pending.pop(g.name, None)
                continue
            delay = scaling.upscale_delay_s if want > have else scaling.downscale_delay_s
            prev = self.pending.get(g.name)
            if prev is None or (prev[0] > have) != (want > have):
                self.pending[g.name] = (want, now)  # direction changed: restart the clock
                prev = self.pending[g.name]
            if now - prev[1] >= delay:
                out[g.name] = want
                self.pending.pop(g.name, None)
            else:
                self.pending[g.name] = (want, prev[1])
        return out


def merge_plan(current: PlacementPlan, proposed: PlacementPlan) -> tuple[PlacementPlan, list[str], list[str]]:
    """Keep current groups whose keys reappear in `proposed` (same name, no restart); name new groups uniquely.

    Returns (merged plan, names of new groups, names of removed groups)."""
    by_keys = {json.dumps(g.keys, sort_keys=True): g for g in current.groups}
    used = {g.name for g in current.groups}
    groups: list[ExpertGroup] = []
    added: list[str] = []
    kept: set[str] = set()
    for g in proposed.groups:
        same = by_keys.get(json.dumps(g.keys, sort_keys=True))
        if same is not None and same.name not in kept:
            kept.add(same.name)
            floor = max(same.min_replicas, g.min_replicas)  # a floor of 2 is the keys' second holder
            groups.append(
                same.model_copy(
                    update={
                        "min_replicas": floor,
                        "max_replicas": max(same.max_replicas, g.max_replicas, floor),
                        "initial_replicas": max(g.start_replicas, floor),
                    }
                )
            )
            continue
        name, i = g.name, 1
        while name in used:
            i += 1
            name = f"{g.name[:44]}-r{i}"
        used.add(name)
        groups.append(g.model_copy(update={"name": name}))
        added.append(name)
    removed = [g.name for g in current.groups if g.name not in kept]
    merged = PlacementPlan(model=current.model, autoscaling=current.autoscaling, groups=groups)
    return merged, added, removed


class ReplicaProber:
    """Finds the replicas in the directory that no longer serve, and deregisters them.

    `reap()` sends one `ExpertService.Info` (deadline `timeout_s`) to every registered replica at once, over one
    channel per replica id (a new replica on a reused port gets a new channel, never the old one's backoff). Dead:
    the connection is refused (UNAVAILABLE: nothing listens, the process is gone), the port answers with another
    replica id, or `misses` deadlines in a row passed (a hung process; one slow answer from a busy replica is not
    enough). Any other answer (an error status) is from a live process. A dead replica is deregistered at once; a
    live one it wrongly removed re-registers on its next lease renewal (lease/3), so a mistake costs that replica's
    traffic for a few seconds, never a request."""

    def __init__(self, directory, timeout_s: float = 1.0, misses: int = 2):
        import grpc

        from expertmesh.core import auth
        from expertmesh.core.protos import expert_pb2, expert_pb2_grpc

        self._grpc, self._pb2, self._pb2_grpc = grpc, expert_pb2, expert_pb2_grpc
        self._open_channel = auth.insecure_channel  # its Info probes carry the cluster credential
        self.directory = directory  # a DirectoryClient (snapshot, deregister)
        self.timeout_s = timeout_s
        self.misses_to_dead = misses
        self._channels: dict[str, tuple[str, Any, Any]] = {}  # replica_id -> (endpoint, channel, stub)
        self._misses: dict[str, int] = {}

    def reap(self) -> list[tuple[str, str, str]]:
        """Probe every registered replica; deregister the dead. Returns [(replica_id, group, why)] deregistered."""
        grpc = self._grpc
        entries = list(self.directory.snapshot(timeout=2).replicas)
        live_ids = {e.replica_id for e in entries}
        for rid in [r for r in self._channels if r not in live_ids]:
            self._channels.pop(rid)[1].close()
            self._misses.pop(rid, None)
        calls = []
        for entry in entries:
            known = self._channels.get(entry.replica_id)
            if known is None or known[0] != entry.endpoint:
                if known is not None:
                    known[1].close()
                channel = self._open_channel(entry.endpoint)
                known = (entry.endpoint, channel, self._pb2_grpc.ExpertServiceStub(channel))
                self._channels[entry.replica_id] = known
            calls.append((entry, known[2].Info.future(self._pb2.InfoRequest(), timeout=self.timeout_s)))
        dead = []
        for entry, call in calls:
            why = None
            try:
                reply = call.result()
                if reply.replica_id != entry.replica_id:
                    why = f"{entry.endpoint} answers as {reply.replica_id!r}"
                else:
                    self._misses.pop(entry.replica_id, None)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    why = f"{entry.endpoint} unreachable ({exc.details()})"
                elif exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    # It answered (say UNAUTHENTICATED during a credential rotation): the process is alive.
                    self._misses.pop(entry.replica_id, None)
                else:
                    n = self._misses.get(entry.replica_id, 0) + 1
                    self._misses[entry.replica_id] = n
                    if n >= self.misses_to_dead:
                        why = f"{entry.endpoint}: {n} Info calls in a row failed ({exc.code().name})"
            if why is not None:
                self.directory.deregister(entry.replica_id)
                self._misses.pop(entry.replica_id, None)
                dead.append((entry.replica_id, entry.group, why))
        return dead

    def close(self) -> None:
        for _, channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()


@dataclass
class ControllerStatus:
    plan: PlacementPlan
    replicas: dict[str, int]
    rate: list[list[float]] | None = None
    layers: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    rebalances: int = 0
    last_rebalance: dict | None = None
    dead_replicas: list[dict] = field(default_factory=list)  # the last ones deregistered by the prober
    short_groups: dict[str, float] = field(
        default_factory=dict
    )  # group -> seconds with fewer live replicas than wanted


class Controller:
    """Runs the loop above in a thread. `read_counts() -> [L, E]` cumulative routed tokens (rows = MoE layers in
    order `layers`); `apply(plan, replicas)` deploys declaratively; `registered() -> dict[group, n ready]` and
    `drain(group)` talk to the directory; `reap() -> [(replica_id, group, why)]` deregisters dead replicas
    (`ReplicaProber.reap`; None = no probing)."""

    def __init__(
        self,
        plan: PlacementPlan,
        layers: list[int],
        read_counts: Callable[[], np.ndarray],
        apply: Callable[[PlacementPlan, dict[str, int]], None],
        registered: Callable[[], dict[str, int]],
        drain: Callable[[str], None],
        settings: ControllerSettings | None = None,
        status_file: str | Path | None = None,
        reap: Callable[[], list[tuple[str, str, str]]] | None = None,
    ):
        self.settings = settings or ControllerSettings()
        self.reap = reap
        self._short_since: dict[str, float] = {}  # group -> when it was first seen with too few live replicas
        self._reported_short: set[str] = set()  # groups logged as short for over replace_after_s
        self.layers = list(layers)
        self.layer_row = {layer: i for i, layer in enumerate(self.layers)}
        self.read_counts, self._apply, self.registered, self.drain = read_counts, apply, registered, drain
        self.window = LoadWindow(self.settings.window_s)
        self.autoscaler = Autoscaler()
        replicas = {g.name: g.start_replicas for g in plan.groups}
        self.state = ControllerStatus(plan=plan, replicas=replicas, layers=self.layers)
        self.status_file = Path(status_file) if status_file else None
        self._last_rebalance = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prober_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- one tick ---------------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.reap is not None and self._prober_thread is None:  # stepped by a caller (the controller service)
            try:
                self.check_replicas(now)
            except Exception:  # noqa: BLE001 - the directory restarting: the load part of the tick goes on
                log.exception("replica probe failed")
        self.window.add(now, np.asarray(self.read_counts()))
        rate = self.window.rate()
        if rate is None:
            return
        st = self.state
        s = self.settings
        imbalance = layer_imbalance(st.plan, st.replicas, rate, self.layer_row)
        worst = max(imbalance.values(), default=1.0)
        total_rate = float(rate.sum())
        # Regroup when replicas are unevenly loaded, or when a layer that needs more than one replica's worth
        # of capacity owes it to a few hot experts (scaling their whole group would copy cold experts too).
        target_rate = st.plan.autoscaling.target_tokens_per_second
        mean_per_expert = rate.mean(axis=1, keepdims=True)
        skew = np.where(mean_per_expert > 0, rate / np.maximum(mean_per_expert, 1e-12), 0.0).max(axis=1)  # [L]
        hot_layers = (skew > s.hot_expert_skew) & (rate.sum(axis=1) > target_rate)
        if (
            (worst > s.imbalance_threshold or hot_layers.any())
            and total_rate >= s.min_tokens_per_s_to_rebalance
            and now - self._last_rebalance >= s.rebalance_cooldown_s
        ):
            self._rebalance(rate, max(worst, float(skew.max())), now)
        loads = group_loads(st.plan, st.replicas, rate, self.layer_row)
        target = self.autoscaler.decide(st.plan, st.replicas, loads, now)
        total = sum(target.values())
        if total > s.max_total_replicas:
            log.warning(
                "autoscaler wants %d replicas, over the cap of %d: keeping current counts", total, s.max_total_replicas
            )
            target = st.replicas
        if target != st.replicas:
            log.info(
                "autoscaling: %s", {k: (st.replicas.get(k), v) for k, v in target.items() if st.replicas.get(k) != v}
            )
            self._apply(st.plan, target)
            with self._lock:
                st.replicas = target
        with self._lock:
            st.rate = rate.tolist()
            st.history.append(
                {"t": time.time(), "replicas": dict(st.replicas), "tokens_per_s": total_rate, "imbalance": worst}
            )
            del st.history[:-2000]
        self._write_status()

    # -- dead replicas ----------------------------------------------------------------------------------------
    def check_replicas(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Deregister the dead replicas (`reap`), then compare each group's live registrations with its replica
        count: a group short of replicas is reported in the status (`short_groups`: since when), and logged once it
        has been short for `replace_after_s` (Serve restarts a dead replica within its 1 s health-check period plus
        a replica's start, measured in docs/benchmarks.md; longer means Serve cannot place or start it). Returns
        what was deregistered."""
        now = time.monotonic() if now is None else now
        if self.reap is None:
            return []
        dead = self.reap()
        for rid, group, why in dead:
            log.warning("replica %s of %s is dead (%s): deregistered", rid, group, why)
        with self._lock:
            if dead:
                self.state.dead_replicas = (
                    self.state.dead_replicas
                    + [{"t": time.time(), "replica_id": r, "group": g, "why": w} for r, g, w in dead]
                )[-20:]
            wanted = dict(self.state.replicas)
        live = self.registered()
        short = {name: self._short_since.get(name, now) for name, n in wanted.items() if live.get(name, 0) < n}
        overdue = [n for n, since in short.items() if now - since >= self.settings.replace_after_s]
        for name in overdue:
            if name not in self._reported_short:
                log.warning(
                    "group %s has %d of %d replicas live for %.0f s: Serve has not replaced the missing ones",
                    name,
                    live.get(name, 0),
                    wanted[name],
                    now - short[name],
                )
        self._reported_short = set(overdue)
        self._short_since = short
        with self._lock:
            self.state.short_groups = {name: round(now - since, 1) for name, since in short.items()}
        return dead

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.settings.probe_interval_s):
            try:
                self.check_replicas()
            except Exception:  # noqa: BLE001 - the directory restarting: probe again next time
                log.exception("replica probe failed")

    def _rebalance(self, rate: np.ndarray, worst: float, now: float) -> None:
        from expertmesh.control.planner import add_redundancy, plan_autoscale, to_placement_plan

        st, s = self.state, self.settings
        target = st.plan.autoscaling.target_tokens_per_second
        result = plan_autoscale(rate, s.max_experts_per_replica, target_load=target, exclusive_hot=True)
        proposed = to_placement_plan(result, self.layers, model=st.plan.model)
        cap = s.max_replicas_per_group
        proposed = proposed.model_copy(
            update={
                "autoscaling": st.plan.autoscaling,
                "groups": [
                    g.model_copy(
                        update={
                            "initial_replicas": min(g.start_replicas, cap),
                            "max_replicas": min(g.max_replicas, cap),
                            "min_replicas": min(g.min_replicas, cap),
                        }
                    )
                    for g in proposed.groups
                ],
            }
        )
        if s.min_holders >= 2:
            proposed, redundancy = add_redundancy(proposed, s.max_experts_per_replica, s.max_total_replicas)
            if redundancy.single:
                log.warning("rebalance: %s", redundancy.describe())
        merged, added, removed = merge_plan(st.plan, proposed)
        self._last_rebalance = now
        if not added and not removed:
            return
        wanted = sum(g.start_replicas for g in merged.groups)
        if wanted > s.max_total_replicas:
            # More replicas than the pool may hold: on a machine with few cores, extra replicas add processes and
            # per-layer fan-out, not compute (measured: 8 replicas on 2 cores served a fraction of 1 replica).
            log.warning(
                "rebalance wants %d replicas, over the cap of %d (max_total_replicas): keeping the current plan",
                wanted,
                s.max_total_replicas,
            )
            return
        log.info("rebalancing (max/mean %.2f): +%s -%s", worst, added, removed)
        # A kept group runs what it runs, and at least its floor (a second replica may be its keys' second holder).
        replicas = {g.name: max(st.replicas.get(g.name, g.start_replicas), g.min_replicas) for g in merged.groups}
        # 1) new groups up next to the old ones; wait until they registered in the directory
        transitional = PlacementPlan(
            model=merged.model,
            autoscaling=merged.autoscaling,
            groups=merged.groups + [g for g in st.plan.groups if g.name in removed],
        )
        both = dict(replicas, **{n: st.replicas[n] for n in removed})
        deadline = time.monotonic() + s.register_timeout_s
        # 0) the groups of hot experts alone first, beside the current plan (which still holds those experts too:
        # the router spreads a key over all its holders). Started with the cold regroupings, they shared the cores
        # with every other new replica and its application's build (docs/benchmarks.md, time to a replica).
        mean = rate.mean(axis=1)  # [L]
        hot_added = [
            g.name
            for g in merged.groups
            if g.name in added
            and all(
                rate[self.layer_row[layer], e] > s.hot_expert_skew * mean[self.layer_row[layer]]
                for layer, experts in g.keys.items()
                for e in experts
            )
        ]
        if hot_added and len(hot_added) < len(added):
            first = PlacementPlan(
                model=merged.model,
                autoscaling=merged.autoscaling,
                groups=st.plan.groups + [g for g in merged.groups if g.name in hot_added],
            )
            self._apply(first, dict(st.replicas, **{n: replicas[n] for n in hot_added}))
            if not self._wait_registered(hot_added, replicas, deadline):
                self._abandon(hot_added)
                return
        self._apply(transitional, both)
        if not self._wait_registered(added, replicas, deadline):
            self._abandon(added)
            return
        # 2) drain the replaced groups, let in-flight work finish, then remove them
        for name in removed:
            self.drain(name)
        time.sleep(s.drain_grace_s)
        self._apply(merged, replicas)
        with self._lock:
            st.plan, st.replicas = merged, replicas
            st.rebalances += 1
            st.last_rebalance = {"t": time.time(), "added": added, "removed": removed, "imbalance_before": worst}
        self.autoscaler.pending.clear()

    def _abandon(self, waited_for: list[str]) -> None:
        """A rebalance that cannot finish (new groups too slow, or the controller stopping) puts the plan it started
        from back."""
        if self._stop.is_set():
            log.info("controller stopping during a rebalance: putting the plan back")
        else:
            log.error("new groups %s did not register in time; keeping the old plan", waited_for)
        self._apply(self.state.plan, self.state.replicas)

    def _wait_registered(self, names: list[str], replicas: dict[str, int], deadline: float) -> bool:
        """Until every group in `names` has its `replicas[name]` registered (True), or the deadline / stop."""
        while time.monotonic() < deadline and not self._stop.is_set():
            ready = self.registered()
            if all(ready.get(n, 0) >= replicas[n] for n in names):
                return True
            time.sleep(0.2)
        return False

    # -- wiring to a running pool ------------------------------------------------------------------------------
    @classmethod
    def for_pool(
        cls,
        pool,
        counters_url: str | list[str],
        settings: ControllerSettings | None = None,
        status_file: str | Path | None = None,
    ) -> Controller:
        """A controller for a `LocalPool` (or the controller service's `ServeTarget`): counters from `counters_url`
        (a router's `GET {router}/expertmesh/counters`; several routers' are summed), the directory for readiness
        and draining, `pool.apply(plan, replicas)` to deploy."""
        layers, num_experts = pool.info.moe_layers, pool.info.num_experts
        row = {layer: i for i, layer in enumerate(layers)}
        directory = pool.client()
        urls = [counters_url] if isinstance(counters_url, str) else list(counters_url)
        read_counts = _summed_counts([_http_counts(url, row, num_experts) for url in urls])

        def registered() -> dict[str, int]:
            out: dict[str, int] = {}
            for r in directory.snapshot(timeout=5).replicas:
                if not r.draining:
                    out[r.group] = out.get(r.group, 0) + 1
            return out

        def drain(group: str) -> None:
            for r in directory.snapshot(timeout=5).replicas:
                if r.group == group:
                    directory.drain(r.replica_id)

        settings = settings or ControllerSettings()
        prober = ReplicaProber(directory, settings.probe_timeout_s, settings.probe_misses)
        return cls(pool.plan, layers, read_counts, pool.apply, registered, drain, settings, status_file, prober.reap)

    # -- thread -----------------------------------------------------------------------------------------------
    def start(self) -> Controller:
        self._thread = threading.Thread(target=self._run, name="expertmesh-controller", daemon=True)
        self._thread.start()
        if self.reap is not None and self.settings.probe_interval_s > 0:
            self._prober_thread = threading.Thread(target=self._probe_loop, name="expertmesh-prober", daemon=True)
            self._prober_thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failed tick (router restarting, Serve busy) retries next tick
                log.exception("controller tick failed")

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._prober_thread):
            if thread is not None:
                thread.join(timeout=30)

    def status(self) -> dict:
        with self._lock:
            st = self.state
            return {
                "plan": st.plan.model_dump(mode="json", exclude_none=True),
                "replicas": dict(st.replicas),
                "layers": st.layers,
                "tokens_per_s": st.rate,
                "rebalances": st.rebalances,
                "last_rebalance": st.last_rebalance,
                "dead_replicas": list(st.dead_replicas),
                "short_groups": dict(st.short_groups),
                "history": list(st.history[-300:]),
            }

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.status_file)


def _http_counts(url: str, row: dict[int, int], num_experts: int) -> Callable[[], np.ndarray]:
    """read_counts over HTTP: `url` answers router/openai_server.py's counters JSON ({"available", "layers",
    "counts": [L][E]}). Before the engine core made its counters, every count is zero.

    One keep-alive client for every read: behind a Kubernetes Service with several router pods, reads stay on one
    pod while the connection lives (vLLM keeps it 5 s, ticks come every 2 s), so a window does not mix the
    cumulative counters of different routers; the controller sees that router's share of the load."""
    import httpx

    from expertmesh.core import auth

    client = httpx.Client(timeout=5)

    def read_counts() -> np.ndarray:
        reply = client.get(url, headers=auth.http_headers())  # a router's state: for the cluster's parts only
        reply.raise_for_status()
        body = reply.json()
        counts = np.zeros((len(row), num_experts))  # [L, E]
        if body.get("available"):
            for layer, values in zip(body["layers"], body["counts"], strict=True):
                if layer in row:
                    n = min(len(values), num_experts)
                    counts[row[layer], :n] = values[:n]
        return counts

    return read_counts


def _summed_counts(readers: list[Callable[[], np.ndarray]]) -> Callable[[], np.ndarray]:
    """read_counts over several routers: the sum of their cumulative counts, kept cumulative per router.

    With one reader this is that reader. With several, a router that cannot be read (restarting) counts with its last
    reading, and one whose counts fell (a restarted router starts again from zero) keeps what it had counted before,
    so the sum never goes back and the controller's windows (differences of readings) stay >= 0."""
    if len(readers) == 1:
        return readers[0]
    last: list[np.ndarray | None] = [None] * len(readers)  # each router's latest reading
    base: list[np.ndarray | None] = [None] * len(readers)  # what each router had counted before its restarts

    def read_counts() -> np.ndarray:
        total = None
        for i, read in enumerate(readers):
            previous = last[i]
            try:
                now = read()
            except Exception:  # noqa: BLE001 - that router is down: its last reading stands
                if previous is None:
                    continue
                now = previous
            if previous is not None and now is not previous and (now < previous).any():  # restarted: count anew
                base[i] = previous if base[i] is None else base[i] + previous
            last[i] = now
            counted = now if base[i] is None else now + base[i]
            total = counted.copy() if total is None else total + counted
        if total is None:
            raise RuntimeError("no router's counters could be read")
        return total

    return read_counts
