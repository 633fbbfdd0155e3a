"""The expert kernel: a batch of (token, expert, gate weight) assignments through SwiGLU expert FFNs.

Every family here uses the same gated FFN, `down(act(gate(x)) * up(x))`, with `act` from the config
(SiLU for all five); only names and routing differ, and routing stays in the router. Two implementations of the
same contract, chosen once per `ExpertWeights`:

- `fused` (default where it runs): vLLM's CPU fused-MoE op (`_C.cpu_fused_moe`, the kernel vLLM itself uses for
  unquantized MoE on CPU) over weights prepacked for it; one call does gather, both GEMMs, SiLU·mul and the
  gate-weighted sum. Loaded straight from vLLM's extension library (no `import vllm`). Several times faster than
  `torch` on a decode-sized call (measured in docs/benchmarks.md).
- `torch`: assignments sorted by expert, each expert's rows through its own matmul (`torch._grouped_mm`, else a
  loop over experts, never over tokens), gate-weighted, summed per token with one index_add. Used when vLLM's
  library is absent (a slim experts image), for activations or sizes the fused op does not take, and as the
  reference the fused op is checked against.

`EXPERTMESH_EXPERT_KERNEL=torch|fused|auto` (default auto) picks one explicitly. Either way an output does not
depend on which other experts a replica holds (tests/test_foundation.py pins it).

`ExpertWeights(..., device="cuda")` puts the stacks and the `torch` kernel on an accelerator (the fused op is
CPU-only, so a non-CPU device always gets `torch`): a host `hidden` (the replica's, decoded from the wire) is copied
to the device for the kernel and its output back to host memory for the reply; the index bookkeeping stays in numpy
on the host. On the CPU (device None or "cpu") nothing of this runs: the same code and copies as without it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertmesh.core import settings
from expertmesh.core.checkpoint import CheckpointReader
from expertmesh.core.codec import ForwardBatch, as_numpy, raw_bytes

log = logging.getLogger(__name__)


class GatedActivation:
    """What turns an expert's first projection [N, 2I] into [N, I]: vLLM's `MoEActivation` value, the way vLLM's
    FusedMoE names it (the manifest records it per checkpoint), with its parameters.

    "silu", "gelu", "gelu_tanh": act(gate) * up, w13 rows [gate; up] (Mixtral, Qwen, DeepSeek, Llama 4, ...);
    "swigluoai": GPT-OSS's clamped SwiGLU over interleaved rows [g0, u0, g1, u1, ...]:
        gate = min(g, limit), up = clamp(u, -limit, limit), out = (up + 1) * gate * sigmoid(alpha * gate).
    """

    SIMPLE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    NAMES = (*SIMPLE, "swigluoai")
    # the constants vLLM's SwigluOAIAndMul and its CPU fused op use (the op takes no parameters)
    OAI_ALPHA, OAI_LIMIT = 1.702, 7.0

    def __init__(self, name: str, alpha: float | None = None, limit: float | None = None):
        if name not in self.NAMES:
            raise ValueError(f"unsupported expert activation {name!r} (supported: {', '.join(self.NAMES)})")
        self.name = name
        self.alpha = self.OAI_ALPHA if alpha is None else float(alpha)
        self.limit = self.OAI_LIMIT if limit is None else float(limit)

    def __call__(self, gu: torch.Tensor) -> torch.Tensor:
        if self.name == "swigluoai":
            gate = gu[..., ::2].clamp(max=self.limit)
            up = gu[..., 1::2].clamp(min=-self.limit, max=self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        half = gu.shape[-1] // 2
        return self.SIMPLE[self.name](gu[..., :half]) * gu[..., half:]

    @property
    def fused_name(self) -> str | None:
        """The fused op's name for this activation, or None where the op cannot compute it."""
        if self.name == "swigluoai" and (self.alpha, self.limit) != (self.OAI_ALPHA, self.OAI_LIMIT):
            return None
        return self.name


def _present(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None  # the reader gives both biases when the checkpoint has them (info.has_bias)
    return t


class ExpertWeights:
    """The replica's one kernel interface: the FFN weights of a set of (layer, expert) keys, stacked per layer,
    and the expert MLP over a batch of assignments (`forward`, and `forward_batch` for a decoded request).

    Parameters
    ----------
    reader: the checkpoint (its `info` gives hidden size, expert count, dtype, the activation and whether the
        experts have biases; `load_expert` gives each expert's tensors in vLLM's layout).
    keys: layer -> expert ids to load; nothing else is read.
    dtype: the compute and weight dtype (default: the checkpoint's).
    kernel: "fused", "torch" or "auto" (default $EXPERTMESH_EXPERT_KERNEL, else auto): see `choose_kernel`.
    device: where the stacks live and the kernel runs (None or "cpu": host memory, today's path; anything else:
        the `torch` kernel on that device, e.g. "cuda" or "cuda:1").

    What a model family needs beyond these is a parameter here (read from the checkpoint's manifest, passed on to
    both implementations), the way vLLM's FusedMoE takes them, never a copy of the kernel per family: the
    activation (`GatedActivation`: SiLU/GELU over [gate; up], or GPT-OSS's clamped SwiGLU over interleaved rows),
    expert biases (`w13_bias` [E, 2I], `w2_bias` [E, H]). Quantized weights with their scales would be the next
    (a quant config that picks the weight layout, as FusedMoE's `quant_config`); not taken yet.

    Attributes
    ----------
    w13[layer]: [E_held, 2I, H] (vLLM's row order for the activation), w2[layer]: [E_held, H, I] — in the fused
    op's blocked layout (same shape and bytes) when `kernel == "fused"`;
    w13_bias[layer]: [E_held, 2I], w2_bias[layer]: [E_held, H] — only for families with biases;
    slot[layer]: [num_experts] int32 (numpy) mapping expert id -> row in the stack (-1 = not held);
    held[layer]: the expert ids held.
    device: the torch.device of the stacks.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        keys: dict[int, list[int]],
        dtype: torch.dtype | None = None,
        kernel: str | None = None,
        device: str | torch.device | None = None,
    ):
        info = reader.info
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type != "cpu":  # with its index ("cuda" -> "cuda:0"), as tensors there report it
            self.device = torch.empty(0, device=self.device).device
        # None on the host: forward's device branch is one `is not None` test there
        self._accelerator = self.device if self.device.type != "cpu" else None
        self.hidden_size = info.hidden_size
        self.num_experts = info.num_experts
        self.dtype = dtype or info.dtype
        self.act = GatedActivation(info.activation, info.swiglu_alpha, info.swiglu_limit)
        self.held: dict[int, frozenset[int]] = {}
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        self.w13_bias: dict[int, torch.Tensor] = {}
        self.w2_bias: dict[int, torch.Tensor] = {}
        self.slot: dict[int, np.ndarray] = {}
        intermediate = None
        for layer, experts in sorted(keys.items()):
            experts = sorted(set(int(e) for e in experts))
            loaded = [reader.load_expert(layer, e) for e in experts]
            self.w13[layer] = torch.stack([t.w13.to(self.dtype) for t in loaded])  # [E_held, 2I, H]
            self.w2[layer] = torch.stack([t.w2.to(self.dtype) for t in loaded])  # [E_held, H, I]
            if info.has_bias:
                self.w13_bias[layer] = torch.stack(
                    [_present(t.w13_bias).to(self.dtype) for t in loaded]
                )  # [E_held, 2I]
                self.w2_bias[layer] = torch.stack([_present(t.w2_bias).to(self.dtype) for t in loaded])  # [E_held, H]
            intermediate = info.intermediate_size
            del loaded
            if self._accelerator is not None:  # one layer at a time: host memory holds at most one layer's stacks
                for stacks in (self.w13, self.w2, self.w13_bias, self.w2_bias):
                    if layer in stacks:
                        stacks[layer] = stacks[layer].to(self._accelerator)
            slot: np.ndarray = np.full(info.num_experts, -1, dtype=np.int32)  # [E] expert id -> row, -1 not held
            slot[experts] = np.arange(len(experts), dtype=np.int32)
            self.slot[layer] = slot
            self.held[layer] = frozenset(experts)
        # Layers whose every expert is held (the default plan): no slot can be -1, so no per-call check for it, and
        # expert id == row in the stacks (no lookup).
        self._holds_all = frozenset(layer for layer, slot in self.slot.items() if slot.min() >= 0)
        self.kernel = choose_kernel(
            kernel, self.act, self.dtype, self.hidden_size, intermediate, self.device, info.has_bias
        )
        if self.kernel == "fused":  # the fused op reads its own blocked layout; nothing keeps the plain copy
            isa = _FUSED.isa
            self.w13 = {layer: _fused_prepack(w, isa) for layer, w in self.w13.items()}
            self.w2 = {layer: _fused_prepack(w, isa) for layer, w in self.w2.items()}

    @property
    def weight_bytes(self) -> int:
        stacks = (self.w13, self.w2, self.w13_bias, self.w2_bias)
        return sum(t.numel() * t.element_size() for d in stacks for t in d.values())

    def _biases(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.w13_bias.get(layer), self.w2_bias.get(layer)

    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        token_index: np.ndarray | torch.Tensor | None,
        expert: np.ndarray | torch.Tensor,
        weight: np.ndarray | torch.Tensor,
    ) -> torch.Tensor:
        """The routed-expert output of one layer for a batch of assignments.

        Parameters
        ----------
        layer: a layer these weights hold.
        hidden: [T, H] float tensor, on the host or on the weights' device.
        token_index: [N] ints, the row of each assignment; or None for the whole-layer form (all K assignments of
            each row in row order, N = T * K: assignment n is row n // K).
        expert: [N] expert ids, each one held (ValueError otherwise).
        weight: [N] gate weights.
        Arrays may be numpy arrays or tensors (a device tensor is copied to the host: the bookkeeping is numpy).

        Returns
        -------
        [T, H] in hidden's dtype and on hidden's device: sum_n weight[n] * FFN_expert[n](hidden[token_index[n]]).
        With weights on a device and a host `hidden`, the input is copied there and the output back (synchronous).
        """
        weight = as_numpy(weight)
        table = self.slot[layer]
        slot = table[as_numpy(expert)]  # [N] row in the stacks (IndexError for ids >= num_experts)
        if layer not in self._holds_all and slot.shape[0] and slot.min() < 0:
            raise ValueError("assignment to an expert that is not held")
        if token_index is not None:
            token_index = as_numpy(token_index)
        if self.kernel == "fused":
            return _fused_forward(
                hidden, token_index, slot, weight, self.w13[layer], self.w2[layer], self.act, *self._biases(layer)
            )
        if token_index is None:
            T, N = hidden.shape[0], slot.shape[0]
            token_index = np.repeat(np.arange(T, dtype=np.int64), N // T if T else 0)  # [N] = n // K
        if self._accelerator is not None and hidden.device != self._accelerator:  # a host hidden: there and back
            out = moe_combine(
                hidden.to(self._accelerator),
                token_index,
                slot,
                weight,
                self.w13[layer],
                self.w2[layer],
                self.act,
                *self._biases(layer),
            )
            return out.to(hidden.device)
        return moe_combine(
            hidden, token_index, slot, weight, self.w13[layer], self.w2[layer], self.act, *self._biases(layer)
        )

    def forward_batch(self, batch: ForwardBatch) -> bytes:
        """The replica's path: a decoded request in, its output's wire bytes out.

        A whole-layer call on the fused kernel (the default plan's every call) is staged: nothing but the op itself
        touches torch (`_fused_staged`).

        Parameters
        ----------
        batch: validated by `codec.decode_forward` against these weights' held keys (or several such, merged by the
            coalescer).

        Returns
        -------
        The output [T, H] as raw little-endian bytes, in the batch's dtype.
        """
        T, N = batch.rows, batch.expert.shape[0]
        if self.kernel == "fused" and batch.whole_layer and N and batch.dtype == self.dtype and T <= _STAGING_MAX_ROWS:
            layer = batch.layer
            slot = batch.expert if layer in self._holds_all else self.slot[layer][batch.expert]  # [N]
            return _fused_staged(
                batch.hidden_data,
                slot,
                batch.weight,
                N // T,
                self.w13[layer],
                self.w2[layer],
                self.act,
                *self._biases(layer),
            )
        token_index = None if batch.whole_layer else batch.token_index
        return raw_bytes(self.forward(batch.layer, batch.hidden, token_index, batch.expert, batch.weight))


# ---- fused: vLLM's CPU fused-MoE op ---------------------------------------------------------------------------


class _FusedOp:
    """vLLM's `_C` extension, loaded on first use: the variant vLLM itself picks for this CPU
    (vllm/platforms/cpu.py: `_C` with AVX512-BF16, `_C_AVX512` with AVX512, `_C_AVX2` otherwise)."""

    isa = "vec"  # the portable vectorised path (fp32 and bf16); "amx" needs bf16 weights and AMX tiles
    alignment = 32  # hidden and intermediate sizes must be multiples of this (vLLM's output_alignment)

    def __init__(self):
        self._loaded: bool | None = None
        self.error = ""

    def available(self) -> bool:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def _load(self) -> bool:
        if hasattr(torch.ops._C, "cpu_fused_moe"):  # vLLM already imported in this process (the router)
            return True
        spec = importlib.util.find_spec("vllm")
        if spec is None or spec.origin is None:
            self.error = "vLLM is not installed"
            return False
        if torch.cpu._is_avx512_supported():
            name = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
        else:
            name = "_C_AVX2"
        library = Path(spec.origin).parent / f"{name}.abi3.so"
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            self.error = f"loading {library}: {exc}"
            return False
        if not hasattr(torch.ops._C, "cpu_fused_moe"):
            self.error = f"{library} has no cpu_fused_moe op"
            return False
        return True


_FUSED = _FusedOp()
# The op keeps per-process scratch memory: two calls at once (two in-process replicas, or a replica's loop and
# compute threads) corrupt each other or crash. One at a time per process; it parallelises inside over torch's
# intra-op threads anyway.
_FUSED_LOCK = threading.Lock()
_fused_ok: dict[tuple[torch.dtype, str, bool], bool] = {}


def _fused_prepack(w: torch.Tensor, isa: str) -> torch.Tensor:
    out = torch.empty_like(w)
    torch.ops._C.prepack_moe_weight(w.contiguous(), out, isa)
    return out


def _fused_forward(
    hidden: torch.Tensor,
    token_index: np.ndarray | None,
    slot: np.ndarray,
    weight: np.ndarray,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: GatedActivation,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assignments -> the fused op's [T, K] (ids, weights) form; K = the most assignments any token has here.
    `slot` [N] int32, every entry a held row (the caller checked); token_index None = the whole-layer form.

    A token with fewer than K assignments is padded with weight 0 on one of its own experts (adds exactly 0); one
    with none gets K weight-0 entries on some held expert (its output row is 0). The router's whole-layer call is
    already [T, K]. This runs once per Forward on the replica's latency path: every extra numpy or torch call here
    was measured to cost the round trip several times its own hot time (docs/benchmarks.md), so the whole-layer
    case makes exactly the tensors the op needs and nothing else."""
    T, H = hidden.shape
    N = slot.shape[0]
    if N == 0:
        return torch.zeros((T, H), dtype=hidden.dtype)
    x = hidden.contiguous() if hidden.dtype == w13.dtype else hidden.to(w13.dtype).contiguous()  # [T, H]
    ti = token_index
    w = weight if weight.dtype == np.float32 else weight.astype(np.float32)
    if ti is None:  # whole-layer: row n // K
        ids, gates = slot.reshape(T, N // T), w.reshape(T, N // T)  # [T, K] views, contiguous
    else:
        per_token = np.bincount(ti, minlength=T)  # [T]
        K = int(per_token.max())
        order = np.argsort(ti, kind="stable")  # [N] assignments grouped by token
        starts = np.zeros(T, dtype=np.int64)
        np.cumsum(per_token[:-1], out=starts[1:])
        sorted_ti = ti[order]
        col = np.arange(N) - starts[sorted_ti]  # [N] column within its token
        ids = np.zeros((T, K), dtype=np.int32)
        ids[:, :] = slot[order][np.minimum(starts, N - 1)][:, None]  # pad: the token's first expert
        ids[sorted_ti, col] = slot[order]
        gates = np.zeros((T, K), dtype=np.float32)
        gates[sorted_ti, col] = w[order]
    out = torch.empty((T, H), dtype=x.dtype)  # [T, H]
    with _FUSED_LOCK:
        torch.ops._C.cpu_fused_moe(
            out,
            x,
            w13,
            w2,
            w13_bias,
            w2_bias,
            torch.from_numpy(gates),
            torch.from_numpy(ids),
            False,
            act.fused_name,
            _FUSED.isa,
        )
    return out if out.dtype == hidden.dtype else out.to(hidden.dtype)


# A whole-layer call's op inputs and output live in persistent tensors, one set per (K, H, dtype) with views per
# row count, written and read through numpy views under _FUSED_LOCK: on the replica's latency path each torch call
# (from_numpy, empty, ...) right after the process woke up for the call costs far more than back to back, while
# numpy copies into existing buffers cost nothing measurable (docs/benchmarks.md). Capacity bounds the memory:
# 2 x rows x H floats + 2 x rows x K small ones per set.
_STAGING_MAX_ROWS = 256


class _Staging:
    def __init__(self, K: int, H: int, dtype: torch.dtype):
        R = _STAGING_MAX_ROWS
        self.x = torch.empty((R, H), dtype=dtype)  # [R, H]
        self.out = torch.empty((R, H), dtype=dtype)  # [R, H]
        self.ids = torch.empty((R, K), dtype=torch.int32)  # [R, K]
        self.gates = torch.empty((R, K), dtype=torch.float32)  # [R, K]
        self._views: dict[int, tuple] = {}

    def views(self, T: int) -> tuple:
        """(x, ids, gates, out) tensors of the first T rows, and numpy views (x words, flat ids, flat gates, out
        words) of the same memory; made once per T."""
        v = self._views.get(T)
        if v is None:
            x, ids, gates, out = self.x[:T], self.ids[:T], self.gates[:T], self.out[:T]
            words = (lambda t: t.numpy()) if x.dtype == torch.float32 else (lambda t: t.view(torch.int16).numpy())
            v = self._views[T] = (
                x,
                ids,
                gates,
                out,
                words(x),
                ids.numpy().reshape(-1),
                gates.numpy().reshape(-1),
                words(out),
            )
        return v


_STAGING: dict[tuple[int, int, torch.dtype], _Staging] = {}


def _fused_staged(
    hidden_words: np.ndarray,
    slot: np.ndarray,
    weight: np.ndarray,
    K: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: GatedActivation,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> bytes:
    """hidden_words [T, H] (float32, or bf16 as int16 words), slot/weight [T*K] in token order (every entry a held
    row) -> the op's output [T, H] as bytes."""
    T, H = hidden_words.shape
    with _FUSED_LOCK:
        staging = _STAGING.get((K, H, w13.dtype))
        if staging is None:
            staging = _STAGING[(K, H, w13.dtype)] = _Staging(K, H, w13.dtype)
        x, ids, gates, out, x_words, ids_flat, gates_flat, out_words = staging.views(T)
        x_words[...] = hidden_words  # [T, H]
        ids_flat[...] = slot  # [T*K] int32
        gates_flat[...] = weight  # [T*K] float32
        torch.ops._C.cpu_fused_moe(out, x, w13, w2, w13_bias, w2_bias, gates, ids, False, act.fused_name, _FUSED.isa)
        return out_words.tobytes()


def choose_kernel(
    requested: str | None,
    act: GatedActivation,
    dtype: torch.dtype,
    hidden: int,
    intermediate: int | None,
    device: torch.device | None = None,
    bias: bool = False,
) -> str:
    """Which implementation serves these weights.

    Parameters
    ----------
    requested: "auto", "fused", "torch", or None for $EXPERTMESH_EXPERT_KERNEL (default auto).
    act: the experts' activation.
    dtype: the weight/compute dtype.
    hidden, intermediate: H and I (the fused op needs multiples of its alignment).
    device: where the weights live (None: the host); the fused op runs on the host only.
    bias: whether the experts have biases (probed with them).

    Returns
    -------
    "fused" where the fused op runs and agrees with the torch path (auto or fused), else "torch". Raises ValueError
    for an unknown request, RuntimeError when "fused" is asked for and cannot run.
    """
    requested = (requested or settings.expert_kernel() or "auto").lower()
    if requested not in ("auto", "fused", "torch"):
        raise ValueError(f"EXPERTMESH_EXPERT_KERNEL={requested!r}: expected auto, fused or torch")
    if requested == "torch":
        return "torch"
    why: str | None
    if device is not None and device.type != "cpu":
        why = f"weights on {device} (the fused op is vLLM's CPU kernel)"
    else:
        why = _fused_unusable(act, dtype, hidden, intermediate, bias)
    if why is None:
        return "fused"
    if requested == "fused":
        raise RuntimeError(f"the fused expert kernel cannot run here: {why}")
    log.info("expert kernel: torch (%s)", why)
    return "torch"


def _fused_unusable(
    act: GatedActivation, dtype: torch.dtype, hidden: int, intermediate: int | None, bias: bool = False
) -> str | None:
    """Why the fused op cannot serve these weights, or None if it can."""
    if act.fused_name is None:
        return f"activation {act.name} with alpha {act.alpha}, limit {act.limit} (the fused op's are fixed)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype}"
    if intermediate is None or hidden % _FUSED.alignment or intermediate % _FUSED.alignment:
        return f"hidden {hidden} / intermediate {intermediate} not multiples of {_FUSED.alignment}"
    if not _FUSED.available():
        return _FUSED.error
    ok = _fused_ok.get((dtype, act.name, bias))
    if ok is None:  # probe once per (dtype, activation, bias) against the torch path: computing wrong rules it out
        g = torch.Generator().manual_seed(0)
        E, I, T, K = 3, _FUSED.alignment, 5, 2
        w13 = (torch.randn(E, 2 * I, _FUSED.alignment, generator=g) * 0.1).to(dtype)
        w2 = (torch.randn(E, _FUSED.alignment, I, generator=g) * 0.1).to(dtype)
        b13 = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if bias else None
        b2 = (torch.randn(E, _FUSED.alignment, generator=g) * 0.1).to(dtype) if bias else None
        x = torch.randn(T, _FUSED.alignment, generator=g).to(dtype)
        token_index = torch.arange(T).repeat_interleave(K)
        slot = torch.randint(E, (T * K,), generator=g)
        weight = torch.rand(T * K, generator=g)
        try:
            got = _fused_forward(
                x,
                token_index.numpy(),
                slot.numpy().astype(np.int32),
                weight.numpy(),
                _fused_prepack(w13, _FUSED.isa),
                _fused_prepack(w2, _FUSED.isa),
                act,
                b13,
                b2,
            )
            want = moe_combine(x, token_index, slot, weight, w13, w2, act, b13, b2)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok = bool(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))
        except RuntimeError:
            log.exception("probing the fused expert kernel")
            ok = False
        _fused_ok[(dtype, act.name, bias)] = ok
    return None if ok else f"the fused op disagrees with the torch kernel for {dtype}, {act.name}, bias={bias}"


# ---- torch: grouped matmuls -----------------------------------------------------------------------------------

# One op per expert group instead of a Python loop over experts (torch >= 2.8 has it on CPU too): faster than the
# loop on decode-sized calls and bitwise-equal to it (docs/benchmarks.md, "dispatch round trip"). The weights are
# passed as transposed *views* ([E, H, 2I] / [E, I, H]): with pre-transposed contiguous copies the CPU kernel takes
# another path that is not bitwise-equal to `x @ w.t()` for tiny groups.
_GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(torch, "_grouped_mm", None)
_grouped_mm_ok: dict[tuple[torch.device, torch.dtype], bool] = {}


def _grouped_mm_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Probe once per (device, dtype) whether torch._grouped_mm runs there (else the per-expert loop is used): on
    CUDA it takes only some dtypes and GPUs (bf16 on sm90+ in torch 2.8/2.9)."""
    ok = _grouped_mm_ok.get((device, dtype))
    if ok is None:
        ok = False
        if _GROUPED_MM is not None:
            try:
                x = torch.ones((3, 4), dtype=dtype, device=device)
                w = torch.ones((2, 5, 4), dtype=dtype, device=device)
                offs = torch.tensor([1, 3], dtype=torch.int32, device=device)
                y = _GROUPED_MM(x, w.transpose(1, 2), offs=offs)
                ok = y.shape == (3, 5) and bool((y == 4).all())
            except (RuntimeError, NotImplementedError):  # also the meta device: no values to check
                ok = False
        _grouped_mm_ok[(device, dtype)] = ok
    return ok


def moe_combine(
    hidden: torch.Tensor,
    token_index: np.ndarray | torch.Tensor,
    slot: np.ndarray | torch.Tensor,
    weight: np.ndarray | torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: GatedActivation | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped gated-MLP experts over assignments (the `torch` implementation, and the fused op's reference).

    Parameters
    ----------
    hidden: [T, H], on w13's device.
    token_index, slot: [N] ints (slot = row in w13/w2, every one >= 0); numpy or tensors (the bookkeeping is
        numpy on the host; the [N] rows and gates it gives are copied to the weights' device when that is not the
        host).
    weight: [N] gate weights.
    w13: [E, 2I, H] (rows as `act` reads them); w2: [E, H, I]; on one device.
    act: the experts' activation (default SiLU over [gate; up]).
    w13_bias: [E, 2I], w2_bias: [E, H], or None (no biases).

    Returns
    -------
    [T, H] in hidden's dtype on w13's device (accumulated in fp32):
    sum_n weight[n] * (w2[slot[n]] act(w13[slot[n]] x + b13) + b2).
    """
    with torch.inference_mode():
        return _moe_combine(
            hidden, token_index, slot, weight, w13, w2, act or GatedActivation("silu"), w13_bias, w2_bias
        )


def _moe_combine(hidden, token_index, slot, weight, w13, w2, act, w13_bias, w2_bias):
    T, H = hidden.shape
    s, token_index, weight = as_numpy(slot), as_numpy(token_index), as_numpy(weight)  # [N] each
    N = s.shape[0]
    on_host = w13.is_cpu
    if on_host:
        out = torch.zeros((T, H), dtype=torch.float32)  # [T, H] fp32 accumulator
    else:
        out = torch.zeros((T, H), dtype=torch.float32, device=w13.device)
    if N == 0:
        return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)
    # Index bookkeeping on [N] ints in numpy: a numpy op on a small array is cheaper than a torch op, and a decode
    # step's kernel is mostly such small ops around two matmuls. Each expert's rows go through their own matmul (never
    # padded or batched with other experts' rows), so an output does not depend on which other experts the
    # replica holds or the call uses: any placement gives the same bits.
    if s.min() < 0:
        raise ValueError("assignment to an expert that is not held")
    counts = np.bincount(s, minlength=w13.shape[0])  # [E]
    order = np.argsort(s, kind="stable")  # [N] assignments grouped by expert
    rows = torch.from_numpy(token_index[order].astype(np.int64))  # [N] token of each sorted assignment
    gate = torch.from_numpy(weight[order].astype(np.float32, copy=False))  # [N]
    if not on_host:  # [N] each, small: one copy apiece to where the weights are
        rows, gate = rows.to(w13.device), gate.to(w13.device)
    x = hidden.index_select(0, rows)  # [N, H]
    if x.dtype != w13.dtype:
        x = x.to(w13.dtype)
    y = _grouped_ffn(x, torch.from_numpy(counts), w13, w2, act, w13_bias, w2_bias)  # [N, H]
    if y.dtype != torch.float32:
        y = y.float()
    y.mul_(gate.unsqueeze(1))  # gate-weighted, in place
    out.index_add_(0, rows, y)
    return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)


def _grouped_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: GatedActivation,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [N, H] sorted by expert, counts [E] -> [N, H]: each expert's FFN over its own rows, exactly N rows."""
    if _grouped_mm_works(w13.dtype, w13.device):
        assert _GROUPED_MM is not None  # _grouped_mm_works found it
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] group ends
        if not w13.is_cpu:
            offs = offs.to(w13.device)
        gu = _GROUPED_MM(x, w13.transpose(1, 2), offs=offs)  # [N, 2I]
        row_expert = None
        if w13_bias is not None:
            row_expert = torch.repeat_interleave(torch.arange(w13.shape[0], device=w13.device), counts.to(w13.device))
            gu = gu + w13_bias.index_select(0, row_expert)  # [N, 2I]
        y = _GROUPED_MM(act(gu), w2.transpose(1, 2), offs=offs)  # [N, H]
        if w2_bias is not None:
            assert row_expert is not None  # the checkpoint has both biases or neither (vLLM's has_bias)
            y = y + w2_bias.index_select(0, row_expert)
        return y
    y = torch.empty((x.shape[0], w2.shape[1]), dtype=w13.dtype, device=x.device)  # [N, H]
    start = 0
    for e, n in enumerate(counts.tolist()):  # counts on the host: no device sync per expert
        if n == 0:
            continue
        gu = x[start : start + n] @ w13[e].t()  # [n, 2I]
        if w13_bias is not None:
            gu = gu + w13_bias[e]
        h = act(gu) @ w2[e].t()  # [n, H]
        y[start : start + n] = h if w2_bias is None else h + w2_bias[e]
        start += n
    return y
