"""The gateway's front door to routers that run vLLM's own OpenAI server: a streaming reverse proxy for the OpenAI
operations in SERVED (any other /v1 path is a 404 here, never relayed). A POST's body is first checked against the
published document (validation.py: a 400 naming the offending field).

Each request goes to the router with the fewest requests in flight from this gateway (ties: round robin), with its
body and headers unchanged, and the router's answer (JSON, or server-sent events as they are produced) is relayed
byte for byte. A router that refuses the connection (down, restarting) is skipped and left alone for
`cooldown_s`; the request is retried on the next router, since nothing reached an engine. A generation (POST
/v1/completions or /v1/chat/completions) is never lost with its router: one whose router dies before any of its
answer reached the client is sent to the next router (a JSON answer is read whole before it is relayed, for that),
and a streamed one that breaks off mid-answer goes on on another router from the last token streamed
(migration.py, up to `max_migrations` times). Any other request whose router fails after accepting it gets a 502.
When no router accepts, the client gets a 503 with Retry-After. Both are OpenAI error bodies. A client that goes
away closes the upstream response, so vLLM aborts the request.

Admission control: a POST (a generation) goes only to a router with fewer than `max_in_flight` requests in flight
from this gateway; when every router is at that bound the client gets a 429 with Retry-After at once (OpenAI's
rate-limit error shape), instead of joining a queue that raises every admitted request's latency without bound.

Tracing (OTEL_EXPORTER_OTLP_ENDPOINT set): each proxied request gets a server span `METHOD /v1/...`
(telemetry.TraceRequests, parent: the client's `traceparent` if it sent one), and the router receives that span's
`traceparent` in place of the client's, so the router's spans continue the gateway's.

`install(app, RouterPool(urls))` adds the routes to a FastAPI app (gateway/app.py's, beside /health, /metrics and
/experts, whose exception handlers answer the APIError of a refused key).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from expertmesh.core import auth, telemetry
from expertmesh.gateway import migration, validation
from expertmesh.gateway.auth import check_auth
from expertmesh.gateway.errors import APIError

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the HTTP client sets itself: never forwarded in either direction.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
# What the gateway relays, and all it relays: the OpenAI surface this project promises (path -> methods). Every
# other /v1 path is a 404 from the gateway, never relayed, and an unlisted method a 405 with Allow. The published
# document (openapi.py) is built from this list, so it describes exactly what the front door accepts; vLLM's extra
# APIs (responses, messages, batch chat, systemone, ...) are left out because their request schemas do not state
# what vLLM enforces and some of them answer 5xx to schema-valid requests. (vLLM 0.32 serves no GET
# /v1/models/{model}.)
SERVED: Mapping[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/models": ("GET",),
}
RETRY_PAUSE_S = 0.05  # before a generation's second pass over the routers
# Connection-level failures: the router never got the request, so another router may take it.
_NOT_ACCEPTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# The router died holding a generation, before any of its answer reached the client: another router may take it.
_LOST = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)


@dataclass
class RouterState:
    url: str
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time before which this router is skipped
    requests: int = 0
    failures: int = 0


@dataclass
class RouterPool:
    """The routers behind this gateway and what the gateway knows of their load (its own requests in flight)."""

    urls: list[str]
    cooldown_s: float = 2.0
    max_in_flight: int = 0  # per router; 0 = no bound (admission control, see `admit`)
    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body: 413
    body_timeout_s: float = 30.0  # a body not complete by then: 408
    max_migrations: int = 3  # a streamed generation continues on another router this often (0 = never, migration.py)
    routers: list[RouterState] = field(init=False)
    migrations: int = field(init=False, default=0)  # streams continued on another router

    def __post_init__(self):
        if not self.urls:
            raise ValueError("at least one router URL is needed")
        self.routers = [RouterState(url.rstrip("/")) for url in self.urls]
        self._turn = itertools.count()

    def order(self) -> list[RouterState]:
        """Routers to try, best first: up ones by fewest in flight (ties rotate), then the ones cooling down."""
        now = time.monotonic()
        turn = next(self._turn)
        n = len(self.routers)
        rotated = [self.routers[(turn + i) % n] for i in range(n)]
        up = sorted((r for r in rotated if r.down_until <= now), key=lambda r: r.in_flight)  # stable: keeps rotation
        down = sorted((r for r in rotated if r.down_until > now), key=lambda r: r.down_until)
        return up + down

    def admit(self, order: list[RouterState]) -> list[RouterState]:
        """The routers of `order` that may take one more request: below `max_in_flight`. A router cooling down
        after a refused connection is not counted full (it may be back)."""
        if not self.max_in_flight:
            return order
        return [r for r in order if r.in_flight < self.max_in_flight]

    def failed(self, router: RouterState) -> None:
        """`router` lost a request it had in flight: one fewer in flight, one more failure, skipped for cooldown_s."""
        router.in_flight -= 1
        router.failures += 1
        router.down_until = time.monotonic() + self.cooldown_s

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "url": r.url,
                "in_flight": r.in_flight,
                "up": r.down_until <= now,
                "requests": r.requests,
                "failures": r.failures,
            }
            for r in self.routers
        ]


def _forward_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


def _error(status: int, message: str, type_: str, code: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return APIError(status, message, type_, None, code, headers).response()


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request's body, at most `max_bytes` (413 past it: by Content-Length at once, else as soon as the bytes
    read pass it) and complete within `timeout_s` (408, connection closed): a huge or never-finishing body costs
    the gateway neither memory nor a connection for long, and never reaches a router."""

    def too_large() -> APIError:
        return APIError(413, f"Request body larger than {max_bytes} bytes.", "invalid_request_error")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large()
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large()
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except TimeoutError:
        message = f"Request body not received within {timeout_s:g} s."
        close = {"Connection": "close"}
        raise APIError(408, message, "invalid_request_error", None, "request_timeout", close) from None
    return b"".join(chunks)


async def proxy_request(
    request: Request,
    pool: RouterPool,
    client: aiohttp.ClientSession,
    path: str,
    first_byte: Callable[[str, float], None] | None = None,
    request_validator: Callable[[], Awaitable[validation.RequestValidator | None]] | None = None,
):
    """Send `request` (one of SERVED) to the best router that accepts it and relay the answer as it arrives.
    `first_byte(path, seconds)` is told how long the router took to start answering; `request_validator()` gives
    the published document's validator: a POST's body that does not match its schema is a 400 here."""
    start = time.monotonic()
    try:
        body = await read_body(request, pool.max_body_bytes, pool.body_timeout_s)
    except ClientDisconnect:  # gone before its body arrived: nothing reached a router, nobody to answer
        return Response(status_code=499)
    parsed = None
    if request.method == "POST":  # an APIError (400) unless the body is what the published document accepts
        validator = await request_validator() if request_validator is not None else None
        parsed = await validation.check_body(validator, request.method, f"/v1/{path}", body)
    headers = _forward_headers(request.headers)
    if internal := auth.http_headers():  # the routers take the cluster credential, not the user's key (checked here)
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"} | internal
    query = request.url.query
    tried: list[str] = []
    generation = request.method == "POST" and path in migration.MIGRATABLE_PATHS  # a generation: resent if lost
    migrating = None
    if generation and pool.max_migrations:  # (re-encoding a large body: in a thread, as its parse was)
        big = len(body) > validation.OFF_LOOP_BYTES
        migrating = (
            await asyncio.to_thread(migration.plan, path, body, parsed) if big else migration.plan(path, body, parsed)
        )
    upstream_body = migrating[1] if migrating is not None else body
    retryable = _NOT_ACCEPTED + _LOST if generation else _NOT_ACCEPTED  # a generation lost with its router too
    order = pool.order()
    if request.method == "POST":  # generation: bounded in flight per router; reads (models, ...) always pass
        order = pool.admit(order)
        if not order:
            # Every router has max_in_flight requests: queueing more would only raise everyone's latency.
            return _error(
                429,
                f"Every router is at its bound of {pool.max_in_flight} requests in flight; retry shortly.",
                "requests",
                "rate_limit_exceeded",
                retry_after=1,
            )
    # A generation gets a second pass over the routers: a connection that failed under it (a pooled keep-alive
    # connection the router had just closed, a connect that timed out on a saturated host) says little about the
    # next one, and with a single router there is no other to take it.
    for attempt, router in enumerate(order + order if generation else order):
        if attempt == len(order):
            await asyncio.sleep(RETRY_PAUSE_S)
        url = f"{router.url}/v1/{path}" + (f"?{query}" if query else "")
        router.in_flight += 1
        router.requests += 1
        try:
            response = await client.request(request.method, url, data=upstream_body, headers=headers)
            if first_byte is not None:
                first_byte(path, time.monotonic() - start)
            if generation and migrating is None and response.status == 200:
                # A whole JSON answer: read it here, so a router that dies before it is complete costs a resend to
                # another router rather than a broken body (nothing has been sent to the client yet).
                data = await response.read()
                router.in_flight -= 1
                return Response(data, status_code=200, headers=_forward_headers(response.headers))
        except retryable as exc:  # nothing of the answer reached the client: the next router may take it
            pool.failed(router)
            tried.append(f"{router.url} ({type(exc).__name__})")
            continue
        except aiohttp.ClientError as exc:
            router.in_flight -= 1
            router.failures += 1
            detail = f"router {router.url} failed: {type(exc).__name__}: {exc}"
            return _error(502, detail, "server_error", "bad_gateway")

        trace.get_current_span().set_attribute("expertmesh.router", router.url)  # (the request's span, if traced)
        if migrating is not None and response.status == 200 and response.content_type == "text/event-stream":
            return StreamingResponse(
                _migrating_relay(migrating[0], response, router, pool, client, headers),
                status_code=200,
                headers=_forward_headers(response.headers),
            )
        released: list[bool] = []

        async def release(response=response, router=router, released=released):
            # Called when the body ends, fails or the client goes away (the generator's finally), and again as the
            # response's background task; only the first call counts.
            if not released:
                released.append(True)
                router.in_flight -= 1
                if response.content.at_eof():
                    response.release()  # read to the end: the connection goes back to the pool
                else:
                    response.close()  # the client went away mid-answer: closing the connection makes vLLM abort

        async def relay(response=response, router=router, release=release):
            try:
                async for chunk in response.content.iter_any():
                    yield chunk
            except aiohttp.ClientError:
                # The router broke off mid-answer: the status line is already sent; ending the body is all we can do
                # (an SSE client sees the stream end without [DONE]).
                router.failures += 1
            finally:
                await release()

        return StreamingResponse(
            relay(),
            status_code=response.status,
            headers=_forward_headers(response.headers),
            background=BackgroundTask(release),
        )
    return _error(
        503,
        "No router is available to serve the request (tried: " + ", ".join(tried) + ").",
        "server_error",
        "no_router_available",
        retry_after=1,
    )


async def _migrating_relay(
    generation: migration.Generation,
    response: aiohttp.ClientResponse,
    router: RouterState,
    pool: RouterPool,
    client: aiohttp.ClientSession,
    headers: dict[str, str],
):
    """Relay a streamed generation event by event (migration.py), and where the router breaks off, go on with the
    rest of the generation on another router, up to `pool.max_migrations` times."""
    rewrite = generation.relay  # the original router's events; a continuation's are rewritten
    failed: set[str] = set()
    try:
        while True:
            buffer = b""
            try:
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while (end := buffer.find(b"\n\n")) >= 0:
                        event, buffer = buffer[:end], buffer[end + 2 :]
                        out = rewrite(event)
                        if out is not None:
                            yield out + b"\n\n"
                if generation.done:
                    return
                raise migration.Broken("the stream ended without [DONE]")
            except (aiohttp.ClientError, migration.Broken) as exc:
                detail = f"router {router.url} broke off: {type(exc).__name__}: {exc}"
            pool.failed(router)
            failed.add(router.url)
            response.close()
            router = None  # type: ignore[assignment]  # (nothing in flight until the next router takes it)
            while router is None and generation.can_continue(pool.max_migrations):
                path, body = generation.continuation()
                for candidate in pool.order():
                    if candidate.url in failed:
                        continue
                    candidate.in_flight += 1
                    candidate.requests += 1
                    try:
                        response = await client.post(f"{candidate.url}/v1/{path}", data=body, headers=headers)
                    except aiohttp.ClientError:  # refused or dropped: other requests skip it for cooldown_s too
                        pool.failed(candidate)
                        failed.add(candidate.url)
                        continue
                    if response.status != 200:
                        detail = f"router {candidate.url} answered {response.status} to the continuation"
                        candidate.in_flight -= 1
                        response.close()
                        failed.add(candidate.url)
                        continue
                    router = candidate
                    break
                else:
                    break
            if router is None:
                yield generation.error_event(f"{detail}; the generation could not be continued elsewhere") + b"\n\n"
                yield migration.DONE + b"\n\n"
                return
            pool.migrations += 1
            rewrite = generation.rewrite
    finally:
        if router is not None:
            router.in_flight -= 1
            if response.content.at_eof():
                response.release()
            else:
                response.close()  # the client went away mid-answer: closing the connection makes vLLM abort


def install(
    app: FastAPI,
    pool: RouterPool,
    *,
    api_keys: Collection[str] = (),
    first_byte: Callable[[str, float], None] | None = None,
    request_validator: Callable[[], Awaitable[validation.RequestValidator | None]] | None = None,
):
    """Add /v1/{path} (the SERVED operations proxied to `pool`; any other path 404, another method 405) and GET
    /proxy/routers (the pool's state) to `app`; `first_byte(path, seconds)` observes each router's time to its
    response headers, `request_validator()` gives the validator of request bodies (proxy_request)."""
    # connect: short, so a dead router is skipped quickly; reads: no bound (a long generation streams slowly)
    timeout = aiohttp.ClientTimeout(total=None, connect=2.0, sock_connect=2.0, sock_read=None)
    state: dict[str, aiohttp.ClientSession | None] = {"client": None}

    def client() -> aiohttp.ClientSession:
        current = state["client"]
        if current is None:  # made in the serving loop (aiohttp binds a session to the loop that made it)
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)  # no cap: the admission bound is ours
            current = state["client"] = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return current

    if telemetry.tracing_enabled():  # a server span per proxied request; its traceparent is what the router gets
        app.add_middleware(telemetry.TraceRequests, prefixes=("/v1/",))

    # every method: an unserved one gets the gateway's 405 with the path's Allow (Starlette's would list this route's)
    @app.api_route("/v1/{path:path}", methods=list(ALL_METHODS), include_in_schema=False)
    async def _v1(path: str, request: Request):
        check_auth(request, api_keys)  # an APIError: the app's handler answers it (and counts it)
        methods = SERVED.get(f"/v1/{path}")
        if methods is None:
            message = (
                f"{request.method} /v1/{path} is not served by this gateway (it serves "
                + ", ".join(f"{m} {p}" for p, ms in SERVED.items() for m in ms)
                + ")."
            )
            raise APIError(404, message, "not_found_error", None, "not_served")
        if request.method not in methods:
            message = f"{request.method} is not allowed on /v1/{path}."
            raise APIError(
                405, message, "invalid_request_error", None, "method_not_allowed", {"Allow": ", ".join(methods)}
            )
        return await proxy_request(request, pool, client(), path, first_byte, request_validator)

    @app.get("/proxy/routers")
    async def _routers():
        return {"routers": pool.snapshot(), "migrations": pool.migrations}

    async def close():
        if state["client"] is not None:
            await state["client"].close()
            state["client"] = None

    return close
