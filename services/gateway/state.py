"""What every request handler of one gateway app shares (`request.app.state.gw`): its settings, the router client
and its metrics. One per app, so several apps can live in one process (tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from expertmesh.core.settings import GatewaySettings
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.proxy import RouterPool
from expertmesh.gateway.router_client import RouterClient


@dataclass
class GatewayState:
    settings: GatewaySettings
    router: RouterClient
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> GatewayState:
        return cls(
            settings=settings,
            router=RouterClient(
                settings.router,
                model_name=settings.model_name,
                tokenizer_dir=settings.tokenizer,
                timeout_s=settings.router_timeout_s,
            ),
        )


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gw


@dataclass
class ProxyGatewayState:
    """The gateway in front of routers that run vLLM's own OpenAI server (`--proxy`): /v1/* is relayed to `pool`
    (gateway/proxy.py); /health, /metrics and /experts read the routers' HTTP endpoints."""

    settings: GatewaySettings
    pool: RouterPool
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
