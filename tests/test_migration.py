"""gateway/migration.py on vLLM-shaped stream events: what a stream needs to go on on another router.

- the token ids vLLM returns (return_token_ids, added by the gateway) are recorded and cut out of the bytes the client
  gets, and chat events sent only because of them are dropped;
- an internal error event from the router (its engine died) means "continue elsewhere", a request error does not;
- the continuation is a /v1/completions request for the rest: prompt ids + streamed ids, the remaining max_tokens, the
  client's sampling options; its events come back in the original stream's shape (id, chat deltas, whole usage);
- requests that cannot be continued (n > 1, echo, several prompts, not streamed) are relayed unchanged;
- a continuation refused by a router (real HTTP) puts that router in cooldown for every request, as a refused first
  attempt does.

End to end (a router SIGKILLed under 32 streams) is tests/test_routers.py.
"""

from __future__ import annotations

import json

import pytest

from expertmesh.gateway import migration


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode()


def _completion_chunk(text: str, ids: list[int], prompt_ids=None, finish=None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    choice["token_ids"] = ids
    return _event({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "demo", "choices": [choice]})


def test_a_streamed_completion_is_planned_with_token_ids_and_relayed_without_them():
    generation, upstream = migration.plan("completions", b'{"model":"demo","prompt":"hi","stream":true,"max_tokens":5}')
    assert json.loads(upstream)["return_token_ids"] is True
    first = generation.relay(_completion_chunk("A", [11], prompt_ids=[1, 2, 3]))
    second = generation.relay(_completion_chunk("B", [12]))
    # as vLLM writes a chunk when ids were not asked for: both fields null
    assert json.loads(first[6:])["choices"][0] == {
        "index": 0,
        "text": "A",
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
        "prompt_token_ids": None,
        "token_ids": None,
    }
    assert json.loads(second[6:])["choices"][0]["token_ids"] is None
    assert (generation.prompt_ids, generation.generated, generation.chunk_id) == ([1, 2, 3], [11, 12], "cmpl-1")
    assert generation.relay(migration.DONE) == migration.DONE and generation.done


def test_a_client_that_asked_for_token_ids_keeps_them():
    body = b'{"model":"demo","prompt":"hi","stream":true,"return_token_ids":true}'
    generation, upstream = migration.plan("completions", body)
    assert upstream == body
    chunk = _completion_chunk("A", [11], prompt_ids=[1])
    assert generation.relay(chunk) == chunk


def test_chat_events_sent_only_for_the_ids_are_dropped():
    generation, _ = migration.plan("chat/completions", b'{"model":"demo","messages":[],"stream":true}')
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "demo"}
    empty = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None, "token_ids": [99]}
    assert generation.relay(_event(head | {"choices": [empty]})) is None  # a token that produced no text yet
    text = {"index": 0, "delta": {"content": "é"}, "logprobs": None, "finish_reason": None, "token_ids": [100]}
    relayed = json.loads(generation.relay(_event(head | {"choices": [text]}))[6:])["choices"][0]
    assert relayed["delta"] == {"content": "é"} and relayed["token_ids"] is None
    assert generation.generated == [99, 100]


def test_an_internal_error_event_breaks_the_stream_but_a_request_error_is_relayed():
    generation, _ = migration.plan("completions", b'{"model":"demo","prompt":"hi","stream":true}')
    with pytest.raises(migration.Broken):
        generation.relay(_event({"error": {"message": "EngineCore died", "code": 500}}))
    bad = _event({"error": {"message": "bad request", "code": 400}})
    assert generation.relay(bad) == bad


def test_the_continuation_asks_for_the_rest_and_comes_back_in_the_original_shape():
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 10,
        "temperature": 0,
        "stop": ["\n\n"],
    }
    generation, _ = migration.plan("chat/completions", json.dumps(body).encode())
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "demo"}
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    generation.relay(_event(head | {"choices": [role], "prompt_token_ids": [1, 2]}))
    tokens = {"index": 0, "delta": {"content": "ab"}, "logprobs": None, "finish_reason": None, "token_ids": [5, 6]}
    generation.relay(_event(head | {"choices": [tokens]}))
    path, raw = generation.continuation()
    rest = json.loads(raw)
    assert path == "completions" and generation.migrations == 1
    assert (rest["prompt"], rest["max_tokens"], rest["temperature"], rest["stop"]) == ([1, 2, 5, 6], 8, 0, ["\n\n"])
    assert rest["stream"] is True and rest["return_token_ids"] is True

    out = generation.rewrite(_completion_chunk("c", [7], prompt_ids=[1, 2, 5, 6]))
    assert json.loads(out[6:]) == head | {
        "choices": [
            {
                "index": 0,
                "delta": {"content": "c"},
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
                "token_ids": None,
            }
        ]
    }
    usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    out = generation.rewrite(
        _event(
            {"id": "cmpl-9", "object": "text_completion", "created": 9, "model": "demo", "choices": [], "usage": usage}
        )
    )
    assert json.loads(out[6:])["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert generation.generated == [5, 6, 7]
    assert generation.rewrite(migration.DONE) == migration.DONE and not generation.can_continue(3)


def test_before_the_first_event_the_original_request_is_sent_again():
    generation, _ = migration.plan("completions", b'{"model":"demo","prompt":"hi","stream":true}')
    path, raw = generation.continuation()
    assert path == "completions" and json.loads(raw) == {
        "model": "demo",
        "prompt": "hi",
        "stream": True,
        "return_token_ids": True,
    }
    assert generation.can_continue(3) and not generation.can_continue(1)


@pytest.mark.parametrize(
    "path,body",
    [
        ("completions", {"prompt": "hi", "stream": False}),
        ("completions", {"prompt": "hi"}),
        ("completions", {"prompt": "hi", "stream": True, "n": 2}),
        ("completions", {"prompt": "hi", "stream": True, "echo": True}),
        ("completions", {"prompt": ["a", "b"], "stream": True}),
        ("chat/completions", {"messages": [], "stream": True, "use_beam_search": True}),
        ("embeddings", {"input": "hi", "stream": True}),
    ],
)
def test_requests_that_cannot_be_continued_are_relayed_unchanged(path, body):
    assert migration.plan(path, json.dumps({"model": "demo", **body}).encode()) is None


def test_a_router_that_refuses_a_continuation_cools_down_for_every_request():
    """The relay's continuation on real HTTP: router A breaks off after two tokens, router B refuses the connection
    (nothing listens), router C serves the rest. The client gets every token once, and B is skipped by the pool for
    its cooldown (as a refused first attempt is), not tried again by the next request at once."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from conftest import free_port

    from expertmesh.gateway import proxy

    continuation: list[dict] = []

    async def breaking(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        await reply.write(_completion_chunk("A", [11], prompt_ids=[1, 2]) + b"\n\n")
        await reply.write(_completion_chunk("B", [12]) + b"\n\n")
        return reply  # ends without [DONE]: the router broke off

    async def continuing(request: web.Request) -> web.StreamResponse:
        continuation.append(await request.json())
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        await reply.write(_completion_chunk("C", [13], prompt_ids=[1, 2, 11, 12], finish="length") + b"\n\n")
        await reply.write(migration.DONE + b"\n\n")
        return reply

    async def serve(handler) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def main():
        (a, url_a), (c, url_c) = await serve(breaking), await serve(continuing)
        url_b = f"http://127.0.0.1:{free_port()}"  # nobody listens there: connections are refused
        pool = proxy.RouterPool([url_a, url_b, url_c], cooldown_s=60)
        generation, body = migration.plan(
            "completions", b'{"model":"demo","prompt":"hi","stream":true,"max_tokens":3,"temperature":0}'
        )
        first = pool.order()[0]
        assert first.url == url_a  # the round robin starts at A; the continuation's order then starts at B
        first.in_flight += 1
        try:
            async with aiohttp.ClientSession() as client:
                response = await client.post(f"{url_a}/v1/completions", data=body)
                out = [e async for e in proxy._migrating_relay(generation, response, first, pool, client, {})]
        finally:
            await a.cleanup()
            await c.cleanup()
        return pool, b"".join(out), url_b

    pool, out, url_b = asyncio.run(main())
    events = [e for e in out.split(b"\n\n") if e]
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["A", "B", "C"] and events[-1] == migration.DONE
    assert continuation[0]["prompt"] == [1, 2, 11, 12] and continuation[0]["max_tokens"] == 1
    state = {r["url"]: r for r in pool.snapshot()}
    assert not state[url_b]["up"] and state[url_b]["failures"] == 1  # cooling down: the next request skips it
    assert [r["in_flight"] for r in pool.snapshot()] == [0, 0, 0]
    assert pool.order()[-1].url == url_b and pool.migrations == 1
