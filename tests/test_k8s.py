"""The Helm chart (deploy/k8s/expertmesh): lint, render, schema-validate, and check what it deploys.

Offline and fast: helm/kubectl are the static binaries `make` unpacks into .venv/bin
(scripts/install_k8s_tools.py); core kinds are validated by kubernetes-validate (strict: unknown fields fail),
the RayService by our own JSON schema (tests/schemas/rayservice.schema.json) and its pod templates by
kubernetes-validate as PodTemplates. The Serve config the chart renders must equal what
expertmesh.control.serve_config.build_serve_config produces from the same plan, and every expertmesh container's
flags must parse with that process's own parser (the router's is vLLM's `vllm serve` parser plus expertmesh's flags).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from expertmesh.control.serve_config import build_serve_config
from expertmesh.core import settings
from expertmesh.core.plan import PlacementPlan
from expertmesh.core.protos import expert_pb2
from expertmesh.core.settings import ENV_VARS, GatewaySettings, ReplicaSettings, replica_settings_from_args

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "k8s" / "expertmesh"
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
BIN = Path(sys.executable).parent
HELM = BIN / "helm"
RAYSERVICE_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "rayservice.schema.json").read_text())
K8S_VERSION = "1.35.0"  # the kubectl/helm client line shipped in the wheel
RELEASE = "em"
VARIANTS = {  # name -> values files (on top of the chart's values.yaml)
    "default": [],
    "cpu": [EXAMPLES / "values-cpu-trial.yaml"],
    "gpu": [EXAMPLES / "values-gpu.yaml"],
}
CRD_KINDS = {"RayService", "ServiceMonitor"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def template(values_files=(), *extra: str, show_only: str | None = None) -> list[dict]:
    args = ["template", RELEASE, str(CHART)]
    for f in values_files:
        args += ["-f", str(f)]
    if show_only:
        args += ["-s", show_only]
    return [d for d in yaml.safe_load_all(helm(*args, *extra).stdout) if d]


def deep_merge(base: dict, over: dict) -> dict:
    """Helm's values merge: maps merge recursively, everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def values_for(variant: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in VARIANTS[variant]:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()))
    return values


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    hits = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """name -> pod template of every workload: Deployments and the RayService's head and worker groups."""
    out = {d["metadata"]["name"]: d["spec"]["template"] for d in by_kind(docs, "Deployment")}
    for rs in by_kind(docs, "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        out["ray-head"] = cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            out[f"ray-{group['groupName']}"] = group["template"]
    return out


def arg_value(args: list[str], flag: str) -> str:
    hits = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(hits) == 1, f"{flag} given {len(hits)} times in {args}"
    return hits[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every variant rendered once (helm template, ~0.1 s each)."""
    assert HELM.exists(), f"{HELM} missing: run `make install` (scripts/install_k8s_tools.py)"
    return {name: template(files) for name, files in VARIANTS.items()}


# ---- tooling --------------------------------------------------------------------------------------------------


def test_install_k8s_tools_is_idempotent():
    def install() -> str:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "install_k8s_tools.py"), str(BIN)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    install()  # installs if `make` has not yet
    before = {n: (BIN / n).stat().st_mtime_ns for n in ("helm", "kubectl")}
    assert install() == "", "a second install must be a no-op"
    assert {n: (BIN / n).stat().st_mtime_ns for n in ("helm", "kubectl")} == before
    assert "v4." in helm("version", "--short").stdout
    kubectl = subprocess.run([str(BIN / "kubectl"), "version", "--client"], capture_output=True, text=True)
    assert kubectl.returncode == 0 and "v1.35" in kubectl.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint(variant):
    args = ["lint", "--strict", str(CHART)]
    for f in VARIANTS[variant]:
        args += ["-f", str(f)]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out


def test_values_schema_is_generated_from_plan_py():
    sys.path.insert(0, str(ROOT / "deploy" / "k8s"))
    try:
        import gen_values_schema
    finally:
        sys.path.pop(0)
    assert (CHART / "values.schema.json").read_text() == gen_values_schema.render(), (
        "values.schema.json is stale: run .venv/bin/python deploy/k8s/gen_values_schema.py"
    )


# ---- schemas --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_core_resources_validate(rendered, variant):
    docs = rendered[variant]
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "RayService",
    } <= kinds
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    # The RayService's pod templates are core PodTemplateSpecs: validate them as such.
    for name, tmpl in pod_templates(docs).items():
        if not name.startswith("ray-"):
            continue
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": tmpl}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"RayService pod template {name}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rayservice_matches_schema(rendered, variant):
    rs = one(rendered[variant], "RayService", "-experts")
    jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).validate(rs)


@pytest.mark.parametrize(
    "where",
    [
        ("spec",),
        ("spec", "rayClusterConfig"),
        ("spec", "rayClusterConfig", "headGroupSpec"),
        ("spec", "rayClusterConfig", "workerGroupSpecs", 0),
        ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
    ],
)
def test_rayservice_schema_rejects_unknown_fields(rendered, where):
    rs = copy.deepcopy(one(rendered["default"], "RayService", "-experts"))
    node = rs
    for step in where:
        node = node[step]
    node["minReplica"] = 1  # a plausible typo
    errors = list(jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).iter_errors(rs))
    assert errors and any("minReplica" in e.message for e in errors)


# ---- Serve config == local plan -------------------------------------------------------------------------------

REPLICA_VALUES = {
    "maxWaitMs": "max_wait_ms",
    "maxBatchRows": "max_batch_rows",
    "inlineRows": "inline_rows",
    "computeThreads": "compute_threads",
    "leaseSeconds": "lease_seconds",
}


def replica_of(values: dict) -> ReplicaSettings:
    """ReplicaSettings from experts.replica (camelCase values; null = unset)."""
    replica = values["experts"]["replica"]
    return ReplicaSettings(**{snake: replica.get(camel) for camel, snake in REPLICA_VALUES.items()})


def expected_serve_config(values: dict) -> dict:
    plan = PlacementPlan.model_validate(values["experts"]["plan"])
    model_path = f"{values['model']['mountPath'].rstrip('/')}/{values['model']['dir']}"
    directory = f"{RELEASE}-expertmesh-directory:{settings.DIRECTORY_PORT}"
    return build_serve_config(
        plan,
        model_path,
        directory,
        num_cpus=values["experts"]["replica"]["numCpus"],
        num_gpus=values["experts"]["replica"]["numGpus"],
        directory_resource="expertmesh-directory",
        replica=replica_of(values),
    )


def rendered_serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService", "-experts")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_serve_config_equals_local_plan(rendered, variant):
    values = values_for(variant)
    got = rendered_serve_config(rendered[variant])
    assert got == expected_serve_config(values)
    groups = [g["name"] for g in values["experts"]["plan"]["groups"]]
    assert [a["name"] for a in got["applications"]] == ["expertmesh-directory"] + [f"experts-{g}" for g in groups]
    assert [[d["name"] for d in a["deployments"]] for a in got["applications"]] == [["ExpertDirectory"]] + [
        [g] for g in groups
    ]


def test_serve_config_defaults_and_overrides(tmp_path):
    """A sparse plan: the chart fills defaults exactly as plan.py does (incl. explicit zeros and nulls)."""
    plan = {
        "groups": [
            {
                "name": "hot-e3",
                "keys": {0: [3]},
                "min_replicas": 0,
                "max_replicas": 6,
                "initial_replicas": 2,
                "autoscaling": {"upscale_delay_s": 0},
            },
            {"name": "rest", "keys": {0: [7, 0, 1, 2, 4, 5, 6], 1: list(range(8)), 2: []}},  # sorted like plan.py
            {"name": "l10", "keys": {10: [0, 11]}, "min_replicas": 0, "initial_replicas": None},
        ],
        "model": "/elsewhere",
    }
    values_file = tmp_path / "plan.yaml"
    values_file.write_text(yaml.safe_dump({"experts": {"plan": plan, "replica": {"numCpus": 0.5, "numGpus": 0}}}))
    docs = template([values_file], show_only="templates/rayservice.yaml")
    values = deep_merge(values_for("default"), yaml.safe_load(values_file.read_text()))
    values["experts"]["plan"] = plan  # lists replace, maps merge: the sparse plan stands alone
    got = rendered_serve_config(docs)
    assert got == expected_serve_config(values)
    apps = {a["name"]: a for a in got["applications"]}
    replicas = {a["deployments"][0]["name"]: a["deployments"][0]["num_replicas"] for a in got["applications"]}
    assert replicas == {"ExpertDirectory": 1, "hot-e3": 2, "rest": 1, "l10": 1}  # l10: max(1, min_replicas)
    assert all("autoscaling_config" not in a["deployments"][0] for a in got["applications"])  # the controller scales
    assert apps["experts-rest"]["args"]["group"] == {
        "name": "rest",
        "keys": {"0": [0, 1, 2, 4, 5, 6, 7], "1": list(range(8)), "2": []},
    }


def test_plan_pins_groups_to_zones_and_resources_in_the_chart_as_locally(tmp_path):
    """A plan's placement (zone: a soft preference for nodes labelled expertmesh.io/zone; resources: custom Ray
    resources, a hard pin) is rendered by the chart exactly as build_serve_config renders it for the local pool."""
    plan = {
        "groups": [
            {"name": "l0", "keys": {0: list(range(8))}, "zone": "a"},
            {"name": "l1", "keys": {1: list(range(8))}, "zone": "b", "resources": {"big-mem": 1}},
            {"name": "l2", "keys": {2: list(range(8))}},
        ]
    }
    values_file = tmp_path / "plan.yaml"
    values_file.write_text(yaml.safe_dump({"experts": {"plan": plan}}))
    docs = template([values_file], show_only="templates/rayservice.yaml")
    values = deep_merge(values_for("default"), yaml.safe_load(values_file.read_text()))
    values["experts"]["plan"] = plan
    got = rendered_serve_config(docs)
    assert got == expected_serve_config(values)
    options = {a["deployments"][0]["name"]: a["deployments"][0]["ray_actor_options"] for a in got["applications"]}
    assert options["l0"]["label_selector"] == {"expertmesh.io/zone": "a"}
    assert options["l0"]["fallback_strategy"] == [{"label_selector": {"expertmesh.io/zone": "!a"}}]
    assert options["l1"]["resources"] == {"big-mem": 1} and options["l1"]["label_selector"] == {
        "expertmesh.io/zone": "b"
    }
    assert "label_selector" not in options["l2"] and "resources" not in options["l2"]


def test_replica_tunables_reach_serve_config_from_one_source(tmp_path):
    """experts.replica's tunables land in every group's args exactly as build_serve_config(replica=...) puts them,
    the controller's flags carry the same (its PUTs change nothing), and ExpertGroupReplica accepts every name."""
    import inspect

    tunables = {"maxWaitMs": 2.5, "maxBatchRows": 1024, "inlineRows": 0, "computeThreads": 2, "leaseSeconds": 6}
    values_file = tmp_path / "replica.yaml"
    values_file.write_text(yaml.safe_dump({"experts": {"replica": tunables}}))
    docs = template([values_file])
    values = deep_merge(values_for("default"), yaml.safe_load(values_file.read_text()))
    got = rendered_serve_config(docs)
    assert got == expected_serve_config(values)
    want = {"max_wait_ms": 2.5, "max_batch_rows": 1024, "inline_rows": 0, "compute_threads": 2, "lease_seconds": 6}
    for app in got["applications"][1:]:
        assert {k: app["args"][k] for k in want} == want, app["args"]
    assert set(got["applications"][0]["args"]) == {"directory"}  # the directory takes none of them
    _, args, plan = controller_of(docs)
    assert replica_settings_from_args(args) == ReplicaSettings(**want)
    target = serve_target_of(args, plan)
    assert target.serve_config(plan, {}) == got
    # every tunable is a parameter of the replica deployment (ray.serve's decorator keeps the class reachable)
    from expertmesh.experts.app import ExpertGroupReplica

    cls = getattr(ExpertGroupReplica, "func_or_class", ExpertGroupReplica)
    assert set(want) <= set(inspect.signature(cls.__init__).parameters)
    # unset (the chart's default): no tunable in the args, as in Python
    default = rendered_serve_config(template([]))
    assert not set(want) & set(default["applications"][1]["args"])
    # a wrong type or an unknown tunable is refused by the schema before anything renders
    for bad in ({"maxBatchRows": 1.5}, {"maxWaitMS": 2}):
        values_file.write_text(yaml.safe_dump({"experts": {"replica": bad}}))
        proc = helm("template", RELEASE, str(CHART), "-f", str(values_file), check=False)
        assert proc.returncode != 0, bad


def test_registered_settings_reach_every_process(tmp_path):
    """values `settings` (registered env vars) land in every expertmesh container; unknown or chart-owned names fail."""
    values_file = tmp_path / "settings.yaml"
    values_file.write_text(
        yaml.safe_dump({"settings": {"EXPERTMESH_DISPATCH_DEADLINE_S": 3, "EXPERTMESH_EXPERT_KERNEL": "torch"}})
    )
    docs = template([values_file])
    templates = pod_templates(docs)
    for name in ("em-expertmesh-gateway", "em-expertmesh-router", "ray-head"):
        env = env_of(templates[name]["spec"]["containers"][0])
        assert env["EXPERTMESH_DISPATCH_DEADLINE_S"]["value"] == "3", name
        assert (
            ENV_VARS["EXPERTMESH_EXPERT_KERNEL"].value(
                {"EXPERTMESH_EXPERT_KERNEL": env["EXPERTMESH_EXPERT_KERNEL"]["value"]}
            )
            == "torch"
        )
    for bad in ("EXPERTMESH_DISPATCH_DEADLINE", "EXPERTMESH_DIRECTORY"):
        values_file.write_text(yaml.safe_dump({"settings": {bad: "1"}}))
        proc = helm("template", RELEASE, str(CHART), "-f", str(values_file), check=False)
        assert proc.returncode != 0 and bad in proc.stderr, bad


def test_serve_config_is_valid_for_ray_serve(rendered):
    from ray.serve.schema import ServeDeploySchema  # the schema `serve deploy` and KubeRay's Serve API use

    parsed = ServeDeploySchema.model_validate(rendered_serve_config(rendered["gpu"]))
    directory = parsed.applications[0]
    assert directory.route_prefix is None and directory.import_path == "expertmesh.experts.app:build_directory"
    groups = {a.deployments[0].name: a for a in parsed.applications[1:]}
    assert all(
        a.import_path == "expertmesh.experts.app:build_group" and a.route_prefix is None for a in groups.values()
    )
    assert groups["l31"].args["group"]["name"] == "l31" and set(groups["l31"].args) == {"model", "group", "directory"}
    assert groups["l31"].deployments[0].ray_actor_options.num_gpus == 0.25


# ---- the expert controller ------------------------------------------------------------------------------------


def serve_target_of(args: argparse.Namespace, plan: PlacementPlan):
    """The ServeTarget the controller service builds from its parsed flags (what it PUTs to the dashboard)."""
    from expertmesh.control.controller_service import ServeTarget

    return ServeTarget(
        None,
        plan,
        {},
        model=args.model,
        directory=args.directory,
        dashboard=args.dashboard,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        directory_resource=args.directory_resource,
        replica=replica_settings_from_args(args),
    )


def controller_of(docs: list[dict]) -> tuple[dict, argparse.Namespace, PlacementPlan]:
    """(container, its parsed flags, the plan it reads) of the controller Deployment."""
    from expertmesh.control.controller_service import configure

    dep = one(docs, "Deployment", "-controller")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "expertmesh.control.controller_service"]
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(container["args"])
    # --plan is a file from the controller's ConfigMap (mounted read-only)
    mount = next(m for m in container["volumeMounts"] if args.plan.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"].removeprefix(f"{RELEASE}-expertmesh"))
    plan = PlacementPlan.model_validate(yaml.safe_load(config_map["data"][Path(args.plan).name]))
    return container, args, plan


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_controller_puts_what_the_chart_renders(rendered, variant):
    """The controller's flags and plan rebuild serveConfigV2 exactly: its first PUT changes nothing but counts."""

    docs = rendered[variant]
    values = values_for(variant)
    container, args, plan = controller_of(docs)
    assert plan == PlacementPlan.model_validate(values["experts"]["plan"])
    target = serve_target_of(args, plan)
    assert target.serve_config(plan, {}) == rendered_serve_config(docs)
    # ... and its peers are the chart's router and directory Services and KubeRay's Service of the active head
    prefix = f"{RELEASE}-expertmesh"
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert args.router == f"http://{prefix}-router:{settings.ROUTER_PORT}" and f"{prefix}-router" in services
    assert services[f"{prefix}-router"]["spec"]["ports"][0]["port"] == settings.ROUTER_PORT  # counters over HTTP
    assert args.directory == f"{prefix}-directory:{settings.DIRECTORY_PORT}" and f"{prefix}-directory" in services
    rayservice = one(docs, "RayService", "-experts")["metadata"]["name"]
    assert args.dashboard == f"http://{rayservice}-head-svc:8265"  # KubeRay: <rayservice>-head-svc
    head_ports = {
        p["name"]: p["containerPort"] for p in pod_templates(docs)["ray-head"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["dashboard"] == 8265
    assert args.port == settings.CONTROLLER_PORT and args.host == "0.0.0.0"
    # CPU-only, probes on /health, requests, weights read-only (it reads config.json)
    dep = one(docs, "Deployment", "-controller")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert "nvidia.com/gpu" not in json.dumps(dep)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    model_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == values["model"]["mountPath"])
    assert model_mount["readOnly"] is True and args.model.startswith(values["model"]["mountPath"] + "/")
    # the gateway's /experts reads its /status through its Service
    gateway = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    status_url = env_of(gateway)["EXPERTMESH_CONTROLLER_STATUS"]["value"]
    assert status_url == f"http://{prefix}-controller:{settings.CONTROLLER_PORT}/status"
    svc = services[f"{prefix}-controller"]
    assert labels_match(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    # the NetworkPolicy on the Ray pods lets it reach the dashboard and the directory (and nothing of the replicas)
    lo, _ = settings.REPLICA_PORT_RANGE
    labels = dep["spec"]["template"]["metadata"]["labels"]
    open_to_it = ports_open_to(one(docs, "NetworkPolicy", "-experts")["spec"], labels)
    assert open_to_it == {8265, settings.DIRECTORY_PORT} and lo not in open_to_it
    # ... and the one on the routers lets it read their counters (GET /expertmesh/counters on the HTTP port)
    assert settings.ROUTER_PORT in ports_open_to(one(docs, "NetworkPolicy", "-router")["spec"], labels)


def test_controller_settings_and_disabling(tmp_path):
    from expertmesh.control.controller_service import parse_settings

    values_file = tmp_path / "settings.yaml"
    values_file.write_text(yaml.safe_dump({"controller": {"settings": {"interval_s": 5, "max_total_replicas": 32}}}))
    docs = template([values_file])
    _, args, _ = controller_of(docs)
    settings = parse_settings(args.settings)
    assert (settings.interval_s, settings.max_total_replicas) == (5, 32)
    values_file.write_text(yaml.safe_dump({"controller": {"settings": {"intervall_s": 5}}}))  # a typo
    proc = helm("template", RELEASE, str(CHART), "-f", str(values_file), check=False)
    assert proc.returncode != 0 and "intervall_s" in proc.stderr
    off = template([], "--set", "controller.enabled=false")
    assert not [d for d in off if "controller" in d["metadata"]["name"]]
    gateway = one(off, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "EXPERTMESH_CONTROLLER_STATUS" not in env_of(gateway)
    policy = one(off, "NetworkPolicy", "-experts")["spec"]
    assert not [
        r for r in policy["ingress"] for p in r.get("ports", []) if p["port"] == 8265 and "podSelector" in r["from"][0]
    ]


@pytest.mark.parametrize(
    "plan_groups, message",
    [
        ([{"name": "a", "keys": {0: [2, 1, 2]}}], "duplicate expert ids"),
        ([{"name": "a", "keys": {0: [-1]}}], "non-negative"),
        ([{"name": "a", "keys": {0: []}}], "at least one"),
        ([{"name": "a", "keys": {0: [0]}, "min_replicas": 3, "max_replicas": 2}], "min_replicas 3 > max_replicas 2"),
        ([{"name": "a", "keys": {0: [0]}, "max_replicas": 2, "initial_replicas": 5}], "initial_replicas outside"),
        ([{"name": "a", "keys": {0: [0]}}, {"name": "a", "keys": {1: [0]}}], "unique"),
        ([{"name": "Bad_Name", "keys": {0: [0]}}], "Bad_Name"),
        ([{"name": "a", "keys": {0: [0]}, "max_replica": 2}], "max_replica"),
    ],
)
def test_bad_plan_is_rejected_before_deploying(tmp_path, plan_groups, message):
    values_file = tmp_path / "bad.yaml"
    values_file.write_text(yaml.safe_dump({"experts": {"plan": {"groups": plan_groups}}}))
    proc = helm("template", RELEASE, str(CHART), "-f", str(values_file), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    # plan.py rejects the same plan.
    with pytest.raises(ValueError):
        PlacementPlan.model_validate({"groups": plan_groups})


# ---- content --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ports_agree_with_defaults_and_protos(rendered, variant):
    docs = rendered[variant]
    prefix = f"{RELEASE}-expertmesh"
    router_url = f"http://{prefix}-router:{settings.ROUTER_PORT}"
    svc_ports = {d["metadata"]["name"]: {p["name"]: p for p in d["spec"]["ports"]} for d in by_kind(docs, "Service")}
    assert svc_ports[f"{prefix}-gateway"]["http"]["port"] == settings.GATEWAY_PORT
    # The router is vLLM's OpenAI server: one HTTP port (API, /health, /metrics, /expertmesh/*), no gRPC.
    assert set(svc_ports[f"{prefix}-router"]) == {"http"}
    assert svc_ports[f"{prefix}-router"]["http"]["port"] == settings.ROUTER_PORT
    assert svc_ports[f"{prefix}-router"]["http"]["appProtocol"] == "http"
    assert svc_ports[f"{prefix}-directory"]["grpc-directory"]["port"] == settings.DIRECTORY_PORT
    assert svc_ports[f"{prefix}-experts-metrics"]["pool-metrics"]["port"] == settings.REPLICA_METRICS_PORT
    assert svc_ports[f"{prefix}-controller"]["http"]["port"] == settings.CONTROLLER_PORT

    # gRPC Services name the proto service they carry; each must exist in the protos, on the right port.
    proto_services = {s.full_name for s in expert_pb2.DESCRIPTOR.services_by_name.values()}
    assert proto_services == {"expertmesh.v1.ExpertDirectory", "expertmesh.v1.ExpertService"}
    expected_port = {"expertmesh.v1.ExpertDirectory": settings.DIRECTORY_PORT}
    annotated = {}
    for svc in by_kind(docs, "Service"):
        name = svc["metadata"].get("annotations", {}).get("expertmesh.io/grpc-services")
        if name:
            assert name in proto_services
            grpc_ports = [p["port"] for p in svc["spec"]["ports"] if p.get("appProtocol") == "grpc"]
            annotated[name] = grpc_ports
    assert annotated == {k: [v] for k, v in expected_port.items()}
    # ExpertService is served by the replicas on the replica range (no Service: the router dials pod IPs).
    lo, hi = settings.REPLICA_PORT_RANGE

    templates = pod_templates(docs)
    gateway = templates[f"{prefix}-gateway"]["spec"]["containers"][0]
    router = templates[f"{prefix}-router"]["spec"]["containers"][0]
    assert gateway["command"] == ["python", "-m", "expertmesh.gateway.app"]
    parser = argparse.ArgumentParser()
    GatewaySettings.configure(parser)  # the gateway's own flags: a stale one (--model-name, --proxy) fails here
    gateway_settings = GatewaySettings.from_args(parser.parse_args(gateway["args"]))
    assert (gateway_settings.routers, gateway_settings.host) == ([router_url], "0.0.0.0")
    assert gateway_settings.port == settings.GATEWAY_PORT
    assert router["command"] == ["python", "-m", "expertmesh.router.openai_server"]
    assert router["args"][0].startswith("/models/")  # the model directory, vLLM's positional argument
    assert arg_value(router["args"], "--host") == "0.0.0.0"
    assert arg_value(router["args"], "--port") == str(settings.ROUTER_PORT)
    assert arg_value(router["args"], "--router-metrics-port") == str(settings.ROUTER_METRICS_PORT)
    assert arg_value(router["args"], "--directory") == f"{prefix}-directory:{settings.DIRECTORY_PORT}"
    assert arg_value(router["args"], "--expert-mode") == "remote"

    # Service targetPorts resolve to container ports with the same numbers; the engine core's metrics port stays
    # inside the pod (re-exported in the router's /metrics).
    assert {p["name"]: p["containerPort"] for p in router["ports"]} == {"http": settings.ROUTER_PORT}
    head = templates["ray-head"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["grpc-directory"] == settings.DIRECTORY_PORT

    # Env names and values every expertmesh process reads (services/core/settings.py).
    for name, tmpl in templates.items():
        if "otel" in name:
            continue
        env = env_of(tmpl["spec"]["containers"][0])
        assert env["EXPERTMESH_BIND_HOST"]["value"] == "0.0.0.0", name
        assert env["EXPERTMESH_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, name
        assert env["EXPERTMESH_DIRECTORY"]["value"] == f"{prefix}-directory:{settings.DIRECTORY_PORT}", name
        assert env["EXPERTMESH_ROUTER"]["value"] == router_url, name
        assert ENV_VARS["EXPERTMESH_ROUTER"].value({"EXPERTMESH_ROUTER": router_url}) == [router_url]
        assert env["EXPERTMESH_REPLICA_PORTS"]["value"] == f"{lo}-{hi}", name
        assert env["OMP_NUM_THREADS"]["value"] == "1", name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_container_has_probes_and_requests(rendered, variant):
    for name, tmpl in pod_templates(rendered[variant]).items():
        spec = tmpl["spec"]
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{where} has no {probe}"
                named = (c[probe].get("httpGet") or c[probe].get("tcpSocket") or {}).get("port")
                if isinstance(named, str):  # a named port must exist on the container
                    assert named in {p["name"] for p in c.get("ports", [])}, f"{where}: {probe} port {named}"
            assert {"cpu", "memory"} <= set(c["resources"].get("requests", {})), f"{where} lacks requests"
        for c in spec.get("initContainers", []):
            assert {"cpu", "memory"} <= set(c["resources"].get("requests", {})), f"{name}/{c['name']}"
    gateway = one(rendered[variant], "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    # The router: vLLM's /health (its engine is alive) on its HTTP port; the startup probe waits for the model to
    # load (at least 15 minutes) before liveness may restart the pod.
    router = one(rendered[variant], "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = router["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def ports_open_to(policy: dict, labels: dict) -> set[int]:
    """Ports a NetworkPolicy's ingress rules open to a pod of this namespace with `labels` (by podSelector)."""
    return {
        p["port"]
        for r in policy["ingress"]
        for peer in r["from"]
        if labels_match(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), labels)
        for p in r["ports"]
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_policy_admits_router_http_only_from_gateway_controller_and_scrapers(rendered, variant):
    """The router's API checks no API key: only the gateway (the front door), the controller (counters) and the
    metrics scrapers reach its HTTP port, and nothing reaches any other port of a router pod."""
    docs = rendered[variant]
    policy = one(docs, "NetworkPolicy", "-router")["spec"]
    templates = pod_templates(docs)
    labels = {name: t["metadata"]["labels"] for name, t in templates.items()}
    prefix = f"{RELEASE}-expertmesh"
    selected = {name for name, lab in labels.items() if labels_match(policy["podSelector"]["matchLabels"], lab)}
    assert selected == {f"{prefix}-router"} and policy["policyTypes"] == ["Ingress"]
    assert {p["port"] for r in policy["ingress"] for p in r["ports"]} == {settings.ROUTER_PORT}
    for component in ("gateway", "controller"):
        assert ports_open_to(policy, labels[f"{prefix}-{component}"]) == {settings.ROUTER_PORT}, component
    for name in templates:  # the Ray pods (and the collector) never call the router
        if name.startswith("ray-") or "otel" in name:
            assert not ports_open_to(policy, labels[name]), name
    by_namespace = [r["from"] for r in policy["ingress"] if any("namespaceSelector" in peer for peer in r["from"])]
    assert by_namespace == [values_for(variant)["networkPolicy"]["metricsFrom"]]  # Prometheus: /metrics
    # without the controller, only the gateway (and the scrapers) remain
    off = one(template([], "--set", "controller.enabled=false"), "NetworkPolicy", "-router")["spec"]
    pod_peers = [
        peer["podSelector"]["matchLabels"] for r in off["ingress"] for peer in r["from"] if "podSelector" in peer
    ]
    assert [sel["app.kubernetes.io/component"] for sel in pod_peers] == ["gateway"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_policy_admits_expert_grpc_only_from_router(rendered, variant):
    docs = rendered[variant]
    policy = one(docs, "NetworkPolicy", "-experts")["spec"]
    templates = pod_templates(docs)
    labels = {name: t["metadata"]["labels"] for name, t in templates.items()}
    selected = {name for name, lab in labels.items() if labels_match(policy["podSelector"]["matchLabels"], lab)}
    ray_pods = {name for name in templates if name.startswith("ray-")}
    assert selected == ray_pods and len(ray_pods) >= 2  # head + every worker group, nothing else
    router_labels = labels[f"{RELEASE}-expertmesh-router"]
    gateway_labels = labels[f"{RELEASE}-expertmesh-gateway"]
    controller_labels = labels[f"{RELEASE}-expertmesh-controller"]

    lo, hi = settings.REPLICA_PORT_RANGE

    def admits(rule: dict, port: int) -> bool:
        ports = rule.get("ports")
        return ports is None or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)

    for port in (lo, (lo + hi) // 2, hi, settings.DIRECTORY_PORT):
        rules = [r for r in policy["ingress"] if admits(r, port)]
        assert rules, f"port {port} closed to everyone"
        for rule in rules:
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"port {port} open to {peer}"  # same namespace, by label
                sel = peer["podSelector"]["matchLabels"]
                from_router = labels_match(sel, router_labels)
                from_pool = all(labels_match(sel, labels[n]) for n in ray_pods) and not from_router
                # the controller asks the directory who registered and drains replicas; no expert traffic
                from_controller = port == settings.DIRECTORY_PORT and labels_match(sel, controller_labels)
                assert from_router or from_pool or from_controller, f"port {port} open to {sel}"
                assert not labels_match(sel, gateway_labels), f"port {port} open to the gateway"
                assert from_controller or not labels_match(sel, controller_labels), (
                    f"port {port} open to the controller"
                )
    router_rule = next(
        r for r in policy["ingress"] if labels_match(r["from"][0]["podSelector"]["matchLabels"], router_labels)
    )
    assert {"protocol": "TCP", "port": lo, "endPort": hi} in router_rule["ports"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pdbs_select_existing_pods(rendered, variant):
    docs = rendered[variant]
    labels = [t["metadata"]["labels"] for t in pod_templates(docs).values()]
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert any(p["metadata"]["name"].endswith("-expert-workers") for p in pdbs)
    for pdb in pdbs:
        assert any(labels_match(pdb["spec"]["selector"]["matchLabels"], lab) for lab in labels), pdb["metadata"]
    for dep in by_kind(docs, "Deployment"):
        assert labels_match(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])


def test_router_args_parse_with_the_routers_own_parser(rendered):
    """Every variant's router flags, the vLLM ones from router.vllm.args included, are what
    `python -m expertmesh.router.openai_server` accepts (vLLM's `vllm serve` parser plus expertmesh's group), and
    mean what the chart intends; router.localExperts switches the expert mode."""
    from expertmesh.router.openai_server import make_parser

    parser = make_parser()
    prefix = f"{RELEASE}-expertmesh"
    for variant, docs in rendered.items():
        values = values_for(variant)
        (container,) = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"]
        args = parser.parse_args(container["args"])
        assert args.model_tag == f"{values['model']['mountPath']}/{values['model']['dir']}", variant
        assert args.served_model_name == [values["model"]["name"]], variant
        assert (args.expert_mode, args.directory) == ("remote", f"{prefix}-directory:{settings.DIRECTORY_PORT}")
        assert (args.host, args.port, args.router_metrics_port) == (
            "0.0.0.0",
            settings.ROUTER_PORT,
            settings.ROUTER_METRICS_PORT,
        )
        if variant == "gpu":
            assert values["router"]["vllm"]["args"] == ["--max-model-len", "32768"] and args.max_model_len == 32768
    local = one(template([], "--set", "router.localExperts=true"), "Deployment", "-router")
    assert parser.parse_args(local["spec"]["template"]["spec"]["containers"][0]["args"]).expert_mode == "local"


def test_gpu_placement_and_autoscaling(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    router = one(gpu, "Deployment", "-router")["spec"]["template"]["spec"]
    assert router["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert router["containers"][0]["args"][-2:] == values_for("gpu")["router"]["vllm"]["args"]  # vLLM settings
    assert router["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in router["tolerations"])
    cluster = one(gpu, "RayService", "-experts")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    assert (
        workers["groupName"] == "gpu-experts"
        and workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    )
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # The directory runs on the head: the head offers the custom resource the ExpertDirectory asks for.
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0"
    assert json.loads(json.loads(head_params["resources"])) == {"expertmesh-directory": 1}
    hpa = one(gpu, "HorizontalPodAutoscaler", "-gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == one(gpu, "Deployment", "-gateway")["metadata"]["name"]
    assert "replicas" not in one(gpu, "Deployment", "-gateway")["spec"]  # the HPA owns it
    # CPU trial: nothing asks for a GPU, CPU workers only.
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    cpu_cluster = one(cpu, "RayService", "-experts")["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cpu_cluster["workerGroupSpecs"]] == ["cpu-experts"]
    assert "num_gpus" not in json.dumps(rendered_serve_config(cpu))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_read_only_and_shm_in_memory(rendered, variant):
    values = values_for(variant)
    for name, tmpl in pod_templates(rendered[variant]).items():
        if name.endswith(("-gateway", "-otel-collector")):
            continue
        spec = tmpl["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", name
        model = mounts[values["model"]["mountPath"]]
        assert model["readOnly"] is True, name
        if values["model"]["source"] == "pvc":
            assert volumes[model["name"]]["persistentVolumeClaim"]["readOnly"] is True
            assert "initContainers" not in spec
        else:
            assert "emptyDir" in volumes[model["name"]]
            (init,) = spec["initContainers"]
            assert env_of(init)["MODEL_DIR"]["value"] == f"{values['model']['mountPath']}/{values['model']['dir']}"
            assert not init["volumeMounts"][0].get("readOnly")  # the only writer


def test_api_keys_come_from_a_secret(rendered):
    for variant, docs in rendered.items():
        gateway = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
        ref = env_of(gateway)["EXPERTMESH_API_KEYS"]["valueFrom"]["secretKeyRef"]
        existing = values_for(variant)["apiKeys"]["existingSecret"]
        if existing:
            assert ref["name"] == existing
            assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-api-keys")]
        else:
            secret = one(docs, "Secret", "-api-keys")
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]


def _cluster_token_of(docs: list[dict], secret: str, key: str) -> None:
    """Every pod that serves or calls an internal service (gRPC: directory, replicas; HTTP: routers, controller)
    mounts the cluster-token Secret (as a directory: no subPath, so a rotation reaches the running process) and names
    the file in EXPERTMESH_CLUSTER_TOKEN_FILE: the gateway too (it calls the routers and the controller); the OTLP
    collector gets neither."""
    pods = pod_templates(docs)
    internal = {n: p for n, p in pods.items() if not n.endswith("-otel-collector")}
    assert any(n.endswith("-gateway") for n in internal)
    assert {"ray-head"} < set(internal) and any(n.endswith("-router") for n in internal)
    assert any(n.endswith("-controller") for n in internal) and any(
        n.startswith("ray-") and n != "ray-head" for n in internal
    )
    for name, pod in internal.items():
        volume = {v["name"]: v for v in pod["spec"]["volumes"]}["cluster-token"]
        assert volume["secret"]["secretName"] == secret, name
        container = pod["spec"]["containers"][0]
        mount = {m["name"]: m for m in container["volumeMounts"]}["cluster-token"]
        assert mount["readOnly"] and "subPath" not in mount, name
        assert env_of(container)["EXPERTMESH_CLUSTER_TOKEN_FILE"]["value"] == f"{mount['mountPath']}/{key}", name
        assert not {"EXPERTMESH_CLUSTER_TOKEN", "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS"} & set(env_of(container)), name
    for name, pod in pods.items():
        if name not in internal:
            assert "EXPERTMESH_CLUSTER_TOKEN_FILE" not in env_of(pod["spec"]["containers"][0]), name
            assert "cluster-token" not in {v["name"] for v in pod["spec"].get("volumes", [])}, name


def test_cluster_token_reaches_every_internal_grpc_pod_from_a_secret(rendered):
    for variant, docs in rendered.items():
        values = values_for(variant)["clusterToken"]
        assert not values["existingSecret"], variant  # the examples let the chart make it
        secret = one(docs, "Secret", "-cluster-token")
        token = base64.b64decode(secret["data"][values["secretKey"]]).decode()
        assert len(token) >= 32 and token.isalnum()
        _cluster_token_of(docs, secret["metadata"]["name"], values["secretKey"])
    # Two renders, two tokens (helm template has no cluster to look up; install keeps the first on upgrade).
    again = one(template(), "Secret", "-cluster-token")
    assert again["data"] != one(rendered["default"], "Secret", "-cluster-token")["data"]
    # An existing Secret (an external secret store): used, none created.
    docs = template((), "--set", "clusterToken.existingSecret=mine", "--set", "clusterToken.secretKey=tok")
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-cluster-token")]
    _cluster_token_of(docs, "mine", "tok")


def test_observability_optional(rendered):
    default_kinds = {d["kind"] for d in rendered["default"]}
    assert "ServiceMonitor" not in default_kinds
    assert not [d for d in by_kind(rendered["default"], "ConfigMap") if "otel" in d["metadata"]["name"]]
    gpu = rendered["gpu"]
    monitors = by_kind(gpu, "ServiceMonitor")
    services = by_kind(gpu, "Service")
    assert len(monitors) == 3
    for sm in monitors:  # each selects a Service that has every port it scrapes
        hits = [s for s in services if labels_match(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(hits) == 1, sm["metadata"]["name"]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in hits[0]["spec"]["ports"]}
    collector = one(gpu, "Service", "-otel-collector")
    endpoint = f"http://{collector['metadata']['name']}:4317"
    for name, tmpl in pod_templates(gpu).items():
        if "otel" not in name:
            assert env_of(tmpl["spec"]["containers"][0])["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == endpoint


@pytest.mark.parametrize("service", ["gateway", "router", "experts"])
def test_dockerfiles_install_like_make(service):
    """Container builds repeat the Makefile's install steps (pip install, remove torchvision & co), but install
    non-editable from the sources the build needs (the build generates the protos and packs the demo model)."""
    make = (ROOT / "Makefile").read_text()
    docker = (ROOT / "deploy" / "docker" / f"{service}.Dockerfile").read_text()
    for step in ("pip install -q --upgrade pip", "uninstall -q -y torchvision torchaudio torchcodec"):
        assert step in make and step in docker, step
    install_recipe = make.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "expertmesh.core.protos" not in install_recipe + docker  # the package build generates them
    assert " -e " not in docker  # the image carries the package, not a source tree
    assert ("'.[cpu]'" in docker and "'.[gpu]'" in docker) if service != "gateway" else " . \\\n" in docker
    copied = [src for line in docker.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    for path in ("pyproject.toml", "setup.py", "protos", "services", "models/demo"):
        assert path in copied, path
    if service == "experts":
        assert "wget" in docker  # KubeRay's health probes exec wget in Ray containers


def test_cpu_trial_serves_the_shipped_demo_model(rendered, tmp_path):
    """The CPU trial's init container (run here as rendered, with this interpreter's `python`) copies the demo
    model out of the installed package into the model volume, where the router and the Ray pods read it."""
    from expertmesh.stack import DEMO_MODEL

    docs = rendered["cpu"]
    values = values_for("cpu")
    model_dir = f"{values['model']['mountPath']}/{values['model']['dir']}"
    router = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    assert router["containers"][0]["args"][0] == model_dir
    # clients ask for the model by model.name: vLLM serves it under that name (the gateway relays /v1/* unchanged)
    assert arg_value(router["containers"][0]["args"], "--served-model-name") == values["model"]["name"]
    inits = {name: t["spec"].get("initContainers", []) for name, t in pod_templates(docs).items()}
    commands = {json.dumps(c["command"]) for cs in inits.values() for c in cs if c["name"] == "fetch-model"}
    assert len(commands) == 1 and sum(len(cs) > 0 for cs in inits.values()) >= 3  # router, head, workers
    command = json.loads(commands.pop())
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "MODEL_DIR": str(tmp_path / "models" / "demo"), "HOME": str(tmp_path)}
    (tmp_path / "models").mkdir()
    for _ in range(2):  # the second run finds config.json and does nothing (a restarted init container)
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        copied = sorted(p.name for p in (tmp_path / "models" / "demo").iterdir())
        assert copied == sorted(p.name for p in DEMO_MODEL.iterdir()) and "model.safetensors" in copied
    weights = "model.safetensors"
    assert (tmp_path / "models" / "demo" / weights).read_bytes() == (DEMO_MODEL / weights).read_bytes()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["demo"]  # no .part left behind
    # The plan places every (layer, expert) of the demo model in exactly one group.
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    plan = PlacementPlan.model_validate(values["experts"]["plan"])
    assert {key: len(groups) for key, groups in plan.holders().items()} == {
        (layer, e): 1 for layer in range(config["num_hidden_layers"]) for e in range(config["num_local_experts"])
    }


def test_build_serve_config_locally_and_cli(tmp_path, capsys):
    """Local use (experts up): no directory pinning, no GPUs; the module's CLI prints the same config."""
    from expertmesh.control import serve_config

    plan = PlacementPlan.model_validate({"groups": [{"name": "l0", "keys": {0: [1, 0]}, "max_replicas": 3}]})
    config = build_serve_config(plan, "/ckpt", "127.0.0.1:50071", num_cpus=0.5)
    directory_app, group_app = config["applications"]
    # every deployment health-checked each second: a dead replica's replacement starts within ~1 s (time_to_replica)
    check = {"health_check_period_s": serve_config.HEALTH_CHECK_PERIOD_S}
    assert serve_config.HEALTH_CHECK_PERIOD_S == 1.0
    assert directory_app["deployments"] == [
        {"name": "ExpertDirectory", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}} | check
    ]
    assert directory_app["args"] == {"directory": "127.0.0.1:50071"}
    (group,) = group_app["deployments"]
    assert group == {"name": "l0", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}} | check
    assert group_app["name"] == "experts-l0"
    assert group_app["args"] == {
        "model": "/ckpt",
        "directory": "127.0.0.1:50071",
        "group": {"name": "l0", "keys": {"0": [0, 1]}},
    }
    # replica counts from the controller change only num_replicas, never the args (no restart)
    scaled = build_serve_config(plan, "/ckpt", "127.0.0.1:50071", num_cpus=0.5, replicas={"l0": 3})
    assert scaled["applications"][1]["deployments"][0]["num_replicas"] == 3
    assert scaled["applications"][1]["args"] == group_app["args"]
    plan.save(tmp_path / "plan.yaml")
    assert (
        serve_config.main(
            [
                "--plan",
                str(tmp_path / "plan.yaml"),
                "--model",
                "/ckpt",
                "--directory",
                "127.0.0.1:50071",
                "--num-cpus",
                "0.5",
            ]
        )
        == 0
    )
    assert yaml.safe_load(capsys.readouterr().out) == config
