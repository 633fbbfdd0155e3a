"""Server-sent events of streamed responses: one `data: {json}` event per chunk, `data: [DONE]` at the end; a
router error mid-stream becomes an error event (the HTTP status is already sent), and the request's span and
in-progress gauge end with the stream, whether it finished or the client went away."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse
from opentelemetry import trace

from expertmesh.gateway.generation import Generation
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.openai_schema import APIError

DONE = b"data: [DONE]\n\n"


def sse(data) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Chunker:
    """chunk(choices, usage=None) -> one SSE event of a streamed response (usage only if stream_options asks);
    `include_usage` says whether the stream ends with a usage chunk."""

    __slots__ = ("request_id", "obj", "created", "model", "include_usage")

    def __init__(self, request_id: str, obj: str, created: int, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.obj = obj
        self.created = created
        self.model = model
        self.include_usage = include_usage

    def __call__(self, choices, usage=None) -> bytes:
        data = {
            "id": self.request_id,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            data["usage"] = usage
        return sse(data)


def chunker(request_id: str, obj: str, created: int, model: str, body) -> Chunker:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Chunker(request_id, obj, created, model, include_usage)


def stream_response(metrics: GatewayMetrics, span, endpoint: str, generation: Generation, chunks) -> StreamingResponse:
    """Wrap an async iterator of SSE bytes: errors become an error event, the span ends with the stream."""
    metrics.in_progress.labels(endpoint).inc()

    async def body():
        try:
            async for data in chunks:
                yield data
            yield DONE
        except APIError as exc:
            metrics.errors.labels(endpoint, exc.type).inc()
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            yield sse(exc.body())
            yield DONE
        finally:
            generation.cancel()
            metrics.in_progress.labels(endpoint).dec()
            span.end()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
