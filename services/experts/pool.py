"""`expertmesh experts up|down` and `LocalPool`: the expert pool on a private local Ray cluster.

`up` starts a Ray head on loopback with non-default ports (`ray start --head --block` in a session of its
own, so `down` can stop exactly its processes and nothing else on the machine), deploys the Serve config from
`serve_config.build_serve_config` through the dashboard's REST API (what `serve deploy` and KubeRay do), waits
until every (layer, expert) of the plan is in the directory, and prints the directory. `down` stops the
cluster recorded in the state file (~/.cache/expertmesh/pool-<gcs port>.json).

    expertmesh experts up --model DIR [--plan FILE] [--address 127.0.0.1:6391] [--directory-port N]
    expertmesh experts down [--address 127.0.0.1:6391]

`LocalPool(model, plan, ...)` is the same as a context manager (tests, `expertmesh serve`, benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from expertmesh.control.serve_api import check_apply, get_serve_status, put_serve_config
from expertmesh.control.serve_config import build_serve_config
from expertmesh.core import settings
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import PlacementPlan, default_plan, load_plan
from expertmesh.core.protos import expert_pb2
from expertmesh.core.settings import ReplicaSettings, add_replica_flags, free_port, replica_settings_from_args
from expertmesh.discovery.directory import DirectoryClient, endpoints_by_key, send_plan

STATE_DIR = settings.cache_dir()
REPLICA_LOGICAL_CPUS = 0.25  # per replica; the head offers `num_cpus` logical CPUs in all
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # the pool moves no objects through Ray; keep /dev/shm use small


def _ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _session_pids(sid: int) -> list[int]:
    """Pids of every process in session `sid` (the `ray start --block` we launched with setsid, and its tree)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone already
            pids.append(int(entry))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_session(sid: int, grace: float = 3.0) -> None:
    """Stop a Ray cluster started by `LocalPool`: SIGTERM to every process of its session (as `ray stop` does,
    but only ours), then SIGKILL to whatever is left after `grace` seconds. Ray's orderly shutdown is slow
    and buys nothing for a local pool (no state to keep; directory entries die with it)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        _signal_all(_session_pids(sid), sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _session_pids(sid):
                return
            time.sleep(0.1)


def coverage(snapshot: expert_pb2.DirectorySnapshot, plan: PlacementPlan) -> tuple[int, int]:
    """(keys of the plan served by some non-draining replica, keys in the plan)."""
    served = endpoints_by_key(snapshot)
    wanted = set(plan.holders())
    return len(wanted & set(served)), len(wanted)


def format_directory(snapshot: expert_pb2.DirectorySnapshot) -> str:
    lines = [f"expert directory version {snapshot.version}: {len(snapshot.replicas)} replica(s)"]
    for entry in sorted(snapshot.replicas, key=lambda e: (e.group, e.replica_id)):
        keys = "; ".join(f"layer {k.layer}: experts {list(k.experts)}" for k in entry.keys)
        flag = " (draining)" if entry.draining else ""
        lines.append(f"  {entry.group:<16} {entry.endpoint:<22} {entry.replica_id}{flag}  {keys}")
    return "\n".join(lines)


class LocalPool:
    """The expert pool on a private single-node Ray cluster bound to loopback."""

    def __init__(
        self,
        model: str | Path,
        plan: PlacementPlan | None = None,
        *,
        gcs_port: int = settings.RAY_GCS_PORT,
        dashboard_port: int = settings.RAY_DASHBOARD_PORT,
        directory_port: int = settings.DIRECTORY_PORT,
        metrics_port: int = settings.REPLICA_METRICS_PORT,
        replica_ports: tuple[int, int] | None = None,
        num_cpus: int | None = None,
        lease_seconds: float | None = None,
        max_wait_ms: float | None = None,
        max_batch_rows: int | None = None,
        compute_threads: int | None = None,
        inline_rows: int | None = None,
        replica: ReplicaSettings | None = None,
        ready_timeout: float = 240.0,
        state_file: Path | None = None,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ):
        """cpus: the cores every process of the pool may run on (Ray's head, the directory, every replica: they all
        descend from `ray start` and inherit its affinity); None = any."""
        self.model = str(Path(model).resolve())
        self.cpus = set(cpus) if cpus else None
        self.info = read_moe_info(self.model)
        self.plan = plan or default_plan(self.info)
        self.plan.check_covers(self.info)
        self.host = "127.0.0.1"
        # 0 = any free port (tests, benchmarks, a second pool beside the default one)
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.directory_port = directory_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.replica_ports = replica_ports or settings.replica_port_range()
        # Replicas ask for 1 CPU each in the Serve config; these are logical CPUs, so give every replica
        # the plan may scale to (and the directory) a slot even on a 2-core machine.
        # Logical CPUs for Ray's bookkeeping only (the directory takes 1/4, each replica 1/4): room for the
        # controller to grow the pool well past the plan's start; physical cores are shared by the OS.
        self.num_cpus = num_cpus or 64
        # The replicas' tunables: `replica`, with any keyword given here on top (None = the replica's default).
        self.replica = ReplicaSettings(
            **{
                **(replica or ReplicaSettings()).serve_args(),
                **{
                    k: v
                    for k, v in (
                        ("lease_seconds", lease_seconds),
                        ("max_wait_ms", max_wait_ms),
                        ("max_batch_rows", max_batch_rows),
                        ("inline_rows", inline_rows),
                        ("compute_threads", compute_threads),
                    )
                    if v is not None
                },
            }
        )
        self.env = dict(env or {})  # registered variables for the Ray head and so for every replica
        self.ready_timeout = ready_timeout
        # Serve's own autoscaler sees none of the traffic (it bypasses Serve), so it would only ever shrink groups
        # to min_replicas: locally the counts are pinned (start_replicas) and changed by `apply` (the controller).
        # Pinned from the start, because moving a deployment from autoscaling to a fixed count restarts the app.
        self.replica_counts: dict[str, int] = {g.name: g.start_replicas for g in self.plan.groups}
        self.plan_sent = False  # whether the directory has this pool's current plan (deploy / wait_ready send it)
        self.state_file = state_file or STATE_DIR / f"pool-{self.gcs_port}.json"
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.log_path: Path | None = None

    @classmethod
    def private(
        cls, model: str | Path, plan: PlacementPlan | None = None, *, replica_span: int = 200, **kwargs: Any
    ) -> LocalPool:
        """A pool on free loopback ports (tests, benchmarks): Ray, dashboard, directory and metrics on `free_port()`s,
        replicas in a random range of `replica_span` ports below the ephemeral range, apart from free_port()'s."""
        lo = random.randrange(30000, 32768 - replica_span)
        ports: dict[str, Any] = dict(
            gcs_port=free_port(),
            dashboard_port=free_port(),
            directory_port=free_port(),
            metrics_port=free_port(),
            replica_ports=(lo, lo + replica_span),
        )
        return cls(model, plan, **(ports | kwargs))

    @property
    def directory_address(self) -> str:
        return f"{self.host}:{self.directory_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalPool:
        try:
            self.start_ray()
            self.deploy()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def serve_config(self) -> dict:
        # Logical CPUs: a replica mostly waits on gRPC; physical cores are shared by the OS scheduler.
        config = build_serve_config(
            self.plan,
            self.model,
            self.directory_address,
            replicas=self.replica_counts,
            num_cpus=REPLICA_LOGICAL_CPUS,
            replica=self.replica,
        )
        # The data plane is each replica's own gRPC server: no Serve HTTP/gRPC proxy at all.
        config["proxy_location"] = "Disabled"
        config["http_options"] = {"host": self.host, "port": free_port()}
        return config

    def start_ray(self) -> None:
        if _port_in_use(self.host, self.gcs_port):
            raise RuntimeError(
                f"port {self.gcs_port} is taken: is a pool already up? (expertmesh experts down "
                f"--address {self.gcs_address}) or choose another --address"
            )
        # Short: Ray puts unix sockets under the temp dir and those paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix=f"em-ray-{self.gcs_port}-")
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        # OMP_NUM_THREADS=1, Ray on loopback, no usage stats, no token auth: settings.RAY_HEAD_ENV says why.
        env = settings.child_env(
            {
                **self.env,
                "EXPERTMESH_BIND_HOST": settings.inherited("EXPERTMESH_BIND_HOST") or self.host,
                "EXPERTMESH_REPLICA_PORTS": f"{self.replica_ports[0]}-{self.replica_ports[1]}",
                "EXPERTMESH_DIRECTORY": self.directory_address,
            },
            forced=settings.RAY_HEAD_ENV,
        )
        # Ports given to this pool (maybe chosen by another process with free_port, not bound yet) stay clear of
        # the ones drawn here.
        taken = {self.gcs_port, self.dashboard_port, self.metrics_port, self.directory_port}
        cmd = [
            _ray_bin(),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            self.host,
            "--port",
            str(self.gcs_port),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            self.host,
            "--dashboard-port",
            str(self.dashboard_port),
            "--dashboard-agent-listen-port",
            str(free_port(avoid=taken)),
            "--dashboard-agent-grpc-port",
            str(free_port(avoid=taken)),
            "--runtime-env-agent-port",
            str(free_port(avoid=taken)),
            "--metrics-export-port",
            str(self.metrics_port),
            "--node-manager-port",
            str(free_port(avoid=taken)),
            "--object-manager-port",
            str(free_port(avoid=taken)),
            "--ray-client-server-port",
            str(free_port(avoid=taken)),
            "--num-cpus",
            str(self.num_cpus),
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--temp-dir",
            self.temp_dir,
        ]
        with open(self.log_path, "wb") as log:
            cpus = self.cpus
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        self._write_state()
        self._wait_http(f"{self.dashboard_url}/api/version", timeout=120)

    def _write_state(self) -> None:
        assert self.process is not None, "the state is written once `ray start` is running"
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps(
                {
                    "session_id": self.process.pid,
                    "gcs_address": self.gcs_address,
                    "dashboard": self.dashboard_url,
                    "directory": self.directory_address,
                    "temp_dir": self.temp_dir,
                    "model": self.model,
                    "started_unix": time.time(),
                },
                indent=2,
            )
        )

    def _wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; log:\n{self._log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{url} did not answer within {timeout} s; log:\n{self._log_tail()}")

    def _log_tail(self, n: int = 40) -> str:
        """The end of `ray start`'s output and of the dashboard's log (the usual suspects when start-up fails)."""
        if self.temp_dir is None:
            return ""
        tails = []
        for path in [self.log_path, *sorted(Path(self.temp_dir).glob("session_*/logs/dashboard.log"))]:
            if path is not None and path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                tails.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(tails)

    def deploy(self) -> None:
        """PUT the Serve config (like `serve deploy`); re-deploying a changed config updates only what changed."""
        # The directory admits only the plan's keys once it knows the plan: tell it before replicas of a new plan
        # register. At the first deploy it is not up yet; wait_ready sends the plan once it answers.
        self.plan_sent = send_plan(self.directory_address, self.plan)
        put_serve_config(self.dashboard_url, self.serve_config())

    def apply(self, plan: PlacementPlan, replicas: dict[str, int]) -> None:
        """Deploy `plan` with `replicas[group]` replicas per group (declarative; returns once Serve accepted it).

        Each group is its own Serve application whose args are only its name and keys: other counts change those
        groups in place, a new group starts its replicas, a removed group stops its own; no other replica
        restarts (serve_config.py says why)."""
        check_apply(plan, replicas, self.info)
        self.plan = plan
        self.replica_counts = {name: int(n) for name, n in replicas.items()}
        self.deploy()

    def serve_status(self) -> dict:
        return get_serve_status(self.dashboard_url)

    def wait_ready(self, timeout: float | None = None) -> expert_pb2.DirectorySnapshot:
        """Wait until every (layer, expert) of the plan is served; fail fast if Serve reports a failed deploy."""
        timeout = timeout or self.ready_timeout
        deadline = time.monotonic() + timeout
        with DirectoryClient(self.directory_address) as client:
            while True:
                apps = self.serve_status().get("applications", {})
                for name, app in apps.items():
                    if app.get("status") == "DEPLOY_FAILED":
                        # The application's message only names the deployments; theirs says why (the replica's error).
                        why = "; ".join(
                            f"{d}: {info.get('message', '')}"
                            for d, info in app.get("deployments", {}).items()
                            if info.get("message")
                        )
                        raise RuntimeError(
                            f"Serve could not deploy {name}: {app.get('message', '')} {why}"[:3000]
                            + f"\nlog:\n{self._log_tail()}"
                        )
                try:
                    snapshot = client.snapshot(timeout=2)
                    if not self.plan_sent:
                        self.plan_sent = send_plan(self.directory_address, self.plan)
                    served, wanted = coverage(snapshot, self.plan)
                    if served == wanted:
                        return snapshot
                except Exception:  # directory not up yet
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pool not ready within {timeout} s; Serve says: {json.dumps(apps)[:3000]}")
                time.sleep(0.5)

    def client(self) -> DirectoryClient:
        return DirectoryClient(self.directory_address)

    def stop(self) -> None:
        if self.process is not None:
            stop_session(self.process.pid)
            self.process.wait(timeout=10)
            self.process = None
        if self.state_file.exists():
            self.state_file.unlink()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count, a listener does
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# -- CLI --------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a local Ray cluster with the expert pool and print the directory")
    up.add_argument("--model", required=True, help="checkpoint directory (Hugging Face MoE, safetensors)")
    up.add_argument(
        "--plan", help="placement plan YAML (default: whole MoE layers packed into groups of at most 2 GiB of experts)"
    )
    up.add_argument(
        "--address",
        default=f"127.0.0.1:{settings.RAY_GCS_PORT}",
        help="GCS address of the local Ray cluster to start (loopback only)",
    )
    up.add_argument("--dashboard-port", type=int, default=settings.RAY_DASHBOARD_PORT, help="0 = any free port")
    up.add_argument("--directory-port", type=int, default=settings.DIRECTORY_PORT, help="0 = any free port")
    up.add_argument(
        "--metrics-port",
        type=int,
        default=settings.REPLICA_METRICS_PORT,
        help="Prometheus metrics of the pool (Ray's metrics export port)",
    )
    up.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for every expert to register")
    add_replica_flags(up)
    down = sub.add_parser("down", help="stop the local Ray cluster started by `experts up`")
    down.add_argument("--address", default=f"127.0.0.1:{settings.RAY_GCS_PORT}")


def _gcs_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise SystemExit(f"--address must be 127.0.0.1:PORT (the pool runs on loopback), got {address!r}")
    return int(port)


def run(args: argparse.Namespace) -> int:
    gcs_port = _gcs_port(args.address)
    if args.action == "up":
        plan = load_plan(args.plan) if args.plan else None
        pool = LocalPool(
            args.model,
            plan,
            gcs_port=gcs_port,
            dashboard_port=args.dashboard_port,
            directory_port=args.directory_port,
            metrics_port=args.metrics_port,
            ready_timeout=args.timeout,
            replica=replica_settings_from_args(args),
        )
        pool.start()
        with pool.client() as client:
            print(format_directory(client.snapshot()))
        print(
            f"\nRay: {pool.gcs_address}  dashboard: {pool.dashboard_url}  directory: {pool.directory_address}  "
            f"metrics: http://127.0.0.1:{pool.metrics_port}/metrics"
        )
        print(f"stop with: expertmesh experts down --address {pool.gcs_address}")
        return 0
    state_file = STATE_DIR / f"pool-{gcs_port}.json"
    if not state_file.exists():
        print(f"no pool recorded for {args.address} ({state_file} missing)", file=sys.stderr)
        return 1
    state = json.loads(state_file.read_text())
    stop_session(int(state["session_id"]))
    state_file.unlink()
    if state.get("temp_dir"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    print(f"stopped the expert pool at {state['gcs_address']}")
    return 0
