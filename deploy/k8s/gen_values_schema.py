"""Write the chart's values.schema.json; the placement-plan part comes from services/core/plan.py,
controller.settings from ControllerSettings (services/control/controller.py), experts.replica's tunables from
ReplicaSettings and `settings` from the environment-variable registry (services/core/settings.py): one schema each.

    .venv/bin/python deploy/k8s/gen_values_schema.py        # rewrite deploy/k8s/expertmesh/values.schema.json

Helm checks values against this file on lint/template/install/upgrade, so a bad plan or a typo in a choice
fails before anything reaches the cluster. tests/test_k8s.py fails if the file differs from this output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from expertmesh.control.controller import ControllerSettings
from expertmesh.core.plan import PlacementPlan
from expertmesh.core.settings import ENV_VARS, ReplicaSettings

# Variables the chart sets itself, as env or as the router's flags (addresses, ports, the expert mode, the API-key
# Secret, the controller's URL): not in `settings`, where a flag would silently override them.
CHART_OWNED = {
    "EXPERTMESH_BIND_HOST",
    "EXPERTMESH_ADVERTISE_HOST",
    "EXPERTMESH_DIRECTORY",
    "EXPERTMESH_ROUTER",
    "EXPERTMESH_ROUTER_METRICS_PORT",  # router: --router-metrics-port (ports.routerMetrics)
    "EXPERTMESH_EXPERT_MODE",  # router: --expert-mode (router.localExperts)
    "EXPERTMESH_REPLICA_PORTS",
    "EXPERTMESH_API_KEYS",
    "EXPERTMESH_CLUSTER_TOKEN",  # clusterToken: a Secret, mounted (a token in values would be plain text)
    "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS",
    "EXPERTMESH_CLUSTER_TOKEN_FILE",
    "EXPERTMESH_CONTROLLER_STATUS",
    "EXPERTMESH_CONTROLLER_SETTINGS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OPENAI_API_KEY",
    "XDG_CACHE_HOME",
}

SCHEMA_PATH = Path(__file__).parent / "expertmesh" / "values.schema.json"


def controller_settings_schema() -> dict:
    """controller.settings: ControllerSettings fields (services/control/controller.py), non-negative numbers."""
    number = {"type": "number", "minimum": 0}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            f.name: dict(number, type="integer" if f.type in (int, "int") else "number")
            for f in fields(ControllerSettings)
        },
    }


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def replica_schema() -> dict:
    """experts.replica: Ray actor options plus ReplicaSettings fields (camelCase; null = the replica's default)."""
    props = {"numCpus": {"type": "number", "minimum": 0}, "numGpus": {"type": "number", "minimum": 0}}
    for f in fields(ReplicaSettings):
        integer = f.name in ("max_batch_rows", "inline_rows", "compute_threads")
        props[camel(f.name)] = {"type": ["integer" if integer else "number", "null"], "minimum": 0}
    return {"type": "object", "additionalProperties": False, "properties": props}


def settings_schema() -> dict:
    """settings: registered environment variables the chart does not set itself."""
    value = {"type": ["string", "number", "boolean"]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: value for name in ENV_VARS if name not in CHART_OWNED},
    }


def values_schema() -> dict:
    plan = PlacementPlan.model_json_schema()  # refs point at "#/$defs/...": keep $defs at the root
    defs = plan.pop("$defs")
    port = {"type": "integer", "minimum": 1, "maximum": 65535}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "expertmesh chart values",
        "type": "object",
        "properties": {
            "ports": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    **{
                        k: port
                        for k in (
                            "gateway",
                            "router",
                            "routerMetrics",
                            "directory",
                            "poolMetrics",
                            "rayMetrics",
                            "controller",
                        )
                    },
                    "replicaRange": {"type": "string", "pattern": r"^[0-9]{1,5}-[0-9]{1,5}$"},
                },
            },
            "image": {"type": "object", "properties": {"flavor": {"enum": ["gpu", "cpu"]}}},
            "model": {"type": "object", "properties": {"source": {"enum": ["pvc", "init"]}}},
            "settings": settings_schema(),
            "controller": {
                "type": "object",
                "properties": {"enabled": {"type": "boolean"}, "settings": controller_settings_schema()},
            },
            "experts": {
                "type": "object",
                "properties": {
                    "plan": plan,
                    "upgradeStrategy": {"enum": ["NewCluster", "None"]},
                    "replica": replica_schema(),
                },
            },
        },
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
