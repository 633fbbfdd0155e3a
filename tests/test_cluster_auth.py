"""The cluster credential on the internal gRPC services (core/auth.py), on real servers over loopback: the expert
directory and an expert replica's ExpertService, each called without the credential, with a wrong one and with a
valid one (UNAUTHENTICATED, UNAUTHENTICATED, served) on unary calls and on their streams (Watch, ForwardStream);
the previous token accepted during a rotation, a rotated token file picked up without a restart; a replica without
the credential cannot register, one with it cannot register keys outside its plan group (PERMISSION_DENIED); the
router's Transport and the DirectoryClient carry the credential end to end; `expertmesh serve`'s per-run token."""

from __future__ import annotations

import logging
import queue

import grpc
import pytest
import torch

from expertmesh.core import auth, settings
from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.codec import decode, encode_forward
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.protos import expert_pb2, expert_pb2_grpc
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer, send_plan
from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer, keys_to_proto
from expertmesh.router.transport import STREAM_METHOD, ReplicaFailed, Transport

TOKEN = "current-cluster-token-0123456789"
OLD = "previous-token"
EXPERTS = list(range(8))  # every routed expert of layer 0 of the tiny Mixtral
NONE, WRONG, VALID, PREVIOUS = None, "Bearer not-the-token", f"Bearer {TOKEN}", f"Bearer {OLD}"
DENIED_CREDENTIALS = [NONE, WRONG, TOKEN, f"Bearer {TOKEN}x", f"bearer {TOKEN}"]  # no scheme / longer / wrong case


def _metadata(credential: str | None):
    return () if credential is None else (("authorization", credential),)


@pytest.fixture
def token(monkeypatch):
    """A token and a previous one configured in this process (servers started after this require them)."""
    monkeypatch.delenv("EXPERTMESH_CLUSTER_TOKEN_FILE", raising=False)
    monkeypatch.setenv("EXPERTMESH_CLUSTER_TOKEN", TOKEN)
    monkeypatch.setenv("EXPERTMESH_CLUSTER_TOKEN_PREVIOUS", OLD)
    return TOKEN


@pytest.fixture
def directory(token):
    server = DirectoryServer()
    server.start("127.0.0.1", 0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture
def replica(token, checkpoint):
    server = ExpertServer(checkpoint, {0: EXPERTS}, group="g")
    server.start("127.0.0.1", 0)
    yield server
    server.stop()


@pytest.fixture
def raw_channel():
    """Plain channels (no credential added): the test chooses each call's metadata."""
    opened: list[grpc.Channel] = []

    def open_(address: str) -> grpc.Channel:
        opened.append(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        return opened[-1]

    yield open_
    for channel in opened:
        channel.close()


def _entry(replica_id: str = "r1", group: str = "g", keys: dict[int, list[int]] | None = None):
    return expert_pb2.ReplicaEntry(
        replica_id=replica_id, group=group, endpoint="127.0.0.1:1", keys=keys_to_proto(keys or {0: [0, 1]})
    )


def _forward_request(rows: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 128, generator=g)
    expert = torch.tensor([[0, 3], [1, 5], [2, 7], [4, 6]])[:rows].flatten()
    return 0, hidden, torch.arange(rows).repeat_interleave(2), expert, torch.rand(rows * 2, generator=g)


# ---- the directory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", DENIED_CREDENTIALS)
def test_directory_refuses_every_call_without_the_credential(directory, raw_channel, credential):
    stub = expert_pb2_grpc.ExpertDirectoryStub(raw_channel(directory.address))
    md = _metadata(credential)
    calls = {
        "List": lambda: stub.List(expert_pb2.ListRequest(), timeout=5, metadata=md),
        "Register": lambda: stub.Register(expert_pb2.RegisterRequest(entry=_entry()), timeout=5, metadata=md),
        "Deregister": lambda: stub.Deregister(expert_pb2.DeregisterRequest(replica_id="r1"), timeout=5, metadata=md),
        "Drain": lambda: stub.Drain(expert_pb2.DrainRequest(replica_id="r1"), timeout=5, metadata=md),
        "SetPlan": lambda: stub.SetPlan(expert_pb2.SetPlanRequest(), timeout=5, metadata=md),
        "Watch": lambda: next(stub.Watch(expert_pb2.WatchRequest(), timeout=5, metadata=md)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "cluster credential" in err.value.details(), name
    # nothing of it reached the directory: no entry, no plan
    assert directory.servicer is not None
    assert not directory.servicer._entries and directory.servicer._plan is None


@pytest.mark.parametrize("credential", [VALID, PREVIOUS])
def test_directory_serves_the_token_and_the_previous_one(directory, raw_channel, credential):
    stub = expert_pb2_grpc.ExpertDirectoryStub(raw_channel(directory.address))
    md = _metadata(credential)
    version = stub.Register(expert_pb2.RegisterRequest(entry=_entry()), timeout=5, metadata=md).version
    assert [r.replica_id for r in stub.List(expert_pb2.ListRequest(), timeout=5, metadata=md).replicas] == ["r1"]
    watch = stub.Watch(expert_pb2.WatchRequest(), timeout=5, metadata=md)
    first = next(watch)
    assert first.version == version and [r.replica_id for r in first.replicas] == ["r1"]
    watch.cancel()


def test_a_replica_may_register_only_the_keys_of_its_plan_group(directory, raw_channel):
    stub = expert_pb2_grpc.ExpertDirectoryStub(raw_channel(directory.address))
    md = _metadata(VALID)

    def register(entry):
        return stub.Register(expert_pb2.RegisterRequest(entry=entry), timeout=5, metadata=md)

    # No plan yet (a directory that just started): any group is taken.
    register(_entry("early", group="anything", keys={3: [9]}))
    plan = expert_pb2.SetPlanRequest(
        groups=[
            expert_pb2.GroupKeys(group="g", keys=keys_to_proto({0: [0, 1, 2], 1: [4]})),
            expert_pb2.GroupKeys(group="h", keys=keys_to_proto({0: [3]})),
        ]
    )
    stub.SetPlan(plan, timeout=5, metadata=md)
    register(_entry("ok-all", group="g", keys={0: [0, 1, 2], 1: [4]}))
    register(_entry("ok-part", group="g", keys={0: [1]}))
    refused = {
        "unknown group": _entry("x1", group="intruder", keys={0: [0]}),
        "key of another group": _entry("x2", group="g", keys={0: [3]}),
        "one key too many": _entry("x3", group="g", keys={0: [0, 1, 2, 5]}),
        "layer the group lacks": _entry("x4", group="h", keys={1: [4]}),
        "renewal of a group no longer planned": _entry("early", group="anything", keys={3: [9]}),
    }
    for why, entry in refused.items():
        with pytest.raises(grpc.RpcError) as err:
            register(entry)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, why
    listed = {r.replica_id for r in stub.List(expert_pb2.ListRequest(), timeout=5, metadata=md).replicas}
    assert listed == {"early", "ok-all", "ok-part"}  # "early" stays until its lease ends; no refused entry got in


def test_directory_client_and_send_plan_carry_the_credential(directory):
    class Plan:  # what send_plan reads of a PlacementPlan
        class Group:
            def __init__(self, name, keys):
                self.name, self.keys = name, keys

        groups = [Group("g", {0: [0, 1]})]

    assert send_plan(directory.address, Plan())
    with DirectoryClient(directory.address) as client:
        client.register(_entry("r1", group="g", keys={0: [0, 1]}))
        snap = client.wait_for(lambda s: any(r.replica_id == "r1" for r in s.replicas), timeout=5)  # the Watch
        assert [r.replica_id for r in snap.replicas] == ["r1"]
        with pytest.raises(grpc.RpcError) as err:
            client.register(_entry("r2", group="g", keys={0: [2]}))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert client.drain("r1") and client.snapshot().replicas[0].draining


# ---- the expert service --------------------------------------------------------------------------------------


def _stream_one(channel: grpc.Channel, credential: str | None, request) -> expert_pb2.ForwardReply:
    requests: queue.SimpleQueue = queue.SimpleQueue()
    method = channel.stream_stream(STREAM_METHOD, response_deserializer=expert_pb2.ForwardReply.FromString)
    replies = method(iter(requests.get, None), timeout=10, metadata=_metadata(credential))
    requests.put(expert_pb2.ForwardCall(id=1, request=encode_forward(*request), timeout_s=5).SerializeToString())
    try:
        return next(replies)
    finally:
        requests.put(None)
        replies.cancel()


@pytest.mark.parametrize("credential", DENIED_CREDENTIALS)
def test_expert_service_refuses_every_call_without_the_credential(replica, raw_channel, credential):
    channel = raw_channel(replica.address)
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    md = _metadata(credential)
    calls = {
        "Info": lambda: stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=md),
        "Forward": lambda: stub.Forward(encode_forward(*_forward_request()), timeout=5, metadata=md),
        "ForwardStream": lambda: _stream_one(channel, credential, _forward_request()),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert replica.servicer is not None and replica.servicer.coalescer is not None


@pytest.mark.parametrize("credential", [VALID, PREVIOUS])
def test_expert_service_serves_the_token_and_the_previous_one(replica, raw_channel, checkpoint, credential):
    channel = raw_channel(replica.address)
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    md = _metadata(credential)
    reference = ExpertWeights(CheckpointReader(checkpoint), {0: EXPERTS})
    req = _forward_request()
    assert stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=md).group == "g"
    out = decode(stub.Forward(encode_forward(*req), timeout=5, metadata=md).output)
    torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)
    reply = _stream_one(channel, credential, req)
    assert reply.id == 1 and reply.code == 0, reply.message
    torch.testing.assert_close(decode(reply.response.output), reference.forward(*req), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("streams", [True, False])
def test_the_routers_transport_carries_the_credential(replica, checkpoint, streams, monkeypatch):
    reference = ExpertWeights(CheckpointReader(checkpoint), {0: EXPERTS})
    req = _forward_request(seed=3)
    transport = Transport(10.0, streams=streams)
    transport.connect(replica.address)
    try:
        out = decode(transport.call(replica.address, encode_forward(*req), 4).output)
        torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)
    finally:
        transport.close()
    # A router of another cluster (it sends its own token) is refused: the failover signal, never an answer.
    monkeypatch.setattr(auth, "call_metadata", lambda: (("authorization", "Bearer another-cluster"),))
    stranger = Transport(10.0, streams=streams)
    stranger.connect(replica.address)
    try:
        with pytest.raises(ReplicaFailed, match="UNAUTHENTICATED"):
            stranger.call(replica.address, encode_forward(*req), 4)
    finally:
        stranger.close()


# ---- rotation through a token file, and no token at all ------------------------------------------------------


def test_a_rotated_token_file_is_picked_up_without_a_restart(tmp_path, monkeypatch, raw_channel):
    monkeypatch.delenv("EXPERTMESH_CLUSTER_TOKEN", raising=False)
    monkeypatch.delenv("EXPERTMESH_CLUSTER_TOKEN_PREVIOUS", raising=False)
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    path = tmp_path / "token"
    path.write_text("first-token\n")
    monkeypatch.setenv("EXPERTMESH_CLUSTER_TOKEN_FILE", str(path))
    server = DirectoryServer()
    server.start("127.0.0.1", 0)
    try:
        stub = expert_pb2_grpc.ExpertDirectoryStub(raw_channel(server.address))

        def code(token: str | None):
            try:
                stub.List(expert_pb2.ListRequest(), timeout=5, metadata=_metadata(token and f"Bearer {token}"))
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        with DirectoryClient(server.address) as client:  # reads the same file: sends line 1
            assert code("first-token") == grpc.StatusCode.OK and code(None) == grpc.StatusCode.UNAUTHENTICATED
            assert client.snapshot().version
            # Rotation, step 1: the new token as current, the old as previous (both accepted while processes roll)
            path.write_text("second-token-longer\nfirst-token\n")
            assert code("second-token-longer") == grpc.StatusCode.OK and code("first-token") == grpc.StatusCode.OK
            assert client.snapshot().version  # the client now sends the new token: still served
            # step 2: the previous one dropped
            path.write_text("second-token-longer\n")
            assert code("first-token") == grpc.StatusCode.UNAUTHENTICATED
            assert code("second-token-longer") == grpc.StatusCode.OK
            assert client.snapshot().version
            # a configured file that is gone accepts nobody (fails closed, never open)
            path.unlink()
            assert code("second-token-longer") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_without_a_token_servers_are_open_and_say_so_once(monkeypatch, raw_channel, caplog):
    for name in ("EXPERTMESH_CLUSTER_TOKEN", "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS", "EXPERTMESH_CLUSTER_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(auth, "_warned_open", False)
    assert auth.call_metadata() == () and not auth.configured()
    servers = [DirectoryServer(), DirectoryServer()]
    with caplog.at_level(logging.WARNING, logger="expertmesh.auth"):
        for server in servers:
            server.start("127.0.0.1", 0)
    try:
        assert sum("no cluster credential configured" in r.getMessage() for r in caplog.records) == 1
        stub = expert_pb2_grpc.ExpertDirectoryStub(raw_channel(servers[0].address))
        assert stub.List(expert_pb2.ListRequest(), timeout=5).version  # no metadata at all: served
        with DirectoryClient(servers[1].address) as client:
            assert not isinstance(client._channel, grpc._interceptor._Channel)  # a plain channel: nothing added
            assert client.snapshot().version
    finally:
        for server in servers:
            server.stop()


# ---- `expertmesh serve`: one token per run, in the environment only ------------------------------------------


def test_the_stack_makes_one_token_per_run_and_passes_it_in_the_environment(monkeypatch, tmp_path, checkpoint):
    from expertmesh.stack import Stack

    for name in ("EXPERTMESH_CLUSTER_TOKEN", "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS", "EXPERTMESH_CLUSTER_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    tokens = []
    for _ in range(2):
        stack = Stack(checkpoint, log_dir=tmp_path / "logs")
        stack._ensure_cluster_token()
        token = settings.cluster_token()
        assert token and len(token) >= 40
        assert stack._env()["EXPERTMESH_CLUSTER_TOKEN"] == token  # every process it starts gets it
        assert not any(token in p.read_text() for p in tmp_path.rglob("*") if p.is_file())  # in no file
        stack.stop()  # nothing started: only the token goes
        assert settings.cluster_token() is None
        tokens.append(token)
    assert tokens[0] != tokens[1]
    # A token given with --env is used (this process's clients send it too), not replaced.
    stack = Stack(checkpoint, log_dir=tmp_path / "logs", extra_env={"EXPERTMESH_CLUSTER_TOKEN": "given"})
    stack._ensure_cluster_token()
    assert settings.cluster_token() == "given" and auth.call_metadata() == (("authorization", "Bearer given"),)
    stack.stop()
    assert settings.cluster_token() is None


def test_the_replicas_own_aio_channels_carry_the_credential(replica, directory):
    """experts/app.py's channels (warm-up, health probe, lease, deregister) are grpc.aio: unary and stream calls."""
    import asyncio

    async def calls():
        async with auth.aio_insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
            info = await expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)
            request = expert_pb2.ForwardCall(id=7, request=encode_forward(*_forward_request()), timeout_s=5)
            stream = expert_pb2_grpc.ExpertServiceStub(channel).ForwardStream(iter([request]), timeout=10)
            replies = [reply async for reply in stream]
        async with auth.aio_insecure_channel(directory.address) as channel:
            stub = expert_pb2_grpc.ExpertDirectoryStub(channel)
            await stub.Register(expert_pb2.RegisterRequest(entry=_entry()), timeout=5)
            watch = stub.Watch(expert_pb2.WatchRequest(), timeout=5)
            first = await watch.read()
            watch.cancel()
        return info, replies, first

    info, replies, first = asyncio.run(calls())
    assert info.group == "g"
    assert [(r.id, r.code) for r in replies] == [(7, 0)]
    assert [r.replica_id for r in first.replicas] == ["r1"]


def test_the_controller_services_status_needs_the_credential_and_its_health_is_open(token):
    """The controller service's HTTP port (what the gateway's /experts reads): /status only with the cluster
    credential (the previous token too, during a rotation), /health open for probes. Real HTTP on loopback."""
    import threading

    import httpx

    from expertmesh.control.controller_service import serve_http

    class Service:  # the two answers serve_http asks a ControllerService for
        last_error = None

        def health(self):
            return {"healthy": True}

        def status(self):
            return {"plan": {"groups": []}}

    server = serve_http(Service(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            reply = httpx.get(f"{url}/status", headers=headers, timeout=10)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error", headers
        for credential in (TOKEN, OLD):
            reply = httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {credential}"}, timeout=10)
            assert reply.status_code == 200 and reply.json() == {"plan": {"groups": []}}
        assert auth.http_headers() == {"Authorization": f"Bearer {TOKEN}"}  # what the gateway and controller send
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
