"""Ping-pong micro-batches (router/micro_batches.py): a step split along requests, the parts taking turns at the
dispatch op, gives exactly monolithic vLLM's output, real engines and real expert servers.

Unit: the split (whole sequences, about equal tokens, never empty) and the turn order of the ring. Engines: greedy
output with EXPERTMESH_MICRO_BATCHES=2 (and 3) identical to monolithic vLLM for the six families, including steps
mixing prefill chunks with decodes, odd token counts and requests finishing at different steps, with steps really
split (counted); compiled mode; and a replica killed while micro-batches are in flight (failover, same output).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest
from test_router_parity import InProcessPool, Run, assert_same, halves, make_llm, wait_for_endpoints

from expertmesh.core.checkpoint import read_moe_info
from expertmesh.router import dispatch, micro_batches

# ---- the split and the ring -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, m",
    [([1] * 16, 2), ([1] * 7, 2), ([1] * 9, 3), ([30, 1, 1, 1, 1], 2), ([5, 9, 1, 1, 7, 2], 3), ([3, 3], 2)],
)
def test_split_keeps_sequences_whole_and_balances_tokens(tokens, m):
    tokens = np.array(tokens)
    slices = micro_batches.request_slices(tokens, m)
    assert len(slices) == min(m, len(tokens))
    assert slices[0][0].start == 0 and slices[-1][0].stop == len(tokens)
    cu = np.concatenate([[0], np.cumsum(tokens)])
    for (r0, t0), (r1, t1) in zip(slices, slices[1:]):
        assert r0.stop == r1.start and t0.stop == t1.start  # contiguous, nothing lost or repeated
    for r, t in slices:
        assert r.stop > r.start  # never empty
        assert (t.start, t.stop) == (cu[r.start], cu[r.stop])  # token slice = its requests' tokens, whole
    if all(x == 1 for x in tokens):  # decodes: sizes differ by at most one
        sizes = [t.stop - t.start for _, t in slices]
        assert max(sizes) - min(sizes) <= 1


def test_ring_runs_one_micro_batch_at_a_time_in_turn():
    """Three threads hand off three times (the last one twice): the order is 0 1 2 0 1 2 ..., a finished thread
    passes the turn on for good, and never do two run at once."""
    ring = micro_batches.Ring([None, None, None])
    order, running, overlap = [], [0], []

    def work(i, hand_offs):
        micro_batches._turn.ring, micro_batches._turn.index = ring, i
        ring.wait_turn(i)
        for _ in range(hand_offs):
            running[0] += 1
            overlap.append(running[0])
            order.append(i)
            running[0] -= 1
            micro_batches.hand_off()
        order.append(f"{i} done")
        ring.finish(i)

    threads = [threading.Thread(target=work, args=(i, 3 - (i == 2))) for i in range(3)]
    for t in threads:
        t.start()
    ring.turns[0].set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert order == [0, 1, 2, 0, 1, 2, 0, 1, "2 done", "0 done", "1 done"]  # a finished one is skipped
    assert max(overlap) == 1


# ---- engines ------------------------------------------------------------------------------------------------------

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "A mixture of experts routes",
    "Each",
    "Serving systems batch requests from many users at once, so",
    "Numbers like 3, 5, 7",
    "The gate picks",
    "Tokens stream",
    "Cache keys hold",
    "Routes every token to two experts of eight, and",
    "A small network",
    "Punctuation!",
]
MAX_TOKENS = [24, 7, 19, 13, 24, 1, 9, 16, 21, 5, 11]  # requests finish at different steps: odd token counts


def generate(llm):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=1, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return Run([list(o.prompt_token_ids) for o in outs], tokens, logprobs, 0, 0, set(), 0)


def run(path, mode, directory=None, **kwargs):
    # a small token budget: prefill chunks share steps with decodes
    llm = make_llm(path, mode, directory, max_num_batched_tokens=32, enable_chunked_prefill=True, **kwargs)
    try:
        return generate(llm)
    finally:
        del llm
        gc.collect()


@pytest.fixture
def micro_batches_env():
    def set_m(m: int):
        os.environ["EXPERTMESH_MICRO_BATCHES"] = str(m)
        os.environ["EXPERTMESH_MICRO_BATCH_MIN_TOKENS"] = "1"

    yield set_m
    os.environ.pop("EXPERTMESH_MICRO_BATCHES", None)
    os.environ.pop("EXPERTMESH_MICRO_BATCH_MIN_TOKENS", None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, m", [("qwen3_moe", 2), ("qwen3_moe", 3), ("mixtral", 2), ("olmoe", 2), ("qwen2_moe", 2)]
)
def test_micro_batches_match_monolithic(family, m, tiny_checkpoint, micro_batches_env):
    """Prefill chunks mixed with decodes (a 32-token budget), requests finishing at different steps, odd token
    counts; Qwen2-MoE's shared experts run in the shadow of each micro-batch's call."""
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    micro_batches_env(m)
    before = dict(micro_batches.stats)
    mono = run(path, "local")
    assert micro_batches.stats == before  # monolithic steps are never split
    with InProcessPool(path, halves(info), kernel="torch") as pool:
        remote = run(path, "remote", pool.address)
    dispatch.reset_dispatcher()
    split = micro_batches.stats["split_steps"] - before["split_steps"]
    parts = micro_batches.stats["micro_batches"] - before["micro_batches"]
    assert split >= 10 and (parts > 2 * split if m > 2 else parts == 2 * split)  # most steps really were split
    assert_same(mono, remote)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_micro_batches_mla_match_monolithic_run_per_micro_batch(family, tiny_checkpoint, micro_batches_env):
    """DeepSeek (MLA). vLLM's CPU MLA output depends on which requests share a batch (measured on the tiny
    DeepSeek-V2: one prompt alone, in a pair and in a batch of four gives three different greedy continuations,
    monolithic vLLM, no expertmesh involved), so the reference for a split step is monolithic vLLM running each
    micro-batch as its own batch. Equal prompts and lengths keep the split the same at every step (halves)."""
    from vllm import SamplingParams

    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    micro_batches_env(2)
    prompts = [{"prompt_token_ids": [10 + (7 * i + 3 * j) % 200 for j in range(12)]} for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, ignore_eos=True)

    def generate_all(llm, batches):
        runs = [o for batch in batches for o in llm.generate(batch, params, use_tqdm=False)]
        return Run(
            [list(o.prompt_token_ids) for o in runs],
            [list(o.outputs[0].token_ids) for o in runs],
            [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in runs],
            0,
            0,
            set(),
            0,
        )

    llm = make_llm(path, "local")
    mono = generate_all(llm, [prompts[:4], prompts[4:]])
    del llm
    gc.collect()
    before = micro_batches.stats["split_steps"]
    with InProcessPool(path, halves(info), kernel="torch") as pool:
        llm = make_llm(path, "remote", pool.address)
        remote = generate_all(llm, [prompts])
        del llm
        gc.collect()
    dispatch.reset_dispatcher()
    assert micro_batches.stats["split_steps"] - before == 12  # every step split in halves
    assert_same(mono, remote)


@pytest.mark.slow
def test_micro_batches_compiled_and_a_replica_killed_in_flight(tiny_checkpoint, micro_batches_env):
    """vLLM's default compiled mode (the dispatch op opaque in the graph, the compiled forward called once per
    micro-batch), and a replica killed while micro-batches are in flight: every request completes, each layer
    call of the killed replica fails over to the other holder, and the output is monolithic vLLM's."""
    path = tiny_checkpoint("mixtral")
    info = read_moe_info(path)
    micro_batches_env(2)
    mono = run(path, "local")
    before = micro_batches.stats["split_steps"]
    # torch kernel: these replicas share the router's process, and vLLM's CPU kernels share one scratch buffer per
    # process (the router's attention now runs while a replica computes: measured, a segfault in the fused op)
    with InProcessPool(path, halves(info), kernel="torch") as pool:
        full = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
        pool.add("full", full)  # every expert has two replicas
        d = dispatch.get_dispatcher(pool.address)
        wait_for_endpoints(d, {pool.endpoint("full"), pool.endpoint("low")})
        d.reset_stats()
        killed = threading.Event()

        def kill_when_running():
            while micro_batches.stats["split_steps"] - before < 3:  # a few split steps in
                time.sleep(0.001)
            pool.kill("low")
            killed.set()

        killer = threading.Thread(target=kill_when_running, daemon=True)
        killer.start()
        remote = run(path, "remote", pool.address, enforce_eager=False)
        killer.join(timeout=30)
        stats = d.stats()
    dispatch.reset_dispatcher()
    assert killed.is_set()
    assert micro_batches.stats["split_steps"] - before >= 10
    assert stats["failovers"] >= 1
    assert_same(mono, remote)


@pytest.mark.slow
def test_requests_cancelled_mid_step_with_micro_batches(tmp_path):
    """vLLM's own OpenAI server with the plugin and EXPERTMESH_MICRO_BATCHES=2 (a subprocess, its experts in a real
    pool): streams that disconnect at random points, so requests leave between and during split steps, never stop
    the engine; afterwards nothing runs or waits in it, and a greedy answer is what it was before the storm. The
    router's own metrics show the steps really were split."""
    import asyncio
    import random

    import httpx
    from conftest import free_port
    from openai_servers import expert_pool, router_args, start_server, stop_server, vllm_flags, wait_ready
    from test_openai_frontend import DEMO, MODEL, _chat, _Disconnect, _metric, _storm_stream

    from expertmesh.core import settings

    rng = random.Random(17)
    plans = [
        rng.choice(
            [_Disconnect(before_s=rng.uniform(0, 0.05)), _Disconnect(after_tokens=rng.randint(0, 24)), _Disconnect()]
        )
        for _ in range(64)
    ]
    with expert_pool(DEMO) as (directory, _server):
        port, metrics_port = free_port(), free_port()
        env = settings.child_env({"EXPERTMESH_MICRO_BATCHES": "2", "EXPERTMESH_MICRO_BATCH_MIN_TOKENS": "1"})
        more = ("--router-metrics-port", str(metrics_port), *vllm_flags(MODEL))
        router = start_server(router_args(DEMO, directory, port, *more), tmp_path / "router.log", env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, router, tmp_path / "router.log")
            before = _chat(url, "What news from Rome?")

            async def storm():
                slots = asyncio.Semaphore(16)
                async with httpx.AsyncClient(timeout=120) as client:

                    async def one(i, plan):
                        async with slots:
                            return await _storm_stream(client, url, f"Speak, my lord ({i}).", plan)

                    return await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)))

            outcomes = asyncio.run(storm())
            for outcome in outcomes:
                if outcome.plan == _Disconnect():
                    assert outcome.done and outcome.finish_reason == "length", outcome
            deadline = time.monotonic() + 30
            while True:
                metrics = httpx.get(f"{url}/metrics", timeout=10).text
                if _metric(metrics, "vllm:num_requests_running") == _metric(metrics, "vllm:num_requests_waiting") == 0:
                    break
                assert time.monotonic() < deadline, "requests still in the engine 30 s after the storm"
                time.sleep(0.2)
            after = _chat(url, "What news from Rome?")
            assert after["choices"][0]["message"] == before["choices"][0]["message"]
            split = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert _metric(split, "expertmesh_micro_batch_steps_total") >= 50
            assert router.poll() is None  # the same engine throughout
        finally:
            stop_server(router)
