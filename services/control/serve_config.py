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
head starts with `num-cpus: 0` so no expert replica lands there). Locally it is None.

    python -m expertmesh.control.serve_config --plan plan.yaml --model /models/m [--max-wait-ms 2 ...]  # YAML
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
    replica: ReplicaSettings | None = None,
) -> dict:
    """Serve config (`{"applications": [...]}`) for `plan`; `num_cpus`/`num_gpus` are per expert replica, `replica`
    its tunables (set fields only)."""
    replicas = replicas or {}
    replica_options: dict = {"num_cpus": num_cpus}
    if num_gpus:
        replica_options["num_gpus"] = num_gpus
    if directory_resource:
        directory_options: dict = {"num_cpus": 0, "resources": {directory_resource: 1}}
    else:
        directory_options = {"num_cpus": num_cpus}
    applications = [
        {
            "name": DIRECTORY_APP,
            "route_prefix": None,
            "import_path": DIRECTORY_IMPORT_PATH,
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
        applications.append(
            {
                "name": group_app_name(group.name),
                "route_prefix": None,
                "import_path": GROUP_IMPORT_PATH,
                "args": group_args(group, model_path, directory, replica),
                "deployments": [
                    {
                        "name": group.name,
                        "num_replicas": int(replicas.get(group.name, group.start_replicas)),
                        "ray_actor_options": dict(replica_options),
                        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                    }
                ],
            }
        )
    return {"applications": applications}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print the Ray Serve config of the expert pool for a plan")
    parser.add_argument("--plan", required=True, help="placement plan YAML")
    parser.add_argument("--model", required=True, help="checkpoint directory as the replicas see it")
    parser.add_argument("--directory", default=None, help="host:port of the expert directory")
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--num-gpus", type=float, default=0)
    add_replica_flags(parser)
    args = parser.parse_args(argv)
    config = build_serve_config(
        load_plan(args.plan),
        args.model,
        args.directory,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        replica=replica_settings_from_args(args),
    )
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
