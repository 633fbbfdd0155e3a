"""The gateway: an OpenAI-compatible HTTP API in front of the router's gRPC `Generate` stream. This module
assembles the app and runs it; the parts live beside it:

    router_client.py   the router link (channel, Health-derived model info, tokenizer, error mapping)
    auth.py            Bearer API keys
    openai_routes.py   /v1/models, /v1/chat/completions, /v1/completions
    generation.py      n concurrent Generate calls per request, sampling params, the non-streamed path
    sse.py             streamed responses (server-sent events)
    logprobs.py        logprob formats
    ops_routes.py      /health, /metrics, /experts (with the controller's status)
    state.py           what the handlers of one app share (settings, router client, metrics)

    python -m expertmesh.gateway.app --router HOST:PORT [--host 127.0.0.1] [--port 8000]
        [--model-name NAME] [--tokenizer DIR]
    python -m expertmesh.gateway.app --proxy http://HOST:PORT [--proxy URL ...] [--host ...] [--port ...]

With `--proxy`, the routers run vLLM's own OpenAI server (router/openai_server.py): /v1/* is relayed to them by the
streaming proxy (proxy.py, least in flight first) instead of being served here, with the same API keys; /health,
/metrics and /experts come from ops_routes.proxy_routes.

API keys (EXPERTMESH_API_KEYS, comma-separated; unset = open) guard /v1/* and /experts; /health and /metrics are
always open. Closing a Generate call (client went away, mid-stream or while waiting for a non-streamed answer)
makes the router abort the request in vLLM. Every error is an OpenAI error body, counted by endpoint and type.

Python API: `create_app(router="127.0.0.1:50061", model_name=None, tokenizer=None, api_keys=None)` or
`create_app(settings=GatewaySettings(...))`; `create_proxy_app(["http://127.0.0.1:8001"], settings=...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.core import telemetry
from expertmesh.core.settings import GatewaySettings
from expertmesh.gateway import openai_routes, ops_routes, proxy
from expertmesh.gateway.logprobs import chat_logprobs, completion_logprobs  # noqa: F401 - public helpers
from expertmesh.gateway.openai_schema import APIError, bad_request, validation_error_message
from expertmesh.gateway.ops_routes import controller_status as _controller_status  # noqa: F401 - tests use it
from expertmesh.gateway.state import GatewayState, ProxyGatewayState


def _install_error_handlers(app: FastAPI, state: GatewayState | ProxyGatewayState) -> None:
    """Every error as an OpenAI error body (401 with WWW-Authenticate), counted; every request counted."""
    metrics = state.metrics

    def error_response(exc: APIError, endpoint: str) -> JSONResponse:
        metrics.errors.labels(endpoint, exc.type).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_error_message(list(exc.errors()))
        return error_response(bad_request(message, param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(APIError(exc.status_code, str(exc.detail), kind), request.url.path)

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response


def create_app(
    router: str | None = None,
    model_name: str | None = None,
    tokenizer: str | None = None,
    api_keys: list[str] | None = None,
    settings: GatewaySettings | None = None,
) -> FastAPI:
    """The gateway app. Arguments given override `settings` (default: GatewaySettings() from the registry;
    api_keys None -> EXPERTMESH_API_KEYS, comma-separated; unset/empty = open)."""
    settings = settings or GatewaySettings()
    overrides: dict[str, Any] = {  # GatewaySettings field -> value given here
        k: v
        for k, v in (("router", router), ("model_name", model_name), ("tokenizer", tokenizer), ("api_keys", api_keys))
        if v is not None
    }
    settings = replace(settings, **overrides)
    settings.api_keys = list(settings.api_keys)
    state = GatewayState.from_settings(settings)
    telemetry.init_tracing("expertmesh-gateway")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await state.router.close()

    app = FastAPI(title="expertmesh gateway", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.gw = state
    _install_error_handlers(app, state)
    app.include_router(openai_routes.routes)
    app.include_router(ops_routes.routes)
    return app


def create_proxy_app(
    routers: list[str], settings: GatewaySettings | None = None, api_keys: list[str] | None = None
) -> FastAPI:
    """The gateway in front of vLLM OpenAI routers (`routers`: base URLs): /v1/* proxied, ops routes beside it."""
    settings = settings or GatewaySettings()
    if api_keys is not None:
        settings = replace(settings, api_keys=list(api_keys))
    state = ProxyGatewayState(settings=settings, pool=proxy.RouterPool(list(routers)))
    closers: list[Callable[[], Awaitable[None]]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for close in closers:
            await close()

    app = FastAPI(title="expertmesh gateway (vLLM routers)", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.gw = state
    app.state.router_pool = state.pool
    _install_error_handlers(app, state)
    app.include_router(ops_routes.proxy_routes)
    closers.append(proxy.install(app, state.pool, api_keys=settings.api_keys, timeout_s=600.0))
    return app


# ---- command line ----------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    GatewaySettings.configure(parser)
    parser.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="URL",
        help="base URL of a router running vLLM's OpenAI server (repeatable): proxy /v1/* to them "
        "instead of serving it over --router's gRPC",
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m expertmesh.gateway.app", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    settings = GatewaySettings.from_args(args)
    app = create_proxy_app(args.proxy, settings=settings) if args.proxy else create_app(settings=settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    telemetry.shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
