"""The one settings registry: every environment variable expertmesh reads, with its type, default and meaning;
the process defaults it sets for OpenMP / vLLM / tokenizers; the gRPC message-size options; and the typed
settings objects the processes build from the registry plus their command line.

In the manner of vllm/envs.py: a variable is read when it is asked for (a test's `monkeypatch.setenv`, or a
parent's export, is seen at once), through a typed accessor (`settings.directory_address()`), by name
(`settings.get("EXPERTMESH_DIRECTORY")`) or as a module attribute (`settings.EXPERTMESH_DIRECTORY`).

This is the only module of the package that touches `os.environ` (tests/test_settings.py greps for others). Writes
go through `export` (this process, inherited by its children) and `child_env` (the environment of a subprocess).
docs/configuration.md is generated from this module and checked for staleness by the same test:

    python -m expertmesh.core.settings --markdown > docs/configuration.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Ports (the Helm chart's values.yaml `ports:` must agree; tests/test_k8s.py checks it).
GATEWAY_PORT = 8000  # HTTP, OpenAI-compatible API, /health, /metrics, /experts
ROUTER_PORT = 8001  # HTTP: the router, vLLM's OpenAI server with the expertmesh plugin (/v1/*, /health, /metrics)
ROUTER_METRICS_PORT = 9461  # HTTP Prometheus metrics of the router process
DIRECTORY_PORT = 50071  # gRPC expertmesh.v1.ExpertDirectory
REPLICA_PORT_RANGE = (50100, 50999)  # gRPC ExpertService of the replicas (one port each)
REPLICA_METRICS_PORT = 9471  # HTTP Prometheus metrics served by the expert pool
RAY_GCS_PORT = 6391  # local Ray cluster of `expertmesh experts up` / `serve`
RAY_DASHBOARD_PORT = 8271
CONTROLLER_PORT = 9481  # HTTP /health and /status of the expert controller service


_ports_handed_out: set[int] = set()  # by free_port() in this process: nothing may listen on them yet


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port nothing listens on right now, for servers started on loopback.

    Drawn from 20000-29999: below the kernel's ephemeral range (Linux 32768+) and above Ray's worker ports
    (10002-19999). A port the OS hands out for bind(0) can be handed out again to the next bind(0) — Ray's agents
    and every Serve replica's internal server bind "[::]:0" — between our choosing it and our server binding it
    (the likely cause of one pool start seen here whose directory replica never came up). Never the same port twice
    in one process, nor one in `avoid` (ports chosen elsewhere, e.g. by a parent process, not bound yet): several
    ports chosen before any server binds would otherwise collide now and then."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        if port in _ports_handed_out or port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- gRPC message size (one constant for every channel and server) -----------------------------------------------

# A layer's batch for one replica is [rows, hidden] activations plus ids and weights; gRPC's 4 MiB default is too
# small for prefill of real models.
GRPC_MAX_MESSAGE_BYTES = 64 << 20


def grpc_message_options(max_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising both message-size limits to `max_bytes`."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


# The shortest keepalive interval our servers (replicas, the directory) accept from a client: a client pinging more
# often is answered with GOAWAY (too_many_pings) by gRPC's ping policy, which would break the very stream it keeps.
GRPC_MIN_KEEPALIVE_S = 1.0


def grpc_keepalive_server_options() -> list[tuple[str, int]]:
    """Server options of our long-lived-stream servers: accept keepalive pings every GRPC_MIN_KEEPALIVE_S, also on
    a connection with no call open."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", int(GRPC_MIN_KEEPALIVE_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def grpc_keepalive_options() -> list[tuple[str, int]]:
    """Client options of the router's long-lived links (replica streams, the directory watch): an HTTP/2 ping every
    EXPERTMESH_DISPATCH_KEEPALIVE_S, the connection broken when one goes unanswered for
    EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S. [] when keepalive is off (0)."""
    every = dispatch_keepalive_s()
    if every == 0:
        return []
    timeout_ms = int(dispatch_keepalive_timeout_s() * 1000)
    return [
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # a link with no call open (unary mode, between calls) too
        ("grpc.http2.max_pings_without_data", 0),  # an idle stream sends no data: keep pinging anyway
        # grpcio 1.85 fails an unanswered keepalive ping by this timeout, not by keepalive_timeout_ms alone
        # (measured: a SIGSTOPped replica's stream stayed open for minutes without it; tests/test_stream_transport.py)
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]


# ---- the registry ------------------------------------------------------------------------------------------------


def _str(raw: str) -> str:
    return raw


def _int(raw: str) -> int:
    return int(raw)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def _float(raw: str) -> float:
    return float(raw)


def _keepalive_s(raw: str) -> float:
    value = float(raw)
    if value != 0 and value < GRPC_MIN_KEEPALIVE_S:
        raise ValueError(f"expected 0 (off) or at least {GRPC_MIN_KEEPALIVE_S:g} s (what the servers accept)")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def _csv(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _port_range(raw: str) -> tuple[int, int]:
    lo, sep, hi = raw.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"expected START-END, got {raw!r}")
    return int(lo), int(hi)


def _json_object(raw: str) -> dict:
    value = json.loads(raw) if raw.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {raw!r}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise _ChoiceError(value, listed)
        return value

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


class _ChoiceError(ValueError):
    def __init__(self, value: str, listed: str):
        super().__init__(value, listed)
        self.value, self.listed = value, listed


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: how to parse it, its default (None = unset), what it means, who reads it."""

    name: str
    type: str  # as documented: str, int, float, host:port, START-END, csv, JSON object, choice, bool
    default: Any
    meaning: str
    read_by: str
    parse: Callable[[str], Any] = _str
    empty_is_unset: bool = True  # an empty value counts as unset (the default applies)

    def value(self, env: Mapping[str, str] | None = None) -> Any:
        raw = (os.environ if env is None else env).get(self.name)
        if raw is None or (self.empty_is_unset and raw == ""):
            return self.default
        try:
            return self.parse(raw)
        except _ChoiceError as exc:
            raise ValueError(f"{self.name}={exc.value!r}: expected {exc.listed}") from None
        except ValueError as exc:
            raise ValueError(f"{self.name}={raw!r}: {exc}") from None


def _var(name, type_, default, meaning, read_by, parse=_str, **kw) -> EnvVar:
    return EnvVar(name, type_, default, meaning, read_by, parse, **kw)


ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in [
        _var(
            "EXPERTMESH_BIND_HOST",
            "str",
            "127.0.0.1",
            "address every server binds (0.0.0.0 in pods)",
            "gateway, router, replica, directory",
        ),
        _var(
            "EXPERTMESH_ADVERTISE_HOST",
            "str",
            None,
            "address a replica publishes in the directory (the pod IP); unset = the bind host",
            "replica",
        ),
        _var(
            "EXPERTMESH_DIRECTORY",
            "host:port",
            f"127.0.0.1:{DIRECTORY_PORT}",
            "the expert directory",
            "router, replica, directory",
        ),
        _var(
            "EXPERTMESH_ROUTER",
            "csv",
            [f"http://127.0.0.1:{ROUTER_PORT}"],
            "base URLs of the routers (vLLM's OpenAI server with the plugin) the gateway proxies to, comma-separated",
            "gateway",
            _csv,
        ),
        _var(
            "EXPERTMESH_API_KEYS",
            "csv",
            [],
            "API keys the gateway accepts (Bearer), comma-separated; unset or empty = open",
            "gateway",
            _csv,
        ),
        _var(
            "EXPERTMESH_REPLICA_PORTS",
            "START-END",
            REPLICA_PORT_RANGE,
            "port range expert replicas bind their gRPC servers in",
            "replica",
            _port_range,
        ),
        _var(
            "EXPERTMESH_RAY_ADDRESS",
            "str",
            None,
            "a running Ray cluster for the expert pool (its GCS host:port, or its dashboard http://host:8265): the "
            "pool deploys its Serve applications there instead of starting a private Ray head, and at exit removes "
            "only those (the cluster keeps running); the `--ray-address` default; unset = a private Ray cluster on "
            "loopback",
            "expertmesh serve, expertmesh experts",
        ),
        _var(
            "EXPERTMESH_SHUTDOWN_GRACE_S",
            "float",
            30.0,
            "on SIGTERM / Ctrl-C the gateway stops accepting and lets requests in flight finish for up to this many "
            "seconds; `expertmesh serve` stops the router only after the gateway is done",
            "gateway, expertmesh serve",
            _float,
        ),
        _var(
            "EXPERTMESH_GATEWAY_MAX_BODY_BYTES",
            "int",
            4 * 1024 * 1024,
            "largest request body the gateway accepts (413 past it, before it reaches a router)",
            "gateway",
            _int,
        ),
        _var(
            "EXPERTMESH_GATEWAY_BODY_TIMEOUT_S",
            "float",
            30.0,
            "seconds a client has to send its whole request body (408 and the connection closed past it)",
            "gateway",
            _float,
        ),
        _var(
            "EXPERTMESH_GATEWAY_MAX_IN_FLIGHT",
            "int",
            256,
            "admission control: requests the gateway keeps in flight per router (0 = no bound); past it, while every "
            "router is at its bound, a new /v1 POST gets 429 with Retry-After at once instead of an unbounded queue",
            "gateway",
            _int,
        ),
        _var(
            "EXPERTMESH_GATEWAY_MIGRATIONS",
            "int",
            3,
            "how often a streamed generation whose router breaks off mid-answer is continued on another router "
            "(the prompt and the tokens already streamed resent; gateway/migration.py); 0 = never: the stream ends",
            "gateway",
            _int,
        ),
        _var(
            "EXPERTMESH_CONTROLLER_STATUS",
            "str",
            None,
            "where the gateway's /experts reads the controller's status: a JSON file (local stack) or "
            "http(s)://controller:9481/status; unset = no controller section",
            "gateway",
        ),
        _var(
            "EXPERTMESH_CONTROLLER_SETTINGS",
            "JSON object",
            {},
            "ControllerSettings fields (services/control/controller.py) when --settings is not given",
            "controller, expertmesh serve",
            _json_object,
        ),
        _var(
            "EXPERTMESH_EXPERT_KERNEL",
            "choice",
            "auto",
            "expert-MLP kernel: auto (fused when it can serve the weights), fused or torch",
            "replica",
            _choice("auto", "fused", "torch"),
        ),
        _var(
            "EXPERTMESH_TRACE_STEP_EVERY",
            "int",
            16,
            "trace every N-th decode step when no newly traced request arrived",
            "router",
            _int,
        ),
        _var(
            "EXPERTMESH_COUNTERS_FILE",
            "path",
            None,
            "routed-token counters file; unset = /dev/shm/expertmesh-routed-tokens-<pid>.npy (pinned by the router "
            "so an engine-core subprocess writes where the server reads)",
            "router",
        ),
        _var(
            "EXPERTMESH_DISPATCH_DEADLINE_S",
            "float",
            5.0,
            "seconds a replica has to answer one layer's Forward before the router fails over",
            "router",
            _float,
        ),
        _var(
            "EXPERTMESH_DISPATCH_STREAMS",
            "bool",
            True,
            "send layer calls to each replica over one long-lived gRPC stream (ForwardStream; measured faster than "
            "unary calls, router/transport.py); 0 = one unary Forward per call",
            "router",
            _bool,
        ),
        _var(
            "EXPERTMESH_DISPATCH_KEEPALIVE_S",
            "float",
            20.0,
            "seconds between HTTP/2 keepalive pings on the router's long-lived gRPC links (each replica's stream, "
            "the directory watch): a link whose peer stopped answering breaks and is reopened before the next call "
            "instead of that call waiting out its deadline, and load balancers or NAT keep an idle stream open; "
            "0 = off, else at least 1 (what replicas and the directory accept)",
            "router",
            _keepalive_s,
        ),
        _var(
            "EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S",
            "float",
            10.0,
            "seconds a keepalive ping may go unanswered before the link counts as broken",
            "router",
            _positive_float,
        ),
        _var(
            "EXPERTMESH_MISSING_EXPERT_WAIT_S",
            "float",
            1.0,
            "seconds (from when an expert was first found without a live replica) the router waits for the directory "
            "to list one before computing that expert itself from the checkpoint (router/fallback.py); the whole "
            "step waits, so keep it short",
            "router",
            _float,
        ),
        _var(
            "EXPERTMESH_SHARED_EXPERTS_OVERLAP",
            "bool",
            True,
            "for models with shared experts (DeepSeek-V2/V3, Qwen2-MoE): the router computes them while the layer's "
            "routed-expert call is in flight, instead of before it (vLLM's order); false = vLLM's order (not with "
            "EXPERTMESH_MICRO_BATCHES > 1, which needs them in the shadow)",
            "router",
            _bool,
        ),
        _var(
            "EXPERTMESH_MICRO_BATCHES",
            "int",
            1,
            "ping-pong micro-batches per engine step (router/micro_batches.py): a step is split along requests into "
            "this many parts that take turns at the dispatch op, so the router computes one part's attention while "
            "another's experts are in the pool; 1 = off (the measured choice on this 2-core machine, "
            "docs/benchmarks.md)",
            "router",
            _positive_int,
        ),
        _var(
            "EXPERTMESH_MICRO_BATCH_MIN_TOKENS",
            "int",
            4,
            "a step is split into micro-batches only when each would get at least this many tokens on average",
            "router",
            _positive_int,
        ),
        _var(
            "EXPERTMESH_ROUTER_METRICS_PORT",
            "int",
            ROUTER_METRICS_PORT,
            "Prometheus port of the router process (0 = off)",
            "router",
            _int,
        ),
        _var(
            "EXPERTMESH_EXPERT_MODE",
            "choice",
            "local",
            "vLLM plugin mode: remote (routed experts go to the pool) or local (vLLM computes them)",
            "router",
            _choice("local", "remote"),
        ),
        _var(
            "EXPERTMESH_CLUSTER_TOKEN",
            "str",
            None,
            "the cluster credential: every internal gRPC call (directory, expert replicas) carries it as "
            "`authorization: Bearer <token>` and every internal server refuses a call without it (UNAUTHENTICATED); "
            "unset (and no _FILE) = internal servers open; `expertmesh serve` makes one per run (core/auth.py)",
            "router, replica, directory, controller, expertmesh serve",
        ),
        _var(
            "EXPERTMESH_CLUSTER_TOKEN_PREVIOUS",
            "str",
            None,
            "during a rotation: the old cluster token, still accepted by servers (never sent); drop it once every "
            "process has the new EXPERTMESH_CLUSTER_TOKEN",
            "replica, directory",
        ),
        _var(
            "EXPERTMESH_CLUSTER_TOKEN_FILE",
            "path",
            None,
            "a file holding the cluster token (a mounted Secret; wins over EXPERTMESH_CLUSTER_TOKEN): line 1 the "
            "token, optional line 2 the previous token still accepted; re-read when it changes (rotation without "
            "restarts)",
            "router, replica, directory, controller",
        ),
        _var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "str",
            None,
            "OTLP/gRPC endpoint for traces; unset = tracing off (no-op tracer)",
            "every process",
        ),
        _var(
            "OPENAI_API_KEY",
            "str",
            None,
            "Bearer key of `expertmesh bench` when --api-key is not given",
            "expertmesh bench",
        ),
        _var(
            "XDG_CACHE_HOME",
            "path",
            None,
            "cache root for pool state files and logs; unset = ~/.cache",
            "expertmesh experts / serve",
        ),
    ]
}

# Set by expertmesh when unset (never overriding what the user exported), in every process it starts and in the
# processes that import torch or vLLM themselves. Name -> (value, why).
PROCESS_DEFAULTS: dict[str, tuple[str, str]] = {
    "OMP_NUM_THREADS": (
        "1",
        "vLLM pins its worker to one core and replicas do small matmuls: two OpenMP "
        "threads per core fight and run many times slower",
    ),
    "VLLM_CPU_KVCACHE_SPACE": (
        "1",
        "GiB of KV cache for vLLM on CPU; otherwise it reserves most of RAM and may refuse to start",
    ),
    "TOKENIZERS_PARALLELISM": ("false", "no tokenizer thread pool fighting the model's threads (and no fork warning)"),
}
# Forced where a process runs `vllm.LLM` itself (parity tests, benchmarks): the engine core, and with it the model
# and the expert plugin, in that process. The router (vLLM's OpenAI server) keeps vLLM's default: its own process.
IN_PROCESS_ENGINE_ENV: dict[str, tuple[str, str]] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": ("0", "an in-process `vllm.LLM` (tests, benchmarks) runs its engine core inline"),
}
# Given to the local pool's `ray start` (and so to every replica it starts).
RAY_HEAD_ENV: dict[str, tuple[str, str]] = {
    "OMP_NUM_THREADS": ("1", "replicas do small matmuls; forced, whatever the parent says"),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": ("0", "keeps Ray on loopback"),
    "RAY_USAGE_STATS_ENABLED": ("0", "no usage reporting from a private cluster"),
    "RAY_AUTH_MODE": (
        "disabled",
        "Ray 2.60 turns on token auth once ~/.ray/auth_token exists; the pool is "
        "loopback-only and its REST calls carry no token",
    ),
}


def get(name: str) -> Any:
    """The typed value of registered variable `name` now (its default when unset)."""
    try:
        var = ENV_VARS[name]
    except KeyError:
        raise KeyError(f"{name} is not in the settings registry (services/core/settings.py)") from None
    return var.value()


def is_set(name: str) -> bool:
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not in the settings registry")
    return bool(os.environ.get(name))


def __getattr__(name: str) -> Any:
    if name in ENV_VARS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- typed accessors (one per variable) ------------------------------------------------------------------------


def bind_host() -> str:
    return get("EXPERTMESH_BIND_HOST")


def advertise_host() -> str:
    return get("EXPERTMESH_ADVERTISE_HOST") or bind_host()


def directory_address() -> str:
    return get("EXPERTMESH_DIRECTORY")


def router_urls() -> list[str]:
    return list(get("EXPERTMESH_ROUTER"))


def api_keys() -> list[str]:
    return list(get("EXPERTMESH_API_KEYS"))


def ray_address() -> str | None:
    return get("EXPERTMESH_RAY_ADDRESS")


def replica_port_range() -> tuple[int, int]:
    return tuple(get("EXPERTMESH_REPLICA_PORTS"))


def shutdown_grace_s() -> float:
    return get("EXPERTMESH_SHUTDOWN_GRACE_S")


def gateway_max_body_bytes() -> int:
    return get("EXPERTMESH_GATEWAY_MAX_BODY_BYTES")


def gateway_body_timeout_s() -> float:
    return get("EXPERTMESH_GATEWAY_BODY_TIMEOUT_S")


def gateway_max_in_flight() -> int:
    return get("EXPERTMESH_GATEWAY_MAX_IN_FLIGHT")


def gateway_migrations() -> int:
    return get("EXPERTMESH_GATEWAY_MIGRATIONS")


def controller_status() -> str | None:
    return get("EXPERTMESH_CONTROLLER_STATUS")


def controller_settings() -> dict:
    return dict(get("EXPERTMESH_CONTROLLER_SETTINGS"))


def expert_kernel() -> str:
    return get("EXPERTMESH_EXPERT_KERNEL")


def trace_step_every() -> int:
    return get("EXPERTMESH_TRACE_STEP_EVERY")


def counters_file() -> str | None:
    return get("EXPERTMESH_COUNTERS_FILE")


def dispatch_deadline_s() -> float:
    return get("EXPERTMESH_DISPATCH_DEADLINE_S")


def dispatch_streams() -> bool:
    return get("EXPERTMESH_DISPATCH_STREAMS")


def dispatch_keepalive_s() -> float:
    return get("EXPERTMESH_DISPATCH_KEEPALIVE_S")


def dispatch_keepalive_timeout_s() -> float:
    return get("EXPERTMESH_DISPATCH_KEEPALIVE_TIMEOUT_S")


def missing_expert_wait_s() -> float:
    return get("EXPERTMESH_MISSING_EXPERT_WAIT_S")


def shared_experts_overlap() -> bool:
    return get("EXPERTMESH_SHARED_EXPERTS_OVERLAP")


def micro_batches() -> int:
    return get("EXPERTMESH_MICRO_BATCHES")


def micro_batch_min_tokens() -> int:
    return get("EXPERTMESH_MICRO_BATCH_MIN_TOKENS")


def router_metrics_port() -> int:
    return get("EXPERTMESH_ROUTER_METRICS_PORT")


def expert_mode() -> str:
    return get("EXPERTMESH_EXPERT_MODE")


def cluster_token() -> str | None:
    return get("EXPERTMESH_CLUSTER_TOKEN")


def cluster_token_previous() -> str | None:
    return get("EXPERTMESH_CLUSTER_TOKEN_PREVIOUS")


def cluster_token_file() -> str | None:
    return get("EXPERTMESH_CLUSTER_TOKEN_FILE")


def otlp_endpoint() -> str | None:
    return get("OTEL_EXPORTER_OTLP_ENDPOINT")


def openai_api_key() -> str | None:
    return get("OPENAI_API_KEY")


def cache_dir() -> Path:
    """expertmesh's cache directory: $XDG_CACHE_HOME/expertmesh, else ~/.cache/expertmesh."""
    root = get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "expertmesh"


# ---- writes: this process, and the environment of a child ------------------------------------------------------


def export(name: str, value: object) -> None:
    """Set registered variable `name` in this process (inherited by every child it starts, e.g. vLLM's engine core).
    The value is checked by the registry's parser first."""
    var = ENV_VARS.get(name)
    if var is None:
        raise KeyError(f"{name} is not in the settings registry")
    text = (
        ",".join(value)
        if isinstance(value, (list, tuple)) and var.parse is _csv
        else (json.dumps(value) if isinstance(value, dict) else str(value))
    )
    var.value({name: text})  # raises ValueError on a bad value, naming the variable
    os.environ[name] = text


def unset(name: str) -> None:
    """Remove registered variable `name` from this process (undoes an `export`)."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not in the settings registry")
    os.environ.pop(name, None)


def apply_process_defaults(*, in_process_engine: bool = False) -> None:
    """Set OMP/vLLM/tokenizers defaults in this process where the user has not (call before importing torch/vLLM).
    `in_process_engine=True` also runs a `vllm.LLM` of this process inline (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    for name, (value, _why) in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if in_process_engine:
        for name, (value, _why) in IN_PROCESS_ENGINE_ENV.items():
            os.environ[name] = value


def child_env(
    overrides: Mapping[str, object] | None = None,
    *,
    process_defaults: bool = True,
    forced: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, str]:
    """The environment for a subprocess: this process's, plus the process defaults where unset, plus `forced`
    (name -> (value, why), e.g. RAY_HEAD_ENV), plus `overrides` (registered names are checked)."""
    env = dict(os.environ)
    if process_defaults:
        for name, (value, _why) in PROCESS_DEFAULTS.items():
            env.setdefault(name, value)
    for name, (value, _why) in (forced or {}).items():
        env[name] = value
    for name, raw in (overrides or {}).items():
        text = str(raw)
        if name in ENV_VARS:
            ENV_VARS[name].value({name: text})
        env[name] = text
    return env


def inherited(name: str, default: str | None = None) -> str | None:
    """The raw value this process has for `name` (registered or a process default), to pass on unchanged."""
    if name not in ENV_VARS and name not in PROCESS_DEFAULTS and name not in IN_PROCESS_ENGINE_ENV:
        raise KeyError(f"{name} is not in the settings registry")
    return os.environ.get(name, default)


# ---- typed settings per process --------------------------------------------------------------------------------


@dataclass
class ReplicaSettings:
    """Tunables of one expert replica (args of experts/app.py ExpertGroupReplica / build_group). None = the
    replica's own default (REPLICA_DEFAULTS); only set fields go into the Serve config, so the Helm chart (nulls
    in values.yaml) and build_serve_config render the same config."""

    lease_seconds: float | None = None  # directory lease; renewed every lease/3
    max_wait_ms: float | None = None  # coalescing: how long a replica waits to merge Forward calls
    max_batch_rows: int | None = None  # coalescing: rows merged into one kernel call at most
    inline_rows: int | None = None  # a request of at most this many rows is computed on the event loop
    compute_threads: int | None = None  # torch threads of the replica (0 = leave torch's setting)

    def serve_args(self) -> dict:
        """The set fields, as Serve application args."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> ReplicaSettings:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown replica settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


# Effective defaults of the replica (services/experts/replica.py DEFAULT_*, discovery/directory.py
# DEFAULT_LEASE_SECONDS); tests/test_settings.py checks they agree.
REPLICA_DEFAULTS = {
    "lease_seconds": 10.0,
    "max_wait_ms": 1.0,
    "max_batch_rows": 4096,
    "inline_rows": 256,
    "compute_threads": 0,
}
REPLICA_MEANINGS = {
    "lease_seconds": "directory lease of a replica; renewed every lease/3, dropped when it runs out",
    "max_wait_ms": "coalescing: how long a replica waits to merge concurrent Forward calls into one kernel call",
    "max_batch_rows": "coalescing: rows merged into one kernel call at most",
    "inline_rows": "requests of at most this many rows are computed on the event loop, not the compute thread",
    "compute_threads": "torch threads of a replica's compute (0 = leave torch's setting, i.e. OMP_NUM_THREADS)",
}


def add_replica_flags(parser: argparse.ArgumentParser) -> None:
    """--lease-seconds, --max-wait-ms, --max-batch-rows, --inline-rows, --compute-threads (default: the replica's)."""
    for f in fields(ReplicaSettings):
        kind = float if f.name in ("lease_seconds", "max_wait_ms") else int
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"expert replicas: {REPLICA_MEANINGS[f.name]} (default {REPLICA_DEFAULTS[f.name]})",
        )


def replica_settings_from_args(args: argparse.Namespace) -> ReplicaSettings:
    return ReplicaSettings(**{f.name: getattr(args, f.name, None) for f in fields(ReplicaSettings)})


@dataclass
class GatewaySettings:
    """The gateway process: CLI flags over the registry."""

    routers: list[str] = field(default_factory=router_urls)
    host: str = field(default_factory=bind_host)
    port: int = GATEWAY_PORT
    api_keys: list[str] = field(default_factory=api_keys)
    controller_status: str | None = field(default_factory=controller_status)
    router_timeout_s: float = 5.0  # the routers' /health and /expertmesh/experts
    router_cooldown_s: float = 2.0  # a router that refused a connection is skipped this long
    max_in_flight: int = field(default_factory=gateway_max_in_flight)  # per router; 0 = no bound
    max_body_bytes: int = field(default_factory=gateway_max_body_bytes)  # 413 past it
    body_timeout_s: float = field(default_factory=gateway_body_timeout_s)  # 408 past it
    max_migrations: int = field(default_factory=gateway_migrations)  # a broken stream goes on elsewhere this often
    shutdown_grace_s: float = field(default_factory=shutdown_grace_s)  # requests in flight finish first
    controller_status_timeout_s: float = 1.0  # /experts must not hang on a controller that is down

    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--router",
            action="append",
            default=None,
            metavar="URL",
            help="base URL of a router, vLLM's OpenAI server with the plugin (repeatable; default $EXPERTMESH_ROUTER)",
        )
        parser.add_argument("--host", default=None, help="bind address (default $EXPERTMESH_BIND_HOST)")
        parser.add_argument("--port", type=int, default=GATEWAY_PORT)
        parser.add_argument(
            "--router-cooldown-s", type=float, default=2.0, help="seconds a router that refused a connection is skipped"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GatewaySettings:
        s = cls(port=args.port, router_cooldown_s=args.router_cooldown_s)
        s.routers = args.router or s.routers
        s.host = args.host or s.host
        return s


@dataclass
class DispatchSettings:
    """The router's expert dispatch (read in the router process and its engine core)."""

    directory: str = field(default_factory=directory_address)
    deadline_s: float = field(default_factory=dispatch_deadline_s)
    missing_wait_s: float = field(default_factory=missing_expert_wait_s)
    metrics_port: int = field(default_factory=router_metrics_port)
    counters_file: str | None = field(default_factory=counters_file)
    expert_mode: str = field(default_factory=expert_mode)
    trace_step_every: int = field(default_factory=trace_step_every)


@dataclass
class DirectorySettings:
    """The expert directory process (experts/app.py ExpertDirectory)."""

    address: str = field(default_factory=directory_address)
    bind_host: str = field(default_factory=bind_host)

    @property
    def port(self) -> int:
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"directory address {self.address!r} is not host:port")
        return int(port)


# ---- docs/configuration.md -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple) and len(value) == 2:
        return f"`{value[0]}-{value[1]}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`" if value else "empty"
    return f"`{value}`"


def markdown() -> str:
    """docs/configuration.md: every variable, process default, replica tunable and where to set it."""
    out = [
        "# Configuration",
        "",
        "Generated from `services/core/settings.py` by `python -m expertmesh.core.settings --markdown`; "
        "tests/test_settings.py fails when this file is stale. Do not edit by hand.",
        "",
        "## Environment variables",
        "",
        "Read when used (not cached at import). An empty value counts as unset.",
        "",
        "| variable | type | default | read by | meaning |",
        "|---|---|---|---|---|",
    ]
    for v in ENV_VARS.values():
        kind = v.type
        choices = getattr(v.parse, "choices", None)
        if choices:
            kind = " \\| ".join(choices)
        out.append(f"| `{v.name}` | {kind} | {_fmt(v.default)} | {v.read_by} | {v.meaning} |")
    out += [
        "",
        "## Process defaults",
        "",
        "Set by expertmesh where unset (never over a value you exported): in every process `expertmesh serve` "
        "starts, in the test session, and by `apply_process_defaults()` before torch/vLLM are imported.",
        "",
        "| variable | value | why |",
        "|---|---|---|",
    ]
    out += [f"| `{k}` | `{v}` | {why} |" for k, (v, why) in PROCESS_DEFAULTS.items()]
    out += ["", "Forced in the router process:", "", "| variable | value | why |", "|---|---|---|"]
    out += [f"| `{k}` | `{v}` | {why} |" for k, (v, why) in IN_PROCESS_ENGINE_ENV.items()]
    out += [
        "",
        "Given to the local pool's `ray start` (and so to every replica):",
        "",
        "| variable | value | why |",
        "|---|---|---|",
    ]
    out += [f"| `{k}` | `{v}` | {why} |" for k, (v, why) in RAY_HEAD_ENV.items()]
    out += [
        "",
        "## Expert replica tunables",
        "",
        "Arguments of each group's Serve application (`build_serve_config(..., replica=ReplicaSettings(...))`); "
        "unset = the replica's default. `expertmesh serve` / `expertmesh experts up` flag, Helm value under "
        "`experts.replica`:",
        "",
        "| setting | flag | Helm value | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in fields(ReplicaSettings):
        camel = f.name.split("_")[0] + "".join(p.title() for p in f.name.split("_")[1:])
        out.append(
            f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `experts.replica.{camel}` | "
            f"`{REPLICA_DEFAULTS[f.name]}` | {REPLICA_MEANINGS[f.name]} |"
        )
    out += [
        "",
        "## gRPC",
        "",
        f"Every channel and server raises both message-size limits to {GRPC_MAX_MESSAGE_BYTES >> 20} MiB "
        "(`grpc_message_options()`).",
        "",
        "## Ports",
        "",
        "| port | default |",
        "|---|---|",
    ]
    for name in (
        "GATEWAY_PORT",
        "ROUTER_PORT",
        "ROUTER_METRICS_PORT",
        "DIRECTORY_PORT",
        "REPLICA_METRICS_PORT",
        "RAY_GCS_PORT",
        "RAY_DASHBOARD_PORT",
        "CONTROLLER_PORT",
    ):
        out.append(f"| `{name}` | {globals()[name]} |")
    out.append(f"| `REPLICA_PORT_RANGE` | {REPLICA_PORT_RANGE[0]}-{REPLICA_PORT_RANGE[1]} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.core.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    for name, var in ENV_VARS.items():  # the current values
        print(f"{name}={var.value()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
