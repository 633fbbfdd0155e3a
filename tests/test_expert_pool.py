"""The expert pool: Ray Serve replicas serving ExpertService directly, the directory, coalescing, bad input, failover.

One private Ray cluster (loopback, free ports) for the whole module, on a tiny Mixtral split into three
groups; a few checks that need no Ray (directory semantics, deadline dropping, other families) use the same
servers in-process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from conftest import free_port

from expertmesh.core.checkpoint import CheckpointReader, read_moe_info
from expertmesh.core.codec import decode, encode_forward
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.plan import ExpertGroup, PlacementPlan
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer, endpoints_by_key
from expertmesh.experts.coalescer import DEFAULT_INLINE_ROWS
from expertmesh.experts.pool import LocalPool
from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer, keys_from_proto

pytestmark = pytest.mark.slow

PLAN = PlacementPlan(
    groups=[
        ExpertGroup(name="l0-a", keys={0: [0, 1, 2, 3]}, max_replicas=2),
        ExpertGroup(name="l0-b", keys={0: [4, 5, 6, 7]}),
        ExpertGroup(name="l1", keys={1: list(range(8))}),
    ]
)
LEASE_SECONDS = 2.0
COMPUTE_THREADS = 2  # the replicas' torch threads: not the default, so a setting that does not arrive shows


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Every routed expert of the model, computed directly by the foundation kernel."""
    info = read_moe_info(checkpoint)
    return ExpertWeights(
        CheckpointReader(checkpoint), {layer: list(range(info.num_experts)) for layer in info.moe_layers}
    )


@pytest.fixture(scope="module")
def pool(checkpoint):
    with LocalPool.private(
        checkpoint,
        PLAN,
        lease_seconds=LEASE_SECONDS,
        compute_threads=COMPUTE_THREADS,
        ready_timeout=240,
        state_file=None,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def directory(pool):
    with pool.client() as client:
        yield client


def _stub(endpoint: str) -> expert_pb2_grpc.ExpertServiceStub:
    return expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS))


def _request(layer: int, experts: list[int], rows: int, top_k: int = 2, seed: int = 0):
    """hidden [rows, 128] and `top_k` distinct experts (from `experts`) per token with random gate weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 128, generator=g)  # [T, H]
    k = min(top_k, len(experts))
    picks = torch.stack([torch.randperm(len(experts), generator=g)[:k] for _ in range(rows)])  # [T, k]
    expert = torch.tensor(experts)[picks].flatten()  # [T*k]
    token_index = torch.arange(rows).repeat_interleave(k)  # [T*k]
    weight = torch.rand(rows * k, generator=g)  # [T*k]
    return layer, hidden, token_index, expert, weight


def _forward(stub, req, timeout: float = 10.0) -> tuple[torch.Tensor, int]:
    reply = stub.Forward(encode_forward(*req), timeout=timeout)
    return decode(reply.output).clone(), reply.batch_rows


def _entry(directory: DirectoryClient, group: str) -> expert_pb2.ReplicaEntry:
    return next(e for e in directory.snapshot().replicas if e.group == group)


# -- the pool -----------------------------------------------------------------------------------------------------
def test_every_key_reachable_through_directory_and_exact(pool, directory, reference):
    snapshot = directory.snapshot()
    assert sorted(e.group for e in snapshot.replicas) == ["l0-a", "l0-b", "l1"]
    by_key = endpoints_by_key(snapshot)
    assert set(by_key) == set(PLAN.holders())
    for (layer, expert), endpoints in sorted(by_key.items()):
        assert len(endpoints) == 1
        req = _request(layer, [expert], rows=5, top_k=1, seed=layer * 100 + expert)
        out, _ = _forward(_stub(endpoints[0]), req)
        assert torch.equal(out, reference.forward(*req)), (layer, expert)
    for entry in snapshot.replicas:  # several experts per token, summed on the replica
        for layer, experts in keys_from_proto(entry.keys).items():
            req = _request(layer, experts, rows=64, top_k=2, seed=7)
            out, rows = _forward(_stub(entry.endpoint), req)
            assert rows >= 64
            assert torch.equal(out, reference.forward(*req)), entry.group


def test_each_replica_holds_only_its_groups_weights(pool, directory):
    info = read_moe_info(pool.model)
    groups = {g.name: g for g in PLAN.groups}
    for entry in directory.snapshot().replicas:
        reply = _stub(entry.endpoint).Info(expert_pb2.InfoRequest(), timeout=5)
        group = groups[reply.group]
        assert reply.replica_id == entry.replica_id
        assert keys_from_proto(reply.keys) == group.keys == keys_from_proto(entry.keys)
        # tensor bytes held by the replica, not RSS: exactly its keys' three matrices each
        assert reply.weight_bytes == len(group.key_list()) * info.expert_bytes
        assert reply.weight_bytes < sum(len(g.key_list()) for g in PLAN.groups) * info.expert_bytes


def test_replicas_compute_with_the_pools_compute_threads(pool, directory):
    """The pool's compute_threads reaches every Serve replica (through the group application's args)."""
    for entry in directory.snapshot().replicas:
        reply = _stub(entry.endpoint).Info(expert_pb2.InfoRequest(), timeout=5)
        assert reply.compute_threads == COMPUTE_THREADS, entry.group


def test_concurrent_callers_are_coalesced_and_correct(pool, directory, reference):
    entry = _entry(directory, "l1")
    callers, calls_each, rows = 32, 6, 4

    async def main():
        async with grpc.aio.insecure_channel(entry.endpoint, options=CHANNEL_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)

            async def caller(i: int):
                results = []
                for j in range(calls_each):
                    req = _request(1, list(range(8)), rows=rows, seed=1000 * i + j)
                    reply = await stub.Forward(encode_forward(*req), timeout=30)
                    results.append((req, decode(reply.output).clone(), reply.batch_rows))
                return results

            return [r for rs in await asyncio.gather(*(caller(i) for i in range(callers))) for r in rs]

    results = asyncio.run(main())
    assert len(results) == callers * calls_each
    batch_rows = [b for _, _, b in results]
    assert max(batch_rows) > rows, f"no coalescing observed: batch sizes {sorted(set(batch_rows))}"
    # Batched with other callers' rows, still each caller's own answer. Not bitwise: a coalesced batch gives the
    # expert matmuls another row count, and BLAS picks its blocking (so fp32 rounding) by shape; seen ~1e-7 abs.
    for req, out, _ in results:
        torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)


def _corrupt(field: str, **changes):
    def make():
        req = encode_forward(*_request(0, [0, 1, 2, 3], rows=8))
        t = getattr(req, field)
        for k, v in changes.items():
            if k == "shape":
                del t.shape[:]
                t.shape.extend(v)
            else:
                setattr(t, k, v)
        return req.SerializeToString()

    return make


def _serialized(layer: int, experts: list[int], rows: int = 8, hidden_size: int = 128):
    def make():
        _, hidden, token_index, expert, weight = _request(layer, experts, rows=rows)
        if hidden_size != 128:
            hidden = torch.randn(rows, hidden_size)
        return encode_forward(layer, hidden, token_index, expert, weight).SerializeToString()

    return make


BAD_INPUTS = {
    "wrong_byte_length": (_corrupt("hidden", data=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
    "unknown_dtype": (_corrupt("hidden", dtype=42), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
    "integer_hidden": (
        lambda: encode_forward(
            0, torch.ones(8, 128, dtype=torch.int32), torch.arange(8), torch.zeros(8, dtype=torch.long), torch.ones(8)
        ).SerializeToString(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a float type",
    ),
    "bad_shape": (_corrupt("hidden", shape=[8 * 128]), grpc.StatusCode.INVALID_ARGUMENT, "expected 2 dims"),
    "hidden_size_mismatch": (
        _serialized(0, [0, 1], hidden_size=96),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not match the model's 128",
    ),
    "layer_out_of_range": (_serialized(7, [0, 1]), grpc.StatusCode.INVALID_ARGUMENT, "layer 7 out of range"),
    "expert_out_of_range": (_serialized(0, [3, 8]), grpc.StatusCode.INVALID_ARGUMENT, "expert id out of range"),
    "expert_not_held": (_serialized(0, [3, 4]), grpc.StatusCode.NOT_FOUND, "does not hold layer 0 expert(s) [4]"),
    "layer_not_held": (_serialized(1, [0, 1]), grpc.StatusCode.NOT_FOUND, "holds no experts of layer 1"),
    "unparseable_message": (lambda: b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "unparseable"),
    "empty_message": (lambda: b"", grpc.StatusCode.INVALID_ARGUMENT, "missing field 'hidden'"),
}


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(pool, directory, reference):
    entry = _entry(directory, "l0-a")
    channel = grpc.insecure_channel(entry.endpoint, options=CHANNEL_OPTIONS)
    raw_forward = channel.unary_unary(
        "/expertmesh.v1.ExpertService/Forward", response_deserializer=expert_pb2.ForwardResponse.FromString
    )
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    good = _request(0, [0, 1, 2, 3], rows=8)
    for name, (make, code, text) in BAD_INPUTS.items():
        with pytest.raises(grpc.RpcError) as err:
            raw_forward(make(), timeout=10)
        assert err.value.code() == code, (name, err.value.details())
        assert text in err.value.details(), (name, err.value.details())
        out, _ = _forward(stub, good)  # still serving, still right
        assert torch.equal(out, reference.forward(*good)), name
    # deadline: a call that cannot finish in time fails with DEADLINE_EXCEEDED; the server carries on
    big = _request(0, [0, 1, 2, 3], rows=16384)
    with pytest.raises(grpc.RpcError) as err:
        _forward(stub, big, timeout=0.002)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    out, _ = _forward(stub, good)
    assert torch.equal(out, reference.forward(*good))
    channel.close()


def test_apply_changes_one_groups_replica_count_in_place(pool, directory, reference):
    """What the controller does: more replicas for one group; no other replica restarts; then back to one."""
    before = {(e.group, e.replica_id) for e in directory.snapshot().replicas}
    pool.apply(PLAN, {"l0-a": 2, "l0-b": 1, "l1": 1})
    snap = directory.wait_for(lambda s: sum(e.group == "l0-a" for e in s.replicas) == 2, timeout=120)
    after = {(e.group, e.replica_id) for e in snap.replicas}
    assert before < after  # only an added replica: nobody restarted
    req = _request(0, [0, 1, 2, 3], rows=8)
    for entry in (e for e in snap.replicas if e.group == "l0-a"):
        out, _ = _forward(_stub(entry.endpoint), req)
        assert torch.equal(out, reference.forward(*req))
    pool.apply(PLAN, {"l0-a": 1, "l0-b": 1, "l1": 1})
    snap = directory.wait_for(lambda s: sum(e.group == "l0-a" for e in s.replicas) == 1, timeout=60)
    assert {(e.group, e.replica_id) for e in snap.replicas} < after


def test_controller_service_adopts_what_serve_runs(pool, directory, monkeypatch):
    """The in-cluster controller (controller_service) against this real dashboard: it starts from the groups and
    counts Serve runs, follows a config someone else PUT (KubeRay re-submitting serveConfigV2) instead of pushing
    its own back, and serves that on /status, which the gateway reads by URL. No router runs here, so every tick
    fails and /health says 503."""
    import threading

    import httpx

    from expertmesh.control import controller_service as cs
    from expertmesh.control.controller import ControllerSettings
    from expertmesh.gateway.ops_routes import controller_status as _controller_status

    service = cs.ControllerService(
        info=pool.info,
        plan=PLAN,
        router=f"http://127.0.0.1:{free_port()}",
        settings=ControllerSettings(interval_s=0.3),
        target_options={"model": pool.model, "directory": pool.directory_address, "dashboard": pool.dashboard_url},
    )
    server = cs.serve_http(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("EXPERTMESH_CONTROLLER_STATUS", url + "/status")

    def wait_status(pred, timeout=30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = httpx.get(url + "/status", timeout=5)
            if reply.status_code == 200 and pred(reply.json()):
                return reply.json()
            time.sleep(0.1)
        raise AssertionError(f"/status never matched: {reply.status_code} {reply.text[:500]}")

    service.start()
    try:
        status = wait_status(lambda s: True)
        assert status["replicas"] == {"l0-a": 1, "l0-b": 1, "l1": 1} and service.adoptions == 0
        assert [(g["name"], g["keys"]) for g in status["plan"]["groups"]] == [
            (g.name, {str(k): v for k, v in g.keys.items()}) for g in PLAN.groups
        ]
        deadline = time.monotonic() + 10
        while "ConnectError" not in (service.last_error or "") and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "ConnectError" in health.json()["last_error"]  # no router
        pool.apply(PLAN, {"l0-a": 2, "l0-b": 1, "l1": 1})  # someone else changes the Serve config
        status = wait_status(lambda s: s["replicas"]["l0-a"] == 2)
        assert service.adoptions == 1 and status["service"]["adoptions"] == 1
        assert status["plan"]["groups"][0]["initial_replicas"] == 2
        seen_by_gateway = asyncio.run(_controller_status())
        assert seen_by_gateway["replicas"] == {"l0-a": 2, "l0-b": 1, "l1": 1}
    finally:
        service.stop()
        server.shutdown()
        server.server_close()
        pool.apply(PLAN, {"l0-a": 1, "l0-b": 1, "l1": 1})
    directory.wait_for(lambda s: sum(e.group == "l0-a" for e in s.replicas) == 1, timeout=60)


def test_killed_replica_leaves_directory_and_serve_restarts_it(pool, directory, reference):
    from ray.util.state import list_actors

    old = _entry(directory, "l0-b")
    unique_id = old.replica_id.split("#", 1)[1]
    actors = list_actors(address=pool.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    pids = [a.pid for a in actors if a.name and a.name.endswith(f"#{unique_id}")]
    assert len(pids) == 1, [a.name for a in actors]
    os.kill(pids[0], signal.SIGKILL)

    t0 = time.monotonic()
    directory.wait_for(lambda s: old.replica_id not in {e.replica_id for e in s.replicas}, timeout=LEASE_SECONDS + 10)
    left_after = time.monotonic() - t0
    snap = directory.wait_for(
        lambda s: any(e.group == "l0-b" and e.replica_id != old.replica_id for e in s.replicas), timeout=150
    )
    back_after = time.monotonic() - t0
    new = next(e for e in snap.replicas if e.group == "l0-b")
    assert keys_from_proto(new.keys) == {0: [4, 5, 6, 7]}
    req = _request(0, [4, 5, 6, 7], rows=16)
    out, _ = _forward(_stub(new.endpoint), req)
    assert torch.equal(out, reference.forward(*req))
    print(
        f"killed replica left the directory after {left_after:.1f} s, replacement registered after {back_after:.1f} s"
    )


# -- in-process pieces (no Ray) ------------------------------------------------------------------------------------
def test_directory_leases_drain_watch_and_validation():
    server = DirectoryServer(sweep_interval=0.05)
    port = server.start("127.0.0.1", 0)
    seen: list[int] = []
    try:
        with DirectoryClient(f"127.0.0.1:{port}") as client:
            client.watch(lambda snap: seen.append(len(snap.replicas)))
            a = expert_pb2.ReplicaEntry(
                replica_id="a", group="g", endpoint="127.0.0.1:1", keys=[expert_pb2.ExpertKeys(layer=0, experts=[0, 1])]
            )
            b = expert_pb2.ReplicaEntry(
                replica_id="b", group="g", endpoint="127.0.0.1:2", keys=[expert_pb2.ExpertKeys(layer=0, experts=[1])]
            )
            v1 = client.register(a, lease_seconds=30)
            assert client.register(a, lease_seconds=30) == v1  # a renewal is not a change
            client.register(b, lease_seconds=0.3)
            assert endpoints_by_key(client.snapshot()) == {
                (0, 0): ["127.0.0.1:1"],
                (0, 1): ["127.0.0.1:1", "127.0.0.1:2"],
            }
            assert client.drain("a") and not client.drain("nobody")
            client.register(a, lease_seconds=30)  # renewing does not undo the drain
            snap = client.snapshot()
            assert [e.draining for e in snap.replicas] == [True, False]
            assert endpoints_by_key(snap)[(0, 1)] == ["127.0.0.1:2"]
            # b stops renewing: its lease runs out and it is gone without a Deregister
            client.wait_for(lambda s: [e.replica_id for e in s.replicas] == ["a"], timeout=5)
            client.deregister("a")
            client.wait_for(lambda s: not s.replicas, timeout=5)
            assert seen[-1] == 0 and 2 in seen
            for bad in (
                expert_pb2.ReplicaEntry(replica_id="", endpoint="h:1"),
                expert_pb2.ReplicaEntry(replica_id="x", endpoint="no-port"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    client.register(bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:
                client.register(a, lease_seconds=-1)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_expired_call_is_dropped_not_computed(checkpoint):
    """A call whose deadline passes while it waits behind a batch on the compute thread is never computed.

    The batch ahead is held on the compute thread by the test (a blocker queued there first), so the order of
    events does not depend on how fast this machine computes: the short call is in the replica, queued, before
    its deadline passes, and the batch ahead finishes only after it passed."""
    server = ExpertServer(checkpoint, {0: [0, 1]}, group="g")
    port = server.start("127.0.0.1", 0)
    coalescer = server.servicer.coalescer
    release = threading.Event()
    try:
        coalescer._compute.submit(release.wait, 60)  # the compute thread is busy until released

        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                # more rows than the replica computes on its loop: this batch goes to the (held) compute thread
                ahead = stub.Forward(
                    encode_forward(*_request(0, [0, 1], rows=DEFAULT_INLINE_ROWS + 44, top_k=1)), timeout=60
                )
                while coalescer.in_flight < 1 or coalescer.timers.batches:  # it is in, its batch not done
                    await asyncio.sleep(0.001)
                expired = stub.Forward(encode_forward(*_request(0, [0, 1], rows=3, top_k=1)), timeout=1.0)
                while coalescer.in_flight < 2:  # the short call is in the replica, queued behind the batch
                    await asyncio.sleep(0.001)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await expired
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # The replica's deadline is its own: the timeout counted from when the call reached it, later than
                # the caller's (under load by tens of ms). Release the batch ahead only once it passed there too
                # (the replica ends the call: it leaves the handler), else the call may still be in time there.
                left = time.monotonic() + 10
                while coalescer.in_flight > 1 and time.monotonic() < left:
                    await asyncio.sleep(0.001)
                assert coalescer.in_flight == 1, "the replica did not end the expired call at its deadline"
                release.set()
                reply = await ahead
                assert reply.batch_rows == DEFAULT_INLINE_ROWS + 44
                after = await stub.Forward(encode_forward(*_request(0, [0, 1], rows=5, top_k=1)), timeout=10)
                assert after.batch_rows == 5

        asyncio.run(main())
        text = server.metrics.text()
        tokens = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("expertmesh_replica_expert_tokens_total{")
        )
        assert tokens == DEFAULT_INLINE_ROWS + 44 + 5  # the expired call's 3 tokens were never computed
        assert 'code="DEADLINE_EXCEEDED"' in text or 'code="CANCELLED"' in text
    finally:
        release.set()
        server.stop()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_in_process_server_other_families(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    layer = info.moe_layers[-1]
    held = list(range(0, info.num_experts, 2))
    server = ExpertServer(path, {layer: held}, group="g")
    port = server.start("127.0.0.1", 0)
    try:
        stub = _stub(f"127.0.0.1:{port}")
        reference = ExpertWeights(CheckpointReader(path), {layer: held})
        req = _request(layer, held, rows=32, top_k=info.top_k)
        out, _ = _forward(stub, req)
        assert torch.equal(out, reference.forward(*req))
        bf16 = (layer, req[1].bfloat16(), *req[2:])  # bf16 activations come back as bf16
        out16, _ = _forward(stub, bf16)
        assert out16.dtype == torch.bfloat16
        torch.testing.assert_close(out16, reference.forward(*bf16))
        if info.moe_layers[0] > 0:  # DeepSeek: the first layers are dense, never served remotely
            with pytest.raises(grpc.RpcError) as err:
                _forward(stub, _request(0, held, rows=2))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_in_process_whole_layer_and_indexed_calls_coalesce_and_stay_exact(checkpoint):
    """The router's whole-layer form (no token index on the wire) and indexed calls, many at once on one replica:
    coalesced (whole-layer calls stay whole when stacked), each caller still gets its own answer."""
    from expertmesh.experts.app import REPLICA_ARGS

    assert "compute_threads" in REPLICA_ARGS
    info = read_moe_info(checkpoint)
    # Every batch on the compute thread (inline_rows 0): while one computes, the loop takes in the next calls, which
    # then form one batch. With the default, small batches compute on the loop itself, and on a loaded machine the
    # callers' sends can arrive one at a time behind them, each a lone call that never waits for company.
    server = ExpertServer(checkpoint, {1: list(range(8))}, group="g", max_wait_ms=20.0, inline_rows=0)
    port = server.start("127.0.0.1", 0)
    reference = ExpertWeights(CheckpointReader(checkpoint), {1: list(range(8))})
    try:

        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)

                async def caller(i: int):
                    results = []
                    for j in range(6):
                        req = _request(1, list(range(8)), rows=3 + (i + j) % 5, top_k=info.top_k, seed=100 * i + j)
                        layer, hidden, token_index, expert, weight = req
                        whole = (i + j) % 3 != 0
                        msg = encode_forward(layer, hidden, None if whole else token_index, expert, weight)
                        assert msg.whole_layer == whole
                        reply = await stub.Forward(msg, timeout=30)
                        results.append((req, decode(reply.output).clone(), reply.batch_rows))
                    return results

                return [r for rs in await asyncio.gather(*(caller(i) for i in range(24))) for r in rs]

        results = asyncio.run(main())
        assert len(results) == 24 * 6
        assert max(rows for _, _, rows in results) > 7, "no coalescing observed"
        for req, out, _ in results:
            torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)
    finally:
        server.stop()


def test_data_plane_loop_claims_grpc_poller_and_other_loops_keep_working(checkpoint):
    """grpc.aio wakes every loop that ever created a grpc.aio object for every event in the process. The expert
    server takes the poller's socket for its own loop; another loop's grpc.aio server (as Ray's own is in a Serve
    replica; here the directory's) still serves — its events are forwarded — and gets the socket back when the
    expert server stops."""
    directory = DirectoryServer()
    directory.start("127.0.0.1", 0)
    other = directory._loop

    def poller_readers(loop) -> int:
        return sum(
            1
            for key in loop._selector.get_map().values()
            if "PollerCompletionQueue._handle_events" in repr(key.data[0])
        )

    def wait_readers(loop, n: int) -> int:
        deadline = time.monotonic() + 5
        while poller_readers(loop) != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return poller_readers(loop)

    async def list_directory():  # a grpc.aio client on the other loop, calling that loop's own server
        async with grpc.aio.insecure_channel(directory.address) as channel:
            return await expert_pb2_grpc.ExpertDirectoryStub(channel).List(expert_pb2.ListRequest(), timeout=5)

    try:
        assert poller_readers(other.loop) == 1
        server = ExpertServer(checkpoint, {0: [0, 1]}, group="g")
        port = server.start("127.0.0.1", 0)
        try:
            assert wait_readers(other.loop, 0) == 0 and poller_readers(server._loop.loop) == 1
            out, _ = _forward(_stub(f"127.0.0.1:{port}"), _request(0, [0, 1], rows=4))  # the data plane serves
            assert out.shape == (4, 128)
            assert list(other.run(list_directory(), timeout=10).replicas) == []
        finally:
            server.stop()
        assert wait_readers(other.loop, 1) == 1
        assert list(other.run(list_directory(), timeout=10).replicas) == []
    finally:
        directory.stop()


def test_replica_metrics_recorded_on_flush_lose_nothing_recorded_meanwhile():
    """Per call the replica only appends to the metrics' queues (the compute thread does too); flushes running at
    the same time must neither lose nor double-count a record."""
    import threading

    import numpy as np

    from expertmesh.experts.metrics import ReplicaMetrics

    metrics = ReplicaMetrics("g")
    ids = np.array([0, 1, 1, 3], dtype=np.int32)
    done = threading.Event()

    def record():
        for _ in range(3000):
            metrics.batch(0, 2, ids, 4)
            metrics.call(0.001, "OK")
        done.set()

    worker = threading.Thread(target=record)
    worker.start()
    while not done.is_set():
        metrics.flush()
    worker.join()
    text = metrics.text()  # flushes the rest
    tokens = {
        line.split('expert="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("expertmesh_replica_expert_tokens_total{")
    }
    assert tokens == {"0": 3000.0, "1": 6000.0, "3": 3000.0}
    assert 'expertmesh_replica_forward_seconds_count{code="OK",group="g"} 3000.0' in text
    assert 'expertmesh_replica_batch_rows_count{group="g",layer="0"} 3000.0' in text


def test_a_stopping_loop_thread_cancels_its_pending_tasks_and_lets_them_end():
    """A data-plane loop that stops with work pending (gRPC's per-call coroutines, a batch on the compute thread)
    cancels it and runs it to its end before closing, as asyncio.run does; left suspended, the GC closed it later
    ("Task was destroyed but it is pending!", GeneratorExit tracebacks from grpc's _schedule_rpc_coro)."""
    from expertmesh.core.loop_thread import LoopThread

    thread = LoopThread("test-loop")
    started, ended = threading.Event(), []

    async def waits_forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except BaseException as exc:  # CancelledError from the stop; GeneratorExit if the GC closed it instead
            ended.append(type(exc).__name__)
            raise

    thread.submit(waits_forever())
    assert started.wait(5)
    thread.stop()
    assert ended == ["CancelledError"]
    assert thread.loop.is_closed()


# Run in a process of its own: the race needs the stopped server to be the process's last grpc.aio object.
_STOP_CYCLES = """
import sys, time
from expertmesh.core.protos import expert_pb2
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer
from expertmesh.experts.replica import ExpertServer
import grpc

entry = expert_pb2.ReplicaEntry(replica_id="r", group="g", endpoint="127.0.0.1:1")
for _ in range(100):
    server = DirectoryServer()
    port = server.start("127.0.0.1", 0)
    with DirectoryClient(f"127.0.0.1:{port}") as client:  # a call and a watch served before the stop
        client.register(entry, lease_seconds=60)
    watcher = DirectoryClient(f"127.0.0.1:{port}")
    watcher.watch()
    time.sleep(0.02)
    watcher.close()
    server.stop()
replica = ExpertServer(sys.argv[1], {0: [0, 1]}, replica_id="r")
for _ in range(20):  # the replica's server is freed the same way (its weights load once)
    replica.start("127.0.0.1", 0)
    with grpc.insecure_channel(replica.address) as channel:
        channel.unary_unary("/expertmesh.v1.ExpertService/Info")(b"", timeout=5)
    replica.stop()
print("stopped", flush=True)
"""


def test_stopped_grpc_servers_shut_grpc_aio_down_without_racing_their_loop(checkpoint):
    """A directory or replica server stopped as the last grpc.aio object of its process is freed only after its
    loop closed. Freed before, grpc.aio's poller shutdown (run by whichever thread frees it) took the poller's socket
    from the still-running loop and closed it while the loop's thread read it: "Exception in callback ... OSError:
    [Errno 9] Bad file descriptor" in about 1 of 5 directory stops here (35-42 of 200 before the fix, 0 after)."""
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_CYCLES, str(checkpoint)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "stopped", proc.stderr[-3000:]
    assert "Exception in callback" not in proc.stderr and "Bad file descriptor" not in proc.stderr, proc.stderr[-3000:]
