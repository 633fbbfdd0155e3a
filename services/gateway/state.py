"""What every request handler of one gateway app shares (`request.app.state.gw`): its settings, the routers it
proxies to and its metrics. One per app, so several apps can live in one process (tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from expertmesh.core.settings import GatewaySettings
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.proxy import RouterPool


@dataclass
class GatewayState:
    """/v1/* is relayed to `pool` (gateway/proxy.py); /health, /metrics and /experts read the routers' HTTP
    endpoints (ops_routes.py)."""

    settings: GatewaySettings
    pool: RouterPool
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    created: int = field(default_factory=lambda: int(time.time()))


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gw
