"""The expert directory: who serves which (layer, expert) at which endpoint, with change notification.

Server (`DirectoryServer`, grpc.aio on its own loop thread): replicas `Register` with a lease and renew it by
registering again; an entry whose lease runs out is removed by a sweeper, so a killed replica disappears
without anyone calling `Deregister`. `Drain` marks an entry as taking no new traffic. Every change bumps the
version; `Watch` streams a full snapshot at once and after every change. Versions start at the server's start
time in ms, so they keep increasing across a directory restart (and replicas re-register on their next renewal).
Every call needs the cluster credential when one is configured (core/auth.py). `SetPlan` tells the directory the
plan's {group: keys}; from then on a replica may register only under a group of the plan and only keys of its
group (PERMISSION_DENIED otherwise: a replica with the credential still cannot claim experts it was not given).
Before the first SetPlan every registration is accepted: the directory is its own Serve application and starts (or
restarts) without a plan, which the pool or the controller sends again with their next deploy.

Client (`DirectoryClient`, sync gRPC, thread-safe): `snapshot()`, and `watch(callback)` — a background thread
that calls `callback(snapshot)` with every new snapshot and reconnects after errors. `endpoints_by_key()` turns a
snapshot into (layer, expert) -> endpoints, the lookup the router's dispatcher needs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import grpc

from expertmesh.core import auth, settings
from expertmesh.core.loop_thread import LoopThread
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 10.0
MAX_LEASE_SECONDS = 3600.0


class DirectoryServicer(expert_pb2_grpc.ExpertDirectoryServicer):
    """In-memory directory state; every method runs on the server's event loop (no locks needed)."""

    def __init__(self, sweep_interval: float = 0.25):
        self.version = int(time.time() * 1000)
        self._entries: dict[str, expert_pb2.ReplicaEntry] = {}
        self._expiry: dict[str, float] = {}  # replica_id -> monotonic deadline
        self._changed = asyncio.Event()
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task | None = None
        self._plan: dict[str, dict[int, set[int]]] | None = None  # group -> layer -> experts; None: no plan yet

    def start_sweeper(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def _bump(self) -> int:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old (set) event; new waiters get a fresh one
        return self.version

    def _snapshot(self) -> expert_pb2.DirectorySnapshot:
        replicas = [self._entries[k] for k in sorted(self._entries)]
        return expert_pb2.DirectorySnapshot(version=self.version, replicas=replicas)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            now = time.monotonic()
            expired = [rid for rid, t in self._expiry.items() if t <= now]
            for rid in expired:
                log.info("directory: lease of %s expired (%s)", rid, self._entries[rid].endpoint)
                del self._entries[rid], self._expiry[rid]
            if expired:
                self._bump()

    async def Register(self, request, context):
        entry = request.entry
        if not entry.replica_id or not entry.endpoint:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "entry needs replica_id and endpoint")
        if ":" not in entry.endpoint:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"endpoint {entry.endpoint!r} is not host:port")
        refused = self._outside_plan(entry)
        if refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{entry.replica_id}: {refused}")
        lease = request.lease_seconds or DEFAULT_LEASE_SECONDS
        if not 0 < lease <= MAX_LEASE_SECONDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"lease_seconds must be in (0, {MAX_LEASE_SECONDS}]")
        new = expert_pb2.ReplicaEntry()
        new.CopyFrom(entry)
        old = self._entries.get(entry.replica_id)
        if old is not None:
            new.registered_unix_ms = old.registered_unix_ms
            new.draining = old.draining or entry.draining  # a renewal does not undo a Drain
        elif not new.registered_unix_ms:
            new.registered_unix_ms = int(time.time() * 1000)
        self._expiry[entry.replica_id] = time.monotonic() + lease
        if old != new:  # plain renewals do not wake watchers
            self._entries[entry.replica_id] = new
            self._bump()
        return expert_pb2.RegisterResponse(version=self.version)

    def _outside_plan(self, entry: expert_pb2.ReplicaEntry) -> str | None:
        """Why `entry` may not register under the current plan (None: it may, or there is no plan yet)."""
        if self._plan is None:
            return None
        allowed = self._plan.get(entry.group)
        if allowed is None:
            return f"group {entry.group!r} is not in the plan"
        for keys in entry.keys:
            extra = set(keys.experts) - allowed.get(int(keys.layer), set())
            if extra:
                return f"layer {keys.layer} experts {sorted(extra)} are not in group {entry.group!r} of the plan"
        return None

    async def SetPlan(self, request, context):
        plan: dict[str, dict[int, set[int]]] = {}
        for group in request.groups:
            if not group.group:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "every plan group needs a name")
            layers = plan.setdefault(group.group, {})
            for keys in group.keys:
                layers.setdefault(int(keys.layer), set()).update(int(e) for e in keys.experts)
        # Entries already registered stay until they deregister or their lease runs out: a group leaving the plan
        # is drained and stopped by whoever deploys; its renewals are refused from now on.
        self._plan = plan
        log.info("directory: plan of %d group(s) set", len(plan))
        return expert_pb2.SetPlanResponse(version=self.version)

    async def Deregister(self, request, context):
        if self._entries.pop(request.replica_id, None) is not None:
            del self._expiry[request.replica_id]
            self._bump()
        return expert_pb2.DeregisterResponse(version=self.version)

    async def Drain(self, request, context):
        entry = self._entries.get(request.replica_id)
        if entry is None:
            return expert_pb2.DrainResponse(version=self.version, found=False)
        if not entry.draining:
            entry.draining = True
            self._bump()
        return expert_pb2.DrainResponse(version=self.version, found=True)

    async def List(self, request, context):
        return self._snapshot()

    async def Watch(self, request, context):
        last = request.after_version
        while True:
            changed = self._changed
            if self.version > last:
                last = self.version
                yield self._snapshot()
            else:
                await changed.wait()


class DirectoryServer:
    """The ExpertDirectory gRPC server on its own event-loop thread."""

    def __init__(self, sweep_interval: float = 0.25):
        self._sweep_interval = sweep_interval
        self._loop: LoopThread | None = None
        self._server: grpc.aio.Server | None = None
        self.servicer: DirectoryServicer | None = None
        self.port: int | None = None
        self.host: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._loop = LoopThread("expert-directory")
        self.port = self._loop.run(self._start(host, port))
        self.host = host
        return self.port

    async def _start(self, host: str, port: int) -> int:
        self.servicer = DirectoryServicer(self._sweep_interval)
        self._server = grpc.aio.server(
            # routers keep their watch streams alive with pings (EXPERTMESH_DISPATCH_KEEPALIVE_S): accept them
            options=[("grpc.so_reuseport", 0), *settings.grpc_keepalive_server_options()],
            interceptors=auth.server_interceptors("expert directory"),
        )
        expert_pb2_grpc.add_ExpertDirectoryServicer_to_server(self.servicer, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        self.servicer.start_sweeper()
        return bound

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.alive and self._server is not None

    async def _shutdown(self, grace: float) -> None:
        if self.servicer is not None and self.servicer._sweeper is not None:
            self.servicer._sweeper.cancel()
        server = self._server
        assert server is not None, "stop() shuts down only a started server"
        await server.stop(grace)

    def stop(self, grace: float = 0.5) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            try:
                self._loop.run(self._shutdown(grace), timeout=grace + 5)
            except Exception:
                log.exception("stopping the directory server")
        self._loop.stop()
        self._loop = None
        self._server = None  # freed only now that its loop is closed (LoopThread.stop says why)


def endpoints_by_key(
    snapshot: expert_pb2.DirectorySnapshot, include_draining: bool = False
) -> dict[tuple[int, int], list[str]]:
    """(layer, expert) -> endpoints serving it (sorted), skipping draining replicas unless asked."""
    out: dict[tuple[int, int], list[str]] = {}
    for entry in snapshot.replicas:
        if entry.draining and not include_draining:
            continue
        for keys in entry.keys:
            for expert in keys.experts:
                out.setdefault((int(keys.layer), int(expert)), []).append(entry.endpoint)
    return {k: sorted(v) for k, v in out.items()}


def send_plan(address: str, plan, timeout: float = 2.0) -> bool:
    """Tell the directory at `address` the groups of `plan` (a PlacementPlan: `.groups` with `.name`, `.keys`);
    False when it cannot be reached (not up yet: the caller sends it again later)."""
    try:
        with DirectoryClient(address, timeout=timeout) as client:
            client.set_plan({group.name: group.keys for group in plan.groups})
        return True
    except grpc.RpcError as exc:
        log.info("directory at %s did not take the plan: %s", address, exc.code())
        return False


class DirectoryClient:
    """Sync, thread-safe client of the expert directory with an optional background watch."""

    def __init__(self, address: str, timeout: float = 5.0):
        self.address = address
        self.timeout = timeout
        self._channel = auth.insecure_channel(address, options=settings.grpc_keepalive_options())  # a long-lived watch
        self._stub = expert_pb2_grpc.ExpertDirectoryStub(self._channel)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[expert_pb2.DirectorySnapshot], None]] = []
        self._latest: expert_pb2.DirectorySnapshot | None = None
        self._updated = threading.Condition(self._lock)
        self._watch_thread: threading.Thread | None = None
        self._watch_call: grpc.Call | None = None  # the open Watch stream (a grpc call, also an iterator)
        self._closed = threading.Event()

    # -- one-shot calls -----------------------------------------------------------------------------------------
    def snapshot(self, timeout: float | None = None) -> expert_pb2.DirectorySnapshot:
        return self._stub.List(expert_pb2.ListRequest(), timeout=timeout or self.timeout)

    def register(self, entry: expert_pb2.ReplicaEntry, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
        req = expert_pb2.RegisterRequest(entry=entry, lease_seconds=lease_seconds)
        return self._stub.Register(req, timeout=self.timeout).version

    def deregister(self, replica_id: str) -> int:
        return self._stub.Deregister(expert_pb2.DeregisterRequest(replica_id=replica_id), timeout=self.timeout).version

    def drain(self, replica_id: str) -> bool:
        return self._stub.Drain(expert_pb2.DrainRequest(replica_id=replica_id), timeout=self.timeout).found

    def set_plan(self, groups: dict[str, dict[int, list[int]]]) -> int:
        """Tell the directory the plan's {group: {layer: experts}}: replicas may then register only those."""
        request = expert_pb2.SetPlanRequest(
            groups=[
                expert_pb2.GroupKeys(
                    group=name,
                    keys=[expert_pb2.ExpertKeys(layer=layer, experts=sorted(keys[layer])) for layer in sorted(keys)],
                )
                for name, keys in groups.items()
            ]
        )
        return self._stub.SetPlan(request, timeout=self.timeout).version

    # -- watch --------------------------------------------------------------------------------------------------
    @property
    def latest(self) -> expert_pb2.DirectorySnapshot | None:
        """The newest snapshot the watch has seen (None before the first)."""
        with self._lock:
            return self._latest

    def watch(self, callback: Callable[[expert_pb2.DirectorySnapshot], None] | None = None) -> None:
        """Start the background watch (once) and add `callback`; it gets the latest snapshot at once if known."""
        with self._lock:
            if callback is not None:
                self._callbacks.append(callback)
            latest = self._latest
            if self._watch_thread is None:
                self._watch_thread = threading.Thread(target=self._watch_main, name="directory-watch", daemon=True)
                self._watch_thread.start()
        if callback is not None and latest is not None:
            callback(latest)

    def wait_for(
        self, predicate: Callable[[expert_pb2.DirectorySnapshot], bool], timeout: float
    ) -> expert_pb2.DirectorySnapshot:
        """Block until a watched snapshot satisfies `predicate` (starts the watch); TimeoutError otherwise."""
        self.watch()
        deadline = time.monotonic() + timeout
        with self._updated:
            while self._latest is None or not predicate(self._latest):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"directory at {self.address}: condition not met within {timeout} s")
                self._updated.wait(left)
            return self._latest

    def _watch_main(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                with self._lock:
                    after = 0  # after a reconnect, always take a full snapshot (the server may have restarted)
                    call = self._stub.Watch(expert_pb2.WatchRequest(after_version=after))
                    self._watch_call = call
                for snap in call:
                    backoff = 0.1
                    with self._updated:
                        self._latest = snap
                        callbacks = list(self._callbacks)
                        self._updated.notify_all()
                    for cb in callbacks:
                        try:
                            cb(snap)
                        except Exception:  # a broken callback must not end the watch
                            log.exception("directory watch callback failed")
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                log.debug("directory watch at %s: %s; reconnecting", self.address, exc)
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            call = self._watch_call
        if call is not None:
            call.cancel()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
        self._channel.close()

    def __enter__(self) -> DirectoryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
