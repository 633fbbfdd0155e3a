"""Router logprob entries (router_pb2.TokenLogprob) in OpenAI's two formats: chat (`content` list) and the legacy
completions format (parallel lists, with `echo` the prompt's entries first)."""

from __future__ import annotations


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries, top: int) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)} for t in list(e.top)[:top]
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries, offset: int, tokenizer=None, prompt_ids=None) -> dict:
    """OpenAI's legacy format. With prompt entries (echo) the first prompt token has no logprob (None)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
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
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
