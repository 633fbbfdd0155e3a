"""The OpenAI routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed or not).

The gateway owns the tokenizer work a client sees: chat template (rendered to text, then tokenized without special
tokens, as vLLM does), prompt token counts for `usage`, the context-length check (max_model_len from the router's
Health). The router gets token ids. `n` choices are n parallel Generate calls (seed + i when a seed is given).
Each request gets a span `gateway <METHOD> <route>` (parent from an incoming `traceparent`) whose context goes to
the router in gRPC metadata."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from opentelemetry import propagate, trace

from expertmesh.core import telemetry
from expertmesh.gateway.auth import check_auth
from expertmesh.gateway.generation import Choice, Generation, finish_reason, run_unary, sampling_for
from expertmesh.gateway.logprobs import chat_logprobs, completion_logprobs, merge_completion_logprobs
from expertmesh.gateway.openai_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    validate_sampling,
)
from expertmesh.gateway.router_client import RouterInfo
from expertmesh.gateway.sse import chunker, stream_response
from expertmesh.gateway.state import GatewayState, gateway_state

routes = APIRouter()


async def check_model(gw: GatewayState, requested: str | None) -> RouterInfo:
    info = await gw.router.info()
    if requested and requested != gw.router.served_name():
        raise APIError(404, f"The model `{requested}` does not exist.", "not_found_error", "model", "model_not_found")
    return info


async def admit(
    request: Request, body: ChatCompletionRequest | CompletionRequest
) -> tuple[GatewayState, RouterInfo, float]:
    """What every generation route checks first, in order: the API key, the sampling parameters, the model.
    Returns the gateway state, the router's info and the time the request was admitted."""
    gw = gateway_state(request)
    check_auth(request, gw.settings.api_keys)
    validate_sampling(body)
    info = await check_model(gw, body.model)
    return gw, info, time.monotonic()


def start_span(request: Request, name: str):
    """The request's span (parent from its `traceparent`) and the gRPC metadata carrying it to the router."""
    parent = propagate.extract(dict(request.headers))
    span = telemetry.tracer().start_span(f"gateway {name}", context=parent)
    metadata = tuple(telemetry.inject_metadata(trace.set_span_in_context(span, parent)))
    return span, metadata


@routes.get("/v1/models")
async def list_models(request: Request):
    gw = gateway_state(request)
    check_auth(request, gw.settings.api_keys)
    info = await gw.router.info()
    return {
        "object": "list",
        "data": [
            {
                "id": gw.router.served_name(),
                "object": "model",
                "created": gw.created,
                "owned_by": "expertmesh",
                "root": info.model,
                "max_model_len": info.max_model_len,
            }
        ],
    }


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    gw, info, started = await admit(request, body)
    endpoint = "/v1/chat/completions"
    metrics = gw.metrics
    tokenizer = gw.router.tokenizer
    assert tokenizer is not None  # check_model -> info() loaded it
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt)
    except Exception as exc:  # jinja errors raised by the template (e.g. role order it refuses)
        raise bad_request(f"The chat template could not render these messages: {exc}", "messages") from exc
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_for(body, len(prompt_ids), info, gw.router.generation_defaults, top, None)
    span, metadata = start_span(request, "POST /v1/chat/completions")
    span.set_attribute("prompt_tokens", len(prompt_ids))
    generation = Generation(gw.router, metrics, endpoint, [prompt_ids], body.n, [params], metadata, started)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = gw.router.served_name()
    echo = ""
    if body.echo and body.messages and body.messages[-1].role == "assistant":
        echo = messages[-1]["content"]
    metrics.prompt_tokens.labels(endpoint).inc(len(prompt_ids))

    if body.stream:
        chunk = chunker(request_id, "chat.completion.chunk", created, model, body)

        async def chunks():
            for c in generation.choices:
                delta = {"role": "assistant", "content": echo}
                yield chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}])
            async for choice, msg in generation.events():
                if not msg.token_ids and not msg.finish_reason:
                    continue
                metrics.completion_tokens.labels(endpoint).inc(len(msg.token_ids))
                entry = {
                    "index": choice.index,
                    "delta": {"content": msg.text} if msg.text or msg.token_ids else {},
                    "logprobs": chat_logprobs(msg.logprobs, top) if top is not None else None,
                    "finish_reason": finish_reason(msg.finish_reason),
                }
                yield chunk([entry])
            if chunk.include_usage:
                yield chunk([], generation.usage([prompt_ids]))

        return stream_response(metrics, span, endpoint, generation, chunks())

    usage = await run_unary(request, span, endpoint, generation, [prompt_ids])
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": echo + c.text},
                "logprobs": chat_logprobs(c.logprobs, top) if top is not None else None,
                "finish_reason": finish_reason(c.finish_reason),
            }
            for c in generation.choices
        ],
        "usage": usage,
    }


def _prompts(tok, raw) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, prompt token ids) of a completions `prompt`: a string, strings, token ids or lists of them."""
    if isinstance(raw, str):
        texts, prompts = [raw], [tok.encode(raw, add_special_tokens=True)]
    elif raw and all(isinstance(x, int) for x in raw):
        texts, prompts = [tok.decode(raw)], [list(raw)]
    elif raw and all(isinstance(x, str) for x in raw):
        texts, prompts = list(raw), [tok.encode(x, add_special_tokens=True) for x in raw]
    elif raw and all(isinstance(x, list) for x in raw):
        texts, prompts = [tok.decode(x) for x in raw], [list(x) for x in raw]
    else:
        raise bad_request("prompt must be a non-empty string, list of strings, or list of token ids.", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise bad_request("prompt must not be empty.", "prompt")
    vocab = len(tok)
    for p in prompts:
        bad = [t for t in p if t < 0 or t >= vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of vocabulary (vocabulary size {vocab}).", "prompt")
    return texts, prompts


@routes.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    gw, info, started = await admit(request, body)
    endpoint = "/v1/completions"
    metrics = gw.metrics
    tok = gw.router.tokenizer
    prompt_texts, prompts = _prompts(tok, body.prompt)
    param_sets = [
        sampling_for(
            body,
            len(p),
            info,
            gw.router.generation_defaults,
            body.logprobs,
            body.logprobs if body.echo and body.logprobs is not None else None,
        )
        for p in prompts
    ]
    span, metadata = start_span(request, "POST /v1/completions")
    span.set_attribute("prompt_tokens", sum(len(p) for p in prompts))
    generation = Generation(gw.router, metrics, endpoint, prompts, body.n, param_sets, metadata, started)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = gw.router.served_name()
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
        chunk = chunker(request_id, "text_completion", created, model, body)
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
                    logprobs = merge_completion_logprobs(logprobs, gen_lp)
                offsets[choice.index] += len(msg.text)
                yield chunk(
                    [
                        {
                            "index": choice.index,
                            "text": text + msg.text,
                            "logprobs": logprobs,
                            "finish_reason": finish_reason(msg.finish_reason),
                        }
                    ]
                )
            if chunk.include_usage:
                yield chunk([], generation.usage(prompts))

        return stream_response(metrics, span, endpoint, generation, chunks())

    usage = await run_unary(request, span, endpoint, generation, prompts)
    out = []
    for c in generation.choices:
        text, logprobs = prompt_part(c)
        if body.logprobs is not None:
            logprobs = merge_completion_logprobs(logprobs, completion_logprobs(c.logprobs, len(text)))
        out.append(
            {
                "index": c.index,
                "text": text + c.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(c.finish_reason),
            }
        )
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage,
    }
