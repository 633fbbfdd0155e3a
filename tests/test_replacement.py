"""Dead replicas leave the directory at once and are replaced (issue 18 item 3).

- `ReplicaProber` on real servers, no Ray: a live replica stays; an endpoint where nothing listens, and a port that
  answers as another replica, are deregistered on the first probe; a port that accepts connections but never
  answers (a hung process) on the second missed deadline.
- On a real `LocalPool` with a long lease (30 s): a SIGKILLed replica is out of the directory within a few seconds
  (the controller's prober, not the lease), and Serve's replacement registers and computes exactly.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import pytest
import torch
from loopback_http import LoopbackHTTP

from expertmesh.control.controller import Controller, ControllerSettings, ReplicaProber
from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.codec import decode, encode_forward
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.plan import ExpertGroup, PlacementPlan
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer
from expertmesh.experts.pool import LocalPool
from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer, keys_to_proto

LONG_LEASE_S = 30.0


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


def _entry(replica_id: str, endpoint: str) -> expert_pb2.ReplicaEntry:
    return expert_pb2.ReplicaEntry(replica_id=replica_id, group="g", endpoint=endpoint, keys=keys_to_proto({0: [0, 1]}))


def test_prober_deregisters_the_dead_and_keeps_the_live(checkpoint):
    directory = DirectoryServer()
    directory.start("127.0.0.1", 0)
    live = ExpertServer(checkpoint, {0: [0, 1]}, replica_id="live")
    live.start("127.0.0.1", 0)
    with socket.socket() as nothing, socket.socket() as hung:
        nothing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel accepts connections, nobody ever answers
        try:
            with DirectoryClient(directory.address) as client:
                for rid, endpoint in (
                    ("live", live.address),
                    ("gone", f"127.0.0.1:{nothing.getsockname()[1]}"),
                    ("impostor", live.address),  # its port now serves another replica
                    ("hung", f"127.0.0.1:{hung.getsockname()[1]}"),
                ):
                    client.register(_entry(rid, endpoint), lease_seconds=LONG_LEASE_S)
                prober = ReplicaProber(client, timeout_s=0.5, misses=2)
                t0 = time.monotonic()
                first = {rid for rid, _, _ in prober.reap()}
                assert first == {"gone", "impostor"}
                assert {e.replica_id for e in client.snapshot().replicas} == {"live", "hung"}
                second = prober.reap()
                assert [rid for rid, _, _ in second] == ["hung"] and "2 Info calls in a row" in second[0][2]
                assert time.monotonic() - t0 < 3.0  # two probes, each bounded by its deadline
                assert [e.replica_id for e in client.snapshot().replicas] == ["live"]
                assert prober.reap() == []
                prober.close()
        finally:
            live.stop()
            directory.stop()


@pytest.mark.slow
def test_killed_replica_is_deregistered_at_once_and_replaced_warm(checkpoint):
    from ray.util.state import list_actors

    keys = {0: [0, 1, 2, 3, 4, 5, 6, 7]}
    plan = PlacementPlan(groups=[ExpertGroup(name="l0", keys=keys), ExpertGroup(name="l1", keys={1: list(range(8))})])
    # a router's counters endpoint before its engine counted anything (the controller's ticks read it)
    counters = LoopbackHTTP({"/expertmesh/counters": lambda _: (200, {"available": False})})
    with LocalPool.private(checkpoint, plan, lease_seconds=LONG_LEASE_S, ready_timeout=240, state_file=None) as pool:
        controller = Controller.for_pool(
            pool, f"{counters.url}/expertmesh/counters", ControllerSettings(probe_interval_s=0.5)
        ).start()
        try:
            with pool.client() as directory:
                old = next(e for e in directory.snapshot().replicas if e.group == "l0")
                unique_id = old.replica_id.split("#", 1)[1]
                actors = list_actors(address=pool.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
                pids = [a.pid for a in actors if a.name and a.name.endswith(f"#{unique_id}")]
                assert len(pids) == 1, [a.name for a in actors]
                os.kill(pids[0], signal.SIGKILL)
                t0 = time.monotonic()
                directory.wait_for(lambda s: old.replica_id not in {e.replica_id for e in s.replicas}, timeout=5)
                gone_after = time.monotonic() - t0
                assert gone_after < 5 < LONG_LEASE_S  # the prober, not the lease
                # the prober's record of it (written just after the deregistration the watch saw)
                deadline = time.monotonic() + 2
                while not controller.status()["dead_replicas"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [d["replica_id"] for d in controller.status()["dead_replicas"]] == [old.replica_id]
                snap = directory.wait_for(
                    lambda s: any(e.group == "l0" and e.replica_id != old.replica_id for e in s.replicas), timeout=60
                )
                back_after = time.monotonic() - t0
                new = next(e for e in snap.replicas if e.group == "l0")
                hidden = torch.randn(8, 128)  # [T, H]
                expert = torch.arange(8)
                request = encode_forward(0, hidden, torch.arange(8), expert, torch.ones(8))
                stub = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(new.endpoint, options=CHANNEL_OPTIONS))
                reply = stub.Forward(request, timeout=10)  # registered means serving: answered at once
                reference = ExpertWeights(CheckpointReader(checkpoint), keys)
                assert torch.equal(
                    decode(reply.output), reference.forward(0, hidden, torch.arange(8), expert, torch.ones(8))
                )
                print(
                    f"killed replica out of the directory after {gone_after:.2f} s, replaced after {back_after:.2f} s"
                )
        finally:
            controller.stop()
            counters.close()
