"""The prepared device check (issue 17, item 5): one replica's data plane on a device, checked and timed.

One command, the same on this CPU machine and on a lent GPU machine (one H100/H200 with CUDA torch, transformers,
grpcio, protobuf and safetensors, and no vLLM, Ray or network):

    python scripts/gpu_check.py --out DIR [--device cuda|cpu] [--iters N] [--rows 1,16,64] [--bench|--no-bench]

It never imports vLLM or Ray (tests/test_gpu_check.py runs it with both blocked), so the replica's expert kernel is
the `torch` one (`EXPERTMESH_EXPERT_KERNEL=torch`; with the weights on a GPU it is the only one anyway: the fused
op is vLLM's CPU library). Steps:

1. builds a tiny random fp32 Mixtral checkpoint with transformers (tests/tiny.py), and with `--bench` (default on
   CUDA) a benchmark-sized one (hidden 1024, 8 experts of intermediate 2048, top-2, 2 MoE layers);
2. starts `ExpertServer(checkpoint, every expert of every MoE layer, device=DEVICE)` on its own grpc.aio server on
   loopback: the weight stacks and the torch kernel on the device, each call's hidden rows copied there from the
   wire and the output back for the reply ("placement" reports where the stacks are; a check fails if any is not
   on the requested device). Beside it a plain grpc.aio bidirectional-stream echo server. The router's side is the
   router's own `Transport` (services/router/transport.py: one long-lived ForwardStream per replica);
3. checks every MoE layer's reply over the stream (random hidden states, routing by transformers' own gate) against
   transformers' own expert MLPs of the same checkpoint, per token in float64: max |out - ref| <= 1e-5 *
   max(1, max |ref|); that the reply's bytes equal `ExpertWeights.forward` called directly with the same host
   inputs; and the kernel alone with the hidden rows already on the device against the same reference;
4. times, interleaved in a shuffled order per iteration, over N calls per row count (first MoE layer):
   `layer_call`: hidden on the device -> host -> encode -> Transport's stream -> replica (decode -> host-to-device
   -> kernel -> device-to-host -> encode) -> reply -> decode -> back on the device, synchronised;
   `echo`: the same ForwardCall bytes the transport puts on its stream, through the plain stream echo and back;
   `kernel`: `ExpertWeights.forward` with the hidden rows already on the device, synchronised (the kernel alone);
   `kernel_host_io`: `ExpertWeights.forward` with host hidden rows, as the replica runs it (with both copies);
   medians, p90s and ratios (`overhead_us` = layer_call - echo - kernel_host_io: what the data plane adds);
5. writes DIR/gpu_check.json; the exit code is 0 only if every check passed (1 otherwise, 2 when the check could
   not start).

On a device machine (see /work/.library/device/README.md) `expertmesh` need not be installed: the script imports
the package from services/. The generated protobuf modules are git-ignored, so carry them, and bring the pure-Python
packages the replica imports that the image lacks (opentelemetry-api; protobuf if the image's is older than the
generated code's) as wheels in .whl (scripts/gpu_check.sh installs them):

    run(command="bash scripts/gpu_check.sh", carry=["services/core/_generated", ".whl"], timeout_s=420)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("vllm", "ray")
REL_TOL = 1e-5  # fp32 kernels against a float64 reference, relative to the output's scale
ECHO_METHOD = "/gpucheck.Echo/StreamEcho"
CALL_DEADLINE_S = 60.0  # the transport's per-call deadline: generous, a slow first CUDA call must not fail over
BENCH_OVERRIDES = dict(
    hidden_size=1024,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=2,
)


def _expertmesh_from_checkout() -> str:
    """Import `expertmesh` (installed, else the checkout's services/ under that name). Returns where from."""
    try:
        import expertmesh

        return str(Path(expertmesh.__file__).parent)
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "expertmesh", ROOT / "services" / "__init__.py", submodule_search_locations=[str(ROOT / "services")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["expertmesh"] = module
    spec.loader.exec_module(module)
    return str(ROOT / "services")


def _stats(values_ns: list[int]) -> dict:
    """Median, p90 (nearest rank), min and mean of durations in ns, reported in microseconds."""
    v = sorted(values_ns)
    n = len(v)
    return {
        "n": n,
        "median_us": (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2) / 1e3,
        "p90_us": v[min(n - 1, max(0, int(0.9 * n + 0.5) - 1))] / 1e3,
        "min_us": v[0] / 1e3,
        "mean_us": sum(v) / n / 1e3,
    }


def _device_info(torch, device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["device_name"] = name
    return info


class EchoServer:
    """A plain grpc.aio server on its own loop thread: a bidirectional stream that answers every message with its
    own bytes (benchmarks/dispatch_roundtrip.py's stream echo, in this process)."""

    def __init__(self, grpc, LoopThread, options):
        self._grpc = grpc
        self._options = options
        self._loop = LoopThread("gpu-check-echo")
        self.port = self._loop.run(self._start())

    async def _start(self) -> int:
        grpc = self._grpc

        async def stream_echo(messages, context):
            async for raw in messages:
                yield raw

        self._server = grpc.aio.server(options=self._options)
        handler = grpc.method_handlers_generic_handler(
            "gpucheck.Echo", {"StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def stop(self) -> None:
        self._loop.run(self._server.stop(0.5), timeout=5)
        self._loop.stop()


class StreamEchoClient:
    """The echo's stream, driven as router/transport.py drives a replica's ForwardStream: sync gRPC, requests fed
    from a queue, replies read by a thread of its own and handed to the waiting caller."""

    def __init__(self, grpc, address: str, options):
        self._grpc = grpc
        self.channel = grpc.insecure_channel(address, options=options)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.call = self.channel.stream_stream(ECHO_METHOD)(iter(self.requests.get, None))
        threading.Thread(target=self._read, name="gpu-check-echo-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.replies.put(raw)
        except self._grpc.RpcError:
            pass  # closed

    def __call__(self, raw: bytes) -> bytes:
        self.requests.put(raw)
        return self.replies.get(timeout=CALL_DEADLINE_S)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def check_model(name: str, path: Path, args, env: dict, report: dict) -> None:
    """Correctness checks and timings of one checkpoint; fills report["models"][name] and report["checks"]."""
    torch, grpc = env["torch"], env["grpc"]
    from transformers import AutoModelForCausalLM

    from expertmesh.core.checkpoint import CheckpointReader
    from expertmesh.core.codec import decode_owned, encode_forward, raw_bytes
    from expertmesh.core.protos import expert_pb2
    from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer
    from expertmesh.router.transport import Transport

    device = env["device"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reader = CheckpointReader(path)
    info = reader.info
    keys = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if i in keys}
    rows_list = args.rows
    out = report["models"][name] = {
        "hidden_size": info.hidden_size,
        "intermediate_size": info.intermediate_size,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "moe_layers": info.moe_layers,
        "rows": rows_list,
    }
    g = torch.Generator().manual_seed(1234)

    server = ExpertServer(reader, keys, replica_id=f"gpu-check-{name}", metrics_backend="prometheus", device=device)
    server.start("127.0.0.1", 0)
    echo = EchoServer(grpc, env["LoopThread"], env["server_options"])
    echo_stream = StreamEchoClient(grpc, f"127.0.0.1:{echo.port}", CHANNEL_OPTIONS)
    transport = Transport(CALL_DEADLINE_S, streams=True)  # the router's own client: one ForwardStream per replica
    endpoint = server.address
    transport.connect(endpoint)
    try:
        weights = server.weights
        # -- placement: the replica's stacks and kernel on the requested device ----------------------------------
        stacks = [t for d in (weights.w13, weights.w2) for t in d.values()]
        on_device = all(t.device.type == device.type for t in stacks)
        out["replica_kernel"] = weights.kernel
        out["placement"] = {
            "device": str(device),
            "weights_device": sorted({str(t.device) for t in stacks}),
            "expert_weights_device": str(weights.device),
            "weight_bytes": weights.weight_bytes,
            "replica_on_device": on_device,
            "kernel": weights.kernel,
        }
        _add_check(report, f"{name}.weights_on_device", on_device, weights_device=out["placement"]["weights_device"])

        def stream_call(layer: int, x_host, ids, w) -> object:
            """One layer call through the router's transport: encode, the stream, the reply's output decoded."""
            request = encode_forward(layer, x_host, None, ids, w)
            response = transport.call(endpoint, request, x_host.shape[0])
            return response, decode_owned(response.output, "output")  # [T, H] on the host

        # -- correctness: every MoE layer, every row count ---------------------------------------------------------
        for layer in info.moe_layers:
            block = blocks[layer]
            ref_experts = copy.deepcopy(block.experts).double()
            for T in rows_list:
                x = torch.randn(T, info.hidden_size, generator=g)  # [T, H] random hidden states
                with torch.no_grad():
                    _, topk_w, topk_ids = block.gate(x)  # [T, K] each: transformers' own routing
                    ref = torch.cat(
                        [
                            ref_experts(x[t : t + 1].double(), topk_ids[t : t + 1], topk_w[t : t + 1].double())
                            for t in range(T)
                        ]
                    )  # [T, H] float64, token by token
                tol = REL_TOL * max(1.0, ref.abs().max().item())
                ids_flat = topk_ids.reshape(-1).numpy()  # [T*K] on the host, as routed
                w_flat = topk_w.reshape(-1).contiguous().numpy()  # [T*K]
                reply, got = stream_call(layer, x, ids_flat, w_flat)
                err = (got.double() - ref).abs().max().item()
                prefix = f"{name}.layer{layer}.rows{T}"
                _add_check(report, f"{prefix}.replica_vs_transformers", err <= tol, max_abs_err=err, tol=tol)
                # the replica's own path (host rows in, host output out) called directly: the same bytes
                direct = weights.forward(layer, x, None, ids_flat, w_flat)
                same = reply.output.data == raw_bytes(direct)
                diff = (got - direct).abs().max().item() if got.numel() else 0.0  # the size of a mismatch, if any
                _add_check(report, f"{prefix}.reply_bytes_equal_direct_kernel", same, max_abs_diff=diff)
                # the kernel alone, its input already on the device, its output left there
                dgot = weights.forward(layer, x.to(device), None, ids_flat, w_flat)
                sync()
                derr = (dgot.cpu().double() - ref).abs().max().item()
                _add_check(
                    report,
                    f"{prefix}.device_kernel_vs_transformers",
                    derr <= tol and dgot.device.type == device.type,
                    max_abs_err=derr,
                    tol=tol,
                    output_device=str(dgot.device),
                )

        # -- timings: first MoE layer, per row count, interleaved ------------------------------------------------
        layer = info.moe_layers[0]
        block = blocks[layer]
        timings = out["timings"] = {}
        rng = random.Random(0)

        def time_rows(T: int) -> dict:
            """Interleaved timings of the four operations at T rows (the first MoE layer)."""
            x = torch.randn(T, info.hidden_size, generator=g)  # [T, H]
            with torch.no_grad():
                _, topk_w, topk_ids = block.gate(x)  # [T, K] each
            ids_flat = topk_ids.reshape(-1).numpy()  # [T*K] on the host, as routed
            w_flat = topk_w.reshape(-1).contiguous().numpy()  # [T*K]
            x_dev = x.to(device)  # [T, H]: the router's hidden states live on the device
            request = encode_forward(layer, x, None, ids_flat, w_flat)
            # What the transport puts on its stream for this call (the id, the deadline; no trace context).
            echo_bytes = expert_pb2.ForwardCall(id=1, request=request, timeout_s=CALL_DEADLINE_S).SerializeToString()
            if echo_stream(echo_bytes) != echo_bytes:
                raise RuntimeError("the stream echo changed the bytes")

            def layer_call():
                host = x_dev.cpu() if device.type != "cpu" else x_dev
                _, result = stream_call(layer, host, ids_flat, w_flat)
                result = result.to(device)  # [T, H]
                sync()
                return result

            def echo_round():
                return echo_stream(echo_bytes)

            def kernel():
                y = weights.forward(layer, x_dev, None, ids_flat, w_flat)  # [T, H] on the device
                sync()
                return y

            def kernel_host_io():
                return weights.forward(layer, x, None, ids_flat, w_flat)  # [T, H] on the host

            ops = {"layer_call": layer_call, "echo": echo_round, "kernel": kernel, "kernel_host_io": kernel_host_io}
            samples: dict[str, list[int]] = {k: [] for k in ops}
            names = list(ops)
            for i in range(args.warmup + args.iters):
                rng.shuffle(names)  # interleaved, in a new order each round: drift hits every operation alike
                for op in names:
                    t0 = time.perf_counter_ns()
                    ops[op]()
                    dt = time.perf_counter_ns() - t0
                    if i >= args.warmup:
                        samples[op].append(dt)
            entry: dict = {op: _stats(v) for op, v in samples.items()}
            entry["request_bytes"] = request.ByteSize()
            entry["stream_message_bytes"] = len(echo_bytes)
            med = {op: entry[op]["median_us"] for op in ops}
            entry["ratios"] = {
                "layer_call_over_echo": med["layer_call"] / med["echo"],
                "layer_call_over_kernel": med["layer_call"] / med["kernel"],
                "kernel_host_io_over_kernel": med["kernel_host_io"] / med["kernel"],
                "overhead_us": med["layer_call"] - med["echo"] - med["kernel_host_io"],
            }
            return entry

        for T in rows_list:
            timings[str(T)] = time_rows(T)
    finally:
        transport.close()
        echo_stream.close()
        echo.stop()
        server.stop()


def _add_check(report: dict, name: str, passed: bool, **values) -> None:
    report["checks"][name] = {"passed": bool(passed), **values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--iters", type=int, default=100, help="timed calls per measurement and row count")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--rows", default="1,16,64", help="tokens per layer call, comma-separated")
    parser.add_argument(
        "--bench", action=argparse.BooleanOptionalAction, default=None, help="also the benchmark-sized model"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",") if r.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"passed": False, "checks": {}, "models": {}, "argv": sys.argv[1:]}
    result_path = args.out / "gpu_check.json"

    def write() -> None:
        report["forbidden_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
        report["wall_s"] = time.perf_counter() - started
        result_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    # The torch kernel: the fused one is vLLM's library, which the device machine lacks (and this check must not load).
    os.environ["EXPERTMESH_EXPERT_KERNEL"] = "torch"
    try:
        report["expertmesh_from"] = _expertmesh_from_checkout()
        from expertmesh.core.settings import apply_process_defaults

        apply_process_defaults()  # OMP_NUM_THREADS=1 etc. where unset, before torch, as every expertmesh process
        import grpc
        import torch

        from expertmesh.core.loop_thread import LoopThread
        from expertmesh.experts.replica import SERVER_OPTIONS

        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tiny_checkpoint
    except Exception as exc:
        report["error"] = f"could not start: {type(exc).__name__}: {exc}"
        report["hint"] = (
            "carry services/core/_generated (git-ignored generated protos); bring missing packages "
            "(opentelemetry-api, a protobuf as new as the generated code) as wheels in .whl: see scripts/gpu_check.sh"
        )
        report["traceback"] = traceback.format_exc()
        write()
        print(report["error"], file=sys.stderr)
        return 2

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        report["error"] = "--device cuda but torch sees no CUDA device"
        write()
        print(report["error"], file=sys.stderr)
        return 2
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the tolerance is set for it
    bench = args.bench if args.bench is not None else device.type == "cuda"
    report.update(_device_info(torch, device))
    report["grpc"] = grpc.__version__
    import transformers

    report["transformers"] = transformers.__version__
    report["tolerance"] = (
        f"max|out - ref| <= {REL_TOL} * max(1, max|ref|); ref = transformers' experts in float64, token by token"
    )
    env = {"torch": torch, "grpc": grpc, "device": device, "LoopThread": LoopThread, "server_options": SERVER_OPTIONS}
    code = 1
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.workdir) as tmp:
        try:
            models = [("tiny", {})] + ([("bench", BENCH_OVERRIDES)] if bench else [])
            for name, overrides in models:
                t0 = time.perf_counter()
                path = build_tiny_checkpoint("mixtral", Path(tmp) / name, seed=0, overrides=overrides)
                report["models"][name] = {}
                check_model(name, path, args, env, report)
                report["models"][name]["seconds"] = time.perf_counter() - t0
                write()  # partial results survive a later timeout
            report["checks"]["no_vllm_or_ray_loaded"] = {
                "passed": not any(m.split(".")[0] in FORBIDDEN for m in sys.modules)
            }
            report["passed"] = bool(report["checks"]) and all(c["passed"] for c in report["checks"].values())
            code = 0 if report["passed"] else 1
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
            report["traceback"] = traceback.format_exc()
            print(report["traceback"], file=sys.stderr)
    write()
    failed = [k for k, c in report["checks"].items() if not c["passed"]]
    print(f"gpu_check: {'PASS' if code == 0 else 'FAIL'} on {report['device_name']} -> {result_path}")
    for k in failed:
        print(f"  failed: {k} {report['checks'][k]}")
    for name, m in report["models"].items():
        for rows, t in m.get("timings", {}).items():
            stats = {op: v for op, v in t.items() if isinstance(v, dict) and "median_us" in v}
            line = ", ".join(f"{op} {v['median_us']:.0f}/{v['p90_us']:.0f}" for op, v in stats.items())
            print(f"  {name} rows={rows} median/p90 us: {line}")
    return code


if __name__ == "__main__":
    sys.exit(main())
