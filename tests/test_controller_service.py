"""The in-cluster expert controller service: flags, adopting what Serve runs, /health and /status, and the gateway
reading its status over HTTP. No Ray here (a few seconds); against a real Ray dashboard it runs in
test_expert_pool.py::test_controller_service_adopts_what_serve_runs.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from conftest import free_port

from expertmesh.control import controller_service as cs
from expertmesh.control.controller import ControllerSettings
from expertmesh.control.serve_config import build_serve_config
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import ExpertGroup, PlacementPlan
from expertmesh.gateway.app import _controller_status

PLAN = PlacementPlan(
    groups=[
        ExpertGroup(name="l0", keys={0: list(range(8))}, max_replicas=3),
        ExpertGroup(name="l1", keys={1: list(range(8))}, min_replicas=1, max_replicas=2),
    ]
)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return str(tiny_checkpoint("mixtral"))


def serve_status(config: dict, status: str = "RUNNING") -> dict:
    """GET /api/serve/applications/ as Ray answers it: each application with the exact config submitted."""
    return {
        "applications": {app["name"]: {"status": status, "deployed_app_config": app} for app in config["applications"]}
    }


def run_main(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cs.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_flags_get_clear_errors(model, tmp_path, capsys):
    ok = ["--router", "r:50061", "--directory", "d:50071", "--dashboard", "http://h:8265", "--model", model]

    def with_(flag, value):
        args = list(ok)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        return args

    assert "--router must be HOST:PORT" in run_main(with_("--router", "router"), capsys)
    assert "--directory must be HOST:PORT (port 1-65535)" in run_main(with_("--directory", "d:70000"), capsys)
    assert "--dashboard must be an http(s) URL" in run_main(with_("--dashboard", "h:8265"), capsys)
    assert "--num-gpus must be >= 0" in run_main(with_("--num-gpus", "-1"), capsys)
    assert f"--model {tmp_path}" in run_main(with_("--model", str(tmp_path)), capsys)
    partial = tmp_path / "plan.yaml"
    PlacementPlan(groups=[PLAN.groups[0]]).save(partial)
    assert "--plan" in (err := run_main(with_("--plan", str(partial)), capsys)) and "does not place 8 expert(s)" in err
    assert "unknown field(s) ['intervall_s']" in run_main(with_("--settings", '{"intervall_s": 1}'), capsys)
    assert "not valid JSON" in run_main(with_("--settings", "{interval_s: 1"), capsys)
    assert "interval_s must be a non-negative number" in run_main(with_("--settings", '{"interval_s": "2"}'), capsys)
    assert "--port must be 0-65535" in run_main(with_("--port", "99999"), capsys)
    assert cs.parse_settings('{"interval_s": 0.5, "max_total_replicas": 9}') == ControllerSettings(
        interval_s=0.5, max_total_replicas=9
    )


def test_deployed_layout_and_adoption(model):
    info = read_moe_info(model)
    config = build_serve_config(PLAN, model, "d:1", replicas={"l0": 2})
    assert cs.deployed_layout({"applications": {}}) is None  # nothing submitted yet: wait
    layout = cs.deployed_layout(serve_status(config))
    target = cs.ServeTarget(info, PLAN, {"l0": 2, "l1": 1}, model=model, directory="d:1", dashboard="http://h")
    assert layout == target.layout()  # what we applied reads back equal: no adoption

    # The controller regrouped earlier (a hot expert of layer 0 on its own); a new controller adopts that.
    regrouped = PlacementPlan(
        groups=[
            ExpertGroup(name="l0", keys={0: [0, 1, 2, 4, 5, 6, 7]}),
            ExpertGroup(name="hot-0-3", keys={0: [3]}, max_replicas=4),
            PLAN.groups[1],
        ]
    )
    live = serve_status(build_serve_config(regrouped, model, "d:1", replicas={"hot-0-3": 4, "l0": 1, "l1": 2}))
    live["applications"]["experts-old"] = {"status": "DELETING", "deployed_app_config": config["applications"][1]}
    settings = ControllerSettings(max_replicas_per_group=6)
    adopted = cs.adopt_plan(PLAN, cs.deployed_layout(live), settings)
    adopted.check_covers(info)
    groups = {g.name: g for g in adopted.groups}
    assert set(groups) == {"l0", "hot-0-3", "l1"}  # the application being deleted is gone already
    assert groups["hot-0-3"].keys == {0: [3]} and groups["hot-0-3"].start_replicas == 4
    assert groups["hot-0-3"].max_replicas == 6  # unknown to the chart's plan: the controller's cap
    assert groups["l0"].keys == {0: [0, 1, 2, 4, 5, 6, 7]} and groups["l0"].max_replicas == 6  # same name, new keys
    assert groups["l1"] == PLAN.groups[1].model_copy(update={"initial_replicas": 2})  # chart's bounds kept
    assert adopted.autoscaling == PLAN.autoscaling
    with pytest.raises(ValueError, match="no expert group"):
        cs.adopt_plan(PLAN, {}, settings)


def test_health_rules():
    settings = ControllerSettings(interval_s=2, register_timeout_s=100, drain_grace_s=5)
    service = cs.ControllerService(info=None, plan=PLAN, router="r:1", target_options={}, settings=settings)
    assert not service.healthy(now=0.0)  # no step yet
    service.last_ok, service.last_error = 100.0, None
    assert service.healthy(now=100.0 + 3 * 2 + 10)  # within three intervals (+10 s)
    assert not service.healthy(now=100.0 + 3 * 2 + 11)  # stale
    service.step_started = 110.0  # a regroup waiting for new replicas to register
    assert service.healthy(now=110.0 + 100 + 5 + 30)
    assert not service.healthy(now=110.0 + 100 + 5 + 31)
    service.step_started, service.last_error = None, "ConnectError: router"
    assert not service.healthy(now=101.0)  # the last step failed


def test_http_endpoints_and_gateway_reads_status_url(model, monkeypatch):
    """A service whose dashboard is down: /health and /status say so (503); the gateway's /experts gets no
    plan from it (and none from a URL nobody listens on), without an error."""
    settings = ControllerSettings(interval_s=0.2)
    dead = f"127.0.0.1:{free_port()}"
    service = cs.ControllerService(
        info=read_moe_info(model),
        plan=PLAN,
        router=dead,
        settings=settings,
        target_options={"model": model, "directory": dead, "dashboard": f"http://{dead}"},
    )
    server = cs.serve_http(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    service.start()
    try:
        deadline = time.monotonic() + 10
        while "ConnectError" not in (service.last_error or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health")
        assert health.status_code == 503
        assert health.json()["healthy"] is False and "ConnectError" in health.json()["last_error"]
        status = httpx.get(url + "/status")
        assert status.status_code == 503 and "controller not running yet" in status.json()["error"]
        assert httpx.get(url + "/nope").status_code == 404
        for where in (url + "/status", f"http://{dead}/status"):
            monkeypatch.setenv("EXPERTMESH_CONTROLLER_STATUS", where)
            assert asyncio.run(_controller_status()) == {}
    finally:
        service.stop()
        server.shutdown()
        server.server_close()
