"""Ray Serve's REST API as the control plane uses it: deploy a whole config, read what runs, check a change.

The same calls `serve deploy` and KubeRay make (PUT/GET `/api/serve/applications/` on the Ray dashboard); used by
`LocalPool` (the local stack) and by the in-cluster controller (`control/controller_service.py`).

A PUT is declarative for every application deployed by config: Serve deletes each one the new config leaves out.
On a Ray cluster that is not expertmesh's own (`expertmesh serve --ray-address`) other people's applications run
beside the pool's, so `put_serve_config(..., keep_others=True)` sends them back unchanged with the pool's, and
`remove_ours` takes the pool's applications away and leaves theirs. Applications deployed from Python
(`serve.run`) are never deleted by a PUT and need no such care.
"""

from __future__ import annotations

import time

import httpx

from expertmesh.control.serve_config import DIRECTORY_APP, GROUP_APP_PREFIX
from expertmesh.core.plan import PlacementPlan


def is_ours(app_name: str) -> bool:
    """Whether a Serve application is one the expert pool deploys (the directory, a group)."""
    return app_name == DIRECTORY_APP or app_name.startswith(GROUP_APP_PREFIX)


def put_serve_config(dashboard_url: str, config: dict, timeout: float = 60, *, keep_others: bool = False) -> None:
    """PUT a whole Serve config to a Ray dashboard (what `serve deploy` and KubeRay do); Serve updates only what
    changed. Used by `LocalPool.deploy` and by the in-cluster controller (controller_service.py).

    keep_others: the config deployed for every application that is not the pool's (declarative ones: those a
    PUT would delete) is sent along unchanged, so they keep running as they are."""
    if keep_others:
        config = {**config, "applications": [*config["applications"], *others_configs(dashboard_url)]}
    reply = httpx.put(f"{dashboard_url.rstrip('/')}/api/serve/applications/", json=config, timeout=timeout)
    if reply.status_code != 200:
        raise RuntimeError(f"serve deploy failed ({reply.status_code}): {reply.text[:2000]}")


def get_serve_status(dashboard_url: str, timeout: float = 10) -> dict:
    """The dashboard's Serve instance details (`applications` -> status, deployed_app_config, ...)."""
    reply = httpx.get(f"{dashboard_url.rstrip('/')}/api/serve/applications/", timeout=timeout)
    reply.raise_for_status()
    return reply.json()


def others_configs(dashboard_url: str) -> list[dict]:
    """The deployed configs of the cluster's declarative applications that are not the pool's."""
    apps = get_serve_status(dashboard_url).get("applications") or {}
    return [
        app["deployed_app_config"]
        for name, app in apps.items()
        if not is_ours(name)
        and app.get("source") != "imperative"
        and app.get("deployed_app_config")
        and app.get("status") != "DELETING"
    ]


def remove_ours(dashboard_url: str, timeout: float = 60) -> list[str]:
    """Delete the pool's applications from a Ray cluster and wait (up to `timeout`) until Serve has stopped them;
    every other application keeps running as deployed. Returns the pool's applications still there at the
    deadline (none when all went)."""
    if not any(is_ours(name) for name in get_serve_status(dashboard_url).get("applications") or {}):
        return []
    # proxy_location as the pool deploys it: the PUT starts nothing new on a cluster where Serve already runs
    put_serve_config(dashboard_url, {"proxy_location": "Disabled", "applications": others_configs(dashboard_url)})
    deadline = time.monotonic() + timeout
    while True:
        left = [name for name in get_serve_status(dashboard_url).get("applications") or {} if is_ours(name)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def check_apply(plan: PlacementPlan, replicas: dict[str, int], info) -> None:
    """What `apply(plan, replicas)` refuses: a plan missing some (layer, expert), counts for unknown groups."""
    plan.check_covers(info)
    unknown = sorted(set(replicas) - {g.name for g in plan.groups})
    if unknown:
        raise ValueError(f"replica counts for groups not in the plan: {unknown}")
