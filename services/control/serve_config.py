"""The Ray Serve config of the expert pool, built from a placement plan (pure function, no Ray import).

`build_serve_config(plan, model_path, directory, replicas=...)` returns the mapping `serve deploy` reads
(`applications: [...]`), which is also what the Helm chart renders into the KubeRay RayService's
`serveConfigV2` (a test renders the chart and checks the two are equal for the same plan). Applications:

    expertmesh-directory     ExpertDirectory, 1 replica: who serves which (layer, expert) where
    experts-<group>          one application per plan group: one deployment named as the group,
                             `num_replicas` from `replicas` (default: the group's initial replicas)

Why one application per group: Serve derives an application's code version from its import path and args,
and a new code version restarts every replica of that application. A group's args are only its own name and
keys, so the controller can add a group (hot experts), remove one, or change any group's replica count (a
lightweight update) without restarting a single replica of any other group. Replica counts are plain
`num_replicas`, not Serve autoscaling: token traffic goes straight to the replicas' gRPC servers, so Serve's
request-based autoscaler would see no load; the expert controller scales groups by routed tokens/s within
the plan's [min_replicas, max_replicas].

No application is exposed over HTTP (`route_prefix: null`): the data plane is each replica's own grpc.aio
server, Serve is the control plane (lifecycle, health checks, restarts, replica counts).

`replica` (core.settings.ReplicaSettings): the replicas' tunables (coalescing wait `max_wait_ms`,
`max_batch_rows`, `inline_rows`, `compute_threads`, `lease_seconds`), added to every group's args when set; unset
fields are left to the replica's defaults. The chart renders the same from `experts.replica` in values.yaml.

`directory_resource`: in Kubernetes the directory must sit on a node a Service can select, so the chart gives
the Ray head a custom resource of that name and the ExpertDirectory asks for one unit of it (and no CPU: the
head starts with `num-cpus: 0` so no expert replica lands there). `directory_on_head` does the same on any Ray
cluster with the resource Ray itself gives the head node (`node:__internal_head__`, a sliver of it): a pool
attached to a running cluster (`expertmesh serve --ray-address`) publishes the directory at the head's address, so
it must run there (the private local pool's cluster is its head alone: None there).

Placement over several Ray nodes (this module is the one place it is decided):

* The replicas of one group are spread by Serve itself: its default scheduler asks Ray for SPREAD, which takes
  the nodes with room in turn, so a group's second replica (planner.add_redundancy's usual second holder) lands
  on another node than its first where there is one, and a lost node's replicas come back on the nodes left.
* Groups that hold copies of each other's experts (add_redundancy's other second holder: keys copied onto another
  one-replica group) are different deployments, which SPREAD does not keep apart. `zones` (from `assign_zones`)
  gives each such group a preferred zone — a value of the node label `zone_label` — so that the holders of one
  expert prefer different zones; the preference is soft: `fallback_strategy` sends a replica to any other node
  when its zone has no room or no live node, so a dead node's replicas come back on the nodes left. In YAML:

      ray_actor_options:
        num_cpus: 0.25
        label_selector: {expertmesh.io/zone: b}          # prefer zone b ...
        fallback_strategy:
        - label_selector: {expertmesh.io/zone: '!b'}     # ... else any node outside it

  A zone must never change while its group runs (Serve restarts replicas whose actor options change), so
  `assign_zones` keeps the zones groups already have and places only new groups.

    python -m expertmesh.control.serve_config --plan plan.yaml --model /models/m [--zones a,b] [--max-wait-ms 2 ...]
"""

from __future__ import annotations

import argparse
import sys

import yaml

from expertmesh.core.plan import ExpertGroup, PlacementPlan, load_plan
from expertmesh.core.settings import ReplicaSettings, add_replica_flags, replica_settings_from_args

DIRECTORY_APP = "expertmesh-directory"
DIRECTORY_IMPORT_PATH = "expertmesh.experts.app:build_directory"
DIRECTORY_DEPLOYMENT = "ExpertDirectory"
GROUP_APP_PREFIX = "experts-"
GROUP_IMPORT_PATH = "expertmesh.experts.app:build_group"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node one unit of this resource, no other node any
ON_HEAD = 0.001  # a sliver of it: enough to pin, and leaves the rest to what else Ray runs on the head
ZONE_LABEL = "expertmesh.io/zone"  # the node label naming a node's zone (`ray start --labels expertmesh.io/zone=a`)
NODE_ID_LABEL = "ray.io/node-id"  # Ray labels every node with its id: one zone per node where no zone label is set


def group_app_name(group: str) -> str:
    return f"{GROUP_APP_PREFIX}{group}"


def group_args(
    group: ExpertGroup, model_path: str, directory: str | None, replica: ReplicaSettings | None = None
) -> dict:
    """The args of a group's application: what its replicas need, nothing that may change while it serves."""
    args = {
        "model": model_path,
        "group": group.model_dump(mode="json", include={"name", "keys"}),
        "directory": directory,
    }
    args.update((replica or ReplicaSettings()).serve_args())
    return args


# Serve learns that a replica's actor died only from its next health check (`health_check_period_s`, Serve's default
# 10 s), and only then starts the replacement: measured, kill -> replacement serving took 3.8-11.3 s with the
# default and 3.3-4.2 s at 1 s (docs/benchmarks.md, time_to_replica.py). Each check is one actor call and one Info
# call on the replica's own server (app.py): cheap at 1 s. The same for the local pool and the chart.
HEALTH_CHECK_PERIOD_S = 1.0


def build_serve_config(
    plan: PlacementPlan,
    model_path: str,
    directory: str | None = None,
    *,
    replicas: dict[str, int] | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    directory_resource: str | None = None,
    directory_on_head: bool = False,
    replica: ReplicaSettings | None = None,
    zones: dict[str, str] | None = None,
    zone_label: str = ZONE_LABEL,
    env_vars: dict[str, str] | None = None,
) -> dict:
    """Serve config (`{"applications": [...]}`) for `plan`; `num_cpus`/`num_gpus` are per expert replica, `replica`
    its tunables (set fields only); `zones`: group -> the zone (value of node label `zone_label`) its replicas
    prefer (`assign_zones`); `env_vars`: environment variables of every application's processes (Serve's
    runtime_env; a pool attached to a cluster whose nodes it did not start passes its settings this way)."""
    replicas = replicas or {}
    zones = zones or {}
    replica_options: dict = {"num_cpus": num_cpus}
    if num_gpus:
        replica_options["num_gpus"] = num_gpus
    if directory_resource:
        directory_options: dict = {"num_cpus": 0, "resources": {directory_resource: 1}}
    elif directory_on_head:
        directory_options = {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: ON_HEAD}}
    else:
        directory_options = {"num_cpus": num_cpus}

    def runtime_env() -> dict:  # a copy per application: shared objects would come out as YAML anchors
        return {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}

    applications = [
        {
            "name": DIRECTORY_APP,
            "route_prefix": None,
            "import_path": DIRECTORY_IMPORT_PATH,
            **runtime_env(),
            "args": {"directory": directory},
            "deployments": [
                {
                    "name": DIRECTORY_DEPLOYMENT,
                    "num_replicas": 1,
                    "ray_actor_options": directory_options,
                    "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                }
            ],
        }
    ]
    for group in plan.groups:
        options = dict(replica_options)
        zone = group.zone or zones.get(group.name)  # the plan's pin first
        if zone:
            options.update(zone_preference(zone_label, zone))
        if group.resources:
            options["resources"] = {**options.get("resources", {}), **group.resources}
        applications.append(
            {
                "name": group_app_name(group.name),
                "route_prefix": None,
                "import_path": GROUP_IMPORT_PATH,
                **runtime_env(),
                "args": group_args(group, model_path, directory, replica),
                "deployments": [
                    {
                        "name": group.name,
                        "num_replicas": int(replicas.get(group.name, group.start_replicas)),
                        "ray_actor_options": options,
                        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                    }
                ],
            }
        )
    return {"applications": applications}


# -- placement over Ray nodes ------------------------------------------------------------------------------------


def zone_preference(label: str, zone: str) -> dict:
    """ray_actor_options for a replica that prefers nodes of `zone` and takes any other node rather than none."""
    return {"label_selector": {label: zone}, "fallback_strategy": [{"label_selector": {label: f"!{zone}"}}]}


def assign_zones(
    plan: PlacementPlan,
    zones: list[str],
    *,
    replicas: dict[str, int] | None = None,
    kept: dict[str, str] | None = None,
) -> dict[str, str]:
    """group -> preferred zone, so that the groups holding one expert prefer different zones.

    Only one-replica groups get a zone (replica counts from `replicas`, else the group's start count): the replicas
    of a group with several are spread over nodes by Serve itself (SPREAD), and a zone would pull them together.
    Groups in `kept` (zones given earlier, still in the plan) keep theirs, whatever their count now: changing a
    running group's actor options restarts its replicas. Each new group takes, in plan order, the zone with the
    fewest groups sharing an expert with it, then the fewest groups, then the first in `zones`. Fewer than two
    zones: nothing to spread over, only `kept` is returned. A group whose plan names a zone keeps that one."""
    replicas = replicas or {}
    names = {g.name for g in plan.groups}
    out = {name: zone for name, zone in (kept or {}).items() if name in names}
    out |= {g.name: g.zone for g in plan.groups if g.zone}  # zones the plan pins
    if len(zones) < 2:
        return out
    sharing: dict[str, set[str]] = {g.name: set() for g in plan.groups}  # group -> groups holding one of its keys
    for holders in plan.holders().values():
        for name in holders:
            sharing[name].update(h for h in holders if h != name)
    load = {zone: sum(1 for z in out.values() if z == zone) for zone in zones}
    for group in plan.groups:
        if group.name in out or int(replicas.get(group.name, group.start_replicas)) != 1:
            continue
        clash = {zone: sum(1 for other in sharing[group.name] if out.get(other) == zone) for zone in zones}
        zone = min(zones, key=lambda z: (clash[z], load[z], zones.index(z)))
        out[group.name] = zone
        load[zone] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print the Ray Serve config of the expert pool for a plan")
    parser.add_argument("--plan", required=True, help="placement plan YAML")
    parser.add_argument("--model", required=True, help="checkpoint directory as the replicas see it")
    parser.add_argument("--directory", default=None, help="host:port of the expert directory")
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument(
        "--zones",
        default="",
        help="comma-separated zones (values of --zone-label on the nodes) that groups holding copies of each other's "
        "experts should prefer apart, e.g. a,b",
    )
    parser.add_argument("--zone-label", default=ZONE_LABEL, help=f"node label naming a node's zone ({ZONE_LABEL})")
    add_replica_flags(parser)
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    config = build_serve_config(
        plan,
        args.model,
        args.directory,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        replica=replica_settings_from_args(args),
        zones=assign_zones(plan, [z for z in args.zones.split(",") if z]),
        zone_label=args.zone_label,
    )
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
