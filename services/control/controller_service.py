"""The expert controller as its own process: what the Helm chart's `controller` Deployment runs.

    python -m expertmesh.control.controller_service --router http://ROUTER:8001 --directory HOST:PORT \\
        --dashboard http://HEAD:8265 --model DIR [--plan FILE] [--num-cpus X] [--num-gpus Y] \\
        [--directory-resource NAME] [--host 0.0.0.0] [--port 9481] [--settings JSON] \\
        [--max-wait-ms MS] [--max-batch-rows N] [--inline-rows N] [--compute-threads N] [--lease-seconds S]

It runs `controller.Controller` (load-driven replica counts, regrouping of hot experts) against a Ray cluster it
did not start. The load comes from the router's routed-token counters, `GET <--router>/expertmesh/counters` (the
router is vLLM's OpenAI server with the expertmesh plugin, router/openai_server.py). `ServeTarget.apply(plan,
replicas)` PUTs `build_serve_config(plan, ...)` to the Ray dashboard with the same options the chart renders into
the RayService's serveConfigV2 (tests/test_k8s.py checks they agree), so the controller's first PUT changes nothing
but replica counts.

Someone else may PUT too: KubeRay re-submits serveConfigV2 when the RayService spec changes (`helm upgrade` with
another plan), when its in-memory cache is empty (operator restart, new cluster) or when the head lost every
application. So every step first reads what Serve has deployed (GET /api/serve/applications/): before anything
is deployed the service waits (KubeRay submits once the head is ready); when the deployed groups differ from what
this process last applied, it adopts them -- a fresh Controller on the deployed groups and replica counts --
instead of pushing its own stale view back. The same adoption makes a restarted controller pod carry on from the
regrouped pool rather than reset it to the chart's plan.

HTTP on --port: GET /health is 200 when the last step succeeded recently (503 with the error otherwise: Serve
config not deployed yet, router or dashboard unreachable); GET /status is the controller's status JSON (plan,
replicas, tokens/s, history; the gateway's /experts reads it via EXPERTMESH_CONTROLLER_STATUS=http://.../status).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from expertmesh.control.controller import ENV_CONTROLLER_SETTINGS, Controller, ControllerSettings
from expertmesh.control.serve_api import check_apply, get_serve_status, put_serve_config
from expertmesh.control.serve_config import DIRECTORY_APP, GROUP_APP_PREFIX, build_serve_config
from expertmesh.core import auth, settings
from expertmesh.core import settings as core_settings
from expertmesh.core.checkpoint import MoEInfo, read_moe_info
from expertmesh.core.plan import ExpertGroup, PlacementPlan, default_plan, load_plan
from expertmesh.core.settings import ReplicaSettings, add_replica_flags, replica_settings_from_args
from expertmesh.discovery.directory import DirectoryClient, send_plan

log = logging.getLogger("expertmesh.controller_service")

# Layout of the deployed groups: name -> (keys as canonical JSON, num_replicas).
Layout = dict[str, tuple[str, int]]


def _keys_json(keys: dict) -> str:
    return json.dumps({str(layer): sorted(int(e) for e in experts) for layer, experts in keys.items()}, sort_keys=True)


class ServeTarget:
    """What `Controller.for_pool` needs (`info`, `plan`, `client()`, `apply(plan, replicas)`) for a Ray cluster
    reached only through its dashboard: every apply PUTs the whole Serve config, built exactly as the chart does."""

    def __init__(
        self,
        info: MoEInfo,
        plan: PlacementPlan,
        replicas: dict[str, int],
        *,
        model: str,
        directory: str,
        dashboard: str,
        num_cpus: float = 1,
        num_gpus: float = 0,
        directory_resource: str | None = None,
        replica: ReplicaSettings | None = None,
    ):
        self.info, self.plan, self.replicas = info, plan, dict(replicas)
        self.model, self.directory, self.dashboard = model, directory, dashboard
        self.num_cpus, self.num_gpus, self.directory_resource = num_cpus, num_gpus, directory_resource
        self.replica = replica or ReplicaSettings()

    def serve_config(self, plan: PlacementPlan, replicas: dict[str, int]) -> dict:
        return build_serve_config(
            plan,
            self.model,
            self.directory,
            replicas=replicas,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            directory_resource=self.directory_resource,
            replica=self.replica,
        )

    def apply(self, plan: PlacementPlan, replicas: dict[str, int]) -> None:
        check_apply(plan, replicas, self.info)
        send_plan(self.directory, plan)  # the directory admits only this plan's keys from now on
        put_serve_config(self.dashboard, self.serve_config(plan, replicas))
        self.plan, self.replicas = plan, {name: int(n) for name, n in replicas.items()}

    def client(self) -> DirectoryClient:
        return DirectoryClient(self.directory)

    def send_plan(self) -> bool:
        """Tell the directory the plan in force (every step: a restarted directory starts without one)."""
        return send_plan(self.directory, self.plan)

    def layout(self) -> Layout:
        """What the last apply (or adoption) put in Serve, in the form `deployed_layout` reads back."""
        return {g.name: (_keys_json(g.keys), self.replicas.get(g.name, g.start_replicas)) for g in self.plan.groups}


def deployed_layout(serve_status: dict) -> Layout | None:
    """The expert groups Serve has deployed (from GET /api/serve/applications/), or None when the directory
    application is not there (nothing submitted yet). Applications being deleted do not count."""
    apps = serve_status.get("applications") or {}
    if DIRECTORY_APP not in apps:
        return None
    out: Layout = {}
    for name, app in apps.items():
        config = app.get("deployed_app_config")
        if not name.startswith(GROUP_APP_PREFIX) or not config or app.get("status") == "DELETING":
            continue
        group = (config.get("args") or {}).get("group") or {}
        deployments = config.get("deployments") or [{}]
        if "name" not in group or "keys" not in group:
            continue  # not one of ours
        out[group["name"]] = (_keys_json(group["keys"]), int(deployments[0].get("num_replicas", 1)))
    return out


def adopt_plan(base: PlacementPlan, layout: Layout, settings: ControllerSettings) -> PlacementPlan:
    """A plan of the deployed groups, starting at their deployed replica counts. A group the base plan knows
    (same name and keys) keeps its bounds and autoscaling; one the controller made earlier (a regrouped hot
    expert) gets [1, max_replicas_per_group]. Raises ValueError if `layout` is no valid plan."""
    known = {g.name: g for g in base.groups}
    groups = []
    for name, (keys_json, n) in layout.items():
        keys = {int(layer): experts for layer, experts in json.loads(keys_json).items()}
        same = known.get(name)
        if same is not None and _keys_json(same.keys) == keys_json:
            groups.append(
                same.model_copy(
                    update={
                        "min_replicas": min(same.min_replicas, n),
                        "max_replicas": max(same.max_replicas, n),
                        "initial_replicas": n,
                    }
                )
            )
        else:
            groups.append(
                ExpertGroup(
                    name=name,
                    keys=keys,
                    min_replicas=min(1, n),
                    initial_replicas=n,
                    max_replicas=max(settings.max_replicas_per_group, n),
                )
            )
    if not groups:
        raise ValueError("no expert group is deployed")
    return PlacementPlan(model=base.model, autoscaling=base.autoscaling, groups=groups)


class ControllerService:
    """Runs one step per `settings.interval_s` (read Serve, adopt if needed, Controller.tick) in a thread."""

    def __init__(
        self, *, info: MoEInfo, plan: PlacementPlan, router: str, target_options: dict, settings: ControllerSettings
    ):
        """`router`: the router's base URL (http://HOST:PORT); its counters are read from /expertmesh/counters."""
        self.info, self.base_plan, self.router = info, plan, router.rstrip("/")
        self.target_options, self.settings = target_options, settings
        self.target: ServeTarget | None = None
        self.controller: Controller | None = None
        self.adoptions = 0
        self.last_ok: float | None = None  # monotonic end of the last successful step
        self.step_started: float | None = None  # monotonic start of the step running now
        self.last_error: str | None = "not started"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> None:
        self.step_started = time.monotonic()
        try:
            layout = deployed_layout(get_serve_status(self.target_options["dashboard"]))
            if layout is None:
                raise RuntimeError(
                    "the expert pool's Serve config is not deployed yet (KubeRay submits "
                    "serveConfigV2 once the Ray head is ready)"
                )
            if self.target is None or layout != self.target.layout():
                self._adopt(layout)
            if self.controller is None:  # only after a failed first adoption (retried next step)
                raise RuntimeError("no controller: adopting the deployed layout failed")
            if self.target is not None:
                self.target.send_plan()
            self.controller.tick()
            self.last_ok, self.last_error = time.monotonic(), None
        except Exception as exc:  # noqa: BLE001 - reported by /health, retried next step
            error = f"{type(exc).__name__}: {exc}"
            if error != self.last_error:  # once per new error, not every step while waiting for the pool
                log.warning("controller step failed: %s", error)
            self.last_error = error
        finally:
            self.step_started = None

    def _adopt(self, layout: Layout) -> None:
        first = self.target is None
        try:
            plan = adopt_plan(self.base_plan, layout, self.settings)
            plan.check_covers(self.info)
            repair = False
        except ValueError as exc:
            log.error("deployed expert groups are not a valid plan (%s): deploying the configured plan", exc)
            plan, repair = self.base_plan, True
        replicas = {g.name: g.start_replicas for g in plan.groups}
        if not first:
            log.warning(
                "Serve's expert groups changed under the controller (KubeRay re-submitted serveConfigV2?): adopting %s",
                {name: n for name, (_, n) in layout.items()},
            )
            self.adoptions += 1
        if self.controller is not None:
            self.controller.stop()
        self.target = ServeTarget(self.info, plan, replicas, **self.target_options)
        if repair:
            self.target.apply(plan, replicas)
        self.controller = Controller.for_pool(self.target, self.counters_url, self.settings)

    @property
    def counters_url(self) -> str:
        return f"{self.router}/expertmesh/counters"

    # -- health and status ------------------------------------------------------------------------------------
    def healthy(self, now: float | None = None) -> bool:
        """The last step succeeded within a few intervals, or a step (a regroup waits for new replicas to
        register) is still running within its time budget."""
        now = time.monotonic() if now is None else now
        s = self.settings
        if self.last_ok is None or self.last_error is not None:
            return False
        if now - self.last_ok <= 3 * s.interval_s + 10:
            return True
        started = self.step_started
        return started is not None and now - started <= s.register_timeout_s + s.drain_grace_s + 30

    def health(self) -> dict:
        ago = None if self.last_ok is None else round(time.monotonic() - self.last_ok, 3)
        return {
            "healthy": self.healthy(),
            "last_error": self.last_error,
            "last_success_seconds_ago": ago,
            "adoptions": self.adoptions,
        }

    def status(self) -> dict | None:
        if self.controller is None:
            return None
        return dict(self.controller.status(), service=self.health())

    # -- thread -----------------------------------------------------------------------------------------------
    def start(self) -> ControllerService:
        self._thread = threading.Thread(target=self._run, name="expertmesh-controller-service", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.step()
        while not self._stop.wait(self.settings.interval_s):
            self.step()

    def stop(self) -> None:
        self._stop.set()
        if self.controller is not None:
            self.controller.stop()  # ends a regroup's wait for registration early
        if self._thread is not None:
            self._thread.join(timeout=30)


def serve_http(service: ControllerService, host: str, port: int) -> ThreadingHTTPServer:
    """GET /health and GET /status on (host, port); the caller runs `serve_forever`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/health":
                body = service.health()
                self._reply(200 if body["healthy"] else 503, body)
            elif path == "/status" and auth.configured() and not auth.http_accepts(self.headers.get("Authorization")):
                self._reply(401, {"error": {"message": auth.DENIED, "type": "authentication_error", "code": 401}})
            elif path == "/status":
                status = service.status()
                if status is None:
                    self._reply(503, {"error": f"controller not running yet: {service.last_error}"})
                else:
                    self._reply(200, status)
            else:
                self._reply(404, {"error": f"no such path {path!r}; try /health or /status"})

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # probes every few seconds: keep the log for decisions
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


# -- command line -----------------------------------------------------------------------------------------------
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-]+:(\d{1,5})$")


def _host_port(flag: str):
    def parse(value: str) -> str:
        m = _HOST_PORT.match(value)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            raise argparse.ArgumentTypeError(f"{flag} must be HOST:PORT (port 1-65535), got {value!r}")
        return value

    return parse


def _base_url(flag: str, example: str):
    def parse(value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise argparse.ArgumentTypeError(f"{flag} must be an http(s) URL like {example}, got {value!r}")
        return value.rstrip("/")

    return parse


def _non_negative(flag: str):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {value!r}") from None
        if not x >= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 0, got {value!r}")
        return x

    return parse


def parse_settings(raw: str | dict | None) -> ControllerSettings:
    """ControllerSettings from a JSON object (text or parsed); unknown fields and non-numbers raise ValueError."""
    if not raw:
        return ControllerSettings()
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object of ControllerSettings fields")
    known = {f.name: f for f in fields(ControllerSettings)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(known)}")
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return ControllerSettings(**data)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--router",
        required=True,
        type=_base_url("--router", f"http://ROUTER:{settings.ROUTER_PORT}"),
        help="router base URL (vLLM's OpenAI server with the expertmesh plugin); counters from URL/expertmesh/counters",
    )
    parser.add_argument(
        "--directory",
        required=True,
        type=_host_port("--directory"),
        help="expert directory gRPC host:port (as the replicas see it: it goes into the Serve config)",
    )
    parser.add_argument(
        "--dashboard",
        required=True,
        type=_base_url("--dashboard", "http://HEAD:8265"),
        help="Ray dashboard URL, e.g. http://HEAD:8265",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory as the replicas see it")
    parser.add_argument(
        "--plan", help="placement plan YAML (default: whole MoE layers packed into groups of at most 2 GiB of experts)"
    )
    parser.add_argument("--num-cpus", type=_non_negative("--num-cpus"), default=1.0, help="per expert replica")
    parser.add_argument("--num-gpus", type=_non_negative("--num-gpus"), default=0.0, help="per expert replica")
    parser.add_argument(
        "--directory-resource",
        default=None,
        help="custom Ray resource the ExpertDirectory asks for (the chart's head offers it)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address of the /health and /status server")
    parser.add_argument("--port", type=int, default=settings.CONTROLLER_PORT, help="0 = any free port")
    parser.add_argument(
        "--settings",
        default=None,
        help=f"JSON object of ControllerSettings fields (default: env {ENV_CONTROLLER_SETTINGS})",
    )
    add_replica_flags(parser)  # the replicas' tunables, rendered into every group's args as the chart does


def build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ControllerService:
    """The service for parsed flags; bad values end in `parser.error` (exit 2, one clear line)."""
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    try:
        info = read_moe_info(args.model)
    except Exception as exc:  # noqa: BLE001 - missing dir, no config.json, not an MoE model: all one message
        parser.error(f"--model {args.model}: {exc}")
    try:
        plan = load_plan(args.plan) if args.plan else default_plan(info)
        plan.check_covers(info)
    except (OSError, ValueError) as exc:
        parser.error(f"--plan {args.plan}: {exc}")
    try:
        settings = parse_settings(args.settings if args.settings is not None else core_settings.controller_settings())
    except (TypeError, ValueError) as exc:
        parser.error(f"--settings: {exc}")
    if settings.interval_s <= 0:
        parser.error("--settings: interval_s must be > 0")
    target_options = {
        "model": args.model,
        "directory": args.directory,
        "dashboard": args.dashboard,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "directory_resource": args.directory_resource or None,
        "replica": replica_settings_from_args(args),
    }
    return ControllerService(info=info, plan=plan, router=args.router, target_options=target_options, settings=settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m expertmesh.control.controller_service", description=__doc__.splitlines()[0]
    )
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = build(args, parser)
    server = serve_http(service, args.host, args.port)
    log.info(
        "expert controller: counters from %s, directory %s, dashboard %s; /health and /status on %s:%d",
        service.counters_url,
        args.directory,
        args.dashboard,
        *server.server_address[:2],
    )
    service.start()

    def shutdown(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
