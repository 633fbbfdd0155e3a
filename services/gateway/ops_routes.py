"""Operations routes of the gateway: GET /health and GET /metrics (Prometheus) — both open, probes and scrapers
carry no keys — and GET /experts (API keys).

- /health: 200 only when every router is up (vLLM's `/health`: its engine is alive) and every (layer, expert) is
  held by a live replica (each router's `/expertmesh/experts`); otherwise 503 with what is wrong, per router. Read
  from `RouterWatch`, which polls the routers every second in the background: a probe never waits on a busy router.
- /experts: routed tokens per (layer, expert) summed over the routers, live replicas from the expert directory,
  the gateway's view of the routers (in flight, up), and the expert controller's plan and status when one runs.
- /metrics: the gateway's own metrics (requests, errors, time to first byte, per-router in flight)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from expertmesh.core import auth, settings
from expertmesh.gateway.auth import check_auth
from expertmesh.gateway.errors import APIError
from expertmesh.gateway.state import GatewayState, gateway_state

CONTROLLER_STATUS_TIMEOUT_S = 1.0  # /experts must not hang on a controller that is down

routes = APIRouter()


async def controller_status(where: str | None = None, timeout_s: float = CONTROLLER_STATUS_TIMEOUT_S) -> dict:
    """The expert controller's last status (plan, replicas per group, load, history), if one is running.
    `where` (default $EXPERTMESH_CONTROLLER_STATUS): a file the local stack's controller writes after every tick,
    or (in the cluster) the controller service's http(s)://.../status. Unreachable or not ready -> {}."""
    where = where if where is not None else settings.controller_status()
    if not where:
        return {}
    if where.startswith(("http://", "https://")):
        try:
            async with httpx.AsyncClient(timeout=timeout_s) as http:
                reply = await http.get(where, headers=auth.http_headers())
            body = reply.json() if reply.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}
    try:
        return json.loads(Path(where).read_text())
    except (OSError, ValueError):
        return {}


async def _experts_body(settings, rows: list[dict], **live) -> dict:
    """The /experts answer: per-(layer, expert) rows, their replica summary, what the gateway knows live (`live`),
    and the controller's plan and status."""
    controller = await controller_status(settings.controller_status or "", settings.controller_status_timeout_s)
    return {
        "experts": rows,
        "replicas": {"total": sum(r["replicas"] for r in rows), "missing": sum(1 for r in rows if r["replicas"] == 0)},
        **live,
        "plan": controller.get("plan"),
        "controller": {k: v for k, v in controller.items() if k != "plan"} or None,
    }


async def _router_view(http: httpx.AsyncClient, url: str) -> dict:
    """One router: {"url", "ok", "detail"?, "experts"?: its /expertmesh/experts body}."""
    try:
        health = await http.get(f"{url}/health")
        if health.status_code != 200:
            return {"url": url, "ok": False, "detail": f"router /health answered {health.status_code}"}
        experts = await http.get(f"{url}/expertmesh/experts", headers=auth.http_headers())
        experts.raise_for_status()
        return {"url": url, "ok": True, "experts": experts.json()}
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "ok": False, "detail": f"router unreachable: {type(exc).__name__}: {exc}"}


class RouterWatch:
    """The routers' health and expert coverage, read every `interval_s` in the background, so /health answers from
    memory at once however busy the routers are (a probe must not wait on an engine serving a full batch). One
    keep-alive HTTP client for every read (the background reads and /experts'), closed with the app."""

    def __init__(self, gw: GatewayState, interval_s: float = 1.0):
        self.gw, self.interval_s = gw, interval_s
        self.views: list[dict] | None = None
        self.at = 0.0  # monotonic time of `views`
        self._http: httpx.AsyncClient | None = None

    async def read(self) -> list[dict]:
        """Every router's view now."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.gw.settings.router_timeout_s)
        http = self._http
        return list(await asyncio.gather(*(_router_view(http, r.url) for r in self.gw.pool.routers)))

    async def run(self) -> None:
        while True:
            self.views, self.at = await self.read(), time.monotonic()
            await asyncio.sleep(self.interval_s)

    async def current(self) -> list[dict]:
        """The latest views if fresh (within 3 intervals) and all good; else read now (a router that was down or
        uncovered is asked again rather than reported from up to a second ago)."""
        views = self.views
        if views is None or time.monotonic() - self.at > 3 * self.interval_s or not all(v["ok"] for v in views):
            return await self.read()
        return views

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


@routes.get("/health")
async def health(request: Request):
    views = await request.app.state.router_watch.current()
    routers = []
    for v in views:
        missing = v["experts"]["missing_experts"] if v["ok"] else None
        row = {"url": v["url"], "ok": v["ok"] and missing == 0, "missing_experts": missing}
        if not v["ok"]:
            row["detail"] = v["detail"]
        elif missing:
            row["detail"] = v["experts"].get("detail") or f"{missing} (layer, expert) keys have no live replica"
        routers.append(row)
    # every router must be able to serve: the proxy would otherwise send requests to one that cannot
    ok = all(r["ok"] for r in routers)
    body = {"status": "ok" if ok else "unavailable", "routers": routers}
    return body if ok else JSONResponse(body, status_code=503)


@routes.get("/metrics")
async def prometheus_metrics(request: Request):
    return Response(gateway_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@routes.get("/experts")
async def experts(request: Request):
    gw = gateway_state(request)
    check_auth(request, gw.settings.api_keys)
    views = [v for v in await request.app.state.router_watch.read() if v["ok"]]
    if not views:
        raise APIError(503, "no router is reachable", "service_unavailable_error")
    rows: dict[tuple[int, int], dict] = {}
    for v in views:  # routed tokens add up over routers; replicas are the directory's, the same for every router
        for e in v["experts"]["experts"]:
            row = rows.setdefault((e["layer"], e["expert"]), dict(e, routed_tokens=0))
            row["routed_tokens"] += e["routed_tokens"]
    return await _experts_body(
        gw.settings,
        [rows[k] for k in sorted(rows)],
        requests_running=sum(r.in_flight for r in gw.pool.routers),
        uptime_seconds=int(time.time()) - gw.created,
        routers=gw.pool.snapshot(),
    )
