"""Ray Serve's REST API as the control plane uses it: deploy a whole config, read what runs, check a change.

The same calls `serve deploy` and KubeRay make (PUT/GET `/api/serve/applications/` on the Ray dashboard); used by
`LocalPool` (the local stack) and by the in-cluster controller (`control/controller_service.py`).
"""

from __future__ import annotations

import httpx

from expertmesh.core.plan import PlacementPlan


def put_serve_config(dashboard_url: str, config: dict, timeout: float = 60) -> None:
    """PUT a whole Serve config to a Ray dashboard (what `serve deploy` and KubeRay do); Serve updates only what
    changed. Used by `LocalPool.deploy` and by the in-cluster controller (controller_service.py)."""
    reply = httpx.put(f"{dashboard_url.rstrip('/')}/api/serve/applications/", json=config, timeout=timeout)
    if reply.status_code != 200:
        raise RuntimeError(f"serve deploy failed ({reply.status_code}): {reply.text[:2000]}")


def get_serve_status(dashboard_url: str, timeout: float = 10) -> dict:
    """The dashboard's Serve instance details (`applications` -> status, deployed_app_config, ...)."""
    reply = httpx.get(f"{dashboard_url.rstrip('/')}/api/serve/applications/", timeout=timeout)
    reply.raise_for_status()
    return reply.json()


def check_apply(plan: PlacementPlan, replicas: dict[str, int], info) -> None:
    """What `apply(plan, replicas)` refuses: a plan missing some (layer, expert), counts for unknown groups."""
    plan.check_covers(info)
    unknown = sorted(set(replicas) - {g.name for g in plan.groups})
    if unknown:
        raise ValueError(f"replica counts for groups not in the plan: {unknown}")
