"""The expert pool on a Ray cluster that already runs, across its nodes (issue 18 item 6).

Placement (no Ray): serve_config.assign_zones keeps the groups that hold copies of each other's experts in different
zones and never moves a group it placed; the rendered Serve config (label selector with a fallback, the directory on
the head, the pool's environment per application) is what Ray Serve's own schema accepts, and readable YAML.

Two nodes on this one machine (slow): a Ray head and a second node joined to it, each a `ray start` of the test's
own on its own loopback address (127.0.0.2, 127.0.0.3: as two machines, each node's replicas bind and advertise its
address), labelled zone a and zone b, carrying the cluster token in their environment as an operator would; another
user's Serve application already runs there. `expertmesh serve --ray-address` attaches to it with a plan that puts
every expert on two holders: layers 0-1 in one group of two replicas (Serve spreads them), layers 2-3 in two
one-replica groups holding the same experts (zones a and b). Then:

- the pool started no Ray of its own, the other user's application still runs, and every expert has a holder on
  each node;
- 64 greedy streams run while the second node is SIGKILLed (its raylet, agents and replica processes at once):
  every stream completes with the text of an undisturbed run, the dead endpoints leave the directory within a few
  seconds, Serve brings the lost replicas back on the node left, and the stack serves the same text again;
- Ctrl-C stops the stack and removes only its Serve applications: the cluster and the other user's application
  keep running (and `expertmesh experts down --ray-address` then finds nothing of the pool's to remove).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import descendants, free_port, running_serve

from expertmesh.control.serve_api import get_serve_status, put_serve_config
from expertmesh.control.serve_config import (
    HEAD_NODE_RESOURCE,
    ZONE_LABEL,
    assign_zones,
    build_serve_config,
)
from expertmesh.core.plan import ExpertGroup, PlacementPlan
from expertmesh.experts.pool import RayNode, resolve_cluster

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
ALL = list(range(8))  # the demo model: 4 MoE layers of 8 experts


def _plan() -> PlacementPlan:
    """Every expert on two holders: layers 0-1 as one group of two replicas, layers 2-3 as two one-replica groups
    holding the same experts (planner.add_redundancy's two forms of a second holder)."""
    return PlacementPlan(
        groups=[
            ExpertGroup(name="l0-1", keys={0: ALL, 1: ALL}, min_replicas=2, max_replicas=2),
            ExpertGroup(name="l2-3-a", keys={2: ALL, 3: ALL}),
            ExpertGroup(name="l2-3-b", keys={2: ALL, 3: ALL}),
        ]
    )


# -- placement, no Ray ------------------------------------------------------------------------------------------


def test_copies_prefer_different_zones_and_a_placed_group_never_moves():
    plan = _plan()
    zones = assign_zones(plan, ["a", "b"])
    # the copies apart; the two-replica group left to Serve's SPREAD (a zone would pull its replicas together)
    assert zones == {"l2-3-a": "a", "l2-3-b": "b"}
    assert assign_zones(plan, ["a"]) == {}  # one zone: nothing to spread over
    # a group placed before keeps its zone even where another would now be better, and a new group avoids it
    grown = PlacementPlan(groups=[*plan.groups, ExpertGroup(name="l2-3-c", keys={2: ALL})])
    again = assign_zones(grown, ["a", "b", "c"], kept={"l2-3-a": "b", "l2-3-b": "b", "gone": "a"})
    assert again == {"l2-3-a": "b", "l2-3-b": "b", "l2-3-c": "a"}
    # ... and a placed group keeps its zone when its count grows (a change of actor options restarts it)
    assert assign_zones(plan, ["a", "b"], replicas={"l2-3-a": 3}, kept=zones) == zones
    assert assign_zones(plan, ["a", "b"], replicas={"l2-3-a": 3}) == {"l2-3-b": "a"}
    # a zone the plan pins stands, and the other copy avoids it
    pinned = PlacementPlan(groups=[plan.groups[0], plan.groups[1].model_copy(update={"zone": "a"}), plan.groups[2]])
    assert assign_zones(pinned, ["a", "b"]) == {"l2-3-a": "a", "l2-3-b": "b"}
    pinned = PlacementPlan(groups=[plan.groups[0], plan.groups[1], plan.groups[2].model_copy(update={"zone": "a"})])
    assert assign_zones(pinned, ["a", "b"]) == {"l2-3-a": "b", "l2-3-b": "a"}


def test_the_serve_config_with_placement_is_readable_and_what_serve_accepts():
    from ray.serve.schema import ServeDeploySchema

    plan = _plan()
    config = build_serve_config(
        plan,
        "/ckpt",
        "127.0.0.2:50071",
        num_cpus=0.25,
        directory_on_head=True,
        zones=assign_zones(plan, ["a", "b"]),
        env_vars={"EXPERTMESH_EXPERT_KERNEL": "torch"},
    )
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema (label selectors, fallback, runtime_env)
    text = yaml.safe_dump(config, sort_keys=False)
    assert "&id" not in text  # no YAML anchors: every application spells out its own options
    apps = {a["name"]: a for a in config["applications"]}
    assert apps["expertmesh-directory"]["deployments"][0]["ray_actor_options"] == {
        "num_cpus": 0,
        "resources": {HEAD_NODE_RESOURCE: 0.001},
    }
    options = {name: app["deployments"][0]["ray_actor_options"] for name, app in apps.items()}
    assert options["experts-l0-1"] == {"num_cpus": 0.25}
    assert options["experts-l2-3-b"] == {
        "num_cpus": 0.25,
        "label_selector": {ZONE_LABEL: "b"},
        "fallback_strategy": [{"label_selector": {ZONE_LABEL: "!b"}}],
    }
    assert all(app["runtime_env"] == {"env_vars": {"EXPERTMESH_EXPERT_KERNEL": "torch"}} for app in apps.values())
    # the placement is not in any group's args: changing it could never be mistaken for a new group
    assert all("zone" not in json.dumps(app["args"]) for app in apps.values())


def test_a_ray_address_is_a_gcs_address_or_a_dashboard_url():
    assert resolve_cluster("http://10.1.2.3:8265/") == ("10.1.2.3", "http://10.1.2.3:8265")
    for bad in ("ray://10.1.2.3:10001", "10.1.2.3", "http://:8265"):
        with pytest.raises(ValueError):
            resolve_cluster(bad)
    with pytest.raises(RuntimeError, match="no Ray cluster answers"):
        resolve_cluster(f"127.0.0.1:{free_port()}")


# -- two nodes on one machine ----------------------------------------------------------------------------------

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
KEY = "multinode-test-key"
FOREIGN_APP = """
from ray import serve


@serve.deployment
class Hello:
    def __call__(self, request):
        return "hello"


app = Hello.bind()
"""
FOREIGN = {
    "name": "someone-else",
    "route_prefix": None,
    "import_path": "foreign_app:app",
    "deployments": [{"name": "Hello", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}],
}


def _wait(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not there yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(every)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (zone a) and a second node (zone b) of the test's own, with another user's Serve application."""
    from ray.util.state import list_nodes

    work = tmp_path_factory.mktemp("multinode")
    (work / "foreign_app.py").write_text(FOREIGN_APP)
    token = secrets.token_urlsafe(24)
    lo = random.randrange(30000, 32568)
    common = {
        "EXPERTMESH_CLUSTER_TOKEN": token,  # the operator's: every node carries it, as the chart mounts it
        "EXPERTMESH_REPLICA_PORTS": f"{lo}-{lo + 200}",
        "PYTHONPATH": str(work),  # the other user's application's code
    }
    head = RayNode(
        host=HEAD_IP,
        num_cpus=8,
        labels={ZONE_LABEL: "a"},
        # multi-node: the head's GCS must take a node that joins (Ray's loopback-only switch off)
        env={**common, "EXPERTMESH_BIND_HOST": HEAD_IP, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
    )
    worker = None
    credential = pytest.MonkeyPatch()
    credential.setenv("EXPERTMESH_CLUSTER_TOKEN", token)  # this process reads the directory too (core/auth.py)
    try:
        head.start()
        _wait("the head's dashboard", lambda: httpx.get(f"{head.dashboard_url}/api/version").status_code == 200, 120)
        worker = RayNode(
            join=head.gcs_address,
            host=WORKER_IP,
            num_cpus=8,
            resources={"node_b": 1},
            labels={ZONE_LABEL: "b"},
            env={**common, "EXPERTMESH_BIND_HOST": WORKER_IP},
        ).start()
        _wait(
            "two live nodes",
            lambda: len(list_nodes(address=head.dashboard_url, filters=[("state", "=", "ALIVE")])) == 2,
            120,
        )
        put_serve_config(head.dashboard_url, {"proxy_location": "Disabled", "applications": [FOREIGN]})
        _wait("the other user's application", lambda: _app_status(head.dashboard_url, "someone-else") == "RUNNING", 120)
        yield {"head": head, "worker": worker, "token": token, "work": work}
    finally:
        if worker is not None:
            worker.stop()
        head.stop()
        credential.undo()


def _app_status(dashboard: str, name: str) -> str | None:
    return ((get_serve_status(dashboard).get("applications") or {}).get(name) or {}).get("status")


@pytest.fixture(scope="module")
def stack(cluster):
    work = cluster["work"]
    plan = work / "plan.yaml"
    _plan().save(plan)
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "EXPERTMESH_API_KEYS": KEY,
            "EXPERTMESH_CLUSTER_TOKEN": cluster["token"],  # the cluster's own credential
            # the prober every second; no regrouping or scaling of the plan's groups during the test
            "EXPERTMESH_CONTROLLER_SETTINGS": json.dumps(
                {"interval_s": 1.0, "window_s": 4.0, "imbalance_threshold": 1e9, "hot_expert_skew": 1e9}
            ),
            "HOME": str(work),
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm"),
        }
    )
    directory_port = free_port()
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(DEMO), "--plan", str(plan)]
    cmd += ["--ray-address", cluster["head"].gcs_address, "--port", str(port), "--router-port", str(free_port())]
    cmd += ["--directory-port", str(directory_port), "--metrics-port", "0", "--", "--max-model-len", "512"]
    with running_serve(cmd, env, work, 420, "expertmesh serve --ray-address") as (proc, _curl):
        yield {
            "proc": proc,
            "url": f"http://127.0.0.1:{port}",
            "directory": f"{HEAD_IP}:{directory_port}",
            "dashboard": cluster["head"].dashboard_url,
            "cluster": cluster,
            "work": work,
        }


def _snapshot(stack):
    from expertmesh.discovery.directory import DirectoryClient

    with DirectoryClient(stack["directory"]) as client:
        return client.snapshot(timeout=5)


def _hosts_by_key(snapshot) -> dict[tuple[int, int], set[str]]:
    """(layer, expert) -> the node addresses of its live holders (each node's replicas advertise its address)."""
    out: dict[tuple[int, int], set[str]] = {}
    for entry in snapshot.replicas:
        if entry.draining:
            continue
        for key in entry.keys:
            for expert in key.experts:
                out.setdefault((key.layer, expert), set()).add(entry.endpoint.rsplit(":", 1)[0])
    return out


async def _streams(url: str, prompts: list[str], max_tokens: int, on_chunk=None) -> list[dict]:
    async def one(client: httpx.AsyncClient, prompt: str) -> dict:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        body |= {"stream": True}
        text, done = [], False
        headers = {"Authorization": f"Bearer {KEY}"}
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as reply:
            assert reply.status_code == 200, await reply.aread()
            async for line in reply.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: ") :])
                if event.get("choices"):
                    text.append(event["choices"][0]["text"])
                    if on_chunk is not None:
                        on_chunk()
        return {"text": "".join(text), "done": done}

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        return list(await asyncio.gather(*(one(client, p) for p in prompts)))


PROMPTS = [f"Request {i}: what news from Rome, good {['lord', 'queen', 'fool', 'friend'][i % 4]}?" for i in range(64)]


@pytest.mark.slow
def test_the_pool_attaches_and_every_expert_has_a_holder_on_each_node(stack):
    # the stack started no Ray of its own: the cluster's nodes run every replica
    mine = [p for p in descendants(stack["proc"].pid) if "ray start" in _cmdline(p) or "raylet" in _cmdline(p)]
    assert not mine, [_cmdline(p) for p in mine]
    assert _app_status(stack["dashboard"], "someone-else") == "RUNNING"  # its deploy kept the other application
    apps = get_serve_status(stack["dashboard"])["applications"]
    deployed = {n: a["deployed_app_config"]["deployments"][0]["ray_actor_options"] for n, a in apps.items()}
    assert deployed["experts-l2-3-a"]["label_selector"] == {ZONE_LABEL: "a"}
    assert deployed["experts-l2-3-b"]["label_selector"] == {ZONE_LABEL: "b"}
    assert deployed["expertmesh-directory"]["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    hosts = _hosts_by_key(_snapshot(stack))
    assert len(hosts) == 32
    spread = {key: nodes for key, nodes in hosts.items() if nodes != {HEAD_IP, WORKER_IP}}
    assert not spread, f"experts not on both nodes: {spread}"


@pytest.mark.slow
def test_killing_the_second_node_under_64_streams_loses_nothing_and_its_replicas_come_back(stack):
    undisturbed = asyncio.run(_streams(stack["url"], PROMPTS, 24))
    worker = stack["cluster"]["worker"]
    chunks = {"n": 0}
    killed: dict = {}

    def kill_once_streaming():
        chunks["n"] += 1
        if chunks["n"] == 64 * 4 and not killed:  # every stream a few tokens in, on average
            killed["t"] = time.monotonic()
            worker.kill()

    gone_after: dict = {}

    def watch_directory():  # how soon the dead node's endpoints leave the directory
        while "t" not in killed:
            time.sleep(0.01)
        gone_after["s"] = _wait(
            "the dead node's endpoints out of the directory",
            lambda: (
                time.monotonic() - killed["t"]
                if not any(e.endpoint.startswith(WORKER_IP) for e in _snapshot(stack).replicas)
                else None
            ),
            30,
            every=0.1,
        )

    watcher = threading.Thread(target=watch_directory, daemon=True)
    watcher.start()
    disturbed = asyncio.run(_streams(stack["url"], PROMPTS, 24, kill_once_streaming))
    assert killed, "the node was never killed"
    assert all(r["done"] for r in disturbed)
    assert [r["text"] for r in disturbed] == [r["text"] for r in undisturbed]
    watcher.join(timeout=40)
    assert gone_after.get("s", 99) < 5.0, gone_after  # the controller's prober, not the leases
    assert not worker.pids()  # every process of the node is gone

    # Serve brings the lost replicas back on the node left: the plan's four, every expert held twice again
    def replaced():
        snapshot = _snapshot(stack)
        counts = {g: sum(1 for e in snapshot.replicas if e.group == g) for g in ("l0-1", "l2-3-a", "l2-3-b")}
        return snapshot if counts == {"l0-1": 2, "l2-3-a": 1, "l2-3-b": 1} else None

    snapshot = _wait("the lost replicas replaced", replaced, 180, every=1.0)
    replaced_after = time.monotonic() - killed["t"]
    print(
        f"\nnode killed: endpoints out of the directory {gone_after['s']:.2f} s, replicas back {replaced_after:.1f} s"
    )
    assert {e.endpoint.rsplit(":", 1)[0] for e in snapshot.replicas} == {HEAD_IP}
    # A new replica registers in the directory as its server starts; Serve calls its application RUNNING only after
    # the replica's constructor returned and the controller's next reconciliation (measured: UNHEALTHY for a moment
    # after the directory had all four). Wait for Serve's view too, then say exactly what it is.
    running = dict.fromkeys(("experts-l0-1", "experts-l2-3-a", "experts-l2-3-b"), "RUNNING")

    def pool_statuses() -> dict:
        apps = get_serve_status(stack["dashboard"])["applications"]
        return {n: a["status"] for n, a in apps.items() if n.startswith("experts-")}

    try:
        _wait("Serve's pool applications RUNNING again", lambda: pool_statuses() == running, 60, every=1.0)
    except TimeoutError:
        pass  # the assertion below shows what Serve says
    assert pool_statuses() == running
    again = asyncio.run(_streams(stack["url"], PROMPTS[:8], 24))
    assert [r["text"] for r in again] == [r["text"] for r in undisturbed[:8]]


@pytest.mark.slow
def test_ctrl_c_removes_only_the_pools_applications_and_the_cluster_keeps_running(stack):
    import signal

    stack["proc"].send_signal(signal.SIGINT)
    assert stack["proc"].wait(timeout=180) == 0
    head = stack["cluster"]["head"]
    assert head.alive() and head.pids()
    apps = get_serve_status(stack["dashboard"])["applications"]
    assert {n: a["status"] for n, a in apps.items()} == {"someone-else": "RUNNING"}
    # `experts down --ray-address` on a cluster without the pool: nothing to remove, nothing else touched
    down = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "experts", "down", "--ray-address", head.gcs_address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert "the cluster keeps running" in down.stdout
    assert _app_status(stack["dashboard"], "someone-else") == "RUNNING" and head.alive()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
