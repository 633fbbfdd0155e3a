"""The gateway: the cluster's front door before the routers, which run vLLM's own OpenAI server with the expertmesh
plugin (router/openai_server.py). It serves no OpenAI logic of its own: the OpenAI operations it serves (POST
/v1/chat/completions, POST /v1/completions, GET /v1/models: proxy.SERVED) are relayed to a router unchanged, JSON
or server-sent events as they are produced, so chat templates, tool and reasoning parsers, structured outputs,
logprobs and vLLM's own errors are vLLM's; a request body is first checked against the published document. Any
other /v1 path is a 404. This module assembles the app and runs it; the parts live beside it:

    proxy.py       /v1/*: the router with the fewest requests in flight; retry elsewhere when one refuses
    auth.py        Bearer API keys
    ops_routes.py  /health, /metrics, /experts (with the controller's status)
    openapi.py     /openapi.json: the router's own document, as much of it as the gateway serves
    validation.py  every request body checked against that document (a 400 naming the offending field)
    errors.py      the gateway's own errors in OpenAI's shape
    state.py       what the handlers of one app share (settings, routers, metrics)

    python -m expertmesh.gateway.app --router http://HOST:PORT [--router URL ...] [--host 127.0.0.1] [--port 8000]

API keys (EXPERTMESH_API_KEYS, comma-separated; unset = open) guard /v1/* and /experts; /health and /metrics are
always open. A client that goes away closes the upstream response, and vLLM aborts the request.

Python API: `create_app(["http://127.0.0.1:8001", ...], settings=GatewaySettings(...), api_keys=None)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.core import telemetry
from expertmesh.core.settings import GatewaySettings
from expertmesh.gateway import openapi, ops_routes, proxy
from expertmesh.gateway.errors import APIError
from expertmesh.gateway.state import GatewayState


def _install_error_handlers(app: FastAPI, state: GatewayState) -> None:
    """The gateway's own errors as OpenAI error bodies, counted; every request counted."""
    metrics = state.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        # by route, as CountRequests does: a label value must not be whatever path a client typed
        metrics.errors.labels(getattr(request.scope.get("route"), "path", None) or "other", exc.type).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        headers = dict(exc.headers) if exc.headers else None
        return await _api_error(request, APIError(exc.status_code, str(exc.detail), kind, headers=headers))

    app.add_middleware(CountRequests, metrics=metrics)


class CountRequests:
    """Counts every HTTP request by route and status. Plain ASGI, not Starlette's BaseHTTPMiddleware: that one
    passes a streamed body through a memory stream, a cost on every relayed SSE event."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(
    routers: list[str] | None = None, settings: GatewaySettings | None = None, api_keys: list[str] | None = None
) -> FastAPI:
    """The gateway in front of `routers` (base URLs; default: settings.routers, i.e. $EXPERTMESH_ROUTER)."""
    settings = settings or GatewaySettings()
    if routers is not None:
        settings = replace(settings, routers=list(routers))
    if api_keys is not None:
        settings = replace(settings, api_keys=list(api_keys))
    pool = proxy.RouterPool(
        list(settings.routers),
        cooldown_s=settings.router_cooldown_s,
        max_in_flight=settings.max_in_flight,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_migrations=settings.max_migrations,
    )
    state = GatewayState(settings=settings, pool=pool)
    state.metrics.watch_pool(pool)
    telemetry.init_tracing("expertmesh-gateway")
    closers: list[Callable[[], Awaitable[None]]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        watch = asyncio.create_task(_app.state.router_watch.run())
        yield
        watch.cancel()
        await _app.state.router_watch.close()
        for close in closers:
            await close()

    # FastAPI's own document would describe /v1/* as one route that takes anything: openapi.py builds the real one
    app = FastAPI(title="expertmesh gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.gw = state
    app.state.router_pool = state.pool
    app.state.router_watch = ops_routes.RouterWatch(state)
    _install_error_handlers(app, state)
    app.include_router(ops_routes.routes)
    first_byte = state.metrics.first_byte

    def observe_first_byte(path: str, seconds: float) -> None:
        first_byte.labels(path=f"/v1/{path}").observe(seconds)  # (only proxy.SERVED paths are relayed)

    document = openapi.PublishedDocument(lambda: get_openapi(title=app.title, version=app.version, routes=app.routes))

    def router_urls() -> list[str]:  # (not pool.order(): that turns the round robin of the requests themselves)
        return [r.url for r in state.pool.routers]

    async def request_validator():
        return await document.request_validator(router_urls())

    closers.append(
        proxy.install(
            app,
            state.pool,
            api_keys=settings.api_keys,
            first_byte=observe_first_byte,
            request_validator=request_validator,
        )
    )

    @app.get("/openapi.json")
    async def _openapi():
        body = await document.get(router_urls())
        return Response(body, media_type="application/json")

    return app


# ---- command line ----------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    GatewaySettings.configure(parser)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m expertmesh.gateway.app", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    settings = GatewaySettings.from_args(args)
    uvicorn.run(
        create_app(settings=settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),  # requests in flight finish first
    )
    telemetry.shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
