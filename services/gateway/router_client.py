"""The gateway's link to the router: one gRPC channel, the router's model and context length (asked once), the
tokenizer and the checkpoint's sampling defaults, and the mapping of router errors to OpenAI errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from expertmesh.core.protos import router_pb2, router_pb2_grpc
from expertmesh.core.settings import grpc_message_options
from expertmesh.gateway.openai_schema import APIError

if TYPE_CHECKING:  # annotations only: transformers is imported when the tokenizer is loaded
    from transformers import PreTrainedTokenizerBase


@dataclass
class RouterInfo:
    model: str
    max_model_len: int
    local_experts: bool


@dataclass
class RouterClient:
    """Lazily connected; `info()` caches the router's Health answer and loads the tokenizer with it."""

    address: str
    model_name: str | None = None  # the id clients use; None = the router's
    tokenizer_dir: str | None = None  # None = the router's model directory
    timeout_s: float = 5.0  # Health / Stats calls
    channel: grpc.aio.Channel | None = None
    _stub: router_pb2_grpc.RouterStub | None = None
    cached: RouterInfo | None = None
    tokenizer: PreTrainedTokenizerBase | None = None  # loaded by info()
    generation_defaults: dict = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def stub(self) -> router_pb2_grpc.RouterStub:
        if self._stub is None:
            self.channel = grpc.aio.insecure_channel(self.address, options=grpc_message_options())
            self._stub = router_pb2_grpc.RouterStub(self.channel)
        return self._stub

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def health(self) -> router_pb2.HealthResponse:
        return await self.stub().Health(router_pb2.HealthRequest(), timeout=self.timeout_s)

    async def stats(self) -> router_pb2.StatsResponse:
        return await self.stub().Stats(router_pb2.StatsRequest(), timeout=self.timeout_s)

    async def info(self) -> RouterInfo:
        """Model name and context length from the router (cached once the router has answered)."""
        if self.cached is not None:
            return self.cached
        async with self.lock:
            if self.cached is None:
                try:
                    h = await self.health()
                except grpc.aio.AioRpcError as exc:
                    raise APIError(
                        503,
                        f"router {self.address} unavailable: {exc.details() or exc.code().name}",
                        "service_unavailable_error",
                    ) from exc
                self.cached = RouterInfo(h.model, int(h.max_model_len), h.local_experts)
                self._load_tokenizer(h.model)
        return self.cached

    def _load_tokenizer(self, router_model: str) -> None:
        from transformers import AutoTokenizer

        source = self.tokenizer_dir or router_model
        if not Path(source).is_dir():
            raise APIError(
                503,
                f"no tokenizer: the router serves {router_model!r}, which is not a local "
                f"directory; start the gateway with --tokenizer DIR",
                "service_unavailable_error",
            )
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        gen = Path(source) / "generation_config.json"
        if gen.exists():  # sampling defaults of the checkpoint, as vLLM applies them (--generation-config auto)
            data = json.loads(gen.read_text())
            self.generation_defaults = {
                k: data[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if data.get(k) is not None
            }

    def served_name(self) -> str:
        return self.model_name or (self.cached.model if self.cached else "")


def router_error(exc: grpc.aio.AioRpcError) -> APIError:
    """The OpenAI error a client sees for a failed router call."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = "max_tokens" if "maximum context length" in details else None
        return APIError(400, details, "invalid_request_error", param, "context_length_exceeded" if param else None)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return APIError(503, f"router: {details}", "service_unavailable_error")
    return APIError(500, f"router: {details}", "internal_error")
