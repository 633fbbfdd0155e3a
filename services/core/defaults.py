"""Ports, addresses and environment variable names shared by every service, the CLI and the Helm chart.

The values live in core/settings.py (the one registry); this module re-exports them under their old names.
Non-default ports on purpose: another Ray cluster (6379/8265) or another server (8000/50051) may share
the machine. Everything binds loopback unless told otherwise.
"""

from __future__ import annotations

import random
import socket

from expertmesh.core.settings import (  # noqa: F401
    CONTROLLER_PORT,
    DIRECTORY_PORT,
    GATEWAY_PORT,
    RAY_DASHBOARD_PORT,
    RAY_GCS_PORT,
    REPLICA_METRICS_PORT,
    REPLICA_PORT_RANGE,
    ROUTER_METRICS_PORT,
    ROUTER_PORT,
    advertise_host,
    bind_host,
    directory_address,
    replica_port_range,
    router_address,
)

# Environment variable names (registered, with type/default/meaning, in core/settings.py; the Helm chart sets them).
ENV_BIND_HOST = "EXPERTMESH_BIND_HOST"
ENV_ADVERTISE_HOST = "EXPERTMESH_ADVERTISE_HOST"
ENV_DIRECTORY = "EXPERTMESH_DIRECTORY"
ENV_ROUTER = "EXPERTMESH_ROUTER"
ENV_API_KEYS = "EXPERTMESH_API_KEYS"
ENV_REPLICA_PORTS = "EXPERTMESH_REPLICA_PORTS"
ENV_CONTROLLER_STATUS = "EXPERTMESH_CONTROLLER_STATUS"


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
