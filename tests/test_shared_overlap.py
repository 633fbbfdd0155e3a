"""Shared experts in the shadow of the routed call (EXPERTMESH_SHARED_EXPERTS_OVERLAP), real vLLM and real replicas.

For the families with shared experts (Qwen2-MoE, DeepSeek-V2): greedy tokens and logprobs with the overlap on and
off are those of monolithic vLLM (local experts); with it on, every MoE layer call runs begin -> the layer's shared
experts (once) -> end, and with it off vLLM's order: shared experts, then the call. Both dispatch forms are used
in one run (the first MoE layer whole on one replica, the others split over two). In vLLM's compiled mode the
inductor schedule itself keeps the shared experts' matmuls between begin and end. With the overlap on, replicas
killed mid-generation (the whole-layer one: its experts are then the router's own; one of a split layer: resent to
a spare) change nothing in the output.

The replicas run in this process (InProcessPool) with the torch expert kernel: vLLM's CPU kernels (its fused MoE,
its GEMMs) are not safe to run in two threads of one process at once, and with the overlap on the router's thread
computes shared experts while a replica's thread computes routed ones (measured: a segfault in cpu_fused_moe).
Real replicas are other processes.
"""

from __future__ import annotations

import gc
import re
import threading
import time

import pytest
from test_router_parity import (
    InProcessPool,
    Run,
    assert_same,
    generate,
    make_llm,
    run_engine,
)

from expertmesh.core.checkpoint import read_moe_info
from expertmesh.router import dispatch

pytestmark = pytest.mark.slow

FAMILIES = ("qwen2_moe", "deepseek_v2")
SHARED_MODULE = {"qwen2_moe": "mlp.shared_expert", "deepseek_v2": "mlp.shared_experts"}
# Calls in inductor's generated code: the overlap ops and the matmuls (vLLM's CPU GEMM op, or inductor's own)
BEGIN, END = "remote_experts_begin.default(", "remote_experts_end.default("
OPS_IN_CODE = (BEGIN, END, "onednn_mm.default(", "extern_kernels.mm(")
SHARED_EVENTS: list[tuple[str, int, float]] = []  # ("shared_start" | "shared_end", layer, perf_counter time)


def layout(info) -> dict[str, dict[int, list[int]]]:
    """The first MoE layer whole on one replica (whole-layer form), the others split in halves (per-replica form)."""
    first, *rest = info.moe_layers
    half = info.num_experts // 2
    return {
        "whole": {first: list(range(info.num_experts))},
        "low": {layer: list(range(half)) for layer in rest},
        "high": {layer: list(range(half, info.num_experts)) for layer in rest},
    }


def _install_shared_hooks(model, suffix: str) -> int:
    """Record the start and end of every call of each layer's shared-experts module (runs in the engine)."""
    count = 0
    for name, module in model.named_modules():
        if not name.endswith(suffix):
            continue
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        module.register_forward_pre_hook(
            lambda m, args, layer=layer: SHARED_EVENTS.append(("shared_start", layer, time.perf_counter()))
        )
        module.register_forward_hook(
            lambda m, args, out, layer=layer: SHARED_EVENTS.append(("shared_end", layer, time.perf_counter()))
        )
        count += 1
    return count


def layer_calls(timeline: list, shared: list) -> list[list[tuple[str, int]]]:
    """Dispatcher begin/end and shared-expert events in time order, cut into groups of four (one per layer call)."""
    events = [(kind, layer) for kind, layer, _ in sorted(timeline + shared, key=lambda e: e[2])]
    assert len(events) % 4 == 0, events[:16]
    return [events[i : i + 4] for i in range(0, len(events), 4)]


@pytest.fixture(scope="module")
def torch_kernel_replicas():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPERTMESH_EXPERT_KERNEL", "torch")  # see the module docstring
        yield


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    """Monolithic vLLM's greedy run per family (computed once)."""
    cache: dict = {}

    def get(family: str) -> Run:
        if family not in cache:
            cache[family] = run_engine(tiny_checkpoint(family), "local")
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_overlap_on_and_off_match_local_experts(
    family, tiny_checkpoint, references, torch_kernel_replicas, monkeypatch
):
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    mono = references(family)
    with InProcessPool(path, layout(info)) as pool:
        for overlap in (True, False):
            monkeypatch.setenv("EXPERTMESH_SHARED_EXPERTS_OVERLAP", str(overlap))
            dispatch.reset_dispatcher()
            llm = make_llm(path, "remote", pool.address)
            try:
                assert llm.apply_model(lambda m: _install_shared_hooks(m, SHARED_MODULE[family]))[0] == len(
                    info.moe_layers
                )
                d = dispatch.get_dispatcher(pool.address)
                d.reset_stats()
                d.timeline, SHARED_EVENTS[:] = [], []
                _, tokens, logprobs = generate(llm)
                timeline, shared, stats = list(d.timeline), list(SHARED_EVENTS), d.stats()
                d.timeline = None
            finally:
                del llm
                gc.collect()
            assert_same(mono, Run(mono.prompt_ids, tokens, logprobs, 0, 0, set(), 0))
            # Both dispatch forms ran: the whole-layer replica and both halves got calls.
            assert set(stats["rpcs"]) == {pool.endpoint(r) for r in ("whole", "low", "high")}
            calls = layer_calls(timeline, shared)
            assert len(calls) == stats["layer_calls"] >= len(info.moe_layers) * 32
            for call in calls:
                layer = call[0][1]
                if overlap:  # sent, the shared experts once, then the replies: inside the call, not also by vLLM
                    expected = [("begin", layer), ("shared_start", layer), ("shared_end", layer), ("end", layer)]
                else:  # vLLM's order: shared experts before the call
                    expected = [("shared_start", layer), ("shared_end", layer), ("begin", layer), ("end", layer)]
                assert call == expected, (overlap, call)
    dispatch.reset_dispatcher()


def test_compiled_graph_keeps_shared_experts_inside_the_call(
    tiny_checkpoint, references, torch_kernel_replicas, tmp_path
):
    """vLLM's default mode (torch.compile): the same output, and in inductor's generated code every
    remote_experts_begin is followed by the shared experts' matmuls and only then by remote_experts_end (without
    the ordering in the ops' signatures inductor put the shared experts before begin)."""
    family = "qwen2_moe"
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    mono = references(family)
    with pytest.MonkeyPatch.context() as mp, InProcessPool(path, layout(info)) as pool:
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path))  # a fresh compile cache: compiled now, its code lands here
        mp.setenv("EXPERTMESH_SHARED_EXPERTS_OVERLAP", "true")
        dispatch.reset_dispatcher()
        llm = make_llm(path, "remote", pool.address, enforce_eager=False)
        try:
            d = dispatch.get_dispatcher(pool.address)
            d.reset_stats()
            _, tokens, logprobs = generate(llm)
            layer_calls_run = d.layer_calls
        finally:
            del llm
            gc.collect()
    dispatch.reset_dispatcher()
    assert layer_calls_run >= len(info.moe_layers) * 32
    assert_same(mono, Run(mono.prompt_ids, tokens, logprobs, 0, 0, set(), 0))
    graphs = [text for text in (f.read_text() for f in tmp_path.rglob("*.py")) if BEGIN in text]
    assert graphs, "no compiled graph with the overlap ops was written"
    for code in graphs:
        lines = [line.strip() for line in code.splitlines() if not line.strip().startswith("#")]
        ops = [
            "begin" if BEGIN in line else "end" if END in line else "mm"
            for line in lines
            if any(op in line for op in OPS_IN_CODE)
        ]
        begins = [i for i, op in enumerate(ops) if op == "begin"]
        assert len(begins) == len(info.moe_layers), ops
        for i in begins:
            # Qwen2-MoE's shared expert: its gate_up, down and sigmoid-gate matmuls, then end
            assert ops[i + 1 : i + 5] == ["mm", "mm", "mm", "end"], ops


def test_failover_and_fallback_with_overlap(tiny_checkpoint, references, torch_kernel_replicas, monkeypatch):
    """Overlap on; mid-generation the whole-layer replica dies (its experts have no other holder: after the
    missing-expert wait the router computes them itself, in end()) and one half of a split layer dies (resent to a
    spare holding that layer): identical output, nothing fails."""
    family = "qwen2_moe"
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    mono = references(family)
    spec = layout(info)
    monkeypatch.setenv("EXPERTMESH_SHARED_EXPERTS_OVERLAP", "true")
    with InProcessPool(path, {**spec, "spare": spec["low"]}) as pool:
        dispatch.reset_dispatcher()
        llm = make_llm(path, "remote", pool.address)
        try:
            d = dispatch.get_dispatcher(pool.address)
            d.missing_wait_s = 0.2
            d.reset_stats()
            killed = threading.Event()

            def kill_when_running():
                while d.layer_calls < 20:  # a few decode steps in
                    time.sleep(0.001)
                pool.kill("whole")
                pool.kill("low")
                killed.set()

            killer = threading.Thread(target=kill_when_running, daemon=True)
            killer.start()
            _, tokens, logprobs = generate(llm)
            killer.join(timeout=30)
            stats = d.stats()
            spare = pool.endpoint("spare")
        finally:
            del llm
            gc.collect()
    dispatch.reset_dispatcher()
    assert killed.is_set() and stats["layer_calls"] > 20 + 10
    assert stats["failovers"] >= 2
    assert stats["fallback_assignments"] > 0  # the whole layer's experts, computed by the router
    assert list(stats["fallback_held"]) == [info.moe_layers[0]]  # only the whole-layer replica's experts
    assert stats["assignments"].get(spare, 0) > 0
    assert_same(mono, Run(mono.prompt_ids, tokens, logprobs, 0, 0, set(), 0))
