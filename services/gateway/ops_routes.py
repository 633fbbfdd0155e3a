"""Operations routes: GET /health (200 only when the router and every expert are reachable), GET /metrics
(Prometheus) — both open, probes and scrapers carry no keys — and GET /experts (API keys): routed tokens and
replicas per (layer, expert) from the router, plus the expert controller's plan and status when one runs.

`routes` serve the gateway in front of the gRPC router; `proxy_routes` the same three in front of routers that run
vLLM's own OpenAI server (`app.py --proxy URL`): health from each router's `/health` (vLLM's: the engine is alive)
and `/expertmesh/experts` (every expert held by a live replica), metrics from the gateway itself, /experts with the
routed tokens summed over the routers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from expertmesh.core import settings
from expertmesh.gateway.auth import check_auth
from expertmesh.gateway.openai_schema import APIError
from expertmesh.gateway.state import ProxyGatewayState, gateway_state

CONTROLLER_STATUS_TIMEOUT_S = 1.0  # /experts must not hang on a controller that is down

routes = APIRouter()
proxy_routes = APIRouter()


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
                reply = await http.get(where)
            body = reply.json() if reply.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}
    try:
        return json.loads(Path(where).read_text())
    except (OSError, ValueError):
        return {}


@routes.get("/health")
async def health(request: Request):
    gw = gateway_state(request)
    address = gw.router.address
    try:
        h = await gw.router.health()
    except grpc.aio.AioRpcError as exc:
        return JSONResponse(
            {
                "status": "unavailable",
                "router": address,
                "detail": f"router unreachable: {exc.details() or exc.code().name}",
            },
            status_code=503,
        )
    body = {
        "status": "ok" if h.ok and h.missing_experts == 0 else "unavailable",
        "router": address,
        "model": h.model,
        "local_experts": h.local_experts,
        "missing_experts": h.missing_experts,
        "max_model_len": h.max_model_len,
    }
    if body["status"] != "ok":
        body["detail"] = h.detail or f"{h.missing_experts} (layer, expert) keys have no live replica"
        return JSONResponse(body, status_code=503)
    return body


def _metrics_response(metrics) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _experts_body(settings, rows: list[dict], **live) -> dict:
    """The /experts answer of either gateway: per-(layer, expert) rows, their replica summary, what the gateway
    knows live (`live`), and the controller's plan and status."""
    controller = await controller_status(settings.controller_status or "", settings.controller_status_timeout_s)
    return {
        "experts": rows,
        "replicas": {"total": sum(r["replicas"] for r in rows), "missing": sum(1 for r in rows if r["replicas"] == 0)},
        **live,
        "plan": controller.get("plan"),
        "controller": {k: v for k, v in controller.items() if k != "plan"} or None,
    }


@routes.get("/metrics")
async def prometheus_metrics(request: Request):
    return _metrics_response(gateway_state(request).metrics)


@routes.get("/experts")
async def experts(request: Request):
    gw = gateway_state(request)
    check_auth(request, gw.settings.api_keys)
    try:
        stats = await gw.router.stats()
    except grpc.aio.AioRpcError as exc:
        raise APIError(
            503, f"router unavailable: {exc.details() or exc.code().name}", "service_unavailable_error"
        ) from exc
    rows = [
        {"layer": e.layer, "expert": e.expert, "routed_tokens": e.routed_tokens, "replicas": e.replicas}
        for e in stats.experts
    ]
    return await _experts_body(
        gw.settings, rows, requests_running=stats.requests_running, uptime_seconds=stats.uptime_seconds
    )


# ---- in front of vLLM OpenAI routers ---------------------------------------------------------------------------


def _proxy_state(request: Request) -> ProxyGatewayState:
    return request.app.state.gw


async def _router_view(http: httpx.AsyncClient, url: str) -> dict:
    """One router: {"url", "ok", "detail"?, "experts"?: its /expertmesh/experts body}."""
    try:
        health = await http.get(f"{url}/health")
        if health.status_code != 200:
            return {"url": url, "ok": False, "detail": f"router /health answered {health.status_code}"}
        experts = await http.get(f"{url}/expertmesh/experts")
        experts.raise_for_status()
        return {"url": url, "ok": True, "experts": experts.json()}
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "ok": False, "detail": f"router unreachable: {type(exc).__name__}: {exc}"}


async def _router_views(gw: ProxyGatewayState) -> list[dict]:
    import asyncio

    async with httpx.AsyncClient(timeout=gw.settings.router_timeout_s) as http:
        return list(await asyncio.gather(*(_router_view(http, r.url) for r in gw.pool.routers)))


@proxy_routes.get("/health")
async def proxy_health(request: Request):
    views = await _router_views(_proxy_state(request))
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


@proxy_routes.get("/metrics")
async def proxy_metrics(request: Request):
    return _metrics_response(_proxy_state(request).metrics)


@proxy_routes.get("/experts")
async def proxy_experts(request: Request):
    gw = _proxy_state(request)
    check_auth(request, gw.settings.api_keys)
    views = [v for v in await _router_views(gw) if v["ok"]]
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
