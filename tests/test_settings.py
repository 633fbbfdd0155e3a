"""The settings registry (services/core/settings.py): typed values, process defaults, the generated
docs/configuration.md, and that nothing else in the package reads the environment."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from expertmesh.core import settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "services"
DOC = ROOT / "docs" / "configuration.md"


def test_configuration_doc_is_generated_from_the_registry():
    assert DOC.read_text() == settings.markdown(), (
        "docs/configuration.md is stale: run .venv/bin/python -m expertmesh.core.settings --markdown "
        "> docs/configuration.md"
    )
    out = subprocess.run(
        [sys.executable, "-m", "expertmesh.core.settings", "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == DOC.read_text()
    for name in settings.ENV_VARS:
        assert f"`{name}`" in out


def _env_uses(path: Path) -> list[str]:
    """`file:line: code` of every os.environ / os.getenv / environ.get use in a module (reads and writes)."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    hits: dict[int, str] = {}
    for node in ast.walk(tree):
        found = False
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb", "getenvb"):
            found = isinstance(node.value, ast.Name) and node.value.id in ("os", "posix", "_os")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix"):
            found = any(a.name in ("environ", "getenv", "environb", "getenvb") for a in node.names)
        elif isinstance(node, ast.Name) and node.id == "environ":
            found = True
        if found:
            hits[node.lineno] = f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}"
    return [hits[n] for n in sorted(hits)]


def test_no_environment_access_outside_settings():
    """Every read goes through the registry, every write through settings.export / child_env /
    apply_process_defaults."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "core" / "settings.py" or "_generated" in path.parts:
            continue
        offenders += [f"{path.parent.relative_to(ROOT)}/{hit}" for hit in _env_uses(path)]
    assert not offenders, "environment access outside core/settings.py:\n" + "\n".join(offenders)


def test_the_grep_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom os import environ, getenv\n"
        "a = os.environ.get('X')\nb = os.getenv('Y')\nc = environ['Z']\nos.environ['W'] = '1'\n"
        "d = dict(os.environ)\n'''os.environ in a docstring is fine'''\n"
    )
    assert [int(u.split(":")[1]) for u in _env_uses(probe)] == [2, 3, 4, 5, 6, 7]  # not the docstring (8)


def test_typed_values_defaults_and_errors(monkeypatch):
    for name in settings.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert settings.directory_address() == f"127.0.0.1:{settings.DIRECTORY_PORT}"
    assert settings.replica_port_range() == settings.REPLICA_PORT_RANGE
    assert settings.api_keys() == [] and settings.controller_settings() == {}
    assert settings.advertise_host() == settings.bind_host() == "127.0.0.1"
    assert settings.dispatch_deadline_s() == 5.0 and settings.trace_step_every() == 16
    monkeypatch.setenv("EXPERTMESH_API_KEYS", " a, b ,,")
    monkeypatch.setenv("EXPERTMESH_REPLICA_PORTS", "51000-51010")
    monkeypatch.setenv("EXPERTMESH_BIND_HOST", "0.0.0.0")
    monkeypatch.setenv("EXPERTMESH_DISPATCH_DEADLINE_S", "2.5")
    monkeypatch.setenv("EXPERTMESH_EXPERT_MODE", " Remote ")
    monkeypatch.setenv("EXPERTMESH_CONTROLLER_SETTINGS", '{"interval_s": 1}')
    assert settings.api_keys() == ["a", "b"] and settings.replica_port_range() == (51000, 51010)
    assert settings.advertise_host() == "0.0.0.0" and settings.EXPERTMESH_DISPATCH_DEADLINE_S == 2.5
    assert settings.expert_mode() == "remote" and settings.controller_settings() == {"interval_s": 1}
    monkeypatch.setenv("EXPERTMESH_REPLICA_PORTS", "")  # empty = unset
    assert settings.replica_port_range() == settings.REPLICA_PORT_RANGE
    for name, raw, message in [
        ("EXPERTMESH_EXPERT_KERNEL", "fastest", "expected auto, fused or torch"),
        ("EXPERTMESH_EXPERT_MODE", "both", "expected local or remote"),
        ("EXPERTMESH_TRACE_STEP_EVERY", "many", "EXPERTMESH_TRACE_STEP_EVERY='many'"),
        ("EXPERTMESH_REPLICA_PORTS", "50100", "START-END"),
        ("EXPERTMESH_CONTROLLER_SETTINGS", "[1]", "JSON object"),
    ]:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=message):
            settings.get(name)
    with pytest.raises(KeyError, match="not in the settings registry"):
        settings.get("EXPERTMESH_NOPE")
    with pytest.raises(AttributeError):
        settings.EXPERTMESH_NOPE  # noqa: B018


def test_export_child_env_and_process_defaults(monkeypatch):
    monkeypatch.delenv("EXPERTMESH_DISPATCH_DEADLINE_S", raising=False)
    settings.export("EXPERTMESH_DISPATCH_DEADLINE_S", 3)
    assert settings.dispatch_deadline_s() == 3.0
    with pytest.raises(ValueError, match="EXPERTMESH_DISPATCH_DEADLINE_S"):
        settings.export("EXPERTMESH_DISPATCH_DEADLINE_S", "soon")
    assert settings.dispatch_deadline_s() == 3.0  # a refused value is not written
    with pytest.raises(KeyError):
        settings.export("EXPERTMESH_TYPO", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's value wins over a default ...
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    env = settings.child_env({"EXPERTMESH_EXPERT_KERNEL": "torch"})
    assert env["OMP_NUM_THREADS"] == "4" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["EXPERTMESH_EXPERT_KERNEL"] == "torch"
    assert settings.child_env(forced=settings.RAY_HEAD_ENV)["OMP_NUM_THREADS"] == "1"  # ... not over a forced one
    with pytest.raises(ValueError):
        settings.child_env({"EXPERTMESH_EXPERT_KERNEL": "fastest"})
    code = (
        "import os; from expertmesh.core import settings; settings.apply_process_defaults(in_process_engine=True); "
        "print(os.environ['OMP_NUM_THREADS'], os.environ['VLLM_CPU_KVCACHE_SPACE'], "
        "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'])"
    )
    clean = {
        k: v
        for k, v in settings.child_env(process_defaults=False).items()
        if k not in settings.PROCESS_DEFAULTS and k not in settings.IN_PROCESS_ENGINE_ENV
    }
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "0"]


def test_grpc_message_options():
    assert settings.grpc_message_options() == [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]


def test_grpc_keepalive_options(monkeypatch):
    """The router's long-lived links ping at the configured interval (failing a ping by its timeout); 0 is off, and
    an interval our servers would answer with GOAWAY (below what they accept) is refused by name."""
    monkeypatch.delenv("EXPERTMESH_DISPATCH_KEEPALIVE_S", raising=False)
    monkeypatch.delenv("EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S", raising=False)
    options = dict(settings.grpc_keepalive_options())
    assert options["grpc.keepalive_time_ms"] == 20000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 10000
    server = dict(settings.grpc_keepalive_server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= 1000 <= options["grpc.keepalive_time_ms"]
    monkeypatch.setenv("EXPERTMESH_DISPATCH_KEEPALIVE_S", "0")
    assert settings.grpc_keepalive_options() == []
    for name, raw in [("EXPERTMESH_DISPATCH_KEEPALIVE_S", "0.5"), ("EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S", "0")]:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=name):
            settings.get(name)


def test_replica_settings_agree_with_the_replica():
    """REPLICA_DEFAULTS are the replica's own defaults, and every ReplicaSettings field is a replica argument."""
    from expertmesh.discovery.directory import DEFAULT_LEASE_SECONDS
    from expertmesh.experts import replica
    from expertmesh.experts.app import ExpertGroupReplica

    assert settings.REPLICA_DEFAULTS == {
        "lease_seconds": DEFAULT_LEASE_SECONDS,
        "max_wait_ms": replica.DEFAULT_MAX_WAIT_MS,
        "max_batch_rows": replica.DEFAULT_MAX_BATCH_ROWS,
        "inline_rows": replica.DEFAULT_INLINE_ROWS,
        "compute_threads": 0,
    }
    cls = getattr(ExpertGroupReplica, "func_or_class", ExpertGroupReplica)
    params = inspect.signature(cls.__init__).parameters
    for f in fields(settings.ReplicaSettings):
        assert f.name in params and params[f.name].default == settings.REPLICA_DEFAULTS[f.name], f.name
    from expertmesh.experts import app as expert_app

    # build_group forwards exactly these args from the Serve config to the replica
    assert set(expert_app.REPLICA_ARGS) == {f.name for f in fields(settings.ReplicaSettings)}


def test_serve_config_carries_set_replica_settings_only(tmp_path):
    from expertmesh.control import serve_config
    from expertmesh.core.plan import PlacementPlan

    plan = PlacementPlan.model_validate({"groups": [{"name": "l0", "keys": {0: [0, 1]}}]})
    plain = serve_config.build_serve_config(plan, "/ckpt", "127.0.0.1:1")
    assert set(plain["applications"][1]["args"]) == {"model", "group", "directory"}
    tuned = serve_config.build_serve_config(
        plan, "/ckpt", "127.0.0.1:1", replica=settings.ReplicaSettings(max_wait_ms=0.5, compute_threads=1)
    )
    assert tuned["applications"][1]["args"] == {
        **plain["applications"][1]["args"],
        "max_wait_ms": 0.5,
        "compute_threads": 1,
    }
    plan.save(tmp_path / "plan.yaml")
    import contextlib
    import io

    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        serve_config.main(
            [
                "--plan",
                str(tmp_path / "plan.yaml"),
                "--model",
                "/ckpt",
                "--directory",
                "127.0.0.1:1",
                "--max-wait-ms",
                "0.5",
                "--compute-threads",
                "1",
            ]
        )
    assert yaml.safe_load(out.getvalue()) == tuned


def test_serve_cli_reaches_every_tunable():
    """`expertmesh serve` has a flag for every replica tunable and takes any registered variable with --env."""
    import argparse

    from expertmesh import stack

    parser = argparse.ArgumentParser()
    stack.configure(parser)
    args = parser.parse_args(
        [
            "--max-wait-ms",
            "2",
            "--max-batch-rows",
            "512",
            "--inline-rows",
            "8",
            "--compute-threads",
            "1",
            "--lease-seconds",
            "4",
            "--dispatch-deadline-s",
            "3",
            "--env",
            "EXPERTMESH_EXPERT_KERNEL=torch",
            "--controller-settings",
            '{"interval_s": 1}',
        ]
    )
    assert settings.replica_settings_from_args(args) == settings.ReplicaSettings(
        lease_seconds=4, max_wait_ms=2, max_batch_rows=512, inline_rows=8, compute_threads=1
    )
    assert stack.env_from_args(args) == {"EXPERTMESH_EXPERT_KERNEL": "torch", "EXPERTMESH_DISPATCH_DEADLINE_S": "3.0"}
    for bad in (["--env", "EXPERTMESH_NOPE=1"], ["--env", "EXPERTMESH_EXPERT_KERNEL=fastest"]):
        with pytest.raises(SystemExit):
            stack.env_from_args(parser.parse_args(bad))


def test_pool_serve_config_uses_replica_settings(tiny_checkpoint):
    from expertmesh.experts.pool import LocalPool

    pool = LocalPool(
        tiny_checkpoint("mixtral"),
        gcs_port=1,
        dashboard_port=1,
        directory_port=1,
        metrics_port=1,
        replica=settings.ReplicaSettings(max_wait_ms=3.0),
        inline_rows=16,
    )
    groups = [a for a in pool.serve_config()["applications"] if a["name"].startswith("experts-")]
    assert groups and all(a["args"]["max_wait_ms"] == 3.0 and a["args"]["inline_rows"] == 16 for a in groups)
    assert all("max_batch_rows" not in a["args"] for a in groups)


def test_free_port_never_hands_out_a_port_twice_nor_an_avoided_one():
    """Ports chosen before any server binds them (a pool's Ray ports, drawn one after another) must differ: a
    repeat made `ray start` refuse ("trying to use a port number ... used by other components")."""
    avoid = set(range(20000, 29000))  # leaves 1,000 candidates, so repeats would be likely without the guard
    drawn = [settings.free_port(avoid=avoid) for _ in range(300)]
    assert len(set(drawn)) == len(drawn)
    assert not avoid & set(drawn)
