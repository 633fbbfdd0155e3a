"""Request migration: a streamed generation whose router dies mid-answer continues on another router.

As Dynamo's request migration does: the gateway keeps, for each streamed `/v1/completions` and `/v1/chat/completions`
request, the prompt's token ids and the ids of the tokens already streamed to the client. When the router breaks off
(its connection drops, or it answers an internal error in the stream) another router is asked for the rest:
`/v1/completions` with the prompt ids + the streamed ids as the prompt and the remaining `max_tokens`; its events are
rewritten into the original stream (same id and creation time, chat deltas for a chat request, usage counted over
the whole generation). The client sees one stream with no token lost or repeated; under greedy decoding the text
is the one an undisturbed router would have produced. Past `max_migrations`, or for a request that cannot be
continued (n > 1, echo, several prompts, beam search), the stream ends with an in-stream error event.

The token ids come from vLLM's own `return_token_ids` option, which the gateway adds to the upstream request; unless
the client asked for them too, they are taken out of the events again (a byte-level edit of the two fields back to
the `null` vLLM writes without the option, no JSON round trip per event), and the chat events vLLM sends only because
ids were asked for (an empty delta carrying a token that produced no text yet) are dropped, so the client gets exactly
the bytes it would have got without them.

A stream that continues elsewhere is not exact in two corners: a stop string that spans the break is not seen (each
router checks the text it produced), and seeded random sampling restarts its generator. Greedy output is exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MIGRATABLE_PATHS = ("completions", "chat/completions")
# vLLM writes these two fields after others in a choice (and prompt_token_ids after the choices in a chat chunk):
# never first in an object, so each appears as `,"name":[...]` (or `:null` when ids were not asked for).
_ID_FIELDS = re.compile(rb',"(prompt_token_ids|token_ids)":(\[[0-9, ]*\]|null)')
DONE = b"data: [DONE]"
# Sampling fields a continuation keeps (everything that shapes the next tokens and is valid for /v1/completions).
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "allowed_token_ids",
    "bad_words",
)


class Broken(Exception):
    """The router's stream ended without [DONE], or it sent an internal error: continue elsewhere."""


@dataclass
class Generation:
    """One streamed generation as the gateway relays it: what it needs to continue it on another router."""

    path: str  # "completions" or "chat/completions"
    request: dict  # the client's request body
    wants_ids: bool  # the client asked for return_token_ids itself: leave the ids in
    prompt_ids: list[int] | None = None  # from the first event
    generated: list[int] = field(default_factory=list)  # token ids streamed to the client so far
    chunk_id: str | None = None
    created: int | None = None
    model: str | None = None
    done: bool = False  # [DONE] relayed
    migrations: int = 0
    generated_before: int = 0  # tokens streamed before the current continuation (usage of a continuation)

    @property
    def chat(self) -> bool:
        return self.path == "chat/completions"

    # -- the original router's events ------------------------------------------------------------------------
    def relay(self, event: bytes) -> bytes | None:
        """One SSE event of the original router -> the bytes to send the client (None: nothing). Raises Broken on an
        internal error event (the router's engine died: the request can go on elsewhere)."""
        if event == DONE:
            self.done = True
            return event
        if not event.startswith(b"data: {"):
            return event
        if event.startswith(b'data: {"error"'):
            self._check_error(event)
            return event
        if self.chunk_id is None:  # the first chunk: the stream's id and creation time, kept over migrations
            first = json.loads(event[6:])
            self.chunk_id, self.created, self.model = first.get("id"), first.get("created"), first.get("model")
        for match in _ID_FIELDS.finditer(event):
            if match.group(2) != b"null":
                ids = json.loads(match.group(2))
                if match.group(1) == b"token_ids":
                    self.generated.extend(ids)
                elif self.prompt_ids is None:
                    self.prompt_ids = ids
        if self.wants_ids:
            return event
        event = _ID_FIELDS.sub(rb',"\1":null', event)  # what vLLM writes when ids were not asked for
        # Sent only because ids were asked for: vLLM skips a chat delta with no text, no logprobs and no finish.
        if self.chat and b'"delta":{}' in event and b'"finish_reason":null' in event and b'"logprobs":null' in event:
            return None
        return event

    def _check_error(self, event: bytes) -> None:
        try:
            error = json.loads(event[6:])["error"]
            code = int(error.get("code") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            code = 0
        if code >= 500:  # the router's fault (e.g. its engine died), not the request's
            raise Broken(str(error.get("message", ""))[:200])

    # -- continuing elsewhere -----------------------------------------------------------------------------------
    def can_continue(self, max_migrations: int) -> bool:
        return self.migrations < max_migrations and not self.done

    def continuation(self) -> tuple[str, bytes]:
        """(path, body) to send the next router. Before the first event there is nothing to continue from: the
        original request again. Otherwise a /v1/completions request for the rest of the generation."""
        self.migrations += 1
        if self.prompt_ids is None:
            return self.path, json.dumps({**self.request, "return_token_ids": True}).encode()
        self.generated_before = len(self.generated)
        body: dict = {k: self.request[k] for k in _SAMPLING if k in self.request}
        budget = self.request.get("max_completion_tokens", self.request.get("max_tokens"))
        body.update(
            model=self.request.get("model"),
            prompt=self.prompt_ids + self.generated,
            max_tokens=None if budget is None else max(1, int(budget) - len(self.generated)),
            stream=True,
            stream_options={"include_usage": True},
            return_token_ids=True,
        )
        if self.chat:  # a chat request's prompt ids already hold the rendered template
            body["skip_special_tokens"] = self.request.get("skip_special_tokens", True)
        return "completions", json.dumps(body).encode()

    def rewrite(self, event: bytes) -> bytes | None:
        """One SSE event of a continuation (a /v1/completions stream) -> the bytes of the original stream."""
        if self.prompt_ids is None:  # the original request, resent: relay as the original router's
            return self.relay(event)
        if event == DONE:
            self.done = True
            return event
        if not event.startswith(b"data: {"):
            return event
        chunk = json.loads(event[6:])
        if "error" in chunk:
            self._check_error(event)
            return event
        usage = chunk.get("usage")
        if usage and not chunk.get("choices"):  # the usage chunk: only if the client asked for it
            if not (self.request.get("stream_options") or {}).get("include_usage"):
                return None
            completion = self.generated_before + int(usage.get("completion_tokens", 0))
            prompt = len(self.prompt_ids)
            chunk["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        out: dict = {
            "id": self.chunk_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model or chunk.get("model"),
            "choices": [],
        }
        for choice in chunk.get("choices", []):
            ids = choice.get("token_ids") or []
            self.generated.extend(ids)
            text = choice.get("text", "")
            finish = choice.get("finish_reason")
            if self.chat:
                if not text and finish is None:
                    continue  # vLLM sends no chat delta for a token that produced no text yet
                piece: dict = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None}
            else:
                piece = {"index": 0, "text": text, "logprobs": None}
            piece["finish_reason"] = finish
            piece["stop_reason"] = choice.get("stop_reason")
            if not self.chat:
                piece["prompt_token_ids"] = None  # sent once, at the start of the original stream
            piece["token_ids"] = ids if self.wants_ids else None  # as vLLM writes the fields (null unless asked)
            out["choices"].append(piece)
        if usage is not None:
            out["usage"] = chunk["usage"]
        if not out["choices"] and "usage" not in out:
            return None
        return b"data: " + json.dumps(out, separators=(",", ":")).encode()

    def error_event(self, detail: str) -> bytes:
        """The in-stream error that ends a stream which cannot go on (vLLM's error-event shape)."""
        error = {"message": detail, "type": "InternalServerError", "param": None, "code": 503}
        return b"data: " + json.dumps({"error": error}).encode()


def plan(path: str, body: bytes, request: Any = None) -> tuple[Generation, bytes] | None:
    """(Generation, the body to send upstream: the client's plus return_token_ids) for a streamed generation that
    can be migrated; None for every other request (relayed unchanged). `request`: `body` already parsed (the proxy
    parses and validates every POST body first: validation.check_body), else parsed here."""
    if path not in MIGRATABLE_PATHS:
        return None
    if request is None:
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's parser
            return None
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    if request.get("n", 1) not in (1, None) or request.get("best_of") not in (None, 1) or request.get("echo"):
        return None
    if request.get("use_beam_search"):
        return None
    prompt = request.get("prompt")
    if path == "completions" and not (
        isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    ):
        return None  # several prompts in one request: one stream per prompt, not continued here
    wants_ids = bool(request.get("return_token_ids"))
    generation = Generation(path, request, wants_ids)
    upstream = body if wants_ids else json.dumps({**request, "return_token_ids": True}).encode()
    return generation, upstream
