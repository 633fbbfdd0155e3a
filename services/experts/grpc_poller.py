"""A work-around for grpc.aio's one completion-queue poller per process: make the expert server's loop the only
one it wakes (`claim_grpc_poller`), and give the socket back when that loop stops (`return_grpc_poller`).

Why: every event loop that ever created a grpc.aio object watches the poller's wake-up socket, so in a Serve replica
(where Ray's own loop is bound too) each Forward woke a second Python thread (docs/benchmarks.md). This reaches
into grpc's private poller objects; grpcio is pinned, and if the reader is not found nothing is changed.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Callable


def claim_grpc_poller() -> list[tuple[asyncio.AbstractEventLoop, int, Callable[..., object]]]:
    """Make the running loop the only one grpc.aio's completion-queue poller wakes; returns what to give back.

    grpc.aio has one poller per process, and every event loop that ever created a grpc.aio object watches its
    wake-up socket: every bound loop wakes for every event of every RPC in the process, and whichever reads first
    runs the events or forwards the other loops' ones with call_soon_threadsafe. In a Serve replica, Ray's own loop
    is bound (Serve's inter-deployment gRPC server), so each Forward woke a second Python thread that competed for
    the GIL and the two cores, and sometimes took the detour through it (docs/benchmarks.md). Taking the socket
    away from the other loops keeps delivery intact — this loop's handler forwards their events, which grpc does
    already. This reaches into grpc's poller (the reader it registers on each bound loop is
    functools.partial(PollerCompletionQueue._handle_events, loop)); grpcio is pinned, and if that reader is not
    found nothing is changed. Call on the server's loop after the server started.
    """
    from grpc._cython import cygrpc

    loop = asyncio.get_running_loop()
    fd: int | None = None
    handle_events: Callable[..., object] | None = None
    # `_selector` is private to selector event loops (not in the typeshed stubs); the server's loop is one.
    for key in loop._selector.get_map().values():  # type: ignore[attr-defined]
        callback = getattr(key.data[0], "_callback", None) if key.data and key.data[0] is not None else None
        if isinstance(callback, functools.partial) and isinstance(
            getattr(callback.func, "__self__", None), cygrpc.PollerCompletionQueue
        ):
            fd, handle_events = key.fd, callback.func
    if fd is None or handle_events is None:  # both are found together
        return []
    taken: list[tuple[asyncio.AbstractEventLoop, int, Callable[..., object]]] = []

    def take(other: asyncio.AbstractEventLoop) -> None:  # runs on `other`'s own thread
        # False: it had no reader there. uvloop returns None either way: give such a loop the reader back too.
        if other.remove_reader(fd) is not False:
            taken.append((other, fd, functools.partial(handle_events, other)))

    for obj in gc.get_objects():  # event loops register nowhere; a one-off scan per replica
        # type(), not isinstance(): some module proxies warn or raise when their __class__ is read. Ray's own
        # loop is a uvloop Loop, not a selector loop: both are AbstractEventLoops.
        if issubclass(type(obj), asyncio.AbstractEventLoop) and obj is not loop and not obj.is_closed():
            obj.call_soon_threadsafe(take, obj)
    return taken


def return_grpc_poller(taken: list[tuple[asyncio.AbstractEventLoop, int, Callable[..., object]]]) -> None:
    """Give the poller's socket back to the loops `claim_grpc_poller` took it from (before this loop stops)."""
    for loop, fd, callback in taken:
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.add_reader, fd, callback)
