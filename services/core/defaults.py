"""Ports, addresses and environment variable names shared by every service, the CLI and the Helm chart.

Non-default ports on purpose: another Ray cluster (6379/8265) or another server (8000/50051) may share
the machine. Everything binds loopback unless told otherwise.
"""

from __future__ import annotations

import os
import random
import socket

GATEWAY_PORT = 8000              # HTTP, OpenAI-compatible API, /health, /metrics, /experts
ROUTER_PORT = 50061              # gRPC expertmesh.v1.Router
ROUTER_METRICS_PORT = 9461       # HTTP Prometheus metrics of the router process
DIRECTORY_PORT = 50071           # gRPC expertmesh.v1.ExpertDirectory
REPLICA_PORT_RANGE = (50100, 50999)  # gRPC ExpertService of the replicas (one port each)
REPLICA_METRICS_PORT = 9471      # HTTP Prometheus metrics served by the expert pool
RAY_GCS_PORT = 6391              # local Ray cluster of `expertmesh experts up` / `serve`
RAY_DASHBOARD_PORT = 8271
CONTROLLER_PORT = 9481           # HTTP /health and /status of the expert controller service

# Environment variables (the Helm chart sets the same names).
ENV_BIND_HOST = "EXPERTMESH_BIND_HOST"            # address servers bind (default 127.0.0.1; 0.0.0.0 in pods)
ENV_ADVERTISE_HOST = "EXPERTMESH_ADVERTISE_HOST"  # address replicas publish in the directory (pod IP)
ENV_DIRECTORY = "EXPERTMESH_DIRECTORY"            # host:port of the expert directory
ENV_ROUTER = "EXPERTMESH_ROUTER"                  # host:port of the router
ENV_API_KEYS = "EXPERTMESH_API_KEYS"              # comma-separated API keys for the gateway; unset = open
ENV_REPLICA_PORTS = "EXPERTMESH_REPLICA_PORTS"    # "start-end" range replicas bind in
ENV_CONTROLLER_STATUS = "EXPERTMESH_CONTROLLER_STATUS"  # controller status for the gateway's /experts: a JSON file
                                                        # (local stack) or http(s)://controller:9481/status


def bind_host() -> str:
    return os.environ.get(ENV_BIND_HOST, "127.0.0.1")


def advertise_host() -> str:
    return os.environ.get(ENV_ADVERTISE_HOST) or bind_host()


def directory_address() -> str:
    return os.environ.get(ENV_DIRECTORY, f"127.0.0.1:{DIRECTORY_PORT}")


def router_address() -> str:
    return os.environ.get(ENV_ROUTER, f"127.0.0.1:{ROUTER_PORT}")


def replica_port_range() -> tuple[int, int]:
    raw = os.environ.get(ENV_REPLICA_PORTS)
    if not raw:
        return REPLICA_PORT_RANGE
    lo, _, hi = raw.partition("-")
    return int(lo), int(hi)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, for servers started on loopback.

    Drawn from 20000-29999: below the kernel's ephemeral range (Linux 32768+) and above Ray's worker ports
    (10002-19999). A port the OS hands out for bind(0) can be handed out again to the next bind(0) — Ray's agents
    and every Serve replica's internal server bind "[::]:0" — between our choosing it and our server binding it
    (the likely cause of one pool start seen here whose directory replica never came up)."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
