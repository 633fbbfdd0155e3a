"""The prepared device check (issue 17, item 5): one replica's data plane on a device machine, checked and timed.

One command, the same on this CPU machine and on a lent GPU machine (one H100/H200 with CUDA torch, transformers,
grpcio, protobuf and safetensors, and no vLLM, Ray or network):

    python scripts/gpu_check.py --out DIR [--device cuda|cpu] [--iters N] [--rows 1,16,64] [--bench|--no-bench]

It never imports vLLM or Ray (tests/test_gpu_check.py runs it with both blocked), so the replica's expert kernel is
the `torch` one (`EXPERTMESH_EXPERT_KERNEL=torch`: the fused op is vLLM's library, absent there). Steps:

1. builds a tiny random fp32 Mixtral checkpoint with transformers (tests/tiny.py), and with `--bench` (default on
   CUDA) a benchmark-sized one (hidden 1024, 8 experts of intermediate 2048, top-2, 2 MoE layers);
2. starts `ExpertServer(checkpoint, every expert of every MoE layer)` on its own grpc.aio server on loopback, and a
   plain grpc.aio echo server beside it. `ExpertWeights` has no device parameter today: its stacks and the torch
   kernel stay on the CPU, so the script probes whether moving the stacks onto the device works and reports that
   under "placement" (on a GPU, with what services/core/kernel.py would need). It passes `device=` through as soon
   as `ExpertWeights` and `ExpertServer` take one. It also runs the same grouped SwiGLU on the chosen device with
   the same weights ("device_kernel": what the kernel would cost there; on the CPU it runs so its code is tested);
3. checks every MoE layer's reply (random hidden states, routing by transformers' own gate) against transformers'
   own expert MLPs of the same checkpoint, per token in float64: max |out - ref| <= 1e-5 * max(1, max |ref|); and
   that the reply's bytes equal `ExpertWeights.forward` called directly;
4. times, interleaved in a shuffled order per iteration, over N calls per row count: the layer call (hidden on the
   device -> encode -> gRPC -> decode -> kernel -> reply -> decode -> back on the device), a plain grpc.aio echo of
   the same request, the replica's kernel alone (`ExpertWeights.forward`) and the device kernel (synchronised);
   medians, p90s and ratios;
5. writes DIR/gpu_check.json; the exit code is 0 only if every correctness check passed (1 otherwise, 2 when the
   check could not start).

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
import inspect
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("vllm", "ray")
REL_TOL = 1e-5  # fp32 kernels against a float64 reference, relative to the output's scale
SERVICE_FORWARD = "/expertmesh.v1.ExpertService/Forward"
ECHO_METHOD = "/gpucheck.Echo/Echo"
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
PLACEMENT_NEEDS = [
    "ExpertWeights(..., device=...): keep w13/w2 on the device (and ExpertServer passes device= through)",
    "moe_combine/_moe_combine: allocate `out`, `rows` and `gate` on hidden's device, not torch.zeros/from_numpy on CPU",
    "forward_batch: copy the decoded hidden rows to the device once per call (pinned host buffer, non_blocking), "
    "and the output back once (raw_bytes already copies a device tensor to the host)",
    "_grouped_mm_works: probe per (device, dtype); torch._grouped_mm on CUDA takes bf16 only, fp32 needs the loop",
    "the index bookkeeping stays in numpy on the host; only `rows`, `gate` and the group offsets go to the device",
]


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
    """A plain grpc.aio server on its own loop thread that answers every call with the request's bytes."""

    def __init__(self, grpc, LoopThread, options):
        self._grpc = grpc
        self._options = options
        self._loop = LoopThread("gpu-check-echo")
        self.port = self._loop.run(self._start())

    async def _start(self) -> int:
        grpc = self._grpc

        async def echo(raw: bytes, context) -> bytes:
            return raw

        self._server = grpc.aio.server(options=self._options)
        handler = grpc.method_handlers_generic_handler(
            "gpucheck.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def stop(self) -> None:
        self._loop.run(self._server.stop(0.5), timeout=5)
        self._loop.stop()


def device_moe(torch, act, x, ids, w, w13, w2):
    """The torch kernel's grouped SwiGLU on whatever device the tensors are on (the script's stand-in for a device
    ExpertWeights): x [T, H], ids [T, K] int64, w [T, K] fp32, w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    T, K = ids.shape
    I = w2.shape[2]
    flat = ids.reshape(-1)  # [N]
    order = torch.argsort(flat, stable=True)  # [N] assignments grouped by expert
    rows = order // K  # [N] token of each sorted assignment
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # [E], one host sync
    xs = x.index_select(0, rows)  # [N, H]
    y = torch.empty_like(xs)  # [N, H]
    start = 0
    for e, n in enumerate(counts):
        if n:
            gu = xs[start : start + n] @ w13[e].t()  # [n, 2I]
            y[start : start + n] = (act(gu[:, :I]) * gu[:, I:]) @ w2[e].t()  # [n, H]
            start += n
    y.mul_(w.reshape(-1)[order].unsqueeze(1))  # gate-weighted
    return torch.zeros_like(x).index_add_(0, rows, y)  # [T, H]


def check_model(name: str, path: Path, args, env: dict, report: dict) -> None:
    """Correctness checks and timings of one checkpoint; fills report["models"][name] and report["checks"]."""
    torch, grpc = env["torch"], env["grpc"]
    from transformers import AutoModelForCausalLM

    from expertmesh.core.checkpoint import CheckpointReader
    from expertmesh.core.codec import decode_owned, encode_forward, raw_bytes
    from expertmesh.core.kernel import ExpertWeights
    from expertmesh.core.protos import expert_pb2
    from expertmesh.experts.replica import CHANNEL_OPTIONS, ExpertServer

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

    # -- placement: can the replica's weights and kernel live on the device? ------------------------------------
    takes_device = all("device" in inspect.signature(cls.__init__).parameters for cls in (ExpertWeights, ExpertServer))
    server_kwargs = {"device": device} if takes_device and device.type != "cpu" else {}
    placement = {
        "device": str(device),
        "expert_weights_takes_device": takes_device,
        "replica_on_device": device.type == "cpu" or takes_device,
    }
    g = torch.Generator().manual_seed(1234)
    layer0 = info.moe_layers[0]
    x_probe = torch.randn(max(rows_list), info.hidden_size, generator=g)  # [T, H]
    if not takes_device:  # also on the CPU, where it must work: the probe's own code is then exercised here too
        if device.type != "cpu":
            placement["why_not"] = "ExpertWeights/ExpertServer take no device: the stacks and torch kernel are CPU-only"
        try:
            probe = ExpertWeights(reader, {layer0: keys[layer0]}, kernel="torch")
            probe.w13 = {k: v.to(device) for k, v in probe.w13.items()}
            probe.w2 = {k: v.to(device) for k, v in probe.w2.items()}
            with torch.no_grad():
                _, pw, pi = blocks[layer0].gate(x_probe)
            got = probe.forward(layer0, x_probe.to(device), None, pi.reshape(-1), pw.reshape(-1))
            sync()
            placement["stacks_moved_by_hand"] = f"forward ran, output on {got.device}"
        except Exception as exc:  # the point of the probe: report what breaks
            placement["stacks_moved_by_hand"] = f"forward fails: {type(exc).__name__}: {exc}"[:500]
        if device.type != "cpu":
            placement["needed"] = PLACEMENT_NEEDS
    out["placement"] = placement

    server = ExpertServer(reader, keys, replica_id=f"gpu-check-{name}", metrics_backend="prometheus", **server_kwargs)
    server.start("127.0.0.1", 0)
    echo = EchoServer(grpc, env["LoopThread"], env["server_options"])
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo.port}", options=CHANNEL_OPTIONS)
    try:
        weights = server.weights
        out["replica_kernel"] = weights.kernel
        forward = channel.unary_unary(
            SERVICE_FORWARD,
            request_serializer=expert_pb2.ForwardRequest.SerializeToString,
            response_deserializer=expert_pb2.ForwardResponse.FromString,
        )
        echo_call = echo_channel.unary_unary(
            ECHO_METHOD, request_serializer=expert_pb2.ForwardRequest.SerializeToString
        )
        # The same grouped SwiGLU on the device (on the CPU too, so that this code runs wherever the check runs).
        dev_w = {layer: (weights.w13[layer].to(device), weights.w2[layer].to(device)) for layer in info.moe_layers}
        act = weights.act

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
                ids_flat, w_flat = topk_ids.reshape(-1), topk_w.reshape(-1).contiguous()  # [T*K]
                reply = forward(encode_forward(layer, x, None, ids_flat, w_flat), timeout=60)
                got = decode_owned(reply.output, "output")  # [T, H]
                err = (got.double() - ref).abs().max().item()
                prefix = f"{name}.layer{layer}.rows{T}"
                _add_check(report, f"{prefix}.replica_vs_transformers", err <= tol, max_abs_err=err, tol=tol)
                direct = weights.forward(layer, x, None, ids_flat, w_flat)
                same = reply.output.data == raw_bytes(direct)
                _add_check(report, f"{prefix}.reply_bytes_equal_direct_kernel", same)
                w13, w2 = dev_w[layer]
                with torch.no_grad():
                    dgot = device_moe(torch, act, x.to(device), topk_ids.to(device), topk_w.to(device), w13, w2)
                derr = (dgot.cpu().double() - ref).abs().max().item()
                _add_check(report, f"{prefix}.device_kernel_vs_transformers", derr <= tol, max_abs_err=derr, tol=tol)

        # -- timings: first MoE layer, per row count, interleaved ------------------------------------------------
        layer = layer0
        block = blocks[layer]
        timings = out["timings"] = {}
        rng = random.Random(0)

        def time_rows(T: int) -> dict:
            """Interleaved timings of the four operations at T rows (the first MoE layer)."""
            x = torch.randn(T, info.hidden_size, generator=g)  # [T, H]
            with torch.no_grad():
                _, topk_w, topk_ids = block.gate(x)  # [T, K] each
            ids_flat, w_flat = topk_ids.reshape(-1), topk_w.reshape(-1).contiguous()  # [T*K] on the host, as routed
            x_dev = x.to(device)  # [T, H]: the router's hidden states live on the device
            ids_dev, w_dev = topk_ids.to(device), topk_w.to(device)  # [T, K]
            w13, w2 = dev_w[layer]
            request = encode_forward(layer, x, None, ids_flat, w_flat)

            def layer_call():
                host = x_dev.cpu() if device.type != "cpu" else x_dev
                reply = forward(encode_forward(layer, host, None, ids_flat, w_flat), timeout=60)
                result = decode_owned(reply.output, "output").to(device)  # [T, H]
                sync()
                return result

            def echo_round():
                return echo_call(request, timeout=60)

            def replica_kernel():
                return weights.forward(layer, x, None, ids_flat, w_flat)

            def device_kernel():
                with torch.no_grad():
                    y = device_moe(torch, act, x_dev, ids_dev, w_dev, w13, w2)
                sync()
                return y

            ops = {
                "layer_call": layer_call,
                "echo": echo_round,
                "replica_kernel": replica_kernel,
                "device_kernel": device_kernel,
            }
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
            med = {op: entry[op]["median_us"] for op in ops}
            entry["ratios"] = {
                "layer_call_over_echo": med["layer_call"] / med["echo"],
                "layer_call_over_replica_kernel": med["layer_call"] / med["replica_kernel"],
                "overhead_us": med["layer_call"] - med["echo"] - med["replica_kernel"],
                "replica_kernel_over_device_kernel": med["replica_kernel"] / med["device_kernel"],
            }
            return entry

        for T in rows_list:
            timings[str(T)] = time_rows(T)
    finally:
        channel.close()
        echo_channel.close()
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
