"""Ping-pong micro-batches: one engine step split along requests into m micro-batches that take turns at the
dispatch op, so the router computes one micro-batch's attention while another's routed experts are in the pool.

Without it a decode step is serial: the router computes a layer's attention for the whole batch, sends the layer
call, and idles until the replicas answer; the replicas idle while the router works. With m micro-batches
(MegaScale-Infer's ping-pong; vLLM's dual-batch overlap, `vllm/v1/worker/ubatching.py`, does the same with CUDA
streams and is off on CPU) the forward pass runs once per micro-batch, each in its own thread, and exactly one
thread runs at a time: a micro-batch runs until its layer call is sent (`dispatch.Dispatcher.begin`), then hands
the turn to the next one (`hand_off`, called by the dispatch ops) and waits for the turn to come back before it
collects its replies. So while micro-batch i's experts are in the pool, micro-batches i+1, ... compute their
attention and send theirs. The dispatch op is the only hand-off point: nothing else in the model knows.

What vLLM 0.32 already has, used as it is: the runner's micro-batch slices (`UBatchSlice`), one attention metadata
and one slot mapping per micro-batch (`_build_attention_metadata` / `_get_slot_mappings` with `ubatch_slices`),
the forward context carrying the slices, and its check that a step is safe to split (`_allow_microbatching`: a
request reading a prefix block another request of the same step writes now). vLLM only splits a step with data
parallelism (`coordinate_batch_across_dp`) and runs the halves with CUDA streams; `install()` wraps four methods
of `CPUModelRunner` (vLLM's CPU runner, inherited from GPUModelRunner) in the process that runs the model:

- `_determine_batch_execution_and_padding`: a real step (not a profile or warm-up run) is split when it has at
  least m requests and `EXPERTMESH_MICRO_BATCH_MIN_TOKENS` tokens per micro-batch, every KV cache group is
  attention (no Mamba state), and vLLM's prefix check allows it;
- `gpu_model_runner.maybe_create_ubatch_slices` (the runner's module global): the split is along requests, a
  sequence's tokens stay together, micro-batches of about equal tokens (vLLM's own splits at the token midpoint);
- `initialize_metadata_builders`: one attention-metadata builder per micro-batch (vLLM keeps one per micro-batch,
  a builder may reuse its buffers between builds);
- `_model_forward`: a split step runs the model once per micro-batch on its slice of the inputs, in m threads taking
  turns (`Ring`), each with its own forward context and the caller's contextvars (a sampled step's span), and the
  outputs are concatenated in order: the rest of the step (logits, sampling) sees one batch.

Every family works the same way (the hand-off is in the dispatch op). Eager and compiled: the op is opaque to
torch.compile, and the compiled forward is called per micro-batch with its own token count. m comes from
`EXPERTMESH_MICRO_BATCHES` (1 = off), read once when vLLM builds the runner's metadata builders; MegaScale-Infer's
rule m >= 2(1 + Tc/Tf) (communication over compute time) and the measurements that chose the default are in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from types import SimpleNamespace

import numpy as np
import torch

from expertmesh.core import settings

_MARK = "_expertmesh_micro_batches"
_turn = threading.local()  # in a micro-batch thread: .ring (its Ring) and .index (its place in it)
stats = {"split_steps": 0, "micro_batches": 0}  # steps run split in this process, and their micro-batches
_split = [0]  # the parts of the step being prepared (set when the runner decides to split, taken by the slicing)
_prometheus: list = []  # [steps, micro-batches] counters, made at the first split step (one registry per process)


def _count_split(parts: int) -> None:
    stats["split_steps"] += 1
    stats["micro_batches"] += parts
    if not _prometheus:
        from prometheus_client import Counter

        _prometheus.append(Counter("expertmesh_micro_batch_steps", "Engine steps run as ping-pong micro-batches"))
        _prometheus.append(Counter("expertmesh_micro_batches", "Micro-batches of the steps run split"))
    _prometheus[0].inc()
    _prometheus[1].inc(parts)


class Ring:
    """m micro-batch threads taking turns, one running at a time, in order 0, 1, ..., m-1, 0, ...

    A thread runs while it holds the turn; `pass_turn(i)` gives it to the next unfinished micro-batch and waits for
    it to come back (then restores micro-batch i's forward context, a process global in vLLM); `finish(i)` gives it
    away for good. Only the thread holding the turn changes `finished`."""

    def __init__(self, forward_contexts: list) -> None:
        self.forward_contexts = forward_contexts
        self.turns = [threading.Event() for _ in forward_contexts]
        self.finished = [False] * len(forward_contexts)

    def _next(self, i: int) -> int | None:
        m = len(self.turns)
        for step in range(1, m + 1):
            j = (i + step) % m
            if not self.finished[j]:
                return j
        return None

    def wait_turn(self, i: int) -> None:
        from vllm import forward_context

        self.turns[i].wait()
        self.turns[i].clear()
        forward_context._forward_context = self.forward_contexts[i]

    def pass_turn(self, i: int) -> None:
        nxt = self._next(i)
        if nxt is None or nxt == i:
            return  # the others are done: keep running
        self.turns[nxt].set()
        self.wait_turn(i)

    def finish(self, i: int) -> None:
        self.finished[i] = True
        nxt = self._next(i)
        if nxt is not None:
            self.turns[nxt].set()


def hand_off() -> None:
    """Called by the dispatch ops right after a layer call is sent: in a micro-batch thread, let the next
    micro-batch run until it has sent its own (or finished), then come back; elsewhere nothing."""
    ring = getattr(_turn, "ring", None)
    if ring is not None:
        ring.pass_turn(_turn.index)


def current_micro_batch() -> int | None:
    """This thread's micro-batch index within the step, or None outside a split step."""
    return getattr(_turn, "index", None) if getattr(_turn, "ring", None) is not None else None


def request_slices(num_scheduled_tokens: np.ndarray, m: int) -> list[tuple[slice, slice]]:
    """num_scheduled_tokens [R] (tokens of each request in the step) -> up to m (request slice, token slice) pairs:
    contiguous requests, whole sequences, about equal tokens each (greedy cut at the request boundary nearest each
    k/m of the tokens); never an empty micro-batch."""
    cu: np.ndarray = np.zeros(len(num_scheduled_tokens) + 1, dtype=np.int64)  # [R+1]
    np.cumsum(num_scheduled_tokens, out=cu[1:])
    total = int(cu[-1])
    cuts = [0]
    for k in range(1, m):
        r = int(np.abs(cu - total * k / m).argmin())  # the boundary nearest the k-th m-th
        r = min(max(r, cuts[-1] + 1), len(num_scheduled_tokens) - (m - k))  # >= 1 request each, left and right
        cuts.append(r)
    cuts.append(len(num_scheduled_tokens))
    return [(slice(a, b), slice(int(cu[a]), int(cu[b]))) for a, b in zip(cuts, cuts[1:]) if b > a]


def should_split(runner, num_tokens: int, num_reqs: int, num_scheduled_tokens_np: np.ndarray) -> bool:
    # m as the runner was built with (one attention-metadata builder per micro-batch); 1 where it cannot split: a
    # KV cache group that is not attention (Mamba state)
    m = getattr(runner, "_expertmesh_micro_batches", 1)
    if settings.expert_mode() != "remote":
        return False  # monolithic: nothing to hide, a split would only cost
    if m < 2 or num_reqs < m or num_tokens < m * settings.micro_batch_min_tokens():
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # vLLM's own check, which it skips when its own micro-batching is off: a request reading a prefix block that
    # another request of this step writes now (it must be run whole, its writes before its reads).
    view = SimpleNamespace(
        parallel_config=SimpleNamespace(use_ubatching=True),
        input_batch=runner.input_batch,
        reorder_batch_threshold=runner.reorder_batch_threshold,
    )
    return bool(GPUModelRunner._allow_microbatching(view, num_reqs, num_scheduled_tokens_np))


def _wrap_determine(original):
    @functools.wraps(original)
    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, num_scheduled_tokens_np, *args, **kw):
        result = original(self, num_tokens, num_reqs, num_scheduled_tokens_np, *args, **kw)
        mode, descriptor, should_ubatch, across_dp, graph_stats = result
        # force_has_lora is passed by vLLM's dummy runs (profiling, warm-up, graph capture) only
        if should_ubatch or kw.get("force_has_lora") is not None or self.parallel_config.data_parallel_size > 1:
            return result
        if descriptor.num_tokens != num_tokens or not should_split(self, num_tokens, num_reqs, num_scheduled_tokens_np):
            return result
        _split[0] = self._expertmesh_micro_batches  # read by maybe_create_ubatch_slices, next in this step
        return mode, descriptor, True, across_dp, graph_stats

    setattr(_determine_batch_execution_and_padding, _MARK, True)
    return _determine_batch_execution_and_padding


def _wrap_create_slices(original):
    @functools.wraps(original)
    def maybe_create_ubatch_slices(should_ubatch, num_scheduled_tokens, num_tokens_padded, num_reqs_padded, *a, **kw):
        from vllm.v1.worker.ubatch_utils import UBatchSlice

        parts, _split[0] = _split[0], 0
        if not should_ubatch or parts < 2:  # not our split (vLLM's own, with data parallelism)
            return original(should_ubatch, num_scheduled_tokens, num_tokens_padded, num_reqs_padded, *a, **kw)
        slices = [UBatchSlice(r, t) for r, t in request_slices(num_scheduled_tokens, parts)]
        return slices, slices  # no padding on CPU: the padded slices are the slices

    setattr(maybe_create_ubatch_slices, _MARK, True)
    return maybe_create_ubatch_slices


def _wrap_builders(original):
    @functools.wraps(original)
    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes):
        original(self, kv_cache_config, kernel_block_sizes)
        from vllm.v1.kv_cache_interface import AttentionSpec

        m = settings.micro_batches()
        attention_only = all(isinstance(g.kv_cache_spec, AttentionSpec) for g in kv_cache_config.kv_cache_groups)
        self._expertmesh_micro_batches = m if attention_only else 1
        if self._expertmesh_micro_batches < 2:
            return
        for gid, groups in enumerate(self.attn_groups):
            for group in groups:
                group.create_metadata_builders(
                    self.vllm_config,
                    self.device,
                    kernel_block_sizes[gid] if gid < len(kernel_block_sizes) else None,
                    num_metadata_builders=m,
                )
        self.calculate_reorder_batch_threshold()

    setattr(initialize_metadata_builders, _MARK, True)
    return initialize_metadata_builders


def run_split(forward, forward_context, vllm_config, input_ids, positions, inputs_embeds, kwargs):
    """The forward pass of a split step: `forward(input_ids=, positions=, inputs_embeds=, intermediate_tensors=None,
    **kwargs)` once per micro-batch, in turns (Ring) -> the outputs [T, ...] concatenated in micro-batch order."""
    from vllm.forward_context import create_forward_context, override_forward_context

    slices = forward_context.ubatch_slices
    per_batch_mapping = isinstance(forward_context.slot_mapping, list)
    contexts = [
        create_forward_context(
            forward_context.attn_metadata[i],
            vllm_config,
            batch_descriptor=forward_context.batch_descriptor,
            cudagraph_runtime_mode=forward_context.cudagraph_runtime_mode,
            slot_mapping=forward_context.slot_mapping[i] if per_batch_mapping else None,
            is_padding=None if forward_context.is_padding is None else forward_context.is_padding[s.token_slice],
            skip_compiled=forward_context.skip_compiled,
        )
        for i, s in enumerate(slices)
    ]
    ring = Ring(contexts)
    _count_split(len(slices))
    outputs: list = [None] * len(slices)
    errors: list[BaseException] = []
    grad_mode = torch.is_inference_mode_enabled()

    def micro_batch(i: int, tokens: slice) -> None:
        _turn.ring, _turn.index = ring, i
        try:
            ring.wait_turn(i)
            with torch.inference_mode(grad_mode):
                outputs[i] = forward(
                    input_ids=None if input_ids is None else input_ids[tokens],
                    positions=positions[..., tokens],  # [T] or M-RoPE's [3, T]
                    intermediate_tensors=None,
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[tokens],
                    **kwargs,
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
        finally:
            _turn.ring = _turn.index = None
            ring.finish(i)

    with override_forward_context(None):  # restored when the last micro-batch is done
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(micro_batch, i, s.token_slice),
                name=f"expertmesh-micro-batch-{i}",
                daemon=True,
            )
            for i, s in enumerate(slices)
        ]
        for t in threads:
            t.start()
        ring.turns[0].set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    if isinstance(outputs[0], tuple):  # hidden states + auxiliary outputs
        return tuple(torch.cat(parts, dim=0) for parts in zip(*outputs))
    return torch.cat(outputs, dim=0)


def _wrap_model_forward(original):
    @functools.wraps(original)
    def _model_forward(
        self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **model_kwargs
    ):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        fc = get_forward_context() if is_forward_context_available() else None
        if fc is None or fc.ubatch_slices is None or intermediate_tensors is not None:
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        forward = functools.partial(original, self)
        return run_split(forward, fc, self.vllm_config, input_ids, positions, inputs_embeds, model_kwargs)

    setattr(_model_forward, _MARK, True)
    return _model_forward


def install() -> None:
    """Wrap vLLM's CPU model runner in this process (idempotent; a no-op when EXPERTMESH_MICRO_BATCHES < 2)."""
    if settings.micro_batches() < 2:
        return
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for name, wrap in (
        ("_determine_batch_execution_and_padding", _wrap_determine),
        ("initialize_metadata_builders", _wrap_builders),
        ("_model_forward", _wrap_model_forward),
    ):
        method = getattr(CPUModelRunner, name)
        if not getattr(method, _MARK, False):
            setattr(CPUModelRunner, name, wrap(method))
    if not getattr(gpu_model_runner.maybe_create_ubatch_slices, _MARK, False):
        gpu_model_runner.maybe_create_ubatch_slices = _wrap_create_slices(gpu_model_runner.maybe_create_ubatch_slices)
