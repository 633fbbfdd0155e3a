"""The data plane's ForwardStream, on real gRPC over loopback against real replica servers (`ExpertServer`): the
router's transport (one long-lived stream per replica, replies matched by id, failures as ReplicaFailed, reopened
after a break) and the replica's side of it (each message answered on its own, a bad message answered with its
error while the stream serves on, per-message deadlines and trace context), and the dispatcher failing over when a
replica dies with its stream open."""

from __future__ import annotations

import asyncio
import queue
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import free_port
from opentelemetry import trace

from expertmesh.core import telemetry
from expertmesh.core.checkpoint import CheckpointReader, read_moe_info
from expertmesh.core.codec import decode, encode_forward
from expertmesh.core.kernel import ExpertWeights
from expertmesh.core.protos import expert_pb2
from expertmesh.discovery.directory import DirectoryClient, DirectoryServer
from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer, keys_to_proto
from expertmesh.router.transport import STREAM_METHOD, ReplicaFailed, Transport

EXPERTS = list(range(8))  # every routed expert of layer 0 of the tiny Mixtral


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return ExpertWeights(CheckpointReader(checkpoint), {0: EXPERTS})


@pytest.fixture
def server(checkpoint):
    s = ExpertServer(checkpoint, {0: EXPERTS}, group="g")
    s.start("127.0.0.1", 0)
    yield s
    s.stop()


def _request(rows: int, seed: int = 0, top_k: int = 2, experts: list[int] = EXPERTS):
    """(layer, hidden [rows, 128], token_index, expert, weight): `top_k` distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 128, generator=g)
    picks = torch.stack([torch.randperm(len(experts), generator=g)[:top_k] for _ in range(rows)])
    expert = torch.tensor(experts)[picks].flatten()
    token_index = torch.arange(rows).repeat_interleave(top_k)
    weight = torch.rand(rows * top_k, generator=g)
    return 0, hidden, token_index, expert, weight


class RawStream:
    """A ForwardStream with raw bytes as messages (what no well-behaved router sends), replies read by the test."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        method = self.channel.stream_stream(STREAM_METHOD, response_deserializer=expert_pb2.ForwardReply.FromString)
        self.replies = method(iter(self.requests.get, None))

    def send(self, raw: bytes) -> None:
        self.requests.put(raw)

    def receive(self, n: int) -> dict[int, expert_pb2.ForwardReply]:
        got: dict[int, expert_pb2.ForwardReply] = {}
        for _ in range(n):
            reply = next(self.replies)
            got[reply.id] = reply
        return got

    def close(self) -> None:
        self.requests.put(None)
        self.replies.cancel()
        self.channel.close()


def _call(call_id: int, req, timeout_s: float = 10.0) -> bytes:
    return expert_pb2.ForwardCall(id=call_id, request=encode_forward(*req), timeout_s=timeout_s).SerializeToString()


def _call_until_reconnected(transport: Transport, address: str, req, why: str, within_s: float = 20) -> torch.Tensor:
    """The output of `req` once the replica at `address` answers again (the channel reconnects after its backoff)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return decode(transport.call(address, encode_forward(*req), req[1].shape[0]).output)
        except ReplicaFailed:
            assert time.monotonic() < deadline, why
            time.sleep(0.1)


def test_many_calls_in_flight_on_one_stream_each_get_their_own_reply(server, reference):
    transport = Transport(10.0, streams=True)
    transport.connect(server.address)
    try:
        reqs = [_request(rows=1 + 7 * i, seed=i) for i in range(12)]
        started = [transport.start(server.address, encode_forward(*r), r[1].shape[0]) for r in reqs]
        assert transport.inflight_rows()[server.address] == sum(r[1].shape[0] for r in reqs)
        streams = {call.stream for call in started}
        assert len(streams) == 1 and None not in streams  # one stream carries them all
        for req, call in reversed(list(zip(reqs, started))):  # collected in another order than sent
            out = decode(transport.finish(call).output)
            torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)
        assert transport.inflight_rows()[server.address] == 0
        # the blocking call rides the same stream
        req = _request(rows=5, seed=99)
        out = decode(transport.call(server.address, encode_forward(*req), 5).output)
        assert torch.equal(out, reference.forward(*req))
        assert transport._links[server.address]._stream is next(iter(streams))
    finally:
        transport.close()


def test_bad_messages_on_a_stream_are_answered_one_by_one_and_the_stream_serves_on(server, reference):
    good = _request(rows=8)
    bad_shape = encode_forward(*_request(rows=8))
    del bad_shape.hidden.shape[:]
    bad_shape.hidden.shape.extend([8 * 128])
    stream = RawStream(server.address)
    try:
        stream.send(_call(1, good))
        cases = {
            2: (expert_pb2.ForwardCall(id=2, request=bad_shape).SerializeToString(), "INVALID_ARGUMENT", "2 dims"),
            3: (_call(3, _request(rows=8, experts=[3, 8])), "INVALID_ARGUMENT", "expert id out of range"),
            # a ForwardCall whose request does not parse: the id (first field) still reads
            4: (b"\x08\x04\x12\x04\xff\xff\xff\xff", "INVALID_ARGUMENT", "unparseable ForwardCall"),
            0: (b"\xff\xff\xff", "INVALID_ARGUMENT", "unparseable ForwardCall"),  # nothing reads: id 0
            5: (expert_pb2.ForwardCall(id=5).SerializeToString(), "INVALID_ARGUMENT", "missing field 'hidden'"),
        }
        for raw, _, _ in cases.values():
            stream.send(raw)
        stream.send(_call(6, good))
        replies = stream.receive(len(cases) + 2)
        assert sorted(replies) == [0, 1, 2, 3, 4, 5, 6]
        for call_id, (_, code, text) in cases.items():
            reply = replies[call_id]
            assert grpc.StatusCode[code].value[0] == reply.code, (call_id, reply.message)
            assert text in reply.message, (call_id, reply.message)
            assert not reply.HasField("response")
        for call_id in (1, 6):
            assert replies[call_id].code == 0
            assert torch.equal(decode(replies[call_id].response.output), reference.forward(*good))
        # still open after all that: a call after the errors is answered on the same stream
        stream.send(_call(7, good))
        assert stream.receive(1)[7].code == 0
        text = server.metrics.text()
        assert 'code="INVALID_ARGUMENT"' in text
    finally:
        stream.close()


def test_expert_not_held_and_expired_message_on_a_stream(checkpoint, reference):
    # inline_rows 0: every batch on the compute thread, so a long batch keeps the loop free to read the next call
    server = ExpertServer(checkpoint, {0: [0, 1]}, group="g", inline_rows=0)
    server.start("127.0.0.1", 0)
    stream = RawStream(server.address)
    try:
        stream.send(_call(1, _request(rows=4, experts=[0, 2])))  # expert 2 not held here
        assert stream.receive(1)[1].code == grpc.StatusCode.NOT_FOUND.value[0]
        stream.send(_call(2, _request(rows=32768, top_k=1, experts=[0, 1]), timeout_s=60))  # a long batch
        while server.servicer.coalescer.in_flight == 0:
            time.sleep(0.001)
        stream.send(_call(3, _request(rows=3, top_k=1, experts=[0, 1]), timeout_s=0.01))  # expires behind it
        replies = stream.receive(2)
        assert replies[3].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], replies[3].message
        assert replies[2].code == 0 and replies[2].response.batch_rows == 32768
    finally:
        stream.close()
        server.stop()


def test_stream_calls_time_their_receive_and_write_steps_and_unary_calls_do_not(server, reference):
    timers = server.servicer.coalescer.timers
    streamed, unary = Transport(10.0, streams=True), Transport(10.0, streams=False)
    try:
        for transport in (streamed, unary):
            transport.connect(server.address)
        req = _request(rows=6, seed=4)
        for _ in range(3):
            out = decode(streamed.call(server.address, encode_forward(*req), 6).output)
            assert torch.equal(out, reference.forward(*req))
        deadline = time.monotonic() + 5
        while timers.stream_calls < 3 and time.monotonic() < deadline:  # a reply's steps count after its write
            time.sleep(0.001)
        after_stream = timers.snapshot()
        assert (after_stream["calls"], after_stream["stream_calls"]) == (3, 3)
        assert all(after_stream["us_per_stream_call"][k] > 0 for k in ("receive", "write"))
        unary.call(server.address, encode_forward(*req), 6)
        after_unary = timers.snapshot()
        assert (after_unary["calls"], after_unary["stream_calls"]) == (4, 3)
        assert after_unary["us_per_stream_call"] == after_stream["us_per_stream_call"]
    finally:
        streamed.close()
        unary.close()


def test_deadline_on_the_stream_fails_the_call_and_its_late_reply_is_dropped(server, reference):
    transport = Transport(0.002, streams=True)
    transport.connect(server.address)
    try:
        big = _request(rows=16384)
        with pytest.raises(ReplicaFailed) as err:
            transport.call(server.address, encode_forward(*big), 16384)
        assert "DEADLINE_EXCEEDED" in err.value.detail
        stream = transport._links[server.address]._stream
        transport.deadline_s = 10.0
        req = _request(rows=6, seed=3)
        out = decode(transport.call(server.address, encode_forward(*req), 6).output)
        assert torch.equal(out, reference.forward(*req))  # not the late reply of the expired call
        assert transport._links[server.address]._stream is stream and not stream.broken
        assert stream._pending == {}
    finally:
        transport.close()


def test_replica_stopped_with_calls_in_flight_fails_them_and_the_stream_reopens_when_it_is_back(checkpoint, reference):
    port = free_port()
    server = ExpertServer(checkpoint, {0: EXPERTS}, group="g", inline_rows=0)
    server.start("127.0.0.1", port)
    address = f"127.0.0.1:{port}"
    transport = Transport(30.0, streams=True)
    transport.connect(address)
    try:
        small = _request(rows=4, seed=1)
        assert torch.equal(decode(transport.call(address, encode_forward(*small), 4).output), reference.forward(*small))
        first = transport._links[address]._stream
        # Calls of 32768 rows are batches of their own, one after another on the compute thread: when the replica
        # stops, the later ones are still waiting (the first may have been answered already).
        reqs = [_request(rows=32768, seed=s) for s in range(2, 6)]
        pending = [transport.start(address, encode_forward(*r), 32768) for r in reqs]
        while server.servicer.coalescer.in_flight == 0:  # the calls are in the replica
            time.sleep(0.001)
        server.stop(grace=0)
        failed = 0
        for req, call in zip(reqs, pending):
            t = time.monotonic()
            try:
                out = decode(transport.finish(call).output)
            except ReplicaFailed as exc:
                assert time.monotonic() - t < 5  # failed by the broken stream, not by the 30 s deadline
                assert "stream" in exc.detail or "UNAVAILABLE" in exc.detail, exc.detail
                failed += 1
            else:
                torch.testing.assert_close(out, reference.forward(*req), rtol=1.3e-6, atol=1e-5)
        assert failed >= 2, f"only {failed} of the calls in flight failed"
        assert first.broken and first._pending == {}
        with pytest.raises(ReplicaFailed):  # nobody there now
            transport.call(address, encode_forward(*small), 4)

        server = ExpertServer(checkpoint, {0: EXPERTS}, group="g")
        server.start("127.0.0.1", port)
        out = _call_until_reconnected(transport, address, small, "no stream to the restarted replica")
        assert torch.equal(out, reference.forward(*small))
        assert transport._links[address]._stream is not first
        assert transport.inflight_rows()[address] == 0
    finally:
        transport.close()
        server.stop()


_REPLICA_MAIN = """
import sys
from expertmesh.experts.replica import ExpertServer
server = ExpertServer(sys.argv[1], {0: list(range(8))}, group="g")
print(server.start("127.0.0.1", 0), flush=True)
sys.stdin.read()
server.stop()
"""


def test_keepalive_breaks_the_idle_stream_of_a_frozen_replica_and_keeps_a_live_one(checkpoint, reference, monkeypatch):
    """A replica that stops answering without closing its connection (SIGSTOP: the kernel still ACKs, nothing
    answers) breaks the router's idle stream within keepalive + timeout, so the next call opens a new one instead of
    waiting out its deadline; a live replica's idle stream outlives many pings (the replica accepts them: no
    GOAWAY too_many_pings); with keepalive off the frozen replica's stream stays open."""
    import signal
    import subprocess
    import sys

    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA_MAIN, str(checkpoint)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    pinging, silent = Transport(30.0, streams=True), Transport(30.0, streams=True)
    try:
        address = f"127.0.0.1:{int(replica.stdout.readline())}"
        req = _request(rows=4, seed=1)
        for transport, keepalive in ((pinging, "1"), (silent, "0")):  # the link reads the settings as it is made
            monkeypatch.setenv("EXPERTMESH_DISPATCH_KEEPALIVE_S", keepalive)
            monkeypatch.setenv("EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S", "1")
            transport.connect(address)
            assert torch.equal(decode(transport.call(address, encode_forward(*req), 4).output), reference.forward(*req))
        first = pinging._links[address]._stream
        time.sleep(4.5)  # idle: four pings answered
        assert not first.broken, first.detail
        assert torch.equal(decode(pinging.call(address, encode_forward(*req), 4).output), reference.forward(*req))
        assert pinging._links[address]._stream is first

        replica.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        while not first.broken:
            assert time.monotonic() - frozen < 8, "the frozen replica's stream was not broken by keepalive"
            time.sleep(0.05)
        assert "UNAVAILABLE" in first.detail, first.detail
        assert not silent._links[address]._stream.broken  # without pings nothing notices
        replica.send_signal(signal.SIGCONT)
        out = _call_until_reconnected(pinging, address, req, "no stream to the replica after it woke")
        assert torch.equal(out, reference.forward(*req))
        assert pinging._links[address]._stream is not first
    finally:
        replica.send_signal(signal.SIGCONT)
        pinging.close()
        silent.close()
        replica.stdin.close()
        try:
            replica.wait(15)
        except subprocess.TimeoutExpired:
            replica.kill()
            replica.wait()


def test_dispatcher_fails_over_when_a_replica_dies_with_its_stream_open(checkpoint, reference):
    """Two replicas hold layer 0; the dispatcher's streams to both are open; one is stopped; every layer call still
    gives the right output (its share resent to the other holder)."""
    from expertmesh.router.dispatch import Dispatcher

    directory = DirectoryServer()
    directory.start("127.0.0.1", 0)
    servers = [ExpertServer(checkpoint, {0: EXPERTS}, replica_id=f"r{i}", group=f"g{i}") for i in range(2)]
    info = read_moe_info(checkpoint)
    dispatcher = None
    try:
        with DirectoryClient(directory.address) as client:
            for s in servers:
                port = s.start("127.0.0.1", 0)
                entry = expert_pb2.ReplicaEntry(
                    replica_id=s.replica_id,
                    group=s.group,
                    endpoint=f"127.0.0.1:{port}",
                    keys=keys_to_proto({0: EXPERTS}),
                )
                client.register(entry, lease_seconds=3600)
        dispatcher = Dispatcher(
            directory.address,
            deadline_s=10.0,
            metrics=False,
            counters_path=str(Path(tempfile.mkdtemp(prefix="counters-")) / "counters"),
        )
        assert dispatcher._transport.streams
        dispatcher.register_layer("test", 0, info.num_experts)
        dispatcher.wait_for_coverage({0: info.num_experts}, timeout=30)

        def layer_call(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            hidden = torch.randn(32, 128, generator=g)
            ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(32)])  # [T, 2]
            weights = torch.rand(32, 2, generator=g)
            out = dispatcher.forward(0, hidden, weights, ids)
            expected = reference.forward(
                0, hidden, torch.arange(32).repeat_interleave(2), ids.flatten(), weights.flatten()
            )
            torch.testing.assert_close(out, expected, rtol=1.3e-6, atol=1e-5)

        layer_call(0)
        links = dispatcher._transport._links
        assert len(links) == 2 and all(link._stream is not None for link in links.values())  # both streams open
        assert dispatcher.stats()["failovers"] == 0
        servers[0].stop(grace=0)
        for seed in range(1, 6):
            layer_call(seed)
        assert dispatcher.stats()["failovers"] >= 1
    finally:
        if dispatcher is not None:
            dispatcher.close()
        for s in servers:
            s.stop()
        directory.stop()


def test_trace_context_on_the_stream_parents_the_replicas_span(server):
    from otlp_collector import Collector

    collector = Collector()
    telemetry.init_tracing("stream-test", endpoint=collector.endpoint, install_global=False)
    transport = Transport(10.0, streams=True)
    transport.connect(server.address)
    try:
        layer_span = telemetry.tracer().start_span("dispatch layer 0")
        metadata = telemetry.inject_metadata(trace.set_span_in_context(layer_span))
        assert any(k == "traceparent" for k, _ in metadata)
        calls = [
            transport.start(server.address, encode_forward(*_request(rows=4, seed=i)), 4, metadata) for i in (0, 1)
        ]
        for call in calls:
            transport.finish(call)
        layer_span.end()
        telemetry.shutdown_tracing()  # flushes
        parent = layer_span.get_span_context()
        deadline = time.monotonic() + 10
        while True:
            spans = [s for _, s in collector.snapshot() if s.name == "expert forward"]
            if len(spans) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(spans) == 2
        for span in spans:
            assert int.from_bytes(span.trace_id, "big") == parent.trace_id
            assert int.from_bytes(span.parent_span_id, "big") == parent.span_id
    finally:
        telemetry.shutdown_tracing()
        transport.close()
        collector.stop()


def test_unary_forward_still_served_by_the_same_handler(server, reference):
    transport = Transport(10.0, streams=False)
    transport.connect(server.address)
    try:
        req = _request(rows=7, seed=4)
        out = decode(transport.call(server.address, encode_forward(*req), 7).output)
        assert torch.equal(out, reference.forward(*req))
        with pytest.raises(ReplicaFailed) as err:
            transport.finish(transport.start(server.address, encode_forward(*_request(rows=2, experts=[3, 8])), 2))
        assert "INVALID_ARGUMENT" in err.value.detail and "expert id out of range" in err.value.detail
        assert transport._links[server.address]._stream is None
    finally:
        transport.close()


def test_cancelled_stream_leaves_no_task_behind(checkpoint):
    server = ExpertServer(checkpoint, {0: [0, 1]}, group="g", inline_rows=0)
    server.start("127.0.0.1", 0)
    stream = RawStream(server.address)
    try:
        request = encode_forward(*_request(rows=32768, top_k=1, experts=[0, 1]))
        calls = [expert_pb2.ForwardCall(id=i, request=request, timeout_s=60).SerializeToString() for i in range(1, 7)]
        for raw in calls:  # batches of their own, computed one after another: the later ones wait
            stream.send(raw)
        deadline = time.monotonic() + 30
        while server.servicer.coalescer.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert server.servicer.coalescer.in_flight >= 2
        stream.close()  # the caller goes away with calls in flight
        deadline = time.monotonic() + 10
        while server.servicer.coalescer.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.servicer.coalescer.in_flight == 0
        assert 'code="CANCELLED"' in server.metrics.text()

        assert server.run_coroutine(_count_stream_tasks(), timeout=5) == 0
    finally:
        server.stop()


async def _count_stream_tasks() -> int:
    """The replica's per-message tasks still alive on its loop."""
    return sum(
        1 for t in asyncio.all_tasks() if not t.done() and "forward_stream.<locals>.answer" in repr(t.get_coro())
    )
