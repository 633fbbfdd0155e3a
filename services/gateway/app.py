"""The gateway: an OpenAI-compatible HTTP API in front of the router's gRPC `Generate` stream.

    python -m expertmesh.gateway.app --router HOST:PORT [--host 127.0.0.1] [--port 8000]
        [--model-name NAME] [--tokenizer DIR]

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (Bearer API keys when
EXPERTMESH_API_KEYS is set), GET /experts (same keys), GET /health and GET /metrics (always open: probes and
scrapers carry no keys).

The gateway owns the tokenizer work a client sees: chat template (rendered to text, then tokenized without
special tokens, as vLLM does), prompt token counts for `usage`, the context-length check (max_model_len from
the router's Health). The router gets token ids. `n` choices are n parallel Generate calls (seed + i when a
seed is given). Closing a Generate call (client went away, mid-stream or while waiting for a non-streamed
answer) makes the router abort the request in vLLM.

Each request gets a span `gateway <METHOD> <route>` (parent from an incoming `traceparent`); its context goes to
the router in gRPC metadata.

Python API: `create_app(router="127.0.0.1:50061", model_name=None, tokenizer=None, api_keys=None)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import propagate, trace
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.core import defaults, telemetry
from expertmesh.core.protos import router_pb2, router_pb2_grpc
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.openai_schema import (APIError, ChatCompletionRequest, CompletionRequest, bad_request,
                                              context_length_error, validate_sampling, validation_error_message)

ROUTER_TIMEOUT_S = 5.0      # Health / Stats calls


# ---- router link -----------------------------------------------------------------------------------------------

@dataclass
class RouterInfo:
    model: str
    max_model_len: int
    local_experts: bool


@dataclass
class _State:
    router: str
    model_name: str | None
    tokenizer_dir: str | None
    api_keys: frozenset[str]
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    channel: grpc.aio.Channel | None = None
    stub: router_pb2_grpc.RouterStub | None = None
    info: RouterInfo | None = None
    tokenizer: object = None
    generation_defaults: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def router_stub(self) -> router_pb2_grpc.RouterStub:
        if self.stub is None:
            self.channel = grpc.aio.insecure_channel(self.router, options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
            self.stub = router_pb2_grpc.RouterStub(self.channel)
        return self.stub

    async def router_info(self) -> RouterInfo:
        """Model name and context length from the router (cached once the router has answered)."""
        if self.info is not None:
            return self.info
        async with self.lock:
            if self.info is None:
                try:
                    h = await self.router_stub().Health(router_pb2.HealthRequest(), timeout=ROUTER_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    raise APIError(503, f"router {self.router} unavailable: {exc.details() or exc.code().name}",
                                   "service_unavailable_error") from exc
                self.info = RouterInfo(h.model, int(h.max_model_len), h.local_experts)
                self._load_tokenizer(h.model)
        return self.info

    def _load_tokenizer(self, router_model: str) -> None:
        from transformers import AutoTokenizer

        source = self.tokenizer_dir or router_model
        if not Path(source).is_dir():
            raise APIError(503, f"no tokenizer: the router serves {router_model!r}, which is not a local "
                                f"directory; start the gateway with --tokenizer DIR", "service_unavailable_error")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        gen = Path(source) / "generation_config.json"
        if gen.exists():   # sampling defaults of the checkpoint, as vLLM applies them (--generation-config auto)
            data = json.loads(gen.read_text())
            self.generation_defaults = {k: data[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                                        if data.get(k) is not None}

    def served_name(self) -> str:
        return self.model_name or (self.info.model if self.info else "")


# ---- one Generate call -----------------------------------------------------------------------------------------

@dataclass
class Choice:
    """What one Generate call produced so far."""
    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)         # router_pb2.TokenLogprob per generated token
    prompt_logprobs: list = field(default_factory=list)  # router_pb2.TokenLogprob per prompt token (first empty)
    finish_reason: str | None = None


def _router_error(exc: grpc.aio.AioRpcError) -> APIError:
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = "max_tokens" if "maximum context length" in details else None
        return APIError(400, details, "invalid_request_error", param,
                        "context_length_exceeded" if param else None)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return APIError(503, f"router: {details}", "service_unavailable_error")
    return APIError(500, f"router: {details}", "internal_error")


def _finish_reason(reason: str) -> str | None:
    return reason or None


class Generation:
    """n Generate calls for one prompt (or several prompts) of one HTTP request, run concurrently."""

    def __init__(self, state: _State, endpoint: str, prompts: list[list[int]], n: int, params_for: list, metadata,
                 started: float):
        """params_for[p](i) -> router SamplingParams of choice i of prompt p (max_tokens may differ per prompt)."""
        self.state = state
        self.endpoint = endpoint
        self.choices: list[Choice] = []
        self.calls = []
        self.started = started
        self.first_token_seen = False
        stub = state.router_stub()
        for p_index, ids in enumerate(prompts):
            for i in range(n):
                index = p_index * n + i
                self.choices.append(Choice(index=index, prompt_ids=ids))
                request = router_pb2.GenerateRequest(request_id=f"gw{index}", token_ids=router_pb2.TokenIds(ids=ids),
                                                     params=params_for[p_index](i))
                self.calls.append(stub.Generate(request, metadata=metadata))

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, router_pb2.GenerateResponse]]:
        """(choice, message) as they arrive from any of the calls; raises APIError on a router error."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice, call) -> None:
            try:
                async for msg in call:
                    await queue.put((choice, msg))
                await queue.put((choice, None))
            except grpc.aio.AioRpcError as exc:
                await queue.put((choice, exc))
            except asyncio.CancelledError:
                raise

        tasks = [asyncio.create_task(pump(c, call)) for c, call in zip(self.choices, self.calls)]
        open_calls = len(tasks)
        try:
            while open_calls:
                choice, item = await queue.get()
                if item is None:
                    open_calls -= 1
                    continue
                if isinstance(item, grpc.aio.AioRpcError):
                    raise _router_error(item)
                self._apply(choice, item)
                yield choice, item
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    def _apply(self, choice: Choice, msg: router_pb2.GenerateResponse) -> None:
        if msg.token_ids and not self.first_token_seen:
            self.first_token_seen = True
            self.state.metrics.ttft.labels(self.endpoint).observe(time.monotonic() - self.started)
        if msg.prompt_logprobs:
            choice.prompt_logprobs = list(msg.prompt_logprobs)
        choice.text += msg.text
        choice.token_ids.extend(msg.token_ids)
        choice.logprobs.extend(msg.logprobs)
        if msg.finish_reason:
            choice.finish_reason = msg.finish_reason

    def usage(self, prompts: list[list[int]]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


# ---- logprob formats -------------------------------------------------------------------------------------------

def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries, top: int) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": _bytes(e.token),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                                          for t in list(e.top)[:top]]}
                        for e in entries]}


def completion_logprobs(entries, offset: int, tokenizer=None, prompt_ids=None) -> dict:
    """OpenAI's legacy format. With prompt entries (echo) the first prompt token has no logprob (None)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for i, e in enumerate(entries):
        if not e.token and not e.top and e.logprob == 0 and prompt_ids is not None and i == 0:
            token = tokenizer.decode([prompt_ids[0]]) if tokenizer is not None else ""
            tokens.append(token)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token = e.token
            tokens.append(token)
            token_logprobs.append(e.logprob)
            top_logprobs.append({t.token: t.logprob for t in e.top})
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _sse(data) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ---- the app ---------------------------------------------------------------------------------------------------

def create_app(router: str | None = None, model_name: str | None = None, tokenizer: str | None = None,
               api_keys: list[str] | None = None) -> FastAPI:
    """The gateway app. api_keys None -> from EXPERTMESH_API_KEYS (comma-separated; unset/empty = open)."""
    if api_keys is None:
        api_keys = [k.strip() for k in os.environ.get(defaults.ENV_API_KEYS, "").split(",") if k.strip()]
    state = _State(router=router or defaults.router_address(), model_name=model_name, tokenizer_dir=tokenizer,
                   api_keys=frozenset(api_keys))
    telemetry.init_tracing("expertmesh-gateway")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if state.channel is not None:
            await state.channel.close()

    app = FastAPI(title="expertmesh gateway", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.gw = state
    metrics = state.metrics

    def error_response(exc: APIError, endpoint: str) -> JSONResponse:
        metrics.errors.labels(endpoint, exc.type).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_error_message(list(exc.errors()))
        return error_response(bad_request(message, param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(APIError(exc.status_code, str(exc.detail), kind), request.url.path)

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def check_auth(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                           "authentication_error", None, "missing_api_key")
        if not any(secrets.compare_digest(key.strip(), k) for k in state.api_keys):
            raise APIError(401, "Incorrect API key provided.", "authentication_error", None, "invalid_api_key")

    async def check_model(requested: str | None) -> RouterInfo:
        info = await state.router_info()
        if requested and requested != state.served_name():
            raise APIError(404, f"The model `{requested}` does not exist.", "not_found_error", "model",
                           "model_not_found")
        return info

    def start_span(request: Request, name: str):
        parent = propagate.extract(dict(request.headers))
        span = telemetry.tracer().start_span(f"gateway {name}", context=parent)
        metadata = tuple(telemetry.inject_metadata(trace.set_span_in_context(span, parent)))
        return span, metadata

    # ---- generation plumbing shared by both endpoints -----------------------------------------------------------
    def sampling_for(body, prompt_len: int, info: RouterInfo, logprobs: int | None, prompt_logprobs: int | None):
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            if prompt_len >= info.max_model_len:
                raise context_length_error(info.max_model_len, prompt_len, None)
            max_tokens = info.max_model_len - prompt_len
        elif prompt_len + max_tokens > info.max_model_len:
            raise context_length_error(info.max_model_len, prompt_len, max_tokens)
        d = state.generation_defaults

        def params(i: int) -> router_pb2.SamplingParams:
            p = router_pb2.SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature if body.temperature is not None else d.get("temperature", 1.0),
                top_p=body.top_p if body.top_p is not None else d.get("top_p", 1.0),
                top_k=body.top_k if body.top_k is not None else d.get("top_k", 0),
                stop=body.stop_list(), presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=(body.repetition_penalty if body.repetition_penalty is not None
                                    else d.get("repetition_penalty", 1.0)),
                ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)
            if body.seed is not None:
                p.seed = body.seed + i
            if logprobs is not None:
                p.logprobs = logprobs
            if prompt_logprobs is not None:
                p.prompt_logprobs = prompt_logprobs
            return p

        return params

    async def run_to_end(request: Request, generation: Generation) -> None:
        """Drain every call; if the client disconnects first, cancel them (the router aborts in vLLM)."""
        async def drain():
            async for _ in generation.events():
                pass

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.create_task(drain())
        watch = asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                generation.cancel()
                work.cancel()
                raise APIError(499, "client disconnected", "client_closed_request")
            work.result()
        finally:
            watch.cancel()
            work.cancel()

    async def run_unary(request: Request, span, endpoint: str, generation: Generation, prompts) -> dict:
        """A non-streamed response: run every call to the end, count it, return its usage."""
        state.metrics.in_progress.labels(endpoint).inc()
        try:
            await run_to_end(request, generation)
        finally:
            state.metrics.in_progress.labels(endpoint).dec()
            span.end()
        usage = generation.usage(prompts)
        state.metrics.completion_tokens.labels(endpoint).inc(usage["completion_tokens"])
        return usage

    async def stream_response(request: Request, span, endpoint: str, generation: Generation, chunks):
        """Wrap an async iterator of SSE bytes: errors become an error event, the span ends with the stream."""
        state.metrics.in_progress.labels(endpoint).inc()

        async def body():
            try:
                async for data in chunks:
                    yield data
                yield b"data: [DONE]\n\n"
            except APIError as exc:
                metrics.errors.labels(endpoint, exc.type).inc()
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
                yield _sse(exc.body())
                yield b"data: [DONE]\n\n"
            finally:
                generation.cancel()
                state.metrics.in_progress.labels(endpoint).dec()
                span.end()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes -------------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        info = await state.router_info()
        return {"object": "list", "data": [{"id": state.served_name(), "object": "model", "created": state.created,
                                            "owned_by": "expertmesh", "root": info.model,
                                            "max_model_len": info.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        check_auth(request)
        validate_sampling(body)
        info = await check_model(body.model)
        endpoint = "/v1/chat/completions"
        started = time.monotonic()
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            text = state.tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # jinja errors raised by the template (e.g. role order it refuses)
            raise bad_request(f"The chat template could not render these messages: {exc}", "messages") from exc
        prompt_ids = state.tokenizer.encode(text, add_special_tokens=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_for(body, len(prompt_ids), info, top, None)
        span, metadata = start_span(request, "POST /v1/chat/completions")
        span.set_attribute("prompt_tokens", len(prompt_ids))
        generation = Generation(state, endpoint, [prompt_ids], body.n, [params], metadata, started)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = state.served_name()
        echo = ""
        if body.echo and body.messages and body.messages[-1].role == "assistant":
            echo = messages[-1]["content"]
        metrics.prompt_tokens.labels(endpoint).inc(len(prompt_ids))

        if body.stream:
            chunk = _chunker(request_id, "chat.completion.chunk", created, model, body)

            async def chunks():
                for c in generation.choices:
                    delta = {"role": "assistant", "content": echo}
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}])
                async for choice, msg in generation.events():
                    if not msg.token_ids and not msg.finish_reason:
                        continue
                    metrics.completion_tokens.labels(endpoint).inc(len(msg.token_ids))
                    entry = {"index": choice.index, "delta": {"content": msg.text} if msg.text or msg.token_ids else {},
                             "logprobs": chat_logprobs(msg.logprobs, top) if top is not None else None,
                             "finish_reason": _finish_reason(msg.finish_reason)}
                    yield chunk([entry])
                if chunk.include_usage:
                    yield chunk([], generation.usage([prompt_ids]))

            return await stream_response(request, span, endpoint, generation, chunks())

        usage = await run_unary(request, span, endpoint, generation, [prompt_ids])
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": echo + c.text},
                             "logprobs": chat_logprobs(c.logprobs, top) if top is not None else None,
                             "finish_reason": _finish_reason(c.finish_reason)} for c in generation.choices],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check_auth(request)
        validate_sampling(body)
        info = await check_model(body.model)
        endpoint = "/v1/completions"
        started = time.monotonic()
        tok = state.tokenizer
        raw = body.prompt
        if isinstance(raw, str):
            prompt_texts, prompts = [raw], [tok.encode(raw, add_special_tokens=True)]
        elif raw and all(isinstance(x, int) for x in raw):
            prompt_texts, prompts = [tok.decode(raw)], [list(raw)]
        elif raw and all(isinstance(x, str) for x in raw):
            prompt_texts, prompts = list(raw), [tok.encode(x, add_special_tokens=True) for x in raw]
        elif raw and all(isinstance(x, list) for x in raw):
            prompt_texts, prompts = [tok.decode(x) for x in raw], [list(x) for x in raw]
        else:
            raise bad_request("prompt must be a non-empty string, list of strings, or list of token ids.", "prompt")
        if any(len(p) == 0 for p in prompts):
            raise bad_request("prompt must not be empty.", "prompt")
        vocab = len(tok)
        for p in prompts:
            bad = [t for t in p if t < 0 or t >= vocab]
            if bad:
                raise bad_request(f"token id {bad[0]} is out of vocabulary (vocabulary size {vocab}).", "prompt")
        param_sets = [sampling_for(body, len(p), info, body.logprobs,
                                   body.logprobs if body.echo and body.logprobs is not None else None)
                      for p in prompts]
        span, metadata = start_span(request, "POST /v1/completions")
        span.set_attribute("prompt_tokens", sum(len(p) for p in prompts))
        generation = Generation(state, endpoint, prompts, body.n, param_sets, metadata, started)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = state.served_name()
        metrics.prompt_tokens.labels(endpoint).inc(sum(len(p) for p in prompts))

        def prompt_part(choice: Choice) -> tuple[str, dict | None]:
            p_index = choice.index // body.n
            text = prompt_texts[p_index] if body.echo else ""
            if body.logprobs is None:
                return text, None
            if body.echo:
                return text, completion_logprobs(choice.prompt_logprobs, 0, tok, prompts[p_index])
            return text, None

        if body.stream:
            chunk = _chunker(request_id, "text_completion", created, model, body)
            offsets = {c.index: 0 for c in generation.choices}

            async def chunks():
                sent_prompt = set()
                async for choice, msg in generation.events():
                    text, logprobs = "", None
                    if choice.index not in sent_prompt:
                        sent_prompt.add(choice.index)
                        text, logprobs = prompt_part(choice)
                        offsets[choice.index] = len(text)
                    if not msg.token_ids and not msg.finish_reason and not text:
                        continue
                    metrics.completion_tokens.labels(endpoint).inc(len(msg.token_ids))
                    if body.logprobs is not None:
                        gen_lp = completion_logprobs(msg.logprobs, offsets[choice.index])
                        logprobs = _merge_completion_logprobs(logprobs, gen_lp)
                    offsets[choice.index] += len(msg.text)
                    yield chunk([{"index": choice.index, "text": text + msg.text, "logprobs": logprobs,
                                  "finish_reason": _finish_reason(msg.finish_reason)}])
                if chunk.include_usage:
                    yield chunk([], generation.usage(prompts))

            return await stream_response(request, span, endpoint, generation, chunks())

        usage = await run_unary(request, span, endpoint, generation, prompts)
        out = []
        for c in generation.choices:
            text, logprobs = prompt_part(c)
            if body.logprobs is not None:
                logprobs = _merge_completion_logprobs(logprobs, completion_logprobs(c.logprobs, len(text)))
            out.append({"index": c.index, "text": text + c.text, "logprobs": logprobs,
                        "finish_reason": _finish_reason(c.finish_reason)})
        return {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": out, "usage": usage}

    # ---- operations ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        try:
            h = await state.router_stub().Health(router_pb2.HealthRequest(), timeout=ROUTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"status": "unavailable", "router": state.router,
                                 "detail": f"router unreachable: {exc.details() or exc.code().name}"}, status_code=503)
        body = {"status": "ok" if h.ok and h.missing_experts == 0 else "unavailable", "router": state.router,
                "model": h.model, "local_experts": h.local_experts, "missing_experts": h.missing_experts,
                "max_model_len": h.max_model_len}
        if body["status"] != "ok":
            body["detail"] = h.detail or f"{h.missing_experts} (layer, expert) keys have no live replica"
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/experts")
    async def experts(request: Request):
        check_auth(request)
        try:
            stats = await state.router_stub().Stats(router_pb2.StatsRequest(), timeout=ROUTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise APIError(503, f"router unavailable: {exc.details() or exc.code().name}",
                           "service_unavailable_error") from exc
        rows = [{"layer": e.layer, "expert": e.expert, "routed_tokens": e.routed_tokens, "replicas": e.replicas}
                for e in stats.experts]
        controller = await _controller_status()
        return {"experts": rows,
                "replicas": {"total": sum(r["replicas"] for r in rows),
                             "missing": sum(1 for r in rows if r["replicas"] == 0)},
                "requests_running": stats.requests_running,
                "uptime_seconds": stats.uptime_seconds,
                "plan": controller.get("plan"),
                "controller": {k: v for k, v in controller.items() if k != "plan"} or None}

    return app


CONTROLLER_STATUS_TIMEOUT_S = 1.0  # /experts must not hang on a controller that is down


def _chunker(request_id: str, obj: str, created: int, model: str, body):
    """chunk(choices, usage=None) -> one SSE event of a streamed response (usage only if stream_options asks)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, usage=None):
        data = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    chunk.include_usage = include_usage
    return chunk


async def _controller_status() -> dict:
    """The expert controller's last status (plan, replicas per group, load, history), if one is running.
    EXPERTMESH_CONTROLLER_STATUS names where: a file the local stack's controller writes after every tick, or
    (in the cluster) the controller service's http(s)://.../status. Unreachable or not ready -> {}."""
    where = os.environ.get(defaults.ENV_CONTROLLER_STATUS)
    if not where:
        return {}
    if where.startswith(("http://", "https://")):
        try:
            async with httpx.AsyncClient(timeout=CONTROLLER_STATUS_TIMEOUT_S) as http:
                reply = await http.get(where)
            body = reply.json() if reply.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}
    try:
        return json.loads(Path(where).read_text())
    except (OSError, ValueError):
        return {}


def _merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


# ---- command line ----------------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=defaults.router_address(), help="router gRPC host:port")
    parser.add_argument("--host", default=defaults.bind_host())
    parser.add_argument("--port", type=int, default=defaults.GATEWAY_PORT)
    parser.add_argument("--model-name", default=None, help="model id clients use (default: the router's)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the router's model, if it is a local directory)")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m expertmesh.gateway.app", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    app = create_app(router=args.router, model_name=args.model_name, tokenizer=args.tokenizer)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    telemetry.shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
