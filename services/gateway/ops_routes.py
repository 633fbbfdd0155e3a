"""Operations routes: GET /health (200 only when the router and every expert are reachable), GET /metrics
(Prometheus) — both open, probes and scrapers carry no keys — and GET /experts (API keys): routed tokens and
replicas per (layer, expert) from the router, plus the expert controller's plan and status when one runs."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from expertmesh.core import settings
from expertmesh.gateway.auth import check_auth
from expertmesh.gateway.openai_schema import APIError
from expertmesh.gateway.state import gateway_state

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


@routes.get("/metrics")
async def prometheus_metrics(request: Request):
    return Response(gateway_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


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
    controller = await controller_status(gw.settings.controller_status or "", gw.settings.controller_status_timeout_s)
    return {
        "experts": rows,
        "replicas": {"total": sum(r["replicas"] for r in rows), "missing": sum(1 for r in rows if r["replicas"] == 0)},
        "requests_running": stats.requests_running,
        "uptime_seconds": stats.uptime_seconds,
        "plan": controller.get("plan"),
        "controller": {k: v for k, v in controller.items() if k != "plan"} or None,
    }
