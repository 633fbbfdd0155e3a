"""One HTTP request's generation: n router `Generate` calls per prompt run concurrently (`Generation`), the
router SamplingParams built from an OpenAI body (`sampling_for`), and the non-streamed path (`run_unary`): run
every call to the end, or cancel them all when the client disconnects (the router then aborts in vLLM)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from fastapi import Request

from expertmesh.core.protos import router_pb2
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.openai_schema import APIError, context_length_error
from expertmesh.gateway.router_client import RouterClient, RouterInfo, router_error


@dataclass
class Choice:
    """What one Generate call produced so far."""

    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # router_pb2.TokenLogprob per generated token
    prompt_logprobs: list = field(default_factory=list)  # router_pb2.TokenLogprob per prompt token (first empty)
    finish_reason: str | None = None


def finish_reason(reason: str | None) -> str | None:
    return reason or None


class Generation:
    """n Generate calls for one prompt (or several prompts) of one HTTP request, run concurrently."""

    def __init__(
        self,
        router: RouterClient,
        metrics: GatewayMetrics,
        endpoint: str,
        prompts: list[list[int]],
        n: int,
        params_for: list,
        metadata,
        started: float,
    ):
        """params_for[p](i) -> router SamplingParams of choice i of prompt p (max_tokens may differ per prompt)."""
        self.metrics = metrics
        self.endpoint = endpoint
        self.choices: list[Choice] = []
        self.calls = []
        self.started = started
        self.first_token_seen = False
        stub = router.stub()
        for p_index, ids in enumerate(prompts):
            for i in range(n):
                index = p_index * n + i
                self.choices.append(Choice(index=index, prompt_ids=ids))
                request = router_pb2.GenerateRequest(
                    request_id=f"gw{index}", token_ids=router_pb2.TokenIds(ids=ids), params=params_for[p_index](i)
                )
                self.calls.append(stub.Generate(request, metadata=metadata))

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, router_pb2.GenerateResponse]]:
        """(choice, message) as they arrive from any of the calls; raises APIError on a router error."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice, call) -> None:
            try:
                async for msg in call:
                    await queue.put((choice, msg))
                await queue.put((choice, None))
            except grpc.aio.AioRpcError as exc:
                await queue.put((choice, exc))
            except asyncio.CancelledError:
                raise

        tasks = [asyncio.create_task(pump(c, call)) for c, call in zip(self.choices, self.calls)]
        open_calls = len(tasks)
        try:
            while open_calls:
                choice, item = await queue.get()
                if item is None:
                    open_calls -= 1
                    continue
                if isinstance(item, grpc.aio.AioRpcError):
                    raise router_error(item)
                self._apply(choice, item)
                yield choice, item
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    def _apply(self, choice: Choice, msg: router_pb2.GenerateResponse) -> None:
        if msg.token_ids and not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.ttft.labels(self.endpoint).observe(time.monotonic() - self.started)
        if msg.prompt_logprobs:
            choice.prompt_logprobs = list(msg.prompt_logprobs)
        choice.text += msg.text
        choice.token_ids.extend(msg.token_ids)
        choice.logprobs.extend(msg.logprobs)
        if msg.finish_reason:
            choice.finish_reason = msg.finish_reason

    def usage(self, prompts: list[list[int]]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def sampling_for(
    body, prompt_len: int, info: RouterInfo, defaults: dict, logprobs: int | None, prompt_logprobs: int | None
) -> Callable[[int], router_pb2.SamplingParams]:
    """params(i) for choice i of one prompt; `defaults` are the checkpoint's sampling defaults (generation_config)."""
    max_tokens = body.requested_max_tokens()
    if max_tokens is None:
        if prompt_len >= info.max_model_len:
            raise context_length_error(info.max_model_len, prompt_len, None)
        max_tokens = info.max_model_len - prompt_len
    elif prompt_len + max_tokens > info.max_model_len:
        raise context_length_error(info.max_model_len, prompt_len, max_tokens)
    d = defaults

    def params(i: int) -> router_pb2.SamplingParams:
        p = router_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else d.get("temperature", 1.0),
            top_p=body.top_p if body.top_p is not None else d.get("top_p", 1.0),
            top_k=body.top_k if body.top_k is not None else d.get("top_k", 0),
            stop=body.stop_list(),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=(
                body.repetition_penalty if body.repetition_penalty is not None else d.get("repetition_penalty", 1.0)
            ),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
        )
        if body.seed is not None:
            p.seed = body.seed + i
        if logprobs is not None:
            p.logprobs = logprobs
        if prompt_logprobs is not None:
            p.prompt_logprobs = prompt_logprobs
        return p

    return params


async def run_to_end(request: Request, generation: Generation) -> None:
    """Drain every call; if the client disconnects first, cancel them (the router aborts in vLLM)."""

    async def drain():
        async for _ in generation.events():
            pass

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.create_task(drain())
    watch = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            generation.cancel()
            work.cancel()
            raise APIError(499, "client disconnected", "client_closed_request")
        work.result()
    finally:
        watch.cancel()
        work.cancel()


async def run_unary(request: Request, span, endpoint: str, generation: Generation, prompts) -> dict:
    """A non-streamed response: run every call to the end, count it, return its usage."""
    metrics = generation.metrics
    metrics.in_progress.labels(endpoint).inc()
    try:
        await run_to_end(request, generation)
    finally:
        metrics.in_progress.labels(endpoint).dec()
        span.end()
    usage = generation.usage(prompts)
    metrics.completion_tokens.labels(endpoint).inc(usage["completion_tokens"])
    return usage
