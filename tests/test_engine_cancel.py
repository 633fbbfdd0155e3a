"""Cancelling callers of the router's in-process engine (`router.engine.InprocAsyncEngine`) at every point of the
add / step / abort cycle must never end the engine thread nor leave requests behind in vLLM.

A real vLLM engine on the tiny fp32 Mixtral, local experts, eager. A storm of thousands of `generate()` calls,
each cancelled at a different moment: after 0, 1, 2, ... event-loop turns (before the engine thread applies the
add, while it applies it, after it), after a few microseconds to milliseconds of wall time, after the first
delta, mid-stream, by closing the iterator, and many requests at once. Afterwards the engine still serves: a
fresh greedy request gives the same tokens as before the storm, no request is left unfinished in vLLM and no
stream is left registered. Stopping the engine ends every stream.

Also here, since the engine is built from them: the vLLM engine arguments for a checkpoint (`router.vllm_args`):
an fp32 MLA model on CPU gets the CPU_MLA attention backend (AMX_MLA refuses fp32), anything else vLLM's choice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time

import pytest

from expertmesh.core import settings  # noqa: E402

settings.apply_process_defaults(router=True)  # the engine in this process, as in the router
os.environ.setdefault("EXPERTMESH_ROUTER_METRICS_PORT", "0")

pytestmark = pytest.mark.slow

PROMPT_IDS = [5, 17, 42, 99, 7, 23, 64, 11]
MAX_TOKENS = 48  # long enough that cancels land mid-stream
TURNS = 24  # cancel after 0 .. TURNS-1 event-loop turns
ROUNDS = 60  # TURNS * ROUNDS calls cancelled by loop turns
BURST = 200  # requests cancelled all at once


def greedy(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)


@pytest.fixture(scope="module")
def engine_and_loop(tiny_checkpoint):
    from expertmesh.router import plugin
    from expertmesh.router.engine import EngineConfig, InprocAsyncEngine

    plugin.configure_local()
    loop = asyncio.new_event_loop()
    engine = InprocAsyncEngine(
        EngineConfig(model=str(tiny_checkpoint("mixtral")), max_model_len=256, enforce_eager=True)
    )
    engine.start(loop)
    try:
        yield engine, loop
    finally:
        engine.stop()
        loop.close()


async def collect(engine, request_id: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(request_id, PROMPT_IDS, greedy(max_tokens)):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


async def consume(engine, request_id: str, stop_after: int | None = None) -> int:
    """Read deltas; with `stop_after`, close the iterator after that many (the `break` path)."""
    seen = 0
    gen = engine.generate(request_id, PROMPT_IDS, greedy())
    try:
        async for _ in gen:
            seen += 1
            if stop_after is not None and seen >= stop_after:
                break
    finally:
        await gen.aclose()
    return seen


async def cancel_after_turns(engine, request_id: str, turns: int) -> None:
    task = asyncio.ensure_future(consume(engine, request_id))
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def cancel_after_seconds(engine, request_id: str, seconds: float) -> None:
    task = asyncio.ensure_future(consume(engine, request_id))
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def cancel_after_deltas(engine, request_id: str, deltas: int) -> None:
    """Cancel the task while it awaits the delta after `deltas` deltas (mid-stream)."""
    got = asyncio.Event()
    count = 0

    async def reader():
        nonlocal count
        async for _ in engine.generate(request_id, PROMPT_IDS, greedy()):
            count += 1
            if count >= deltas:
                got.set()

    task = asyncio.ensure_future(reader())
    waiter = asyncio.ensure_future(got.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    waiter.cancel()
    await asyncio.gather(task, waiter, return_exceptions=True)


async def settle(engine, timeout: float = 20.0) -> None:
    """Wait until the engine thread has applied every abort (nothing unfinished, nothing streaming)."""
    deadline = time.monotonic() + timeout
    while (engine.num_unfinished or engine._streams) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def storm(engine) -> dict:
    rng = random.Random(0)
    seq = 0

    def rid(kind: str) -> str:
        nonlocal seq
        seq += 1
        return f"{kind}-{seq}"

    # 1. after 0, 1, 2, ... loop turns: before the add is applied, while it is, after it; a few at a time so some
    #    adds queue up behind others and behind steps.
    for _ in range(ROUNDS):
        await asyncio.gather(*(cancel_after_turns(engine, rid("turns"), t) for t in range(TURNS)))
    # 2. after a random wall-clock delay (lands anywhere in the engine thread's add/step/abort cycle)
    await asyncio.gather(*(cancel_after_seconds(engine, rid("time"), rng.uniform(0, 0.02)) for _ in range(300)))
    # 3. after the first delta, and mid-stream after 2..12 deltas
    for deltas in (1, 1, 2, 3, 5, 8, 12):
        await asyncio.gather(*(cancel_after_deltas(engine, rid("delta"), deltas) for _ in range(8)))
    # 4. closing the iterator (client `break`) after the first delta and mid-stream
    await asyncio.gather(*(consume(engine, rid("close"), stop_after=k) for k in (1, 2, 4, 6, 9) * 4))
    # 5. many at once: start BURST requests, cancel them together after some turns, several times
    for turns in (0, 1, 3, 10, 40):
        tasks = [asyncio.ensure_future(consume(engine, rid("burst"))) for _ in range(BURST)]
        for _ in range(turns):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # 6. one burst cancelled once the first of them streams
    tasks = [asyncio.ensure_future(consume(engine, rid("burst-stream"))) for _ in range(BURST)]
    first = asyncio.ensure_future(cancel_after_deltas(engine, rid("first"), 1))
    await first
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"calls": seq}


def test_cancel_storm_leaves_engine_serving(engine_and_loop):
    engine, loop = engine_and_loop
    before = loop.run_until_complete(collect(engine, "before"))
    assert len(before) == MAX_TOKENS

    t0 = time.monotonic()
    summary = loop.run_until_complete(asyncio.wait_for(storm(engine), 120))
    elapsed = time.monotonic() - t0
    assert summary["calls"] >= 2000
    assert engine.running, "the engine thread died during the cancel storm"
    assert engine._thread.is_alive()

    loop.run_until_complete(settle(engine))
    assert engine.num_unfinished == 0, f"{engine.num_unfinished} requests left in vLLM after the storm"
    assert not engine._streams, f"{len(engine._streams)} streams left registered"

    after = loop.run_until_complete(collect(engine, "after"))
    assert after == before
    loop.run_until_complete(settle(engine))
    assert engine.num_unfinished == 0
    print(f"{summary['calls']} cancelled calls in {elapsed:.1f} s")


def test_add_error_fails_that_request_alone(engine_and_loop):
    """vLLM refusing a request at add time reaches its caller; the engine keeps serving the next one."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    engine, loop = engine_and_loop
    failures = engine.step_failures

    async def bad():
        params = SamplingParams(max_tokens=4, output_kind=RequestOutputKind.DELTA)
        async for _ in engine.generate("bad", [engine.vocab_size + 10], params):
            pass

    with pytest.raises((ValueError, VLLMClientError), match="out of vocabulary"):
        loop.run_until_complete(bad())
    assert engine.running and engine.step_failures == failures  # refused at add, not in a step
    assert loop.run_until_complete(collect(engine, "after-bad", 4)) == loop.run_until_complete(
        collect(engine, "after-bad-2", 4)
    )
    loop.run_until_complete(settle(engine))
    assert engine.num_unfinished == 0 and not engine._streams


def test_stop_ends_every_stream(engine_and_loop):
    """Stopping the engine (runs last: it stops the module's engine) while requests stream, while adds are queued
    and while callers cancel: every caller gets its tokens or EngineStopped, none waits forever; later calls are
    refused at once."""
    from expertmesh.router.engine import EngineStopped

    engine, loop = engine_and_loop

    async def run():
        streaming = [asyncio.ensure_future(collect(engine, f"stop-{i}", 200)) for i in range(40)]
        await cancel_after_deltas(engine, "stop-first", 1)  # the batch is in the engine now
        cancelled = [asyncio.ensure_future(consume(engine, f"stop-cancel-{i}")) for i in range(40)]
        stopping = loop.run_in_executor(None, engine.stop)
        queued = [asyncio.ensure_future(collect(engine, f"stop-late-{i}", 4)) for i in range(40)]
        for task in cancelled:
            task.cancel()
        await stopping
        return await asyncio.gather(*streaming, *cancelled, *queued, return_exceptions=True)

    results = loop.run_until_complete(asyncio.wait_for(run(), 60))
    assert not engine.running
    kinds = {type(r).__name__ for r in results}
    assert kinds <= {"list", "EngineStopped", "CancelledError"}, kinds
    assert sum(isinstance(r, EngineStopped) for r in results[:40]) > 0  # stopped mid-stream, not run out
    with pytest.raises(EngineStopped):
        loop.run_until_complete(collect(engine, "after-stop", 4))


# ---- engine arguments (no engine needed) -----------------------------------------------------------------------


def _config_with(path, tmp_path, **changes):
    """A checkpoint directory holding only `path`'s config.json with `changes` applied."""
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_engine_kwargs_fp32_mla_on_cpu_uses_cpu_mla(tiny_checkpoint, caplog):
    from expertmesh.router.vllm_args import engine_kwargs

    path = tiny_checkpoint("deepseek_v3")  # fp32, kv_lora_rank 512
    with caplog.at_level(logging.INFO, logger="expertmesh.router.vllm_args"):
        kwargs = engine_kwargs(path, cpu=True)
    assert kwargs == {"dtype": "float32", "attention_config": {"backend": "CPU_MLA"}}
    assert "attention backend CPU_MLA: fp32 MLA model; AMX_MLA takes only bf16/fp16/int8" in caplog.text
    assert engine_kwargs(path) == kwargs  # this machine: vLLM's CPU platform
    assert engine_kwargs(path, cpu=False) == {"dtype": "float32"}  # not a CPU platform: vLLM's own choice
    # vLLM parses the setting into its attention config (the same path LLM(...) and the router's EngineArgs take)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    args = EngineArgs(model=str(path), **kwargs)
    assert args.attention_config.backend == AttentionBackendEnum.CPU_MLA


def test_engine_kwargs_bf16_mla_and_non_mla_keep_vllm_default(tiny_checkpoint, tmp_path):
    from expertmesh.router.vllm_args import engine_kwargs

    mla = tiny_checkpoint("deepseek_v3")
    bf16 = _config_with(mla, tmp_path, dtype="bfloat16")
    assert engine_kwargs(bf16, cpu=True) == {"dtype": "bfloat16"}  # AMX_MLA takes bf16: leave it to vLLM
    assert engine_kwargs(mla, dtype="bfloat16", cpu=True) == {"dtype": "bfloat16"}
    assert engine_kwargs(tiny_checkpoint("mixtral"), cpu=True) == {"dtype": "float32"}  # not MLA
