"""OpenAI API request bodies, their validation (as vLLM's OpenAI server does it) and the error format.

Types are checked by pydantic (wrong types -> 400); value ranges by `validate_sampling` with the messages
vLLM's server gives, so clients written against vLLM see the same errors. Every error leaves the gateway as

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with OpenAI's types: invalid_request_error (400), authentication_error (401), not_found_error (404),
service_unavailable_error (503), internal_error (500). Unknown request fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_N = 16


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> APIError:
    """vLLM's wording (the router's is the same), so clients that parse it keep working."""
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion."
        )
    return bad_request(message, "messages" if max_tokens is None else "max_tokens", "context_length_exceeded")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"Unsupported content part type {part.type!r}: this model takes text only.", "messages"
                )
            parts.append(part.text)
        return "\n".join(parts)


class _SamplingBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    min_tokens: int = 0  # vLLM extension
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _check_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number, got {value}.", name)
    if (value <= lo if lo_open else value < lo) or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"{name} must be in {interval}, got {value}.", name)


def validate_sampling(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Value checks shared by both endpoints (types were checked by pydantic)."""
    max_tokens = body.requested_max_tokens()
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise bad_request(f"{param} must be at least 1, got {max_tokens}.", param)
    if body.temperature is not None and body.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {body.temperature}.", "temperature")
    _check_range("temperature", body.temperature, 0.0, 2.0)
    _check_range("top_p", body.top_p, 0.0, 1.0, lo_open=True)
    _check_range("presence_penalty", body.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", body.frequency_penalty, -2.0, 2.0)
    if body.repetition_penalty is not None and not (
        math.isfinite(body.repetition_penalty) and body.repetition_penalty > 0
    ):
        raise bad_request(
            f"repetition_penalty must be greater than zero, got {body.repetition_penalty}.", "repetition_penalty"
        )
    if body.top_k is not None and body.top_k < -1:
        raise bad_request(f"top_k must be -1 or 0 (disabled), or at least 1, got {body.top_k}.", "top_k")
    if body.min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {body.min_tokens}.", "min_tokens")
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {body.min_tokens}.", "min_tokens"
        )
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {body.n}.", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    if any(s == "" for s in body.stop_list()):
        raise bad_request("stop strings must not be empty.", "stop")
    if isinstance(body, ChatCompletionRequest):
        if not body.messages:
            raise bad_request("messages must contain at least one message.", "messages")
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"`top_logprobs` must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}.", "top_logprobs"
                )
    else:
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"`logprobs` must be in [0, {MAX_LOGPROBS}], got {body.logprobs}.", "logprobs")
        if body.suffix:
            raise bad_request("suffix is not supported by this model.", "suffix")


def validation_error_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic/FastAPI validation errors -> (one readable message, the offending parameter)."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"Malformed JSON in request body: {ctx.get('error', first.get('msg', 'invalid JSON'))}.", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if first.get("type") == "missing":
        return f"Missing required parameter: '{where}'.", param
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "The request body must be a JSON object.", None
    got = first.get("input")
    got_text = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"Invalid value for '{where}': {first.get('msg', 'invalid')} (got {got_text}).", param
