"""The expert kernel: a batch of (token, expert, gate weight) assignments through SwiGLU expert FFNs.

Every family here uses the same gated FFN, `down(act(gate(x)) * up(x))`, with `act` from the config
(SiLU for all five); only names and routing differ, and routing stays in the router. Assignments are
sorted by expert so each expert runs one matmul over all its tokens — all experts in one
`torch._grouped_mm` where this torch has it on CPU (else a loop over experts, never over tokens); results
are scaled by the gate weight and summed per token with one index_add.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from expertmesh.core.checkpoint import CheckpointReader

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ExpertWeights:
    """The FFN weights of a set of (layer, expert) keys, stacked per layer.

    w13[layer]: [E_held, 2I, H] (gate rows first, then up), w2[layer]: [E_held, H, I];
    slot[layer]: [num_experts] int64 mapping expert id -> row in the stack (-1 = not held).
    """

    def __init__(self, reader: CheckpointReader, keys: dict[int, list[int]], dtype: torch.dtype | None = None):
        info = reader.info
        self.hidden_size = info.hidden_size
        self.num_experts = info.num_experts
        self.dtype = dtype or info.dtype
        act = info.hidden_act
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} (supported: {sorted(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.held: dict[int, frozenset[int]] = {}
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        self.slot: dict[int, torch.Tensor] = {}
        for layer, experts in sorted(keys.items()):
            experts = sorted(set(int(e) for e in experts))
            gates, downs = [], []
            for e in experts:
                gate, up, down = reader.load_expert(layer, e)
                gates.append(torch.cat([gate, up], dim=0).to(self.dtype))  # [2I, H]
                downs.append(down.to(self.dtype))                          # [H, I]
            self.w13[layer] = torch.stack(gates)  # [E_held, 2I, H]
            self.w2[layer] = torch.stack(downs)   # [E_held, H, I]
            slot = torch.full((info.num_experts,), -1, dtype=torch.long)
            slot[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
            self.slot[layer] = slot
            self.held[layer] = frozenset(experts)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.w13, self.w2) for t in d.values())

    def forward(self, layer: int, hidden: torch.Tensor, token_index: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], token_index/expert/weight [N] -> [T, H] = sum_n weight[n] * FFN_expert[n](hidden[row])."""
        return moe_combine(hidden, token_index, self.slot[layer][expert], weight,
                           self.w13[layer], self.w2[layer], self.act)


# One op per expert group instead of a Python loop over experts (torch >= 2.8 has it on CPU too). Measured on
# 64 tokens x top-2 x 8 experts, hidden 128: ~38 % faster than the loop and bitwise-equal to it (see
# docs/benchmarks.md, "dispatch round trip"). The weights are passed as transposed *views* ([E, H, 2I] /
# [E, I, H]): with pre-transposed contiguous copies the CPU kernel takes another path that is not bitwise-equal
# to `x @ w.t()` for tiny groups.
_GROUPED_MM = getattr(torch, "_grouped_mm", None)
_grouped_mm_ok: dict[torch.dtype, bool] = {}


def _grouped_mm_works(dtype: torch.dtype) -> bool:
    """Probe once per dtype whether torch._grouped_mm runs on CPU (else the per-expert loop is used)."""
    ok = _grouped_mm_ok.get(dtype)
    if ok is None:
        ok = False
        if _GROUPED_MM is not None:
            try:
                x = torch.ones((3, 4), dtype=dtype)
                w = torch.ones((2, 5, 4), dtype=dtype)
                y = _GROUPED_MM(x, w.transpose(1, 2), offs=torch.tensor([1, 3], dtype=torch.int32))
                ok = y.shape == (3, 5) and bool((y == 4).all())
            except (RuntimeError, NotImplementedError):
                ok = False
        _grouped_mm_ok[dtype] = ok
    return ok


def moe_combine(hidden: torch.Tensor, token_index: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, act=F.silu) -> torch.Tensor:
    """Grouped SwiGLU over assignments.

    hidden [T, H]; token_index, slot [N] int64 (slot = row in w13/w2); weight [N];
    w13 [E, 2I, H]; w2 [E, H, I]. Returns [T, H] in hidden's dtype (accumulated in fp32).
    """
    with torch.inference_mode():
        return _moe_combine(hidden, token_index, slot, weight, w13, w2, act)


def _moe_combine(hidden, token_index, slot, weight, w13, w2, act):
    T, H = hidden.shape
    N = slot.numel()
    out = torch.zeros((T, H), dtype=torch.float32)                             # [T, H] fp32 accumulator
    if N == 0:
        return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)
    # Index bookkeeping on [N] ints in numpy: an op there costs ~1 us, a torch op ~5 us, and a decode step's
    # kernel is mostly such small ops around two matmuls. Each expert's rows go through their own matmul (never
    # padded or batched with other experts' rows), so an output does not depend on which other experts the
    # replica holds or the call uses: any placement gives the same bits.
    s = slot.numpy()                                                           # [N]
    if s.min() < 0:
        raise ValueError("assignment to an expert that is not held")
    counts = np.bincount(s, minlength=w13.shape[0])                            # [E]
    order = np.argsort(s, kind="stable")                                       # [N] assignments grouped by expert
    rows = torch.from_numpy(token_index.numpy()[order])                        # [N] token of each sorted assignment
    gate = torch.from_numpy((weight if weight.dtype == torch.float32 else weight.float()).numpy()[order])  # [N]
    x = hidden.index_select(0, rows)                                           # [N, H]
    if x.dtype != w13.dtype:
        x = x.to(w13.dtype)
    y = _grouped_ffn(x, torch.from_numpy(counts), w13, w2, act)                # [N, H]
    if y.dtype != torch.float32:
        y = y.float()
    y.mul_(gate.unsqueeze(1))                                                  # gate-weighted, in place
    out.index_add_(0, rows, y)
    return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)


def _grouped_ffn(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act) -> torch.Tensor:
    """x [N, H] sorted by expert, counts [E] -> [N, H]: each expert's FFN over its own rows, exactly N rows."""
    I = w2.shape[2]
    if _grouped_mm_works(w13.dtype):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)                     # [E] group ends
        gu = _GROUPED_MM(x, w13.transpose(1, 2), offs=offs)                     # [N, 2I]
        return _GROUPED_MM(act(gu[:, :I]) * gu[:, I:], w2.transpose(1, 2), offs=offs)  # [N, H]
    y = torch.empty((x.shape[0], w2.shape[1]), dtype=w13.dtype)               # [N, H]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        gu = x[start:start + n] @ w13[e].t()                                  # [n, 2I]
        y[start:start + n] = (act(gu[:, :I]) * gu[:, I:]) @ w2[e].t()         # [n, H]
        start += n
    return y
