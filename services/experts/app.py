"""The Ray Serve application of the expert pool: Serve is the control plane, each replica serves gRPC itself.

Applications (replica counts and actor options come from the Serve config, `serve_config.build_serve_config`,
which `serve deploy`, the local pool and the Helm chart's RayService all use):

    expertmesh-directory   `ExpertDirectory`, 1 replica: the directory gRPC server on the directory port
    experts-<group> ...    `ExpertGroupReplica`, one application per plan group; each replica loads ONLY its
                           group's (layer, expert) weights, serves ExpertService on its own grpc.aio server (a
                           free port of `replica_port_range()` on `bind_host()`), runs one warm-up Forward
                           through that server on dummy rows, only then registers `advertise_host():port` in the
                           directory with a lease, renews it, and deregisters when Serve shuts it down.

No request goes through Serve: a Serve proxy hop costs over ten times a plain grpc.aio call (docs/benchmarks.md). Serve
starts, health-checks (`check_health` makes a real Info call to the replica's own server), restarts and
scales the replicas; changing one group's application (replica count, removal) touches no other group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
import torch
from ray import serve

from expertmesh.control.serve_config import DIRECTORY_DEPLOYMENT
from expertmesh.core import auth, settings
from expertmesh.core.codec import encode_forward
from expertmesh.core.plan import ExpertGroup
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc
from expertmesh.discovery.directory import DEFAULT_LEASE_SECONDS, DirectoryServer
from expertmesh.experts.coalescer import DEFAULT_INLINE_ROWS, DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_WAIT_MS
from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer, keys_to_proto

log = logging.getLogger("expertmesh.experts")


def _port_of(address: str) -> int:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"directory address {address!r} is not host:port")
    return int(port)


@serve.deployment
class ExpertGroupReplica:
    """One replica of one expert group: its weights, its grpc.aio server, its directory lease."""

    def __init__(
        self,
        model: str,
        group: dict,
        directory: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        inline_rows: int = DEFAULT_INLINE_ROWS,
        compute_threads: int = 0,
    ):
        spec = ExpertGroup.model_validate(group)
        ctx = serve.get_replica_context()
        self.replica_id = f"{ctx.deployment}#{ctx.replica_id.unique_id}"
        self.directory = directory
        self.lease_seconds = lease_seconds
        self.server = ExpertServer(
            model,
            spec.keys,
            replica_id=self.replica_id,
            group=spec.name,
            max_wait_ms=max_wait_ms,
            max_batch_rows=max_batch_rows,
            inline_rows=inline_rows,
            metrics_backend="ray",
            compute_threads=compute_threads,
        )
        port = self.server.start(settings.bind_host(), settings.replica_port_range())
        self.endpoint = f"{settings.advertise_host()}:{port}"
        # Warm before registering: the first Forward of a process pays for kernel selection, the fused op's first
        # call and grpc's first stream; a router that found this replica in the directory would wait on that.
        warm_s = self.server.run_coroutine(self._warm_up(), timeout=60)
        self.entry = expert_pb2.ReplicaEntry(
            replica_id=self.replica_id,
            group=spec.name,
            endpoint=self.endpoint,
            keys=keys_to_proto(self.server.weights.held),
        )
        self._lease = self.server.submit_coroutine(self._keep_registered())
        log.info(
            "replica %s of %s serving %s (%d weight bytes, warm-up %.3f s, pid %d)",
            self.replica_id,
            spec.name,
            self.endpoint,
            self.server.weights.weight_bytes,
            warm_s,
            os.getpid(),
        )

    async def _warm_up(self) -> float:
        """One Forward per held layer through the replica's own server (the path a router's call takes: gRPC,
        decode, coalescer, kernel) on dummy rows, every held expert once; returns the seconds it took."""
        start = time.perf_counter()
        async with auth.aio_insecure_channel(self._local_target(), options=CHANNEL_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            for layer, experts in sorted(self.server.weights.held.items()):
                ids = torch.tensor(sorted(experts), dtype=torch.int64)  # [N]
                hidden = torch.zeros(
                    len(ids), self.server.weights.hidden_size, dtype=self.server.weights.dtype
                )  # [N, H]
                request = encode_forward(layer, hidden, torch.arange(len(ids)), ids, torch.ones(len(ids)))
                await stub.Forward(request, timeout=30)
        return time.perf_counter() - start

    def _local_target(self) -> str:
        return f"127.0.0.1:{self.server.port}" if self.server.host in ("0.0.0.0", "::") else self.server.address

    async def _keep_registered(self) -> None:
        """Register at once, retrying until the directory answers, then renew every lease/3."""
        async with auth.aio_insecure_channel(self.directory) as channel:
            stub = expert_pb2_grpc.ExpertDirectoryStub(channel)
            request = expert_pb2.RegisterRequest(entry=self.entry, lease_seconds=self.lease_seconds)
            while True:
                try:
                    await stub.Register(request, timeout=min(2.0, self.lease_seconds / 3))
                    await asyncio.sleep(self.lease_seconds / 3)
                except grpc.aio.AioRpcError as exc:  # directory not up yet / restarting: keep trying
                    log.warning("register %s at %s: %s", self.replica_id, self.directory, exc.code())
                    await asyncio.sleep(0.5)

    def info(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "weight_bytes": self.server.weights.weight_bytes,
        }

    async def check_health(self) -> None:
        if not self.server.running:
            raise RuntimeError(f"{self.replica_id}: the ExpertService server is down")
        if self._lease.done():
            raise RuntimeError(f"{self.replica_id}: the directory lease task ended: {self._lease.exception()!r}")
        # The probe runs on the server's own loop, never on Serve's: grpc.aio binds every loop that creates a
        # channel to its one completion-queue poller, and each bound loop is then woken by every event of every
        # RPC in the process (measured: two extra thread wake-ups per Forward; docs/benchmarks.md).
        reply = await asyncio.wrap_future(self.server.submit_coroutine(self._info_probe()))
        if reply.replica_id != self.replica_id:
            raise RuntimeError(f"{self.replica_id}: port {self.server.port} answers as {reply.replica_id}")

    async def _info_probe(self) -> expert_pb2.InfoResponse:
        async with auth.aio_insecure_channel(self._local_target()) as channel:
            return await expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)

    def __del__(self) -> None:
        """Serve's graceful shutdown: leave the directory first (no new traffic), then stop serving."""
        lease = getattr(self, "_lease", None)
        if lease is None:
            return
        lease.cancel()
        try:
            self.server.run_coroutine(self._deregister(), timeout=5)
        except Exception:  # the directory may already be gone; the lease then expires on its own
            log.warning("deregister %s failed", self.replica_id, exc_info=True)
        self.server.stop(grace=1.0)

    async def _deregister(self) -> None:
        async with auth.aio_insecure_channel(self.directory) as channel:
            await expert_pb2_grpc.ExpertDirectoryStub(channel).Deregister(
                expert_pb2.DeregisterRequest(replica_id=self.replica_id), timeout=2
            )


@serve.deployment
class ExpertDirectory:
    """The directory server, an application of its own (`expertmesh-directory`)."""

    def __init__(self, directory: str):
        self.server = DirectoryServer()
        self.server.start(settings.bind_host(), _port_of(directory))
        log.info("expert directory serving on %s", self.server.address)

    def check_health(self) -> None:
        if not self.server.running:
            raise RuntimeError("the expert directory server is down")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def _directory_of(args: dict) -> str:
    directory = args.get("directory") or settings.directory_address()
    _port_of(directory)
    return directory


def build_directory(args: dict):
    """The `expertmesh-directory` application: args = {directory: "host:port"}."""
    # @serve.deployment turns the class into a Deployment (with .options); mypy types class decorators as identity.
    return ExpertDirectory.options(name=DIRECTORY_DEPLOYMENT).bind(_directory_of(args))  # type: ignore[attr-defined]


# The optional args of a group application that reach each replica's `ExpertGroupReplica.__init__`.
REPLICA_ARGS = ("lease_seconds", "max_wait_ms", "max_batch_rows", "inline_rows", "compute_threads")


def build_group(args: dict):
    """One group's application: args = {model, group: {name, keys}, directory[, lease_seconds, max_wait_ms,
    max_batch_rows, inline_rows, compute_threads]}. Replica count and actor options come from the Serve config only
    (`serve_config.build_serve_config`): one source of truth, never fought by a default set here."""
    group = ExpertGroup.model_validate(args["group"])
    replica_args = {k: args[k] for k in REPLICA_ARGS if args.get(k) is not None}
    # A Deployment, not the class (see build_directory).
    return ExpertGroupReplica.options(name=group.name).bind(  # type: ignore[attr-defined]
        str(args["model"]), group.model_dump(mode="json"), _directory_of(args), **replica_args
    )
