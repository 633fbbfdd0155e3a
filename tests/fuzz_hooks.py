"""schemathesis hooks of tests/test_fuzz_gateway.py (loaded through SCHEMATHESIS_HOOKS=fuzz_hooks).

Only schema-valid (positive) cases are touched, never the schema-violating (negative) ones, and every change keeps
a case schema-valid. Three kinds:

- reach: `model` set to the served model (the document allows any name; vLLM answers another with a 404, which
  would end most generated cases before they reach an engine);
- speed: generated max_tokens / max_completion_tokens capped at SMALL (one set where the request leaves it to the
  server: vLLM would generate up to the whole context), n at 2, so a generation costs milliseconds on 2 cores;
- what no JSON schema can say, each a 400 from vLLM that the gateway's document names in its 400 description
  (openapi.VLLM_400): a positive case is moved inside the rule rather than left to be rejected. Each rule is one
  line of `_inside_vllm_rules` with its reason.
"""

from __future__ import annotations

import json
import os

import schemathesis

SMALL = 4
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy sampling
VOCAB = int(os.environ.get("FUZZ_VOCAB_SIZE", "4096"))  # the served model's vocabulary (the test sets it)
MODEL = os.environ.get("FUZZ_MODEL", "demo")  # the served model's name (the test sets it)
# Fields that need a server option this stack does not set, so vLLM refuses them whatever their value: the gateway
# cannot know a router's options; its document names them in the 400.
NEEDS_SERVER_OPTION = (
    "suffix",  # a model with fill-in-the-middle rendering
    "prompt_embeds",  # --enable-prompt-embeds
    "chat_template",  # --trust-request-chat-template
    "thinking_token_budget",  # --reasoning-parser
    "mm_processor_kwargs",  # --trust-request-mm-kwargs
    "media_io_kwargs",  # --trust-request-mm-kwargs
)
# Grammars and templates: whether one compiles is decided by xgrammar / jinja, not by a schema.
GRAMMARS = ("structured_outputs", "response_format", "repetition_detection")


def _ids(value):
    """Token ids folded into the vocabulary (the vocabulary size is not in the document)."""
    if isinstance(value, list):
        return [_ids(v) for v in value]
    if isinstance(value, float) and value.is_integer():  # JSON Schema's integer: 7.0 is one
        value = int(value)
    return value % VOCAB if isinstance(value, int) and not isinstance(value, bool) else value


def _inside_vllm_rules(body: dict) -> None:
    for key in NEEDS_SERVER_OPTION + GRAMMARS:
        body.pop(key, None)
    # the context: prompt + max_tokens <= max_model_len (generated prompts are short; max_tokens is capped below)
    # token ids outside the vocabulary
    for key in ("stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
        if isinstance(body.get(key), list):
            body[key] = _ids(body[key])
    if isinstance(body.get("prompt"), list):
        body["prompt"] = _ids(body["prompt"])
    if isinstance(body.get("logit_bias"), dict):
        # keys are token ids (the schema says digits; vLLM refuses an id past the vocabulary)
        body["logit_bias"] = {str(int(k) % VOCAB): v for k, v in body["logit_bias"].items() if k.isdigit()}
    # options that go only with others
    if not body.get("stream"):
        body.pop("stream_options", None)  # "Stream options can only be defined when stream=True"
    else:
        body.pop("prompt_logprobs", None)  # "prompt_logprobs are not available when stream=True"
    if body.get("tool_choice") != "none":
        # tools with "auto" (their default), "required" or a named choice: "... requires --enable-auto-tool-choice
        # and --tool-call-parser to be set", which this stack does not (test_openai_parity.py runs tools)
        body.pop("tools", None)
    if not body.get("tools"):
        body.pop("tool_choice", None)  # "When using tool_choice, tools must be set"
    if body.get("logprobs") is not True and "messages" in body:
        body.pop("top_logprobs", None)  # "when using top_logprobs, logprobs must be set to true"
    if body.get("logprobs") is None:
        body.pop("logprob_token_ids", None)  # "when using logprob_token_ids, logprobs must be set"
    if body.get("continue_final_message"):
        body["add_generation_prompt"] = False  # "continue_final_message and add_generation_prompt are not compatible"
    body.pop("routed_experts_prompt_start", None)  # at most the prompt's length in tokens
    body.pop("bad_words", None)  # "bad_words entries must tokenize to at least one token": the tokenizer decides
    body.pop("use_beam_search", None)  # beam search's own rules ("Streaming is not currently supported with ...")
    if isinstance(body.get("messages"), list):
        # openai_harmony's Message (author, recipient: no role) is gpt-oss's format; other models' templates fail on
        # it ("'Message' object is not subscriptable")
        body["messages"] = [m for m in body["messages"] if not isinstance(m, dict) or "role" in m] or [
            {"role": "user", "content": "Speak."}
        ]
    # a text-only model: content parts other than text are refused ("demo is not a multimodal model")
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message["content"] = [p for p in message["content"] if isinstance(p, dict) and p.get("type") == "text"]
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            # "chat completions only support assistant tool_calls of type 'function'"
            message["tool_calls"] = [
                c for c in message["tool_calls"] if isinstance(c, dict) and c.get("type") == "function"
            ]


def _number(value) -> bool:
    """An integer as JSON Schema has it (7 or 7.0), not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@schemathesis.hook
def map_case(ctx, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    body = case.body
    generation = "messages" in body or "prompt" in body
    if "model" in body:
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if _number(body.get(key)) and body[key] > SMALL:
            body[key] = SMALL
    if generation and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = SMALL
    if _number(body.get("n")) and body["n"] > 2:
        body["n"] = 2
    if _number(body.get("n")) and _number(body.get("temperature")) and body["temperature"] < GREEDY_TEMPERATURE:
        body["n"] = 1  # "n must be 1 when using greedy sampling"
    # "min_tokens must be less than or equal to max_tokens"
    if _number(body.get("min_tokens")):
        body["min_tokens"] = min(body["min_tokens"], body.get("max_tokens") or body.get("max_completion_tokens") or 1)
    if generation:
        _inside_vllm_rules(body)
    json.dumps(body)  # still JSON
    return case
