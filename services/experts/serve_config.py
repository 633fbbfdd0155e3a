"""The Ray Serve config of the expert pool, built from a placement plan (pure function, no Ray import).

`build_serve_config(plan, model_path)` returns the mapping `serve deploy` reads (`applications: [...]`), which
is also what the Helm chart renders into the KubeRay RayService's `serveConfigV2` (a test renders the chart
and checks the two are equal for the same plan). One application, `expertmesh-experts`:

    ExpertDirectory        1 replica: who serves which (layer, expert) where
    <group name> ...       one deployment per plan group: min/max/initial replicas and delays from the plan

The application is not exposed over HTTP (`route_prefix: null`): the data plane is each replica's own
grpc.aio server, Serve is the control plane only (lifecycle, health checks, scaling).

`directory_resource`: in Kubernetes the directory must sit on a node a Service can select, so the chart gives
the Ray head a custom resource of that name and the ExpertDirectory asks for one unit of it (and no CPU: the
head starts with `num-cpus: 0` so no expert replica lands there). Locally it is None.

    python -m expertmesh.experts.serve_config --plan plan.yaml --model /models/m   # prints the config YAML
"""

from __future__ import annotations

import argparse
import sys

import yaml

from expertmesh.core.plan import PlacementPlan, load_plan

APP_NAME = "expertmesh-experts"
IMPORT_PATH = "expertmesh.experts.app:build_app"
DIRECTORY_DEPLOYMENT = "ExpertDirectory"


def build_serve_config(
    plan: PlacementPlan,
    model_path: str,
    directory: str | None = None,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    directory_resource: str | None = None,
) -> dict:
    """Serve config (`{"applications": [...]}`) for `plan`; `num_cpus`/`num_gpus` are per expert replica."""
    replica_options: dict = {"num_cpus": num_cpus}
    if num_gpus:
        replica_options["num_gpus"] = num_gpus
    if directory_resource:
        directory_options: dict = {"num_cpus": 0, "resources": {directory_resource: 1}}
    else:
        directory_options = {"num_cpus": num_cpus}

    deployments = [{"name": DIRECTORY_DEPLOYMENT, "num_replicas": 1, "ray_actor_options": directory_options}]
    for group in plan.groups:
        scaling = plan.autoscaling_for(group)
        deployments.append({
            "name": group.name,
            "autoscaling_config": {
                "min_replicas": group.min_replicas,
                "max_replicas": group.max_replicas,
                "initial_replicas": group.start_replicas,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            },
            "ray_actor_options": dict(replica_options),
        })
    return {
        "applications": [{
            "name": APP_NAME,
            "route_prefix": None,
            "import_path": IMPORT_PATH,
            "args": {
                "model": model_path,
                "plan": plan.model_dump(mode="json", exclude_none=True),
                "directory": directory,
            },
            "deployments": deployments,
        }]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print the Ray Serve config of the expert pool for a plan")
    parser.add_argument("--plan", required=True, help="placement plan YAML")
    parser.add_argument("--model", required=True, help="checkpoint directory as the replicas see it")
    parser.add_argument("--directory", default=None, help="host:port of the expert directory")
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--num-gpus", type=float, default=0)
    args = parser.parse_args(argv)
    config = build_serve_config(load_plan(args.plan), args.model, args.directory,
                                num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
