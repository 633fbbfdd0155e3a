"""The cluster credential: one per-cluster token that every internal call carries and every internal server checks:
gRPC (the expert directory, the expert replicas' ExpertService) and HTTP (the routers' OpenAI servers, the
controller service's /status).

Where the token comes from (settings registry, docs/configuration.md):
  EXPERTMESH_CLUSTER_TOKEN_FILE       a file (the Helm chart mounts its Secret): line 1 the token, optional line 2
                                      the previous token, still accepted during a rotation. Re-read when the file
                                      changes (checked at most every RECHECK_S), so a rotation needs no restart.
  EXPERTMESH_CLUSTER_TOKEN            the token itself (`expertmesh serve` makes one per run and passes it to its
                                      processes in their environment only), with
  EXPERTMESH_CLUSTER_TOKEN_PREVIOUS   the previous token, still accepted during a rotation.
The file wins when both are set. Servers accept the token or the previous one; clients send only the token.

On the wire: `authorization: Bearer <token>` metadata on every call, compared in constant time. A call without it
or with a wrong one ends with UNAUTHENTICATED before any handler runs (`server_interceptors`). Clients get it from
the channel helpers (`insecure_channel`, `aio_insecure_channel`): every internal client makes its channels there.

Over HTTP: `Authorization: Bearer <token>` (`http_headers`), checked by `ClusterAuthMiddleware` on every path but
the probes' and scrapers' (`OPEN_HTTP_PATHS`). The gateway is the only door for users: it checks their API keys and
sends the routers the cluster credential in place of the user's key.

No token configured: servers install no interceptor (open, as before; a warning once per process at server start)
and channels send nothing, so a local test or benchmark without a token runs unchanged and pays nothing.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Sequence

import grpc

from expertmesh.core import settings

log = logging.getLogger("expertmesh.auth")

METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
SCHEME = "Bearer "
RECHECK_S = 1.0  # how often a token file's mtime is looked at (never per call: a stat per RPC is waste)
DENIED = "missing or wrong cluster credential (authorization: Bearer <EXPERTMESH_CLUSTER_TOKEN>)"


class _FileTokens:
    """The (token, previous) of a token file, re-read when its mtime or size changes."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: tuple[str | None, str | None] = (None, None)
        self._checked = float("-inf")

    def get(self) -> tuple[str | None, str | None]:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return self._tokens
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)  # follows the symlinks a Kubernetes Secret mount swaps on update
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    lines = [line.strip() for line in open(self.path, encoding="utf-8").read().splitlines()]
                    lines = [line for line in lines if line]
                    self._tokens = (lines[0] if lines else None, lines[1] if len(lines) > 1 else None)
                    self._stamp = stamp
                    log.info("cluster token read from %s (%s previous token)", self.path, "with" if lines[1:] else "no")
            except OSError as exc:  # fail closed: a configured but unreadable file accepts nobody
                log.error("cluster token file %s: %s", self.path, exc)
                self._tokens, self._stamp = (None, None), None
            return self._tokens


_files: dict[str, _FileTokens] = {}
_files_lock = threading.Lock()


def configured() -> bool:
    """Whether this process runs with a cluster credential (a token file or a token)."""
    return bool(settings.cluster_token_file() or settings.cluster_token())


def tokens() -> tuple[str | None, str | None]:
    """(token, previous token) now; (None, None) when none is configured."""
    path = settings.cluster_token_file()
    if path:
        with _files_lock:
            source = _files.get(path) or _files.setdefault(path, _FileTokens(path))
        return source.get()
    return settings.cluster_token(), settings.cluster_token_previous()


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The metadata an internal call carries: the credential, or nothing when none is configured."""
    token = tokens()[0]
    return ((METADATA_KEY, SCHEME + token),) if token else ()


def accepts(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's metadata carries the token or the previous one (constant-time compare)."""
    token, previous = tokens()
    presented = next((value for key, value in metadata or () if key == METADATA_KEY), None)
    if not token or not isinstance(presented, str) or not presented.startswith(SCHEME):
        return False
    given = presented[len(SCHEME) :].encode()
    ok = hmac.compare_digest(given, token.encode())
    if previous:  # compared even after a match: the time taken says nothing about which one matched
        ok = hmac.compare_digest(given, previous.encode()) or ok
    return ok


# ---- server side --------------------------------------------------------------------------------------------


async def _deny_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # pragma: no cover  (makes this an async generator, the shape a streaming handler has)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts with UNAUTHENTICATED."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_deny_unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **kw)


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with the cluster credential; any other call gets UNAUTHENTICATED and nothing else
    (its handler never runs, its request is never read)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or accepts(handler_call_details.invocation_metadata):
            return handler
        return _denying(handler)


_warned_open = False


def server_interceptors(server_name: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of an internal grpc.aio server: the credential check, or none (with a warning once per
    process) when no token is configured."""
    global _warned_open
    if configured():
        return [ClusterAuthInterceptor()]
    if not _warned_open:
        _warned_open = True
        log.warning(
            "%s: no cluster credential configured (EXPERTMESH_CLUSTER_TOKEN / _FILE): internal gRPC servers of this "
            "process accept calls from anyone who can reach them",
            server_name,
        )
    return []


# ---- client side --------------------------------------------------------------------------------------------


def _with_credential(details, aio: bool):
    extra = call_metadata()
    if not extra:
        return details
    metadata = [*(details.metadata or ()), *extra]
    if aio:
        return details._replace(metadata=grpc.aio.Metadata(*metadata))
    return _CallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
    )


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _SyncCredential(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the credential to every call of a sync channel (read per call: a rotated token file is picked up)."""

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_credential(client_call_details, False), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_credential(client_call_details, False), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(_with_credential(client_call_details, False), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(_with_credential(client_call_details, False), request_iterator)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_credential(client_call_details, True), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_credential(client_call_details, True), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_credential(client_call_details, True), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_credential(client_call_details, True), request_iterator)


def insecure_channel(target: str, options=None) -> grpc.Channel:
    """A sync channel to an internal server whose every call carries the cluster credential (a plain channel when
    none is configured: nothing added to the router's hot path then)."""
    channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _SyncCredential()) if configured() else channel


def aio_insecure_channel(target: str, options=None) -> grpc.aio.Channel:
    """The grpc.aio form of `insecure_channel` (create it on the loop that uses it)."""
    interceptors = (
        [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()] if configured() else None
    )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


# ---- HTTP: the routers' OpenAI servers and the controller service --------------------------------------------

OPEN_HTTP_PATHS = ("/health", "/ping", "/metrics")  # probes and scrapers carry no credential


def http_headers() -> dict[str, str]:
    """The header an internal HTTP call carries (the gateway to a router, the controller and the gateway reading a
    router's or the controller's state): the credential, or nothing when none is configured."""
    token = tokens()[0]
    return {"Authorization": SCHEME + token} if token else {}


def http_accepts(authorization: str | None) -> bool:
    """Whether an HTTP request's Authorization header carries the token or the previous one."""
    return accepts([(METADATA_KEY, authorization)] if authorization else None)


class ClusterAuthMiddleware:
    """Plain ASGI: every HTTP request but OPEN_HTTP_PATHS needs the cluster credential, else 401 in OpenAI's error
    shape (and nothing of the app runs). Installed only where a credential is configured."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope["path"] in OPEN_HTTP_PATHS:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if http_accepts(header):
            return await self.app(scope, receive, send)
        import json

        body = json.dumps({"error": {"message": DENIED, "type": "authentication_error", "param": None, "code": 401}})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
