"""Time to a serving replica: (a) a hot expert's onset -> its extra replica serving, (b) a replica SIGKILLed -> its
replacement serving.

The expert pool and the controller are what `expertmesh serve` runs (a `LocalPool` on a private Ray cluster on
loopback, the demo model's default plan, `Controller.for_pool` with its dead-replica prober); in place of the router,
the controller reads the routed-token counters from a small HTTP server in this process that answers the router's
`GET /expertmesh/counters` JSON, so the moment load changes is known to the millisecond. The load is steady and
even over every (layer, expert) until the hot onset, when one expert takes `--hot-tokens-per-s`.

(a) per run: a fresh controller on the default plan; at t0 the hot load starts; done when a replica of the group
    holding only the hot expert is registered in the directory AND answers a Forward for that expert (measured
    by polling the directory every 20 ms and calling each new replica). Also recorded: when the controller decided
    (its first deployed regrouping) and when the hot group had all its replicas. Then the default plan is
    re-applied, for the next run.
(b) per run: the pid of one replica (Ray's state API), SIGKILL at t0; recorded: when its entry left the directory
    (the controller's prober deregisters it; the lease alone would take `lease_seconds`), and when a new replica
    of its group is registered and answers a Forward.

    .venv/bin/python benchmarks/time_to_replica.py [--model models/demo] [--runs 5]

Results: benchmarks/results/time_to_replica.json (every run, median and max); a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from expertmesh.core import settings

settings.apply_process_defaults()

from expertmesh.control.controller import Controller, ControllerSettings  # noqa: E402
from expertmesh.core.codec import encode_forward  # noqa: E402
from expertmesh.core.plan import Autoscaling, default_plan  # noqa: E402
from expertmesh.core.protos import expert_pb2_grpc  # noqa: E402
from expertmesh.discovery.directory import DEFAULT_LEASE_SECONDS, DirectoryClient  # noqa: E402
from expertmesh.experts.pool import LocalPool  # noqa: E402
from expertmesh.experts.replica import CHANNEL_OPTIONS, keys_from_proto  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback HTTP stub
from loopback_http import LoopbackHTTP  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "time_to_replica.json"
HOT_LAYER, HOT_EXPERT = 1, 3
POLL_S = 0.02


class Counters:
    """Cumulative routed tokens [L, E] that grow at a set rate per key, served as the router's counters JSON."""

    def __init__(self, layers: list[int], num_experts: int):
        self.layers = layers
        self.rate = np.zeros((len(layers), num_experts))
        self.counts = np.zeros((len(layers), num_experts))
        self.t = time.monotonic()
        self.lock = threading.Lock()
        route = lambda _: (200, {"available": True, "layers": self.layers, "counts": self.read().tolist()})  # noqa: E731
        self.server = LoopbackHTTP({"/expertmesh/counters": route})
        self.url = f"{self.server.url}/expertmesh/counters"

    def _advance(self) -> None:
        now = time.monotonic()
        self.counts += self.rate * (now - self.t)
        self.t = now

    def read(self) -> np.ndarray:
        with self.lock:
            self._advance()
            return np.floor(self.counts)

    def set_rate(self, rate: np.ndarray) -> float:
        """Change the load from now on; returns the monotonic time it took effect."""
        with self.lock:
            self._advance()
            self.rate = rate.copy()
            return self.t


def forward_ok(endpoint: str, layer: int, experts: list[int], hidden_size: int) -> bool:
    """One Forward for `experts` of `layer` on `endpoint` answers (the replica serves, not only registered)."""
    ids = torch.tensor(experts, dtype=torch.int64)  # [N]
    req = encode_forward(layer, torch.randn(len(ids), hidden_size), torch.arange(len(ids)), ids, torch.ones(len(ids)))
    with grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        try:
            expert_pb2_grpc.ExpertServiceStub(channel).Forward(req, timeout=5)
            return True
        except grpc.RpcError:
            return False


def wait_serving(directory: DirectoryClient, accept, layer: int, experts: list[int], hidden: int, timeout: float):
    """Poll until an entry for which accept(entry) holds answers a Forward; returns (monotonic time, entry)."""
    deadline = time.monotonic() + timeout
    tried: set[str] = set()
    while time.monotonic() < deadline:
        for entry in directory.snapshot(timeout=5).replicas:
            if entry.replica_id in tried or entry.draining or not accept(entry):
                continue
            if forward_ok(entry.endpoint, layer, experts, hidden):
                return time.monotonic(), entry
            tried.add(entry.replica_id)  # not answering yet: tried again only if it stays (below)
        tried.clear()
        time.sleep(POLL_S)
    raise TimeoutError(f"no replica serving within {timeout} s")


def controller_settings() -> ControllerSettings:
    # As tests/test_stack.py's hot-expert test: the mechanism, with room for the regrouped pool (the 2-core local
    # budget of `expertmesh serve` would be one replica, which allows no regrouping at all).
    return ControllerSettings(
        interval_s=1.0,
        window_s=3.0,
        rebalance_cooldown_s=5.0,
        max_replicas_per_group=2,
        max_total_replicas=8,
        min_tokens_per_s_to_rebalance=1.0,
        drain_grace_s=0.5,
        min_holders=1,
    )


def hot_run(pool: LocalPool, counters: Counters, base_plan, directory, even: np.ndarray, hot_rate: float) -> dict:
    row = pool.info.moe_layers.index(HOT_LAYER)
    pool.apply(base_plan, {g.name: 1 for g in base_plan.groups})
    wanted = {g.name for g in base_plan.groups}
    directory.wait_for(lambda s: {e.group for e in s.replicas} == wanted, timeout=180)
    counters.set_rate(even)
    controller = Controller.for_pool(pool, counters.url, controller_settings())
    applied_at: list[float] = []  # when the controller sent each Serve config (the first one after t0: its decision)
    apply = controller._apply

    def timed_apply(plan, replicas):
        applied_at.append(time.monotonic())
        apply(plan, replicas)

    controller._apply = timed_apply
    controller.start()
    try:
        time.sleep(3.0)  # the controller's window fills with even load first
        hot = even.copy()
        hot[row, HOT_EXPERT] = hot_rate
        t0 = counters.set_rate(hot)

        def is_hot_group(entry) -> bool:
            return keys_from_proto(entry.keys) == {HOT_LAYER: [HOT_EXPERT]}

        t_serving, _ = wait_serving(directory, is_hot_group, HOT_LAYER, [HOT_EXPERT], pool.info.hidden_size, 180)
        # every replica of the hot group registered (its count: the hot load over the plan's target per replica,
        # within max_replicas_per_group)
        want = min(
            controller.settings.max_replicas_per_group,
            math.ceil(hot_rate / base_plan.autoscaling.target_tokens_per_second),
        )
        directory.wait_for(lambda snap: sum(is_hot_group(e) for e in snap.replicas) >= want, timeout=180)
        t_all = time.monotonic()
        return {
            "onset_to_decision_s": round(min(t for t in applied_at if t >= t0) - t0, 3),
            "onset_to_serving_s": round(t_serving - t0, 3),
            "onset_to_hot_group_complete_s": round(t_all - t0, 3),
            "hot_group_replicas": want,
        }
    finally:
        # Stopping the controller in the middle of its regrouping (the cold groups still starting) makes it put the
        # plan it started from back: the next run starts where this one did.
        controller.stop()
        counters.set_rate(even)


def replica_pid(pool: LocalPool, replica_id: str) -> int:
    from ray.util.state import list_actors

    unique_id = replica_id.split("#", 1)[1]
    actors = list_actors(address=pool.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    pids = [a.pid for a in actors if a.name and a.name.endswith(f"#{unique_id}")]
    if len(pids) != 1:
        raise RuntimeError(f"replica {replica_id}: actors {pids}")
    return pids[0]


def kill_run(pool: LocalPool, directory: DirectoryClient, group: str) -> dict:
    victim = next(e for e in directory.snapshot().replicas if e.group == group and not e.draining)
    keys = keys_from_proto(victim.keys)
    layer = min(keys)
    pid = replica_pid(pool, victim.replica_id)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    directory.wait_for(lambda s: victim.replica_id not in {e.replica_id for e in s.replicas}, timeout=60)
    t_gone = time.monotonic()

    def is_replacement(entry) -> bool:
        return entry.group == group and entry.replica_id != victim.replica_id

    t_serving, new = wait_serving(directory, is_replacement, layer, keys[layer], pool.info.hidden_size, 180)
    return {
        "killed": victim.replica_id,
        "replacement": new.replica_id,
        "kill_to_deregistered_s": round(t_gone - t0, 3),
        "kill_to_serving_s": round(t_serving - t0, 3),
    }


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "runs": values}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE.parent / "models" / "demo"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hot-tokens-per-s", type=float, default=3000.0)
    ap.add_argument("--only", choices=("hot", "kill"), help="one half only")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    started = time.monotonic()
    probe = ControllerSettings()
    with LocalPool.private(args.model, ready_timeout=240, state_file=None) as pool:
        t_ready = time.monotonic() - started
        info = pool.info
        # the router's default target (2,000 tokens/s per replica) with a 1 s upscale delay: a hot expert at
        # 3,000 tokens/s needs a second replica
        base = pool.plan.model_copy(
            update={
                "autoscaling": Autoscaling(target_tokens_per_second=1000.0, upscale_delay_s=1.0, downscale_delay_s=60)
            }
        )
        assert base.groups == default_plan(info).groups
        counters = Counters(info.moe_layers, info.num_experts)
        even = np.full((len(info.moe_layers), info.num_experts), 20.0)  # tokens/s per key
        out: dict = {
            "model": args.model,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "pool_start_s": round(t_ready, 1),
            "lease_seconds": pool.replica.lease_seconds or DEFAULT_LEASE_SECONDS,
            "probe_interval_s": probe.probe_interval_s,
        }
        with pool.client() as directory:
            if args.only != "kill":
                hot = [hot_run(pool, counters, base, directory, even, args.hot_tokens_per_s) for _ in range(args.runs)]
                for i, r in enumerate(hot):
                    print(f"hot run {i}: {r}", flush=True)
                out["hot_expert"] = {
                    "runs": hot,
                    "onset_to_decision_s": summary([r["onset_to_decision_s"] for r in hot]),
                    "onset_to_serving_s": summary([r["onset_to_serving_s"] for r in hot]),
                    "onset_to_hot_group_complete_s": summary([r["onset_to_hot_group_complete_s"] for r in hot]),
                }
            # (b) on the default plan, with the controller (and so its prober) running on even load
            pool.apply(base, {g.name: 1 for g in base.groups})
            wanted = {g.name for g in base.groups}
            directory.wait_for(lambda s: {e.group for e in s.replicas} == wanted and len(s.replicas) == 1, 180)
            if args.only != "hot":
                counters.set_rate(even)
                controller = Controller.for_pool(pool, counters.url, controller_settings()).start()
                try:
                    kills = []
                    for i in range(args.runs):
                        kills.append(kill_run(pool, directory, base.groups[0].name))
                        print(f"kill run {i}: {kills[-1]}", flush=True)
                        time.sleep(2.0)  # kills apart: the controller's prober sees the group whole again in between
                finally:
                    controller.stop()
                out["replica_kill"] = {
                    "runs": kills,
                    "kill_to_deregistered_s": summary([r["kill_to_deregistered_s"] for r in kills]),
                    "kill_to_serving_s": summary([r["kill_to_serving_s"] for r in kills]),
                }
    out["total_s"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'measure':<40} {'median s':>9} {'max s':>9}  (runs: {args.runs}, model {Path(args.model).name})")
    for section, key in (
        ("hot_expert", "onset_to_decision_s"),
        ("hot_expert", "onset_to_serving_s"),
        ("hot_expert", "onset_to_hot_group_complete_s"),
        ("replica_kill", "kill_to_deregistered_s"),
        ("replica_kill", "kill_to_serving_s"),
    ):
        if section in out:
            s = out[section][key]
            print(f"{section + ': ' + key:<40} {s['median']:>9.2f} {s['max']:>9.2f}")
    print(f"total {out['total_s']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
