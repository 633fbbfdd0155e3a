"""The in-cluster expert controller service: flags, adopting what Serve runs, reading the router's routed-token
counters over HTTP, /health and /status, and the gateway reading its status over HTTP. No Ray and no vLLM here (a
few seconds): the router's side is a loopback HTTP server answering `/expertmesh/counters` with the router's own
`counters_json` over a real counters file, and the dashboard's side a loopback HTTP server keeping the Serve config
PUT to it. Against a real Ray dashboard the service runs in
test_expert_pool.py::test_controller_service_adopts_what_serve_runs.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import free_port
from loopback_http import LoopbackHTTP

from expertmesh.control import controller_service as cs
from expertmesh.control.controller import ControllerSettings
from expertmesh.control.serve_config import build_serve_config
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import Autoscaling, ExpertGroup, PlacementPlan
from expertmesh.gateway.ops_routes import controller_status as _controller_status
from expertmesh.router.counters import RoutedTokenCounters
from expertmesh.router.openai_server import counters_json

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
    ok = ["--router", "http://r:8001", "--directory", "d:50071", "--dashboard", "http://h:8265", "--model", model]

    def with_(flag, value):
        args = list(ok)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        return args

    assert "--router must be an http(s) URL like http://ROUTER:8001" in run_main(with_("--router", "r:50061"), capsys)
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
    parser = argparse.ArgumentParser()
    cs.configure(parser)
    service = cs.build(parser.parse_args(with_("--router", "http://r:8001/")), parser)
    assert service.counters_url == "http://r:8001/expertmesh/counters"  # a base URL; the counters route is ours


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
    service = cs.ControllerService(info=None, plan=PLAN, router="http://r:1", target_options={}, settings=settings)
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
        router=f"http://{dead}",
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


def test_routed_load_read_over_http_scales_a_group(model, tmp_path):
    """The service reads the router's counters over HTTP (the router's own JSON over a real counters file): before
    the engine core made its counters the load is zero; load routed to layer 0 then puts a Serve config with more
    replicas of l0 to the dashboard, and nothing else changes. A router that goes away makes /health say so."""
    info = read_moe_info(model)
    counters_path = tmp_path / "routed-tokens.npy"
    router = LoopbackHTTP({"/expertmesh/counters": lambda _: (200, counters_json(str(counters_path)))})
    plan = PLAN.model_copy(
        update={"autoscaling": Autoscaling(target_tokens_per_second=100, upscale_delay_s=0, downscale_delay_s=600)}
    )
    directory = "127.0.0.1:1"  # only written into the Serve config; no regroup here asks the directory anything
    deployed = {"config": build_serve_config(plan, model, directory)}
    puts: list[dict] = []

    def put(config: dict):
        puts.append(config)
        deployed["config"] = config
        return 200, {}

    dashboard = LoopbackHTTP(
        {
            "/api/serve/applications/": lambda body: (
                put(body) if body is not None else (200, serve_status(deployed["config"]))
            )
        }
    )
    service = cs.ControllerService(
        info=info,
        plan=plan,
        router=router.url + "/",
        settings=ControllerSettings(interval_s=0.2),
        target_options={"model": model, "directory": directory, "dashboard": dashboard.url},
    )
    status_server = cs.serve_http(service, "127.0.0.1", 0)
    threading.Thread(target=status_server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    status_url = f"http://127.0.0.1:{status_server.server_address[1]}"
    try:
        assert service.counters_url == f"{router.url}/expertmesh/counters"
        for _ in range(2):  # no counters file yet: {"available": false} reads as no load
            service.step()
            time.sleep(0.2)
        assert service.last_error is None and service.healthy()
        assert np.array_equal(service.controller.status()["tokens_per_s"], np.zeros((2, 8)))
        assert puts == []  # nothing to change: the first apply would only repeat the chart's config

        counters = RoutedTokenCounters.create(counters_path, [0, 1], 8)
        service.step()  # the counters appear: the window starts from them
        counters.add(0, np.full(8, 500))  # 4,000 tokens routed to layer 0's experts
        time.sleep(0.3)
        service.step()
        assert service.last_error is None, service.last_error
        status = httpx.get(status_url + "/status").json()
        rate = np.array(status["tokens_per_s"])
        assert rate[0].min() > 0 and rate[1].max() == 0  # layer 0 loaded, layer 1 idle
        assert status["replicas"] == {"l0": 3, "l1": 1}  # ceil(tokens/s / 100) clamped to l0's max_replicas
        (config,) = puts
        assert config == build_serve_config(plan, model, directory, replicas={"l0": 3, "l1": 1})
        service.step()
        assert service.adoptions == 0 and len(puts) == 1  # what it put reads back as its own: no adoption

        router.close()
        service.step()
        health = httpx.get(status_url + "/health")
        assert health.status_code == 503 and health.json()["last_error"].startswith("ConnectError"), health.json()
    finally:
        service.stop()
        status_server.shutdown()
        status_server.server_close()
        router.close()
        dashboard.close()
