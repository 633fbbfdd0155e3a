"""One MoE layer's dispatch round trip to the expert pool vs a plain grpc.aio echo of the same payload.

Dispatch: 64 tokens x hidden 128, fp32, top-2 over the layer's 8 experts (tiny Mixtral), through the router's
own code: `router.dispatch.Dispatcher.forward(layer, hidden, topk_weights, topk_ids)` — directory watch, routing
table, grouping, encode, one call straight to the Ray Serve replica's own grpc.aio server, decode, combine. Twice:
over the router's long-lived ForwardStream (`dispatch`, the default data plane) and as one unary Forward per call
(`dispatch_unary`, EXPERTMESH_DISPATCH_STREAMS=0).
Echo: a grpc.aio server in its own process that returns the bytes it gets unchanged (raw handlers, no protobuf
work) — the floor any gRPC data plane pays for moving this payload — called the way the dispatcher calls: `echo`
is a bidirectional stream echoing the serialized ForwardCall (sync gRPC client, requests fed from a queue, replies
read by a thread of its own, as router/transport.py), `echo_unary` a unary call of the ForwardRequest bytes. All
four are timed in the same run, interleaved call by call, sequential calls (latency, not throughput). Also one
concurrent line: 32 grpc.aio callers at once on the same replica (coalesced), to show what batching buys. With
`--standalone` the replica's own timers of the measured calls come back too, and `stream_call_stages_us` puts one
stream layer call together stage by stage: the router's dispatcher, the replica's handler and the stream's steps
around it, and what is left of the router's wait (gRPC moving the call and the reply, both ways).

    .venv/bin/python benchmarks/dispatch_roundtrip.py            # writes benchmarks/results/dispatch_roundtrip.json
    .venv/bin/python benchmarks/dispatch_roundtrip.py --iters 500 --blocks 4
    .venv/bin/python benchmarks/dispatch_roundtrip.py --out benchmarks/results/dispatch_roundtrip_streams.json

Targets: dispatch median <= 1.5x the stream echo median; unary dispatch <= 2x the unary echo.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from expertmesh.core import settings  # noqa: E402 - stdlib only

settings.apply_process_defaults()

import grpc  # noqa: E402
import torch  # noqa: E402

from expertmesh.core.checkpoint import read_moe_info  # noqa: E402
from expertmesh.core.codec import decode, encode_forward  # noqa: E402
from expertmesh.core.plan import default_plan  # noqa: E402
from expertmesh.core.protos import expert_pb2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-checkpoint builder
from tiny import build_tiny_checkpoint  # noqa: E402

from expertmesh.core.settings import free_port  # noqa: E402
from expertmesh.experts.pool import LocalPool  # noqa: E402
from expertmesh.experts.replica import CHANNEL_OPTIONS, SERVER_OPTIONS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dispatch_roundtrip.json"
FORWARD = "/expertmesh.v1.ExpertService/Forward"
ECHO = "/bench.Echo/Echo"
STREAM_ECHO = "/bench.Echo/StreamEcho"


# -- echo server (runs in its own process) -------------------------------------------------------------------------
async def _echo_main(port: int) -> None:
    async def echo(raw: bytes, context) -> bytes:
        return raw

    async def stream_echo(messages, context):
        async for raw in messages:
            yield raw

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _directory_main(port: int) -> None:
    """--standalone's directory, in a process of its own (as in the Ray pool): a grpc.aio server on another
    loop of the replica's process would be woken by every Forward too (grpc.aio's poller serves all loops)."""
    from expertmesh.discovery.directory import DirectoryServer

    directory = DirectoryServer()
    directory.start("127.0.0.1", port)
    print("ready", flush=True)
    sys.stdin.read()
    directory.stop()


def _standalone_main(model: str, directory_port: int, compute_threads: int) -> None:
    """--standalone: one replica of layer 0 in a plain process, no Ray (quick A/B of the code)."""
    from expertmesh.discovery.directory import DirectoryClient
    from expertmesh.experts.replica import ExpertServer, keys_to_proto

    directory = subprocess.Popen(
        [sys.executable, __file__, "--directory-server", str(directory_port)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    assert directory.stdout.readline().strip() == b"ready"
    info = read_moe_info(model)
    server = ExpertServer(
        model,
        {info.moe_layers[0]: list(range(info.num_experts))},
        replica_id="bench",
        group="l0",
        compute_threads=compute_threads,
    )
    port = server.start("127.0.0.1", 0)
    with DirectoryClient(f"127.0.0.1:{directory_port}") as client:
        client.register(
            expert_pb2.ReplicaEntry(
                replica_id="bench", group="l0", endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(server.weights.held)
            ),
            lease_seconds=3600,
        )
    print("ready", flush=True)
    for line in sys.stdin:  # until the parent closes our stdin; "timers" asks for the data-plane timers
        if line.strip() == "timers":
            print(json.dumps(server.servicer.coalescer.timers.snapshot()), flush=True)
    server.stop()
    directory.stdin.close()
    directory.wait(10)


# -- client ------------------------------------------------------------------------------------------------------
def _summary(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p90_ms": round(pick(0.90), 4),
        "p99_ms": round(pick(0.99), 4),
        "min_ms": round(ms[0], 4),
    }


def _layer_request(seed: int, tokens: int = 64, hidden: int = 128, experts: int = 8, top_k: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)  # [T, H]
    topk = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])  # [T, k]
    weight = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)  # [T, k]
    return x, topk, weight


class _StreamEcho:
    """The echo's bidirectional stream, driven as router/transport.py drives a replica's ForwardStream: requests fed
    to gRPC's sync API from a queue, replies read by a thread of its own and handed to the waiting caller."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.call = self.channel.stream_stream(STREAM_ECHO)(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.replies.put(raw)
        except grpc.RpcError:
            pass  # closed

    def __call__(self, raw: bytes) -> bytes:
        self.requests.put(raw)
        return self.replies.get(timeout=5)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def _dispatcher(args, directory_address: str, info, layer: int, streams: bool):
    from expertmesh.router.dispatch import Dispatcher

    settings.export("EXPERTMESH_DISPATCH_STREAMS", "1" if streams else "0")  # read by the dispatcher's transport
    d = Dispatcher(
        directory_address,
        metrics=False,
        counters_path=str(Path(tempfile.mkdtemp(prefix="counters-", dir=args.scratch)) / "counters"),
    )
    d.register_layer("bench", layer, info.num_experts)
    d.wait_for_coverage({layer: info.num_experts}, timeout=30)
    return d


def _timers_between(before: dict, after: dict) -> dict:
    """The replica's data-plane timers (DataPlaneTimers.snapshot) of the calls between two snapshots, in us per call:
    the handler's stages per call, `receive` and `write` per stream call."""

    def totals(snap: dict, calls: str, per_call: str) -> dict:
        return {k: v * snap[calls] for k, v in snap[per_call].items()}

    out = {}
    for calls, per_call in (("calls", "us_per_call"), ("stream_calls", "us_per_stream_call")):
        n = after[calls] - before[calls]
        t0, t1 = totals(before, calls, per_call), totals(after, calls, per_call)
        out.update({k: round((t1[k] - t0[k]) / max(1, n), 1) for k in t1})
        out[calls] = n
    return out


def _stages(dispatcher_us: dict, replica_us: dict) -> dict:
    """One stream layer call, stage by stage (us, means): the router's dispatcher, the replica's handler and the
    stream's steps around it, and what is left of the router's wait: gRPC moving the call and the reply."""
    replica = ("receive", "validate", "queue", "compute", "respond", "write")
    stages = {f"router_{k}": dispatcher_us[k] for k in ("prepare", "encode", "combine")}
    stages.update({f"replica_{k}": replica_us[k] for k in replica})
    handler_rest = replica_us["handler"] - sum(replica_us[k] for k in ("validate", "queue", "compute", "respond"))
    stages["replica_handler_other"] = round(handler_rest, 1)
    replica_total = replica_us["receive"] + replica_us["handler"] + replica_us["write"]
    stages["grpc_both_ways"] = round(dispatcher_us["wait"] - replica_total, 1)
    return stages


def _measure(args, directory_address: str, info, layer: int, echo_port: int, replica_timers=None) -> dict:
    x, topk, weight = _layer_request(0)
    # The request the dispatcher sends for this layer: the whole-layer form (no token index on the wire).
    payload = encode_forward(layer, x, None, topk.flatten(), weight.flatten())
    echo_bytes = payload.SerializeToString()
    # What the dispatcher puts on its stream for it (the id, the deadline; no trace context: untraced step).
    echo_stream_bytes = expert_pb2.ForwardCall(id=1, request=payload, timeout_s=5.0).SerializeToString()

    dispatchers = {
        "dispatch": _dispatcher(args, directory_address, info, layer, streams=True),
        "dispatch_unary": _dispatcher(args, directory_address, info, layer, streams=False),
    }
    reference = _reference_output(args.model_path, layer, x, topk, weight)

    def dispatch_with(d):
        def dispatch() -> torch.Tensor:
            return d.forward(layer, x, weight, topk)  # [T, H]

        return dispatch

    echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=CHANNEL_OPTIONS)
    echo_call = echo_channel.unary_unary(ECHO)
    stream_echo = _StreamEcho(f"127.0.0.1:{echo_port}")

    def echo_unary() -> bytes:
        return echo_call(echo_bytes, timeout=5)

    def echo() -> bytes:
        return stream_echo(echo_stream_bytes)

    kinds = {
        "dispatch": dispatch_with(dispatchers["dispatch"]),
        "echo": echo,
        "dispatch_unary": dispatch_with(dispatchers["dispatch_unary"]),
        "echo_unary": echo_unary,
    }
    for name, d in dispatchers.items():
        assert torch.equal(dispatch_with(d)(), reference), f"{name} output differs from the kernel run locally"
    assert echo() == echo_stream_bytes and echo_unary() == echo_bytes
    # As in the router, whose vLLM engine freezes the GC heap after start-up (and as vLLM's own benchmark client does)
    gc.collect()
    gc.freeze()
    for _ in range(args.warmup):
        for fn in kinds.values():
            fn()
    for d in dispatchers.values():
        d.reset_stats()
    timers_before = replica_timers() if replica_timers else None
    times: dict[str, list[float]] = {name: [] for name in kinds}
    # Interleaved call by call (the order flipped every block), so all see the same background load: on this
    # shared VM the load drifts within seconds and blocks of hundreds of calls would compare different moments.
    for block in range(args.blocks):
        order = list(kinds.items())
        if block % 2:
            order.reverse()
        for _ in range(args.iters):
            for name, fn in order:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    timers_after = replica_timers() if replica_timers else None
    stats = {name: d.stats() for name, d in dispatchers.items()}
    endpoint = next(iter(stats["dispatch"]["rpcs"]))
    for d in dispatchers.values():
        d.close()
    echo_channel.close()
    stream_echo.close()

    result: dict = {name: _summary(v) for name, v in times.items()}
    result["dispatcher_us_per_call"] = {
        name: {k: round(v / max(1, s["layer_calls"]) * 1e6, 1) for k, v in s["timers"].items()}
        for name, s in stats.items()
    }
    if timers_before is not None and timers_after is not None:  # --standalone: the replica's own timers too
        result["replica_us_per_call"] = _timers_between(timers_before, timers_after)
        result["stream_call_stages_us"] = _stages(
            result["dispatcher_us_per_call"]["dispatch"], result["replica_us_per_call"]
        )
    result["request_bytes"] = len(echo_bytes)
    result["stream_message_bytes"] = len(echo_stream_bytes)
    for suffix in ("", "_unary"):
        dispatch, echo_ = result[f"dispatch{suffix}"], result[f"echo{suffix}"]
        result[f"ratio_median{suffix}"] = round(dispatch["median_ms"] / echo_["median_ms"], 3)
        result[f"ratio_p90{suffix}"] = round(dispatch["p90_ms"] / echo_["p90_ms"], 3)
    result["stream_vs_unary_dispatch_median"] = round(
        result["dispatch"]["median_ms"] / result["dispatch_unary"]["median_ms"], 3
    )
    result["concurrent_32"] = asyncio.run(_concurrent(args, endpoint, payload))
    return result


def _reference_output(model: str, layer: int, x, topk, weight) -> torch.Tensor:
    from expertmesh.core.checkpoint import CheckpointReader
    from expertmesh.core.kernel import ExpertWeights

    info = read_moe_info(model)
    w = ExpertWeights(CheckpointReader(model), {layer: list(range(info.num_experts))})
    return w.forward(layer, x, torch.arange(64).repeat_interleave(2), topk.flatten(), weight.flatten())


async def _concurrent(args, endpoint: str, payload) -> dict:
    """32 callers each issuing layer calls back to back on the same replica (coalesced batches)."""
    channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    call = channel.unary_unary(
        FORWARD,
        request_serializer=expert_pb2.ForwardRequest.SerializeToString,
        response_deserializer=expert_pb2.ForwardResponse.FromString,
    )
    batch_rows: list[int] = []

    async def caller(n: int):
        for _ in range(n):
            reply = await call(payload, timeout=10)
            batch_rows.append(reply.batch_rows)

    t = time.perf_counter()
    await asyncio.gather(*(caller(args.concurrent_calls) for _ in range(32)))
    wall = time.perf_counter() - t
    calls = 32 * args.concurrent_calls
    await channel.close()
    return {
        "calls": calls,
        "wall_s": round(wall, 3),
        "layer_calls_per_s": round(calls / wall, 1),
        "tokens_per_s": round(calls * 64 / wall, 1),
        "mean_batch_rows": round(statistics.fmean(batch_rows), 1),
        "max_batch_rows": max(batch_rows),
    }


def _per_call_us(fn, n: int = 500, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n * 1e6)
    return round(sorted(best)[len(best) // 2], 1)


def _breakdown(model: str, layer: int) -> dict:
    """Where a dispatch's CPU time goes, per piece, measured hot in this process (median of 5 x 500 calls). The
    round trip pays these several times over in situ (see docs/benchmarks.md)."""
    from expertmesh.core.checkpoint import CheckpointReader
    from expertmesh.core.codec import decode_forward, encode_raw_into
    from expertmesh.core.kernel import ExpertWeights

    info = read_moe_info(model)
    weights = ExpertWeights(CheckpointReader(model), {layer: list(range(info.num_experts))})
    x, topk, weight = _layer_request(0)
    expert, gate = topk.flatten(), weight.flatten()
    req = encode_forward(layer, x, None, expert, gate)  # the whole-layer form, as the router sends

    raw = req.SerializeToString()
    batch = decode_forward(
        req, held=weights.held, hidden_size=info.hidden_size, num_layers=info.num_layers, num_experts=info.num_experts
    )
    out = weights.forward_batch(batch)

    def encode_output() -> bytes:
        response = expert_pb2.ForwardResponse(batch_rows=64)
        encode_raw_into(response.output, batch.dtype, batch.hidden_data.shape, out)
        return response.SerializeToString()

    reply = encode_output()
    return {
        "client_encode_forward": _per_call_us(lambda: encode_forward(layer, x, None, expert, gate)),
        "server_parse": _per_call_us(lambda: expert_pb2.ForwardRequest.FromString(raw)),
        "server_decode_forward_validate": _per_call_us(
            lambda: decode_forward(
                req,
                held=weights.held,
                hidden_size=info.hidden_size,
                num_layers=info.num_layers,
                num_experts=info.num_experts,
            )
        ),
        "server_kernel_forward_batch": _per_call_us(lambda: weights.forward_batch(batch)),
        "server_encode_output": _per_call_us(encode_output),
        "client_decode_output": _per_call_us(lambda: decode(expert_pb2.ForwardResponse.FromString(reply).output)),
    }


def _run_against(args, directory_address: str, replicas: int, info, echo_port: int, replica_timers=None) -> dict:
    from expertmesh.discovery.directory import DirectoryClient

    with DirectoryClient(directory_address) as client:
        client.watch()
        client.wait_for(lambda s: len(s.replicas) == replicas, timeout=30)
    return _measure(args, directory_address, info, info.moe_layers[0], echo_port, replica_timers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000, help="calls per block and kind")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrent-calls", type=int, default=50, help="calls per caller in the 32-caller run")
    parser.add_argument("--model", help="checkpoint (default: a tiny random Mixtral built in a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="replica + directory in one plain process instead of Ray Serve (quick A/B, not the target)",
    )
    parser.add_argument(
        "--compute-threads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2],
        help="replica torch threads to measure, comma-separated (default 1,2; one pool each)",
    )
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--standalone-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(_echo_main(args.echo_server))
        return 0
    if args.directory_server:
        _directory_main(args.directory_server)
        return 0
    if args.standalone_server:
        _standalone_main(args.model, args.standalone_server, args.compute_threads[0])
        return 0

    scratch = tempfile.TemporaryDirectory(prefix="em-bench-")  # the tiny checkpoint and counters files; removed at exit
    args.scratch = scratch.name
    model = args.model or str(build_tiny_checkpoint("mixtral", Path(scratch.name) / "m"))
    args.model_path = model
    info = read_moe_info(model)
    plan = default_plan(info)  # the default placement (both MoE layers of the tiny Mixtral in one group)
    echo_port = free_port()
    echo = subprocess.Popen(
        [sys.executable, __file__, "--echo-server", str(echo_port)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    runs = {}
    try:
        assert echo.stdout.readline().strip() == b"ready"
        for threads in args.compute_threads:
            t = time.perf_counter()
            if args.standalone:
                directory_port = free_port()
                replica = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--model",
                        model,
                        "--standalone-server",
                        str(directory_port),
                        "--compute-threads",
                        str(threads),
                    ],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.PIPE,
                    env=dict(os.environ, OMP_NUM_THREADS="1"),
                )

                def replica_timers(replica=replica) -> dict:
                    replica.stdin.write(b"timers\n")
                    replica.stdin.flush()
                    return json.loads(replica.stdout.readline())

                try:
                    assert replica.stdout.readline().strip() == b"ready"
                    startup = time.perf_counter() - t
                    result = _run_against(
                        args, f"127.0.0.1:{directory_port}", 1, info, echo_port, replica_timers=replica_timers
                    )
                finally:
                    replica.stdin.close()
                    replica.wait(10)
            else:
                with LocalPool.private(
                    model,
                    plan,
                    compute_threads=threads,
                ) as pool:
                    startup = time.perf_counter() - t
                    result = _run_against(args, pool.directory_address, len(plan.groups), info, echo_port)
            result["pool_startup_s"] = round(startup, 1)
            runs[f"compute_threads_{threads}"] = result
            print(
                f"compute_threads={threads}: stream: dispatch {result['dispatch']['median_ms']} ms, "
                f"echo {result['echo']['median_ms']} ms, ratio {result['ratio_median']}; unary: dispatch "
                f"{result['dispatch_unary']['median_ms']} ms, echo {result['echo_unary']['median_ms']} ms, "
                f"ratio {result['ratio_median_unary']}",
                flush=True,
            )
    finally:
        echo.terminate()
        echo.wait(10)
    first = next(iter(runs.values()))
    result = {
        "benchmark": "dispatch_roundtrip",
        "payload": {
            "tokens": 64,
            "hidden": 128,
            "dtype": "float32",
            "top_k": 2,
            "experts": info.num_experts,
            "request_bytes": first["request_bytes"],
        },
        "replica": "standalone process (no Ray)" if args.standalone else "Ray Serve replica (LocalPool)",
        "runs": runs,
        "breakdown_us": _breakdown(model, info.moe_layers[0]),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "torch": torch.__version__,
        },
        "unix_time": int(time.time()),
        "target": "stream dispatch median <= 1.5x stream echo median (unary: <= 2x unary echo median)",
        "meets_target": {
            name: {"stream": r["ratio_median"] <= 1.5, "unary": r["ratio_median_unary"] <= 2.0}
            for name, r in runs.items()
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
