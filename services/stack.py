"""`expertmesh serve`: the whole local stack in one command — Ray on loopback with the expert pool, the
router (vLLM), the gateway — on the shipped demo model unless `--model` names another checkpoint.

Shows progress while loading, prints the URL and a ready-to-paste curl, restarts the router or the gateway if it
dies (the gateway answers 503 with Retry-After while the router is down), and on Ctrl-C / SIGTERM stops
everything it started: the gateway and router processes (their whole process groups) and exactly the Ray
cluster it started. `Stack` is the same thing as a context manager, for tests and benchmarks.

Every tunable is reachable from here: the replicas' (`--max-wait-ms`, `--max-batch-rows`, `--inline-rows`,
`--compute-threads`, `--lease-seconds`, passed in the Serve config), the router's dispatch (`--dispatch-deadline-s`,
`--missing-expert-wait-s`), the controller's (`--controller-settings JSON`) and any other registered environment
variable (`--env NAME=VALUE`, checked against core/settings.py; docs/configuration.md lists them).

The router is vLLM's own OpenAI server with the expertmesh plugin (`expertmesh.router.openai_server`: AsyncLLM, the
model in vLLM's engine-core process, routed experts sent to the pool); the gateway is its front door (API keys,
/health, /metrics, /experts, the streaming proxy of /v1/*); the controller reads the router's
`GET /expertmesh/counters`. Everything after `--` goes to vLLM's own parser: the options of `vllm serve`
(`--max-model-len`, `--chat-template`, `--enable-auto-tool-choice --tool-call-parser NAME`, `--served-model-name`, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmesh.core import auth, settings
from expertmesh.core.manifest import config_file
from expertmesh.core.plan import DEFAULT_GROUP_BYTES, PlacementPlan, default_plan, load_plan
from expertmesh.core.settings import ReplicaSettings, add_replica_flags, free_port, replica_settings_from_args

if TYPE_CHECKING:  # annotations only: both are imported when the stack starts them (Ray, gRPC)
    from expertmesh.control.controller import Controller
    from expertmesh.experts.pool import LocalPool


def _demo_model() -> Path:
    """The shipped demo checkpoint: package data `expertmesh.demo` in an installed package; in a source checkout
    (editable install, whose `expertmesh` is services/) the same files at models/demo."""
    here = Path(__file__).resolve().parent
    candidates = (here / "demo", here.parent / "models" / "demo")
    return next((p for p in candidates if (p / "config.json").is_file()), candidates[0])


DEMO_MODEL = _demo_model()


_SIGNALS: list[int] = []  # SIGINT/SIGTERM received by `serve` (checked while starting, too)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if `serve` itself dies (even by SIGKILL), so nothing is orphaned."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wait(what: str, check, proc: subprocess.Popen | None, timeout: float, log: Path | None) -> float:
    """Poll `check()` until true; fail early (with the log's tail) if `proc` exits."""
    start = time.monotonic()
    last = 0.0
    while True:
        if _SIGNALS:
            raise KeyboardInterrupt(f"interrupted while waiting for {what}")
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting\n{tail}")
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not up yet
            pass
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s" + (f" (log: {log})" if log else ""))
        if elapsed - last >= 5:
            _say(f"      ... waiting for {what} ({elapsed:.0f} s)")
            last = elapsed
        time.sleep(0.25)


RESTARTS_PER_WINDOW = 5  # supervision gives up on a component that dies more often than this ...
RESTART_WINDOW_S = 300.0  # ... within this many seconds (a crash loop is a bug to see, not to hide)


def _served_model_names(vllm_args: list[str]) -> list[str]:
    """The names given to vLLM's `--served-model-name` (nargs="+") among `vllm_args`, or []."""
    for i, arg in enumerate(vllm_args):
        if arg.startswith("--served-model-name="):
            return [arg.split("=", 1)[1]]
        if arg == "--served-model-name":
            return [a for a in itertools.takewhile(lambda a: not a.startswith("-"), vllm_args[i + 1 :])]
    return []


def _http_ok(url: str) -> bool:
    import httpx

    from expertmesh.core import auth

    return httpx.get(url, timeout=2, headers=auth.http_headers()).status_code == 200  # a router wants the credential


def local_replica_budget(planned: int, cores: int | None = None) -> int:
    """The most expert replicas the local stack's controller may run: half this machine's cores (the router's vLLM
    engine, its API server and the gateway need the other half), and never fewer than the plan starts with.

    On one machine a replica beyond the free cores adds a process and per-layer fan-out, not compute: measured on
    2 cores, the controller's regrouping into 8 replicas cut `expertmesh serve`'s throughput several times over
    (docs/benchmarks.md). A cluster's controller (`expertmesh controller`) keeps ControllerSettings' own cap."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(planned, cores // 2, 1)


ROLES = ("router", "gateway", "pool")  # the parts of the stack that `cpus` can pin
AUTH_VARS = ("EXPERTMESH_CLUSTER_TOKEN", "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS", "EXPERTMESH_CLUSTER_TOKEN_FILE")


class Stack:
    """The local stack: expert pool (unless local_experts), router subprocess, gateway subprocess."""

    def __init__(
        self,
        model: str | Path = DEMO_MODEL,
        host: str = "127.0.0.1",
        port: int = settings.GATEWAY_PORT,
        router_port: int = settings.ROUTER_PORT,
        routers: int = 1,
        local_experts: bool = False,
        plan: str | None = None,
        log_dir: str | Path | None = None,
        enforce_eager: bool = True,
        ray_port: int | None = None,
        directory_port: int | None = None,
        metrics_port: int = 0,
        extra_env: dict | None = None,
        controller: bool = True,
        replica: ReplicaSettings | None = None,
        controller_settings: dict | str | None = None,
        vllm_args: list[str] | None = None,
        cpus: dict[str, set[int]] | None = None,
        ray_address: str | None = None,
    ):
        """extra_env: registered variables (core/settings.py) for every process the stack starts, the Ray head
        included; replica: the expert replicas' tunables; controller_settings: ControllerSettings fields
        (default: $EXPERTMESH_CONTROLLER_SETTINGS); vllm_args: more `vllm serve` options for the router;
        routers: how many routers (each its own vLLM engine, on router_port, router_port + 1, ...) the gateway spreads
        requests over; cpus: {role: cores} for "router" (every router), "gateway" and "pool" (Ray and every replica),
        e.g. attention on one core and experts on another, as on separate machines (a role not named runs anywhere);
        ray_address: a running Ray cluster for the expert pool instead of the stack's own (experts/pool.py)."""
        if routers < 1:
            raise ValueError(f"routers must be >= 1, got {routers}")
        self.vllm_args = list(vllm_args or [])
        self.routers = routers
        self.cpus = {role: set(cores) for role, cores in (cpus or {}).items()}
        if unknown := set(self.cpus) - set(ROLES):
            raise ValueError(f"cpus: unknown role(s) {sorted(unknown)}; choose from {ROLES}")
        self.model = Path(model).resolve()
        self.host, self.port, self.router_port = host, port, router_port
        self.local_experts, self.plan, self.enforce_eager = local_experts, plan, enforce_eager
        self.ray_port, self.directory_port, self.metrics_port = ray_port, directory_port, metrics_port
        self.ray_address = ray_address or None
        self.log_dir = Path(log_dir or settings.cache_dir() / "logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = {k: str(v) for k, v in (extra_env or {}).items()}
        self.replica = replica or ReplicaSettings()
        self.controller_settings = controller_settings
        self.use_controller = controller and not local_experts
        self.pool: LocalPool | None = None
        self.controller: Controller | None = None
        self.procs: list[subprocess.Popen] = []
        self._commands: dict[int, tuple[str, list[str], dict]] = {}  # pid -> (name, command, env): to restart it
        self._restarts: dict[str, list[float]] = {}  # name -> monotonic times it was restarted
        self._exported: list[str] = []  # cluster-credential variables this stack put in its own environment
        self.url = f"http://{host}:{port}"

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure_cluster_token(self) -> None:
        """Every internal gRPC call of the stack carries the cluster credential (core/auth.py). Given (exported or
        --env): used. Not given: one made for this run, never written anywhere: it lives in this process's
        environment (its pool client and controller call the directory and the replicas) and reaches every process
        the stack starts, the Ray head and so every replica included, through their environment."""
        for name in AUTH_VARS:  # --env values: this process needs them too, not only its children
            if self.extra_env.get(name) and not settings.is_set(name):
                settings.export(name, self.extra_env[name])
                self._exported.append(name)
        if not auth.configured() and self.ray_address:  # a cluster's nodes have their own token (or none)
            _say("      no cluster token (EXPERTMESH_CLUSTER_TOKEN / _FILE): the Ray cluster's nodes must have none")
        elif not auth.configured():
            settings.export("EXPERTMESH_CLUSTER_TOKEN", secrets.token_urlsafe(32))
            self._exported.append("EXPERTMESH_CLUSTER_TOKEN")

    def _env(self) -> dict:
        """This process's environment + OMP/vLLM/tokenizers defaults where unset + extra_env (checked)."""
        return settings.child_env(self.extra_env)

    def _spawn(self, name: str, cmd: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        proc = self._launch(name, cmd, env, "w")
        self.procs.append(proc)
        return proc, self.log_dir / f"{name}.log"

    def _launch(self, name: str, cmd: list[str], env: dict, log_mode: str) -> subprocess.Popen:
        """Start a component in its own session (its whole group can be stopped), output to logs/NAME.log
        (`log_mode` "w" at start, "a" on a restart), remembering how to start it again."""
        cores = self.cpus.get(name.split("-")[0])  # router-2 -> the routers' cores

        def before_exec() -> None:
            _die_with_parent()
            if cores:
                os.sched_setaffinity(0, cores)

        with open(self.log_dir / f"{name}.log", log_mode) as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=before_exec
            )
        self._commands[proc.pid] = (name, cmd, env)
        return proc

    def _start(self) -> None:
        if config_file(self.model) is None:
            raise FileNotFoundError(f"{self.model}: not a checkpoint directory (no config.json or params.json)")
        steps = 2 if self.local_experts else 3
        step = 1
        self._ensure_cluster_token()
        env = self._env()
        directory = None
        if not self.local_experts:
            from expertmesh.experts.pool import LocalPool

            if self.ray_address:
                _say(f"[{step}/{steps}] starting the expert pool on the Ray cluster at {self.ray_address} ...")
            else:
                _say(f"[{step}/{steps}] starting Ray on loopback and the expert pool for {self.model.name} ...")
            t0 = time.monotonic()
            kwargs: dict[str, Any] = {}  # LocalPool's keyword arguments
            if self.ray_port:
                given = {p for p in (self.port, self.ray_port, self.directory_port) if p}
                given |= {self.router_port + i for i in range(self.routers)}
                kwargs["gcs_port"] = self.ray_port
                kwargs["dashboard_port"] = free_port(avoid=given)
                kwargs["metrics_port"] = free_port(avoid=given)
                kwargs["state_file"] = self.log_dir / f"pool-{self.ray_port}.json"
            if self.directory_port:
                kwargs["directory_port"] = self.directory_port
            plan = load_plan(self.plan) if self.plan else self._default_plan()
            self.pool = LocalPool(
                self.model,
                plan=plan,
                replica=self.replica,
                env=self.extra_env,
                cpus=self.cpus.get("pool"),
                ray_address=self.ray_address,
                **kwargs,
            ).start()
            directory = self.pool.directory_address
            _say(f"      expert pool ready in {time.monotonic() - t0:.0f} s: directory {directory}")
            step += 1
        self._start_router(step, steps, directory, env)
        if self.use_controller:
            from expertmesh.control.controller import Controller
            from expertmesh.control.controller_service import parse_settings

            chosen = self.controller_settings
            if chosen is None:
                chosen = self.extra_env.get("EXPERTMESH_CONTROLLER_SETTINGS") or settings.controller_settings()
            fields = json.loads(chosen) if isinstance(chosen, str) and chosen else dict(chosen or {})
            assert self.pool is not None  # use_controller implies remote experts
            budget = local_replica_budget(sum(g.start_replicas for g in self.pool.plan.groups))
            fields.setdefault("max_total_replicas", budget)
            controller_settings = parse_settings(fields)
            self.controller = Controller.for_pool(
                self.pool,
                [f"{url}/expertmesh/counters" for url in self.router_urls],
                controller_settings,
                status_file=self.log_dir / "controller-status.json",
            ).start()
            _say(
                "      expert controller running (autoscaling and rebalancing by routed load, "
                f"at most {controller_settings.max_total_replicas} replicas)"
            )

    def _default_plan(self) -> PlacementPlan:
        """The default plan, with every expert on two replicas where the local replica budget has room (so killing one
        replica uncovers nothing; planner.add_redundancy). On a 2-core machine the budget is one replica: no change."""
        from expertmesh.control.planner import add_redundancy
        from expertmesh.core.checkpoint import read_moe_info

        info = read_moe_info(self.model)
        plan = default_plan(info)
        budget = local_replica_budget(sum(g.start_replicas for g in plan.groups))
        plan, redundancy = add_redundancy(plan, max(1, DEFAULT_GROUP_BYTES // max(1, info.expert_bytes)), budget)
        _say(f"      {redundancy.describe()}")
        return plan

    @property
    def router_url(self) -> str:
        """The (first) router: vLLM's OpenAI server with the plugin."""
        return self.router_urls[0]

    @property
    def router_urls(self) -> list[str]:
        """Every router, in start order (ports router_port, router_port + 1, ...)."""
        return [f"http://127.0.0.1:{self.router_port + i}" for i in range(self.routers)]

    def _start_router(self, step: int, steps: int, directory: str | None, env: dict) -> None:
        mode = "local experts" if self.local_experts else "remote experts"
        what = "the router" if self.routers == 1 else f"{self.routers} routers"
        _say(f"[{step}/{steps}] starting {what} (vLLM's OpenAI server, {mode}) ...")
        # All routers start at once (each loads its own engine); the gateway waits for every one to serve.
        started = [self._spawn_router(i, directory, env) for i in range(self.routers)]
        t0 = time.monotonic()
        for url, (proc, log) in zip(self.router_urls, started, strict=True):
            _wait("router", lambda url=url: _http_ok(f"{url}/v1/models"), proc, 600, log)
        _say(f"      ready in {time.monotonic() - t0:.0f} s at {', '.join(self.router_urls)}")
        step += 1
        _say(f"[{step}/{steps}] starting the gateway (proxy to {what}) ...")
        self._start_gateway(env)

    def _spawn_router(self, index: int, directory: str | None, env: dict) -> tuple[subprocess.Popen, Path]:
        """Router `index` (0-based): logs/router.log for the first, logs/router-2.log ... for the others. Only the
        first serves the engine-core Prometheus port (metrics_port): two processes cannot bind one port."""
        cmd = [
            sys.executable,
            "-m",
            "expertmesh.router.openai_server",
            str(self.model),
            "--router-metrics-port",
            str(self.metrics_port if index == 0 else 0),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.router_port + index),
        ]
        if not _served_model_names(self.vllm_args):
            cmd += ["--served-model-name", self.model_name]
        if directory is None:
            cmd += ["--expert-mode", "local"]
        else:
            cmd += ["--expert-mode", "remote", "--directory", directory]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        # vLLM's default executor: the model in a worker process below the engine core. Measured on 2 cores
        # (docs/benchmarks.md) it serves more than `uni` (the model inside the engine core) at concurrency 32.
        cmd += self.vllm_args  # last: the user's `vllm serve` options win over the stack's
        counters = env.get("EXPERTMESH_COUNTERS_FILE")
        if counters and self.routers > 1:  # one file per router: each engine writes its own (counters.py)
            env = {**env, "EXPERTMESH_COUNTERS_FILE": f"{counters}.router-{index + 1}"}
        return self._spawn("router" if index == 0 else f"router-{index + 1}", cmd, env)

    def _start_gateway(self, env: dict) -> None:
        """The gateway on this stack's host and port, in front of the routers."""
        cmd = [sys.executable, "-m", "expertmesh.gateway.app"]
        for url in self.router_urls:
            cmd += ["--router", url]
        cmd += ["--host", self.host, "--port", str(self.port)]
        if self.use_controller:
            env["EXPERTMESH_CONTROLLER_STATUS"] = str(self.log_dir / "controller-status.json")
        proc, log = self._spawn("gateway", cmd, env)
        took = _wait("gateway", lambda: _http_ok(f"{self.url}/health"), proc, 120, log)
        _say(f"      gateway ready in {took:.0f} s")

    @property
    def model_name(self) -> str:
        """The model id clients use: the checkpoint directory's name, unless vLLM's --served-model-name says."""
        names = _served_model_names(self.vllm_args)
        return names[0] if names else self.model.name

    def stop(self) -> None:
        """The gateway first (started last): it stops accepting and lets the requests in flight finish, up to
        EXPERTMESH_SHUTDOWN_GRACE_S; only then the router, so no request being served is cut; then the pool."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        grace = settings.shutdown_grace_s()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=grace + 15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        for name in self._exported:  # this run's credential dies with it (a later stack in this process makes its own)
            settings.unset(name)
        self._exported.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def supervise(self, max_restarts: int = RESTARTS_PER_WINDOW, window_s: float = RESTART_WINDOW_S) -> str | None:
        """Restart the router or gateway if it died (in place, same command and log file, appended). While the router
        is down the gateway answers 503 with Retry-After; it takes requests again as soon as the router serves.
        Returns why supervision gave up (a component died more than `max_restarts` times within `window_s`), else
        None."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                continue
            name, cmd, env = self._commands.pop(proc.pid)
            try:  # what it left behind (vLLM's engine core and worker share its process group)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            now = time.monotonic()
            recent = [t for t in self._restarts.get(name, []) if now - t < window_s]
            if len(recent) >= max_restarts:
                return f"the {name} exited with code {proc.returncode}, {len(recent)} restarts in {window_s:.0f} s"
            self._restarts[name] = [*recent, now]
            _say(f"expertmesh serve: the {name} exited with code {proc.returncode}; restarting it")
            self.procs[i] = self._launch(name, cmd, env, "a")
        return None


# -- CLI ------------------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint directory (default: the demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=settings.GATEWAY_PORT, help="gateway port (default 8000)")
    parser.add_argument(
        "--router-port", type=int, default=settings.ROUTER_PORT, help="router HTTP port (vLLM's OpenAI server)"
    )
    parser.add_argument(
        "--routers",
        type=int,
        default=1,
        help="routers (vLLM engines) behind the gateway, on --router-port, --router-port + 1, ... (default 1)",
    )
    parser.add_argument(
        "--cpus",
        action="append",
        default=[],
        metavar="ROLE=CORES",
        type=_role_cpus,
        help=f"pin a part of the stack ({', '.join(ROLES)}) to cores, e.g. --cpus router=0 --cpus pool=1-3 "
        "(repeatable; default: anywhere)",
    )
    parser.add_argument(
        "--ray-port",
        type=int,
        default=None,
        help=f"GCS port of the stack's own Ray cluster (default {settings.RAY_GCS_PORT})",
    )
    parser.add_argument(
        "--ray-address",
        default=settings.ray_address(),
        metavar="ADDR",
        help="run the expert pool on this running Ray cluster (GCS host:port or dashboard http://host:8265) instead of "
        "starting one; at exit only the pool's Serve applications are removed (default $EXPERTMESH_RAY_ADDRESS)",
    )
    parser.add_argument(
        "--directory-port", type=int, default=None, help=f"expert directory port (default {settings.DIRECTORY_PORT})"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=settings.ROUTER_METRICS_PORT,
        help="Prometheus port of the router's engine-core process (0 = off)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="placement plan YAML (default: whole MoE layers packed into groups of at most 2 GiB of experts)",
    )
    parser.add_argument(
        "--local-experts",
        action="store_true",
        help="compute experts inside vLLM (the monolithic baseline): no expert pool",
    )
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (slower start)")
    parser.add_argument("--no-controller", action="store_true", help="do not run the expert autoscaling controller")
    parser.add_argument(
        "--controller-settings",
        default=None,
        metavar="JSON",
        help="ControllerSettings fields as a JSON object (default: $EXPERTMESH_CONTROLLER_SETTINGS)",
    )
    parser.add_argument(
        "--dispatch-deadline-s",
        type=float,
        default=None,
        help="router: seconds a replica has to answer a layer before failover "
        f"(default {settings.ENV_VARS['EXPERTMESH_DISPATCH_DEADLINE_S'].default})",
    )
    parser.add_argument(
        "--missing-expert-wait-s",
        type=float,
        default=None,
        help="router: seconds to wait for an expert nobody serves "
        f"(default {settings.ENV_VARS['EXPERTMESH_MISSING_EXPERT_WAIT_S'].default})",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a registered environment variable for every process of the stack (repeatable; see docs/configuration.md)",
    )
    parser.add_argument(
        "vllm_args",
        nargs="*",
        metavar="-- VLLM_OPTION",
        help="everything after `--` goes to vLLM's `vllm serve` parser "
        "(e.g. -- --max-model-len 512 --enable-auto-tool-choice --tool-call-parser hermes)",
    )
    add_replica_flags(parser)


def _role_cpus(text: str) -> tuple[str, set[int]]:
    """ROLE=CORES (CORES as taskset's list: 0,2 or 1-3) -> (role, {cores})."""
    role, sep, spec = text.partition("=")
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        cores = set()
    if not sep or role not in ROLES or not cores:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROLE=CORES, ROLE one of {', '.join(ROLES)}, e.g. router=0"
        )
    return role, cores


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """--env NAME=VALUE pairs and the router flags, as registered variables (unknown names and bad values fail)."""
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or name not in settings.ENV_VARS:
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE with NAME one of {sorted(settings.ENV_VARS)}")
        env[name] = value
    if args.dispatch_deadline_s is not None:
        env["EXPERTMESH_DISPATCH_DEADLINE_S"] = str(args.dispatch_deadline_s)
    if args.missing_expert_wait_s is not None:
        env["EXPERTMESH_MISSING_EXPERT_WAIT_S"] = str(args.missing_expert_wait_s)
    for name, value in env.items():
        try:
            settings.ENV_VARS[name].value({name: value})
        except ValueError as exc:
            raise SystemExit(f"--env: {exc}") from None
    return env


def run(args: argparse.Namespace) -> int:
    stack = Stack(
        args.model,
        host=args.host,
        port=args.port,
        router_port=args.router_port,
        routers=args.routers,
        cpus=dict(args.cpus),
        local_experts=args.local_experts,
        plan=args.plan,
        enforce_eager=not args.compile,
        controller=not args.no_controller,
        ray_port=args.ray_port,
        ray_address=args.ray_address,
        directory_port=args.directory_port,
        metrics_port=args.metrics_port,
        extra_env=env_from_args(args),
        replica=replica_settings_from_args(args),
        controller_settings=args.controller_settings,
        vllm_args=args.vllm_args,
    )
    # The handler only records the signal: taking a lock in it (Event.set) can deadlock against the main
    # thread it interrupts while that thread holds the same lock.
    signals = _SIGNALS

    def on_signal(signum, frame):
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except KeyboardInterrupt:  # start() already stopped everything it had started
        _say("expertmesh serve: interrupted while starting; stopped.")
        return 130
    except Exception as exc:  # noqa: BLE001 - report, clean up (start() already stopped everything)
        _say(f"expertmesh serve: failed to start: {exc}")
        return 1
    body = {"model": stack.model_name, "messages": [{"role": "user", "content": "Speak, my lord."}], "max_tokens": 40}
    _say("")
    _say(f"expertmesh is serving {stack.model_name} at {stack.url}/v1  (logs: {stack.log_dir})")
    _say("Try:")
    print(
        f"curl -s {stack.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
        flush=True,
    )
    _say("Press Ctrl-C to stop.")
    code = 0
    while not signals:
        time.sleep(0.2)
        gave_up = stack.supervise()
        if gave_up is not None:
            _say(f"expertmesh serve: {gave_up}; shutting down")
            code = 1
            break
    _say("stopping ...")
    stack.stop()
    _say("stopped.")
    return code
