"""`expertmesh experts up|down` and `LocalPool`: the expert pool on a private local Ray cluster, or on an existing one.

`up` starts a Ray head on loopback with non-default ports (`ray start --head --block` in a session of its
own, so `down` can stop exactly its processes and nothing else on the machine), deploys the Serve config from
`serve_config.build_serve_config` through the dashboard's REST API (what `serve deploy` and KubeRay do), waits
until every (layer, expert) of the plan is in the directory, and prints the directory. `down` stops the
cluster recorded in the state file (~/.cache/expertmesh/pool-<gcs port>.json).

`up --ray-address ADDR` (or EXPERTMESH_RAY_ADDRESS) starts no Ray at all: it deploys the same Serve applications
on the Ray cluster at ADDR (its GCS address host:port, or its dashboard's http://host:8265), with the directory
on that cluster's head node (so it is reached at the head's address), keeps every other Serve application of
that cluster as it is, and `down --ray-address ADDR` removes only expertmesh's applications: the cluster is
never stopped. The nodes' own environment is the replicas' (the cluster token, EXPERTMESH_BIND_HOST /
_ADVERTISE_HOST / _REPLICA_PORTS where the defaults do not fit: docs/deploy.md). Where the cluster has several
nodes, replicas are spread over them (serve_config.py says how).

    expertmesh experts up --model DIR [--plan FILE] [--address 127.0.0.1:6391] [--directory-port N]
    expertmesh experts up --model DIR --ray-address 10.0.0.5:6379
    expertmesh experts down [--address 127.0.0.1:6391 | --ray-address 10.0.0.5:6379]

`LocalPool(model, plan, ...)` is the same as a context manager (tests, `expertmesh serve`, benchmarks), and
`RayNode` one `ray start` of ours (the private head; tests add nodes to it).
"""

from __future__ import annotations

import argparse
import json
import logging
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
from urllib.parse import urlparse

import httpx

from expertmesh.control.serve_api import check_apply, get_serve_status, is_ours, put_serve_config, remove_ours
from expertmesh.control.serve_config import (
    DIRECTORY_APP,
    NODE_ID_LABEL,
    ZONE_LABEL,
    assign_zones,
    build_serve_config,
)
from expertmesh.core import settings
from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import PlacementPlan, default_plan, load_plan
from expertmesh.core.protos import expert_pb2
from expertmesh.core.settings import ReplicaSettings, add_replica_flags, free_port, replica_settings_from_args
from expertmesh.discovery.directory import DirectoryClient, endpoints_by_key, send_plan

log = logging.getLogger("expertmesh.pool")

STATE_DIR = settings.cache_dir()
# The cluster credential's variables (core/auth.py): never written into a Serve config (the dashboard shows it)
AUTH_VARS = tuple(name for name in settings.ENV_VARS if name.startswith("EXPERTMESH_CLUSTER_TOKEN"))
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


class RayNode:
    """One `ray start --block` of ours on loopback, in a session of its own: the private pool's head, or (tests) a
    node joining a head. Every process of the node (raylet, agents, workers, and for a head GCS and dashboard)
    descends from it, so `stop` and `kill` reach exactly this node's processes and nothing else on the machine.

    head: the GCS on `gcs_port` and the dashboard on `dashboard_port`; else joins the head at `join`
    ("127.0.0.1:PORT"). Every other port Ray opens is drawn here (free_port), away from `avoid`."""

    def __init__(
        self,
        *,
        join: str | None = None,
        gcs_port: int = 0,
        dashboard_port: int = 0,
        metrics_port: int = 0,
        num_cpus: float = 64,
        object_store_bytes: int = 0,
        resources: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        avoid: set[int] | None = None,
        host: str = "127.0.0.1",
    ):
        self.head = join is None
        self.host = host
        self.join = join
        self.gcs_port = gcs_port or (free_port() if self.head else 0)
        self.dashboard_port = dashboard_port or (free_port() if self.head else 0)
        self.metrics_port = metrics_port or free_port()
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes or OBJECT_STORE_BYTES
        self.resources = dict(resources or {})
        self.labels = dict(labels or {})
        self.env = dict(env or {})
        self.cpus = set(cpus) if cpus else None
        self.avoid = set(avoid or ()) | {p for p in (self.gcs_port, self.dashboard_port, self.metrics_port) if p}
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.log_path: Path | None = None

    @property
    def gcs_address(self) -> str:
        return self.join or f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    def command(self) -> list[str]:
        def port() -> str:
            return str(free_port(avoid=self.avoid))

        cmd = [_ray_bin(), "start", "--block", "--disable-usage-stats", "--node-ip-address", self.host]
        if self.head:
            cmd += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true"]
            cmd += ["--dashboard-host", self.host, "--dashboard-port", str(self.dashboard_port)]
            cmd += ["--ray-client-server-port", port()]
        else:
            cmd += ["--address", self.gcs_address]
        cmd += ["--dashboard-agent-listen-port", port(), "--dashboard-agent-grpc-port", port()]
        cmd += ["--runtime-env-agent-port", port(), "--metrics-export-port", str(self.metrics_port)]
        cmd += ["--node-manager-port", port(), "--object-manager-port", port()]
        cmd += ["--num-cpus", str(self.num_cpus), "--object-store-memory", str(self.object_store_bytes)]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        if self.labels:
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in self.labels.items())]
        return [*cmd, "--temp-dir", str(self.temp_dir)]

    def start(self) -> RayNode:
        # Short: Ray puts unix sockets under the temp dir and those paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix=f"em-ray-{self.gcs_port or 'node'}-")
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        # OMP_NUM_THREADS=1, Ray on loopback, no usage stats, no token auth: settings.RAY_HEAD_ENV says why.
        env = settings.child_env(self.env, forced=settings.RAY_HEAD_ENV)
        if not self.head:  # `ray start --address` refuses to join a head unless multi-node clusters are enabled
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        with open(self.log_path, "wb") as log:
            cpus = self.cpus
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        return self

    def pids(self) -> list[int]:
        return _session_pids(self.process.pid) if self.process is not None else []

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL every process of this node at once (a machine lost): raylet, agents, workers."""
        if self.process is not None:
            _signal_all(self.pids(), signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            stop_session(self.process.pid)
            self.process.wait(timeout=10)
            self.process = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def log_tail(self, n: int = 40) -> str:
        """The end of `ray start`'s output and of the dashboard's log (the usual suspects when start-up fails)."""
        if self.temp_dir is None:
            return ""
        tails = []
        for path in [self.log_path, *sorted(Path(self.temp_dir).glob("session_*/logs/dashboard.log"))]:
            if path is not None and path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                tails.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(tails)


def resolve_cluster(address: str) -> tuple[str, str]:
    """(head host, dashboard URL) of a running Ray cluster given by its GCS address (host:port) or its dashboard's
    URL (http://host:8265). A GCS address is asked for the dashboard's (as `ray job submit` does)."""
    if "://" in address:
        parsed = urlparse(address)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--ray-address {address!r}: a GCS address host:port or a dashboard URL http://host:port")
        return parsed.hostname, address.rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r}: a GCS address host:port or a dashboard URL http://host:port")
    try:  # a plain connect first: Ray's GCS client takes ~40 s to give up on an address where nothing listens
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise RuntimeError(f"no Ray cluster answers at {address}: {exc}") from None
    from ray._private.utils import internal_kv_get_with_retry
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # a compiled module without stubs

    try:
        raw = internal_kv_get_with_retry(GcsClient(address=address), "dashboard", b"dashboard", num_retries=3)
    except Exception as exc:  # noqa: BLE001 - Ray's RpcError / ConnectionError: not a Ray GCS, or no dashboard
        raise RuntimeError(f"no Ray cluster answers at {address} (or it runs no dashboard): {exc}") from None
    dash_host, _, dash_port = raw.decode().rpartition(":")
    if dash_host in ("", "0.0.0.0", "::", "[::]"):  # bound to every address: reach it where the GCS is
        dash_host = host
    return host, f"http://{dash_host}:{dash_port}"


def cluster_zones(dashboard_url: str, num_cpus: float, num_gpus: float = 0) -> tuple[str, list[str]]:
    """(node label, its values) naming the zones of the cluster's live nodes that can host a replica: the nodes'
    `expertmesh.io/zone` label where some node has one, else each node its own zone (Ray's node-id label)."""
    from ray.util.state import list_nodes

    nodes = [
        n
        for n in list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
        if n.resources_total.get("CPU", 0) >= num_cpus and n.resources_total.get("GPU", 0) >= num_gpus
    ]
    label = ZONE_LABEL if any(ZONE_LABEL in (n.labels or {}) for n in nodes) else NODE_ID_LABEL
    values = {(n.labels or {}).get(label) or (n.node_id if label == NODE_ID_LABEL else None) for n in nodes}
    return label, sorted(v for v in values if v)


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
    """The expert pool on a private single-node Ray cluster bound to loopback, or (`ray_address`) on a running Ray
    cluster that is not ours: attached, it starts and stops no Ray process, only its own Serve applications."""

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
        ray_address: str | None = None,
    ):
        """cpus: the cores every process of the pool may run on (Ray's head, the directory, every replica: they all
        descend from `ray start` and inherit its affinity); None = any.
        ray_address: a running Ray cluster (GCS host:port or dashboard http://host:port) to deploy on instead of
        starting one; then gcs_port, dashboard_port, metrics_port, num_cpus and cpus are not used (the cluster's
        own)."""
        self.model = str(Path(model).resolve())
        self.ray_address = ray_address or None
        if self.ray_address and cpus:
            raise ValueError("cpus pins the pool's own Ray; the nodes of the cluster at ray_address run the pool")
        self.cpus = set(cpus) if cpus else None
        self.info = read_moe_info(self.model)
        self.plan = plan or default_plan(self.info)
        self.plan.check_covers(self.info)
        self.host = "127.0.0.1"  # attached: the head's host, once resolved (start)
        # 0 = any free port (tests, benchmarks, a second pool beside the default one)
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.directory_port = directory_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.replica_ports_given = replica_ports is not None
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
        self.node: RayNode | None = None  # the private cluster's head (None when attached)
        self._dashboard_url: str | None = None  # attached: the cluster's dashboard (resolved at start)
        # Attached to a cluster of several nodes: the zone each group's replicas prefer (serve_config.assign_zones),
        # given once per group and kept while it runs (a change of actor options restarts a group's replicas).
        self.zone_label: str | None = None
        self.zones: dict[str, str] = {}
        self.deployed = False  # whether this pool PUT its applications (attached: what `stop` removes again)

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
    def attached(self) -> bool:
        return self.ray_address is not None

    @property
    def process(self) -> subprocess.Popen | None:
        """`ray start` of the private cluster (None when attached or stopped)."""
        return self.node.process if self.node is not None else None

    @property
    def directory_address(self) -> str:
        return f"{self.host}:{self.directory_port}"

    @property
    def gcs_address(self) -> str:
        return self.ray_address if self.attached else f"{self.host}:{self.gcs_port}"  # type: ignore[return-value]

    @property
    def dashboard_url(self) -> str:
        if self.attached:
            if self._dashboard_url is None:
                self.host, self._dashboard_url = resolve_cluster(self.ray_address)  # type: ignore[arg-type]
            return self._dashboard_url
        return f"http://{self.host}:{self.dashboard_port}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalPool:
        try:
            if self.attached:
                self.attach()
            else:
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
            # the directory is published at the head's address: on a cluster of several nodes it must run there
            directory_on_head=self.attached,
            zones=self.zones,
            zone_label=self.zone_label or ZONE_LABEL,
            env_vars=self._attached_env() if self.attached else None,
        )
        # The data plane is each replica's own gRPC server: no Serve HTTP/gRPC proxy at all. (On a cluster where
        # Serve already runs, Serve keeps its own proxies and HTTP options and only logs the difference.)
        config["proxy_location"] = "Disabled"
        config["http_options"] = {"host": self.host, "port": free_port()}
        return config

    def _attached_env(self) -> dict[str, str]:
        """What an attached pool's applications get on top of their nodes' environment: the registered variables
        given to the pool (`env`; `expertmesh serve --env`), and the replica port range when one was chosen. Never
        the cluster credential: a Serve config is shown by the dashboard to anyone who can reach it; the nodes must
        carry the token in their own environment (docs/deploy.md)."""
        out = {k: v for k, v in self.env.items() if k not in AUTH_VARS}
        if self.replica_ports_given:
            out["EXPERTMESH_REPLICA_PORTS"] = f"{self.replica_ports[0]}-{self.replica_ports[1]}"
        return out

    def attach(self) -> None:
        """Check that the cluster at `ray_address` answers (its dashboard: Serve's REST API) and that no other
        expertmesh pool runs on it (Serve application names are fixed, one pool per cluster)."""
        self.host, self._dashboard_url = resolve_cluster(self.ray_address)  # type: ignore[arg-type]
        status = get_serve_status(self._dashboard_url)
        if (directory := (status.get("applications") or {}).get(DIRECTORY_APP)) is not None:
            theirs = ((directory.get("deployed_app_config") or {}).get("args") or {}).get("directory")
            if theirs != self.directory_address:
                raise RuntimeError(
                    f"the Ray cluster at {self.ray_address} already runs an expertmesh pool (directory {theirs}); "
                    f"remove it first: expertmesh experts down --ray-address {self.ray_address}"
                )
        for name in AUTH_VARS:
            if name in self.env:
                log.warning(
                    "%s is not passed to a cluster expertmesh did not start: its nodes' environment must carry it", name
                )

    def place(self) -> None:
        """Attached: give every new one-replica group a zone of the cluster's live nodes (serve_config.py)."""
        if not self.attached:
            return
        label, values = cluster_zones(self.dashboard_url, REPLICA_LOGICAL_CPUS)
        if self.zone_label is not None and label != self.zone_label:
            values = []  # the cluster's zones are named otherwise now: keep the zones given, place no new group
        self.zones = assign_zones(self.plan, values, replicas=self.replica_counts, kept=self.zones)
        if self.zones:
            self.zone_label = self.zone_label or label

    def start_ray(self) -> None:
        if _port_in_use(self.host, self.gcs_port):
            raise RuntimeError(
                f"port {self.gcs_port} is taken: is a pool already up? (expertmesh experts down "
                f"--address {self.gcs_address}) or choose another --address"
            )
        # Ports given to this pool (maybe chosen by another process with free_port, not bound yet) stay clear of
        # the ones drawn here.
        self.node = RayNode(
            gcs_port=self.gcs_port,
            dashboard_port=self.dashboard_port,
            metrics_port=self.metrics_port,
            num_cpus=self.num_cpus,
            env={
                **self.env,
                "EXPERTMESH_BIND_HOST": settings.inherited("EXPERTMESH_BIND_HOST") or self.host,
                "EXPERTMESH_REPLICA_PORTS": f"{self.replica_ports[0]}-{self.replica_ports[1]}",
                "EXPERTMESH_DIRECTORY": self.directory_address,
            },
            cpus=self.cpus,
            avoid={self.directory_port},
            host=self.host,
        ).start()
        self._write_state()
        self._wait_http(f"{self.dashboard_url}/api/version", timeout=120)

    @property
    def temp_dir(self) -> str | None:
        return self.node.temp_dir if self.node is not None else None

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
        return self.node.log_tail(n) if self.node is not None else ""

    def deploy(self) -> None:
        """PUT the Serve config (like `serve deploy`); re-deploying a changed config updates only what changed.
        Attached, the cluster's other applications are sent back unchanged (serve_api.put_serve_config)."""
        # The directory admits only the plan's keys once it knows the plan: tell it before replicas of a new plan
        # register. At the first deploy it is not up yet; wait_ready sends the plan once it answers.
        self.plan_sent = send_plan(self.directory_address, self.plan)
        self.place()
        self.deployed = True  # from here on, stop() removes what this PUT may have started
        put_serve_config(self.dashboard_url, self.serve_config(), keep_others=self.attached)

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
                apps = {k: v for k, v in self.serve_status().get("applications", {}).items() if is_ours(k)}
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
        if self.attached:
            # Only what this pool deployed goes; the cluster and everything else on it stay.
            if not self.deployed:
                return
            self.deployed = False
            try:
                left = remove_ours(self.dashboard_url)
                if left:
                    log.warning("Serve had not removed %s from %s yet", left, self.ray_address)
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                log.warning("could not remove the expert pool's applications from %s: %s", self.ray_address, exc)
            return
        if self.node is not None:
            self.node.stop()
            self.node = None
        if self.state_file.exists():
            self.state_file.unlink()


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count, a listener does
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# -- CLI --------------------------------------------------------------------------------------------------------
def add_ray_address_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """--ray-address: a running Ray cluster for the pool instead of a private one (default EXPERTMESH_RAY_ADDRESS)."""
    parser.add_argument(
        "--ray-address",
        default=settings.ray_address(),
        metavar="ADDR",
        help=f"{what} (its GCS host:port or dashboard http://host:8265; default $EXPERTMESH_RAY_ADDRESS; "
        "unset: a private Ray cluster on loopback)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser(
        "up", help="start the expert pool (on a local Ray cluster, or one given) and print the directory"
    )
    up.add_argument("--model", required=True, help="checkpoint directory (Hugging Face MoE, safetensors)")
    up.add_argument(
        "--plan", help="placement plan YAML (default: whole MoE layers packed into groups of at most 2 GiB of experts)"
    )
    up.add_argument(
        "--address",
        default=f"127.0.0.1:{settings.RAY_GCS_PORT}",
        help="GCS address of the local Ray cluster to start (loopback only)",
    )
    add_ray_address_flag(up, "deploy the pool on this running Ray cluster instead of starting one")
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
    down = sub.add_parser(
        "down", help="stop the local Ray cluster started by `experts up`, or remove the pool from a cluster given"
    )
    down.add_argument("--address", default=f"127.0.0.1:{settings.RAY_GCS_PORT}")
    add_ray_address_flag(down, "remove the pool's Serve applications from this Ray cluster (the cluster stays up)")


def _gcs_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise SystemExit(f"--address must be 127.0.0.1:PORT (the pool runs on loopback), got {address!r}")
    return int(port)


def run(args: argparse.Namespace) -> int:
    if args.action == "down" and args.ray_address:
        _host, dashboard = resolve_cluster(args.ray_address)
        left = remove_ours(dashboard)
        if left:
            print(f"Serve is still removing {left} from {args.ray_address}", file=sys.stderr)
            return 1
        print(f"removed the expert pool from the Ray cluster at {args.ray_address} (the cluster keeps running)")
        return 0
    gcs_port = 0 if args.ray_address else _gcs_port(args.address)
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
            ray_address=args.ray_address,
        )
        pool.start()
        with pool.client() as client:
            print(format_directory(client.snapshot()))
        if pool.attached:
            print(f"\nRay: {pool.ray_address}  dashboard: {pool.dashboard_url}  directory: {pool.directory_address}")
            print(f"remove with: expertmesh experts down --ray-address {pool.ray_address}")
            return 0
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
