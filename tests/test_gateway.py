"""The gateway over real HTTP (uvicorn on loopback) in front of a real router subprocess (vLLM CPU, fp32, local
experts) on the tiny Mixtral, with the official `openai` SDK for the happy paths and raw HTTP for the errors.

One router and two gateways (open, and with API keys) for the whole module.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
from conftest import free_port
from test_router_server import MAX_MODEL_LEN, spawn_router, tokens_of, wait_ready

from expertmesh.core.protos import router_pb2 as pb

pytestmark = pytest.mark.slow

KEYS = ["key-one", "key-two"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]


class Gateway:
    """create_app(...) served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, **kwargs):
        import uvicorn

        from expertmesh.gateway.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(**kwargs),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=1,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("mixtral")
    router = spawn_router(
        model,
        tmp_path_factory.mktemp("gw-router") / "router.log",
        "--local-experts",
        "--served-model-name",
        "tiny-mixtral",
    )
    gateways = []
    try:
        wait_ready(router)
        open_gw = Gateway(router=router.address, tokenizer=str(model), api_keys=[])
        gateways.append(open_gw)
        keyed_gw = Gateway(router=router.address, tokenizer=str(model), api_keys=KEYS)
        gateways.append(keyed_gw)
        yield {"router": router, "gw": open_gw, "keyed": keyed_gw, "model": model}
    finally:
        for g in gateways:
            g.stop()
        router.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["gw"].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(stack):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stack["model"])


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def router_greedy(stack, ids: list[int], n: int) -> list[int]:
    stub = stack["router"].stub()
    return tokens_of(
        stub.Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=n, temperature=0))
        )
    )


# ---- happy paths with the openai SDK ---------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-mixtral"]
    assert models.data[0].owned_by == "expertmesh"
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_non_streaming(client, tokenizer, stack):
    r = client.chat.completions.create(model="tiny-mixtral", messages=MESSAGES, max_tokens=12, temperature=0)
    prompt_ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert r.object == "chat.completion" and r.model == "tiny-mixtral"
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    generated = router_greedy(stack, prompt_ids, 12)  # the router's greedy tokens for the templated prompt
    assert r.choices[0].message.content == tokenizer.decode(generated, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(generated)
    assert r.usage.total_tokens == len(prompt_ids) + len(generated)
    assert r.choices[0].finish_reason == ("length" if len(generated) == 12 else "stop")


def test_chat_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model="tiny-mixtral", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-mixtral",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny-mixtral", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == tops[0]  # greedy picks the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_completions_echo_with_logprobs(client, tokenizer):
    prompt = "The quick brown fox"
    prompt_ids = tokenizer.encode(prompt)
    r = client.completions.create(
        model="tiny-mixtral", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + r.usage.completion_tokens
    assert "".join(lp.tokens[: len(prompt_ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.usage.prompt_tokens == len(prompt_ids)
    # without echo: only the completion, whose logprobs equal the echoed tail
    plain = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    assert choice.text == prompt + plain.choices[0].text
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(prompt_ids) :]


def test_completions_streaming_and_token_prompt(client, tokenizer):
    prompt = "Serving systems batch requests"
    full = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=10, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-mixtral", prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == full.choices[0].text
    by_ids = client.completions.create(
        model="tiny-mixtral", prompt=tokenizer.encode(prompt), max_tokens=10, temperature=0
    )
    assert by_ids.choices[0].text == full.choices[0].text
    batch = client.completions.create(model="tiny-mixtral", prompt=[prompt, "The gate"], max_tokens=10, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == full.choices[0].text


def test_n_choices_and_seed_determinism(client):
    kwargs = dict(model="tiny-mixtral", messages=MESSAGES, max_tokens=10, temperature=1.0, n=2, seed=5)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seed + i per choice
    assert a.usage.completion_tokens == b.usage.completion_tokens
    other = client.chat.completions.create(**dict(kwargs, seed=6, n=1))
    assert other.choices[0].message.content == a.choices[1].message.content  # choice 1 of seed 5 = seed 6


def test_stop_sequence(client):
    full = client.completions.create(model="tiny-mixtral", prompt="Numbers like", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[3:6]
    r = client.completions.create(
        model="tiny-mixtral", prompt="Numbers like", max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]


# ---- validation ------------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
BASE = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BASE_CMPL = {"model": "tiny-mixtral", "prompt": "hi", "max_tokens": 4}

ERRORS = [
    (
        "negative temperature",
        CHAT,
        dict(BASE, temperature=-0.1),
        400,
        "temperature must be non-negative",
        "temperature",
    ),
    ("temperature above 2", CHAT, dict(BASE, temperature=2.5), 400, "temperature must be in [0, 2]", "temperature"),
    ("top_p 0", CHAT, dict(BASE, top_p=0), 400, "top_p must be in (0, 1]", "top_p"),
    ("top_p above 1", CMPL, dict(BASE_CMPL, top_p=1.01), 400, "top_p must be in (0, 1]", "top_p"),
    ("max_tokens 0", CHAT, dict(BASE, max_tokens=0), 400, "max_tokens must be at least 1", "max_tokens"),
    ("max_tokens negative", CMPL, dict(BASE_CMPL, max_tokens=-3), 400, "max_tokens must be at least 1", "max_tokens"),
    (
        "max_completion_tokens 0",
        CHAT,
        dict(BASE, max_completion_tokens=0),
        400,
        "max_completion_tokens must be at least 1",
        "max_completion_tokens",
    ),
    (
        "presence_penalty",
        CHAT,
        dict(BASE, presence_penalty=2.5),
        400,
        "presence_penalty must be in [-2, 2]",
        "presence_penalty",
    ),
    (
        "frequency_penalty",
        CMPL,
        dict(BASE_CMPL, frequency_penalty=-2.1),
        400,
        "frequency_penalty must be in [-2, 2]",
        "frequency_penalty",
    ),
    (
        "stream_options without stream",
        CHAT,
        dict(BASE, stream_options={"include_usage": True}),
        400,
        "Stream options can only be defined when `stream=True`.",
        "stream_options",
    ),
    (
        "beyond the context",
        CHAT,
        dict(BASE, max_tokens=1000),
        400,
        "This model's maximum context length is 256 tokens. However, you requested",
        "max_tokens",
    ),
    (
        "prompt alone beyond the context",
        CMPL,
        dict(BASE_CMPL, prompt=[5] * 300, max_tokens=None),
        400,
        "This model's maximum context length is 256 tokens. However, your request has 300 input tokens",
        "messages",
    ),
    (
        "top_logprobs without logprobs",
        CHAT,
        dict(BASE, top_logprobs=2),
        400,
        "`logprobs` must be set to true",
        "top_logprobs",
    ),
    (
        "too many top_logprobs",
        CHAT,
        dict(BASE, logprobs=True, top_logprobs=21),
        400,
        "`top_logprobs` must be in",
        "top_logprobs",
    ),
    ("too many logprobs", CMPL, dict(BASE_CMPL, logprobs=50), 400, "`logprobs` must be in [0, 20]", "logprobs"),
    ("n 0", CHAT, dict(BASE, n=0), 400, "n must be in", "n"),
    ("empty prompt", CMPL, dict(BASE_CMPL, prompt=""), 400, "prompt must not be empty", "prompt"),
    ("token out of vocabulary", CMPL, dict(BASE_CMPL, prompt=[99999]), 400, "out of vocabulary", "prompt"),
    ("empty messages", CHAT, dict(BASE, messages=[]), 400, "at least one message", "messages"),
    ("missing messages", CHAT, {"model": "tiny-mixtral"}, 400, "Missing required parameter: 'messages'", "messages"),
    ("wrong type", CHAT, dict(BASE, max_tokens="many"), 400, "Invalid value for 'max_tokens'", "max_tokens"),
    (
        "bad role",
        CHAT,
        dict(BASE, messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "Invalid value for 'messages",
        "messages",
    ),
    ("unknown model", CHAT, dict(BASE, model="gpt-17"), 404, "The model `gpt-17` does not exist.", "model"),
]


def check_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path,body,status,message,param", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validation_errors(stack, path, body, status, message, param):
    body = {k: v for k, v in body.items() if v is not None}
    error = check_error_shape(httpx.post(stack["gw"].url + path, json=body, timeout=30), status)
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_malformed_json(stack):
    r = httpx.post(
        stack["gw"].url + CHAT,
        content=b'{"model": "tiny-mixtral", "messages": [',
        timeout=30,
        headers={"content-type": "application/json"},
    )
    error = check_error_shape(r, 400)
    assert error["type"] == "invalid_request_error" and error["message"].startswith("Malformed JSON")
    r = httpx.post(stack["gw"].url + CHAT, json=["not", "an", "object"], timeout=30)
    check_error_shape(r, 400)


def test_context_length_check_uses_the_chat_template(stack, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    prompt_len = len(chat_prompt_ids(tokenizer, messages))
    ok = httpx.post(
        stack["gw"].url + CHAT,
        json=dict(BASE, messages=messages, max_tokens=MAX_MODEL_LEN - prompt_len, temperature=0, ignore_eos=True),
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - prompt_len
    too_long = httpx.post(
        stack["gw"].url + CHAT,
        json=dict(BASE, messages=messages, max_tokens=MAX_MODEL_LEN - prompt_len + 1),
        timeout=30,
    )
    error = check_error_shape(too_long, 400)
    assert error["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{MAX_MODEL_LEN + 1} tokens ({prompt_len} in the messages, {MAX_MODEL_LEN - prompt_len + 1} in the "
        f"completion). Please reduce the length of the messages or completion."
    )
    assert error["code"] == "context_length_exceeded"


# ---- auth ------------------------------------------------------------------------------------------------------


def test_api_keys(stack):
    url = stack["keyed"].url
    missing = check_error_shape(httpx.post(url + CHAT, json=BASE, timeout=30), 401)
    assert missing["type"] == "authentication_error"
    wrong = check_error_shape(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert wrong["type"] == "authentication_error" and wrong["code"] == "invalid_api_key"
    check_error_shape(httpx.get(url + "/experts"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[1], max_retries=0)
    r = keyed.chat.completions.create(model="tiny-mixtral", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    assert httpx.get(url + "/metrics").status_code == 200
    # auth off: no header needed
    assert httpx.get(stack["gw"].url + "/v1/models").status_code == 200


# ---- operations ------------------------------------------------------------------------------------------------


def test_health(stack):
    r = httpx.get(stack["gw"].url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["local_experts"] is True and body["missing_experts"] == 0
    dead = Gateway(router=f"127.0.0.1:{free_port()}", tokenizer=str(stack["model"]), api_keys=[])
    try:
        r = httpx.get(dead.url + "/health", timeout=30)
        assert r.status_code == 503
        assert r.json()["status"] == "unavailable" and "router unreachable" in r.json()["detail"]
        error = check_error_shape(httpx.post(dead.url + CHAT, json=BASE, timeout=30), 503)
        assert "unavailable" in error["message"]
    finally:
        dead.stop()


def test_metrics(stack, client):
    client.chat.completions.create(model="tiny-mixtral", messages=MESSAGES, max_tokens=4, temperature=0)
    list(
        client.chat.completions.create(
            model="tiny-mixtral", messages=MESSAGES, max_tokens=4, temperature=0, stream=True
        )
    )
    httpx.post(stack["gw"].url + CHAT, json=dict(BASE, temperature=-1))
    text = httpx.get(stack["gw"].url + "/metrics").text

    def value(name: str, labels: str) -> float:
        m = re.search(rf"^{re.escape(name)}{{{labels}}} (\S+)$", text, re.M)
        assert m, f"{name}{{{labels}}} not in /metrics"
        return float(m.group(1))

    assert value("expertmesh_gateway_requests_total", 'endpoint="/v1/chat/completions",status="200"') >= 2
    assert value("expertmesh_gateway_requests_total", 'endpoint="/v1/chat/completions",status="400"') >= 1
    assert value("expertmesh_gateway_time_to_first_token_seconds_count", 'endpoint="/v1/chat/completions"') >= 2
    assert value("expertmesh_gateway_prompt_tokens_total", 'endpoint="/v1/chat/completions"') >= 2
    assert value("expertmesh_gateway_completion_tokens_total", 'endpoint="/v1/chat/completions"') >= 2
    assert value("expertmesh_gateway_errors_total", 'endpoint="/v1/chat/completions",type="invalid_request_error"') >= 1


def test_experts_json(stack):
    body = httpx.get(stack["gw"].url + "/experts").json()
    assert body["experts"] == []  # local experts: vLLM computes them, nothing is routed out
    assert body["replicas"] == {"total": 0, "missing": 0}
    assert body["plan"] is None and body["requests_running"] == 0 and body["uptime_seconds"] > 0


def _wait_engine_idle(stack, timeout=10.0) -> int:
    stub = stack["router"].stub()
    deadline = time.monotonic() + timeout
    while stub.Stats(pb.StatsRequest()).requests_running and time.monotonic() < deadline:
        time.sleep(0.05)
    return stub.Stats(pb.StatsRequest()).requests_running


def test_client_disconnect_mid_stream_cancels_generation(stack):
    router = stack["router"]
    cancelled = router.metric("expertmesh_router_requests_total", '{status="cancelled"}')
    body = dict(BASE, max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    with httpx.stream("POST", stack["gw"].url + CHAT, json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert router.stub().Stats(pb.StatsRequest()).requests_running == 1
    # the connection is closed: the gateway cancels its Generate call, the router aborts the request in vLLM
    assert _wait_engine_idle(stack) == 0
    assert (
        router.wait_metric("expertmesh_router_requests_total", '{status="cancelled"}', cancelled + 1) == cancelled + 1
    )


def test_client_disconnect_while_waiting_cancels_generation(stack):
    router = stack["router"]
    cancelled = router.metric("expertmesh_router_requests_total", '{status="cancelled"}')
    body = json.dumps(dict(BASE, max_tokens=230, temperature=0, ignore_eos=True)).encode()
    sock = socket.create_connection(("127.0.0.1", stack["gw"].port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    deadline = time.monotonic() + 10
    while router.stub().Stats(pb.StatsRequest()).requests_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()
    assert _wait_engine_idle(stack) == 0
    assert (
        router.wait_metric("expertmesh_router_requests_total", '{status="cancelled"}', cancelled + 1) == cancelled + 1
    )
