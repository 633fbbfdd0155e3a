"""A request's heavy work, kept off the gateway's event loop so that one large or hostile request never delays
the others (/health included): the body is read with a size limit (413 past it), parsed and validated, chat-
templated and tokenized in a small thread pool (`RequestWork`).

The tokenizer's Rust encoder releases the GIL while it works; building a Python list of millions of ids does not,
so a prompt that cannot fit the context is refused from its token count alone (`encode`), with the same error
`generation.sampling_for` gives. JSON is parsed by pydantic's parser, which refuses lone surrogate escapes
(`"\\ud800"`), so no string a tokenizer or protobuf cannot encode gets past the parse."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from expertmesh.gateway.openai_schema import APIError, bad_request, context_length_error, validation_error_message

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class RequestWork:
    """A bounded thread pool for request parsing and tokenizer calls (few threads: the work is CPU-bound and the
    machine's cores also run the router)."""

    def __init__(self, workers: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gateway-request-work")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes).",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed `limit` bytes (declared length, else bytes read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse(model: type[M], raw: bytes) -> M:
    """`raw` JSON validated as `model`; a 400 in OpenAI's shape when it is not (run in the pool: O(body))."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, param = validation_error_message([dict(e) for e in exc.errors(include_url=False)])
        raise bad_request(message, param) from None


async def parse_request(request: Request, model: type[M], work: RequestWork, limit: int) -> M:
    return await work.run(parse, model, await read_body(request, limit))


def encode(tok, text: str, add_special_tokens: bool, max_model_len: int, max_tokens: int | None) -> list[int]:
    """tok.encode(text) (same ids), or the context-length error when the prompt alone fills the context."""
    backend = getattr(tok, "backend_tokenizer", None)
    # Call the Rust tokenizer directly only where transformers would call it unchanged (it resets truncation,
    # padding and special-token splitting before encoding when they differ from this call's defaults).
    direct = (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))
    )
    if backend is None or not direct:
        ids = list(tok.encode(text, add_special_tokens=add_special_tokens))
        check_fits(len(ids), max_model_len, max_tokens)
        return ids
    # encode_batch releases the GIL while it works; its `_fast` form (same ids, no character offsets) also leaves
    # no per-token strings behind, whose freeing would hold the GIL again for a long prompt.
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encoding = batch([text], add_special_tokens=add_special_tokens)[0]
    check_fits(len(encoding), max_model_len, max_tokens)
    return list(encoding.ids)


def check_fits(prompt_len: int, max_model_len: int, max_tokens: int | None) -> None:
    """Refuse a prompt of at least max_model_len tokens (it leaves no room for one generated token)."""
    if prompt_len >= max_model_len:
        raise context_length_error(max_model_len, prompt_len, max_tokens)


def chat_prompt(
    tok, messages: list[dict], add_generation_prompt: bool, max_model_len: int, max_tokens: int | None
) -> list[int]:
    """The chat template rendered to text, then tokenized without special tokens (as vLLM does)."""
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors raised by the template (e.g. role order it refuses)
        raise bad_request(f"The chat template could not render these messages: {exc}", "messages") from exc
    return encode(tok, text, False, max_model_len, max_tokens)
