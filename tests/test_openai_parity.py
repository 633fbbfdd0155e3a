"""The OpenAI surface is vLLM's own: expertmesh's serving path answers OpenAI requests exactly as vLLM's own OpenAI
server does on the same checkpoint.

expertmesh's path: the gateway as its command line runs it (`python -m expertmesh.gateway.app --router URL`) in
front of a router (`python -m expertmesh.router.openai_server MODEL --expert-mode remote`: vLLM's OpenAI server with
the plugin, every routed expert computed by a real ExpertServer over gRPC, in this process). The reference: vLLM's
own `vllm.entrypoints.openai.api_server` with local experts. Both get the same vLLM flags (openai_servers.vllm_flags).

Per model (the shipped demo model and a tiny random Qwen3-MoE in fp32), both servers start once, side by side, and
every case sends the same request to both through the official `openai` SDK and compares the answers whole, with
only the per-request fields (id, created, system_fingerprint, tool call ids) taken out and logprob values compared
within LOGPROB_TOLERANCE: greedy chat, stop strings, n=3 seeded sampling, chat logprobs, a streamed chat with
usage, completions with echo and logprobs, response_format json_schema and json_object, a named and a required
tool_choice, vLLM's structured_outputs (choice, regex); and bad requests (unknown model, prompt over
--max-model-len, invalid JSON schema, tool_choice naming no given tool, tool_choice without tools) get the same
status and the same OpenAI error body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import free_port
from openai_servers import (
    expert_pool,
    gateway_args,
    reference_args,
    router_args,
    start_server,
    stop_server,
    vllm_flags,
    wait_ready,
)

from expertmesh.core import settings

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
MODELS = ("demo", "qwen3_moe")
MAX_MODEL_LEN = 512  # vllm_flags' --max-model-len
# vLLM answers a named or "required" tool_choice only with a tool parser, and builds one only with auto tool choice
# enabled (else a 400 "requires --tool-call-parser to be set"); the call is then decoded under a JSON grammar built
# from the tools and parsed as JSON. "pythonic" is a parser that takes that JSON path and needs no special tokens in
# the vocabulary. Neither checkpoint's chat template knows tools: the prompt is the conversation without them.
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]
# A failure bound: a pair starts in ~45 s on two quiet cores; two pairs starting together took 2-4.7 minutes while
# other tests loaded the machine.
START_TIMEOUT_S = 360
# Logprob values may differ in the last bits between the two paths: the remote experts run expertmesh's kernel on the
# replica (core/kernel.py: vLLM's CPU fused-MoE op by default, torch grouped matmuls where that op is absent or
# EXPERTMESH_EXPERT_KERNEL=torch), each replica sums its experts and the router combines replicas with index_add_,
# where vLLM's local path runs its fused MoE in one call: the same fp32 products, possibly added in another order.
# That moves hidden states by a few fp32 ulps (~1e-7 relative) per layer, and a logprob (a log-softmax over logits
# of order 1-10) by ~1e-6 after a few layers. 1e-4 is well above that and far below what a wrong expert, weight or
# gate does to a logprob (1e-2 and up). Measured here with the default kernel: identical to the bit (0 of ~2,900
# logprob values of echoed completions with top-5 differ, both models).
LOGPROB_TOLERANCE = 1e-4
# Prompts both models answer with some text under greedy decoding (the Qwen3 model ends at once on "What news from
# Rome?", which the demo answers).
PROMPTS = ("Speak, my lord.", "Good morrow, sweet queen.", "The quick brown fox")
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "alive": {"type": "boolean"}},
    "required": ["name", "alive"],
    "additionalProperties": False,
}
# Arguments from closed sets and bounded strings, so a random model's call ends within the token budget.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Rome", "Verona", "Elsinore"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_letter",
            "description": "Send a letter.",
            "parameters": {
                "type": "object",
                "properties": {"to": {"type": "string", "maxLength": 10}, "sealed": {"type": "boolean"}},
                "required": ["to", "sealed"],
                "additionalProperties": False,
            },
        },
    },
]


@dataclass(frozen=True)
class Pair:
    """The two OpenAI clients of one model: expertmesh's path (gateway → router → replica) and vLLM's own server."""

    model: str  # the served model name
    expertmesh: openai.OpenAI
    reference: openai.OpenAI

    def both(self, call: Callable[[openai.OpenAI], Any]) -> tuple[Any, Any]:
        """(expertmesh's answer, the reference's) to `call`, sent to both at once; an APIStatusError is returned as
        the answer, so error cases compare like the others."""

        def answer(client: openai.OpenAI):
            try:
                return call(client)
            except openai.APIStatusError as exc:
                return exc

        with ThreadPoolExecutor(2) as pool:
            ours, theirs = pool.map(answer, (self.expertmesh, self.reference))
        return ours, theirs


def _client(url: str) -> openai.OpenAI:
    # no retries: a failed call must show, not be repeated; the key is not checked (the gateway runs open)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tiny_checkpoint, tmp_path_factory) -> Iterator[Pair]:
    """The model's pool, router, gateway and reference server, started once for the model's tests."""
    checkpoint = DEMO if request.param == "demo" else tiny_checkpoint(request.param)
    served = request.param
    logs = tmp_path_factory.mktemp(f"openai-parity-{served}")
    router_port, reference_port, gateway_port = free_port(), free_port(), free_port()
    # the router's expert mode comes from its flags; the reference must not load the plugin in remote mode; the
    # gateway runs open whatever the shell running the tests has in EXPERTMESH_API_KEYS
    env = settings.child_env({"EXPERTMESH_EXPERT_MODE": "local"})
    env.pop("EXPERTMESH_API_KEYS", None)
    flags = [*vllm_flags(served), *TOOL_FLAGS]
    router_url, reference_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{reference_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    with expert_pool(checkpoint) as (directory, _replica):
        commands = {
            "router": router_args(checkpoint, directory, router_port, *flags),
            "reference": reference_args(checkpoint, reference_port, *flags),
            "gateway": gateway_args([router_url], gateway_port),
        }
        procs = {}
        try:
            for name, command in commands.items():  # all three start side by side
                procs[name] = start_server(command, logs / f"{name}.log", env)
            # the gateway's /v1/models is the router's: ready once the router is
            for name, url in (("router", router_url), ("reference", reference_url), ("gateway", gateway_url)):
                wait_ready(url, procs[name], logs / f"{name}.log", START_TIMEOUT_S)
            yield Pair(served, _client(gateway_url), _client(reference_url))
        finally:
            for proc in procs.values():
                stop_server(proc)


# ---- comparing answers -------------------------------------------------------------------------------------------


def _normalised(answer) -> tuple[Any, list[float]]:
    """(the answer as JSON data without its per-request fields and with every float replaced by a marker, the
    floats in document order): everything in the first must be equal, the floats (logprobs: the only floats in
    these answers) equal within LOGPROB_TOLERANCE."""
    data = answer.model_dump(mode="json")  # vLLM's extra fields (stop_reason, token_ids, ...) included
    for key in ("id", "created", "system_fingerprint"):
        data.pop(key)  # KeyError if a field is not there at all: the shapes must match
    for choice in data.get("choices") or []:
        for call in (choice.get("message") or choice.get("delta") or {}).get("tool_calls") or []:
            assert call.pop("id").startswith("chatcmpl-tool-"), call
    floats: list[float] = []

    def walk(value):
        if isinstance(value, float):
            floats.append(value)
            return "<float>"
        if isinstance(value, dict):
            return {key: walk(value[key]) for key in sorted(value)}  # sorted: top_logprobs maps compare in one order
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return walk(data), floats


def assert_same_answer(ours, theirs) -> dict:
    """expertmesh's answer equals the reference's (floats within LOGPROB_TOLERANCE); returns the reference's data."""
    assert not isinstance(ours, Exception), ours
    assert not isinstance(theirs, Exception), theirs
    (our_data, our_floats), (their_data, their_floats) = _normalised(ours), _normalised(theirs)
    assert our_data == their_data
    assert len(our_floats) == len(their_floats)
    assert our_floats == pytest.approx(their_floats, abs=LOGPROB_TOLERANCE, rel=0)
    return theirs.model_dump(mode="json")


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _chat(pair: Pair, prompt: str = PROMPTS[0], **kwargs) -> Callable[[openai.OpenAI], Any]:
    options = {"temperature": 0, "max_tokens": 24} | kwargs
    return lambda client: client.chat.completions.create(model=pair.model, messages=_messages(prompt), **options)


# ---- successful requests -----------------------------------------------------------------------------------------


def test_greedy_chat(pair):
    for prompt in PROMPTS:
        reply = assert_same_answer(*pair.both(_chat(pair, prompt)))
        assert reply["choices"][0]["message"]["content"], prompt  # something was compared
        assert reply["usage"]["completion_tokens"] > 0


def _stop_string_from(text: str) -> str:
    """Two printable ASCII characters from the second half of `text` (the Qwen3 model's greedy text is mostly
    bytes that decode to replacement characters; a stop string is matched on the decoded text)."""
    for start in range(len(text) // 2, len(text) - 1):
        candidate = text[start : start + 2]
        if all(" " <= char <= "~" for char in candidate) and text.index(candidate) > 0:
            return candidate
    raise AssertionError(f"no ASCII stop string in {text!r}")


def test_stop_string_that_triggers(pair):
    """A stop string taken from the reference's greedy answer ends both answers where it first occurs."""
    full = pair.reference.chat.completions.create(
        model=pair.model, messages=_messages(PROMPTS[0]), temperature=0, max_tokens=24
    )
    text = full.choices[0].message.content
    stop = _stop_string_from(text)
    reply = assert_same_answer(*pair.both(_chat(pair, PROMPTS[0], stop=["never said", stop])))
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop, choice
    assert choice["message"]["content"] == text[: text.index(stop)]
    assert reply["usage"]["completion_tokens"] < full.usage.completion_tokens


def test_n_seeded_sampling(pair):
    reply = assert_same_answer(*pair.both(_chat(pair, PROMPTS[1], n=3, seed=1234, temperature=1.0, max_tokens=16)))
    texts = [choice["message"]["content"] for choice in reply["choices"]]
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3, texts  # three samples, not one answer thrice


def test_chat_logprobs(pair):
    reply = assert_same_answer(*pair.both(_chat(pair, PROMPTS[0], logprobs=True, top_logprobs=3, max_tokens=12)))
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)
    # The Qwen3 model's tokens are mostly partial UTF-8 bytes whose text is "": with vLLM's token-id form the token
    # comparison compares the tokens themselves.
    reply = assert_same_answer(
        *pair.both(
            _chat(
                pair,
                PROMPTS[0],
                logprobs=True,
                top_logprobs=3,
                max_tokens=12,
                extra_body={"return_tokens_as_token_ids": True},
            )
        )
    )
    tokens = [entry["token"] for entry in reply["choices"][0]["logprobs"]["content"]]
    assert all(token.startswith("token_id:") for token in tokens), tokens


def _stream(pair: Pair, prompt: str) -> Callable[[openai.OpenAI], Any]:
    def call(client: openai.OpenAI):
        stream = client.chat.completions.create(
            model=pair.model,
            messages=_messages(prompt),
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(stream)

    return call


def test_streaming_chat_with_usage(pair):
    ours, theirs = pair.both(_stream(pair, PROMPTS[0]))

    def summary(chunks) -> dict:
        assert not isinstance(chunks, Exception), chunks
        # chunk boundaries depend on when the API server reads the engine's outputs, so the text is compared whole
        assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]  # include_usage: a last chunk
        assert len({chunk.id for chunk in chunks}) == 1
        return {
            "text": "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]),
            "roles": [chunk.choices[0].delta.role for chunk in chunks[:-1] if chunk.choices[0].delta.role],
            "finish_reasons": [
                chunk.choices[0].finish_reason for chunk in chunks[:-1] if chunk.choices[0].finish_reason
            ],
            "usage": chunks[-1].usage.model_dump(),
            "model": {chunk.model for chunk in chunks},
        }

    our_summary, their_summary = summary(ours), summary(theirs)
    assert our_summary == their_summary
    assert their_summary["text"] and their_summary["roles"] == ["assistant"]
    assert their_summary["usage"]["completion_tokens"] > 0
    # ... and the same text a non-streamed request gets
    plain = pair.reference.chat.completions.create(
        model=pair.model, messages=_messages(PROMPTS[0]), temperature=0, max_tokens=24
    )
    assert their_summary["text"] == plain.choices[0].message.content


def test_completions_echo_logprobs(pair):
    prompt = PROMPTS[1]
    reply = assert_same_answer(
        *pair.both(
            lambda client: client.completions.create(
                model=pair.model, prompt=prompt, echo=True, logprobs=3, temperature=0, max_tokens=8
            )
        )
    )
    choice = reply["choices"][0]
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    usage = reply["usage"]
    assert len(choice["logprobs"]["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["logprobs"]["token_logprobs"][0] is None  # the first prompt token has no logprob


def _json_value(content: str):
    # strict=False: xgrammar's JSON string rule lets a raw control character through (the Qwen3 model writes a NUL
    # inside a name), which strict JSON parsing refuses; the same on both servers, so vLLM's behaviour, not ours
    return json.loads(content, strict=False)


def test_response_format_json_schema(pair):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
    }
    for prompt in PROMPTS[:2]:
        reply = assert_same_answer(*pair.both(_chat(pair, prompt, response_format=response_format, max_tokens=64)))
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(_json_value(choice["message"]["content"]), PERSON_SCHEMA)


def test_response_format_json_object(pair):
    """json_object: the same answers from both, and each complete one parses to a JSON object. Under this grammar
    a random model closes the object at once (`{}`) or opens a key it never ends, so a few seeded samples are
    compared, and at least one must be complete."""
    complete = []
    for seed in range(4):
        reply = assert_same_answer(
            *pair.both(_chat(pair, response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=64))
        )
        choice = reply["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), choice
        if choice["finish_reason"] == "stop":
            complete.append(choice["message"]["content"])
    assert complete
    for content in complete:
        assert isinstance(_json_value(content), dict), content


def _tool_calls(reply: dict) -> list[dict]:
    return [call["function"] for call in reply["choices"][0]["message"]["tool_calls"]]


def test_named_tool_choice(pair):
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = assert_same_answer(*pair.both(_chat(pair, tools=TOOLS, tool_choice=tool_choice, max_tokens=64)))
    (call,) = _tool_calls(reply)
    assert call["name"] == "get_weather"
    assert set(json.loads(call["arguments"])) == {"city", "unit"}
    assert reply["choices"][0]["finish_reason"] == "stop"  # vLLM (as OpenAI): "stop" for a named tool call


def test_required_tool_choice(pair):
    # parallel_tool_calls=False caps vLLM's grammar at one call: with parallel calls allowed, a random model keeps
    # adding calls to the array until the token budget runs out (no tool call at all in the answer then)
    reply = assert_same_answer(
        *pair.both(
            _chat(pair, PROMPTS[1], tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=128)
        )
    )
    (call,) = _tool_calls(reply)
    assert call["name"] in {"get_weather", "send_letter"}
    assert isinstance(json.loads(call["arguments"]), dict)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"  # vLLM (as OpenAI): "tool_calls" for required


def test_structured_outputs_choice_and_regex(pair):
    choices = ["Rome", "Verona", "Elsinore"]
    reply = assert_same_answer(*pair.both(_chat(pair, extra_body={"structured_outputs": {"choice": choices}})))
    assert reply["choices"][0]["message"]["content"] in choices
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    reply = assert_same_answer(
        *pair.both(_chat(pair, PROMPTS[2], extra_body={"structured_outputs": {"regex": pattern}}))
    )
    assert re.fullmatch(pattern, reply["choices"][0]["message"]["content"])


# ---- bad requests ------------------------------------------------------------------------------------------------


def assert_same_error(ours, theirs, status: int) -> dict:
    """Both answers are the same OpenAI error: HTTP status, error type, code, param and message; returns it."""
    for answer in (ours, theirs):
        assert isinstance(answer, openai.APIStatusError), answer
        assert answer.status_code == status, (answer.status_code, answer.body)
    # the SDK's body is the response's "error" object
    assert set(theirs.body) == {"message", "type", "param", "code"}, theirs.body
    assert _without_log_time(ours.body) == _without_log_time(theirs.body)
    return theirs.body


def _without_log_time(error: dict) -> dict:
    """The error with xgrammar's log time ("[22:46:51] <path>:4944: ...", quoted in vLLM's message for a schema it
    cannot compile) taken out of the message: two servers may answer in different seconds."""
    return error | {"message": re.sub(r"\[\d{2}:\d{2}:\d{2}\] ", "", error["message"])}


def test_unknown_model(pair):
    error = assert_same_error(
        *pair.both(lambda client: client.chat.completions.create(model="nope", messages=_messages("hi"))), 404
    )
    assert "nope" in error["message"]


def test_prompt_longer_than_max_model_len(pair):
    long_prompt = "Speak, my lord. " * MAX_MODEL_LEN
    error = assert_same_error(*pair.both(_chat(pair, long_prompt)), 400)
    assert str(MAX_MODEL_LEN) in error["message"]


def test_invalid_json_schema(pair):
    bad_schema = {"type": "object", "properties": {"name": {"type": "not-a-type"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": bad_schema}}
    error = assert_same_error(*pair.both(_chat(pair, response_format=response_format)), 400)
    assert "not-a-type" in error["message"]


def test_tool_choice_naming_no_given_tool(pair):
    tool_choice = {"type": "function", "function": {"name": "summon_ghost"}}
    error = assert_same_error(*pair.both(_chat(pair, tools=TOOLS, tool_choice=tool_choice)), 400)
    assert error["param"] == "tool_choice"


def test_tool_choice_without_tools(pair):
    error = assert_same_error(*pair.both(_chat(pair, tool_choice="required")), 400)
    assert error["param"] == "tool_choice"


# ---- hand-made bad input (issue 19): raw HTTP, as the openai SDK cannot send all of it ---------------------------


def _raw_both(pair: Pair, path: str, body: bytes) -> tuple[httpx.Response, httpx.Response]:
    """(expertmesh's answer, the reference's) to POST /v1/`path` with `body` sent byte for byte (a lone surrogate
    escape, integers past 64 bits: JSON text the SDK would not write)."""

    def send(client: openai.OpenAI) -> httpx.Response:
        return httpx.post(
            f"{client.base_url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=120
        )

    with ThreadPoolExecutor(2) as pool:
        ours, theirs = pool.map(send, (pair.expertmesh, pair.reference))
    return ours, theirs


def _completion_body(pair: Pair, fields: str) -> bytes:
    return ("{" + json.dumps({"model": pair.model})[1:-1] + ", " + fields + "}").encode()


def _chat_body(pair: Pair, fields: str) -> bytes:
    return ("{" + json.dumps({"model": pair.model, "max_tokens": 4})[1:-1] + ", " + fields + "}").encode()


# (path, JSON fields as text, param): each a 400 from vLLM's own server. param None: the request matches the published
# schema and vLLM's own error is relayed, whole; else the body breaks the published schema and the gateway answers
# the 400 itself, `param` the offending field's JSON path (the same status and shape as vLLM's, in its own words).
BAD_INPUT = {
    "prompt_ids_negative": ("completions", '"prompt": [-1], "max_tokens": 4', "prompt[0]"),
    "prompt_ids_2_32": ("completions", '"prompt": [4294967296], "max_tokens": 4', None),
    "prompt_ids_nested_negative": ("completions", '"prompt": [[-1], [5]], "max_tokens": 4', "prompt[0][0]"),
    "min_tokens_2_32_without_max_tokens": ("completions", '"prompt": "Speak", "min_tokens": 4294967296', "min_tokens"),
    "lone_surrogate_in_prompt": ("completions", '"prompt": "\\ud800", "max_tokens": 4', None),
    "lone_surrogate_in_streamed_prompt": ("completions", '"prompt": "\\ud800", "max_tokens": 4, "stream": true', None),
    "lone_surrogate_in_chat_message": (
        "chat/completions",
        '"messages": [{"role": "user", "content": "\\ud800"}]',
        None,
    ),
    "lone_surrogate_in_streamed_chat": (
        "chat/completions",
        '"messages": [{"role": "user", "content": "\\ud800"}], "stream": true',
        None,
    ),
    "logit_bias_token_out_of_range": (
        "completions",
        '"prompt": "Speak", "max_tokens": 4, "logit_bias": {"999999": 1}',
        None,
    ),
    "logit_bias_not_a_number": (
        "completions",
        '"prompt": "Speak", "max_tokens": 4, "logit_bias": {"5": "abc"}',
        "logit_bias.5",
    ),
    "chat_logit_bias_token_out_of_range": (
        "chat/completions",
        '"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 1}',
        None,
    ),
    "chat_logit_bias_not_a_number": (
        "chat/completions",
        '"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": "abc"}',
        "logit_bias.5",
    ),
    "temperature_over_2": ("completions", '"prompt": "Speak", "max_tokens": 4, "temperature": 3', "temperature"),
    "chat_content_not_text": (
        "chat/completions",
        '"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]',
        None,
    ),
    "chat_no_messages": ("chat/completions", '"messages": []', "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_same_error_as_vllm(pair, case):
    """Each hand-made bad request: a 4xx in OpenAI's error shape from both servers, the same status; vLLM's own
    error whole where the gateway relayed the request, the offending field's path where the gateway refused it.
    (The issue saw several of these reach a 500 through the old gateway.)"""
    path, fields, param = BAD_INPUT[case]
    body = _chat_body(pair, fields) if path == "chat/completions" else _completion_body(pair, fields)
    ours, theirs = _raw_both(pair, path, body)
    assert 400 <= theirs.status_code < 500, (theirs.status_code, theirs.text)
    assert ours.status_code == theirs.status_code, (ours.status_code, ours.text, theirs.text)
    assert ours.headers["content-type"].startswith("application/json"), ours.headers
    error, our_error = theirs.json()["error"], ours.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    if param is None:
        assert _without_log_time(our_error) == _without_log_time(error)
    else:
        assert set(our_error) == {"message", "type", "param", "code"}, our_error
        assert our_error["type"] == "invalid_request_error" and our_error["param"] == param, our_error


# Bounds that look out of range but that vLLM's own server serves: top_k past the vocabulary means "no top-k", and
# seed + i for the i-th of n samples does not overflow vLLM's 64-bit seed. Seeded, so both answers must be equal.
SERVED_EDGES = {
    "top_k_2_31": '"prompt": "Speak, my lord.", "max_tokens": 6, "top_k": 2147483648, "seed": 7',
    "seed_2_63_minus_1_with_n_2": '"prompt": "Speak, my lord.", "max_tokens": 6, "seed": 9223372036854775807, "n": 2',
}


@pytest.mark.parametrize("case", sorted(SERVED_EDGES))
def test_served_edges_same_answer_as_vllm(pair, case):
    ours, theirs = _raw_both(pair, "completions", _completion_body(pair, SERVED_EDGES[case]))
    assert theirs.status_code == 200, theirs.text
    assert ours.status_code == 200, ours.text
    assert [c["text"] for c in ours.json()["choices"]] == [c["text"] for c in theirs.json()["choices"]]
    assert ours.json()["usage"] == theirs.json()["usage"]


# What vLLM's own server answers with a 500 (an integer it cannot hand to its engine core; a field of the wrong type
# that one of its request validators reads before checking it): expertmesh answers a 400 in OpenAI's shape instead.
VLLM_SERVER_ERRORS = {
    "top_k_2_64": ("completions", '"prompt": "Speak", "max_tokens": 4, "top_k": 18446744073709551616', "top_k"),
    "stream_interval_2_64": (
        "completions",
        '"prompt": "Speak", "max_tokens": 4, "stream_interval": 18446744073709551616',
        "stream_interval",
    ),
    "structured_outputs_a_list": (
        "chat/completions",
        '"messages": [{"role": "user", "content": "hi"}], "structured_outputs": [null, null]',
        "structured_outputs",
    ),
    "json_schema_integer_2_64": (  # a free-form value (a JSON schema) that vLLM hands its engine core as it is
        "chat/completions",
        '"messages": [{"role": "user", "content": "hi"}], '
        '"structured_outputs": {"json": {"type": "object", "maximum": 18446744073709551616}}',
        "structured_outputs.json.maximum",
    ),
}


@pytest.mark.parametrize("case", sorted(VLLM_SERVER_ERRORS))
def test_vllm_server_errors_are_a_400_here(pair, case):
    path, fields, param = VLLM_SERVER_ERRORS[case]
    body = _chat_body(pair, fields) if path == "chat/completions" else _completion_body(pair, fields)
    ours, theirs = _raw_both(pair, path, body)
    assert theirs.status_code == 500, (theirs.status_code, theirs.text)  # vLLM's own server: still a 500
    assert ours.status_code == 400, ours.text
    error = ours.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
