"""Reading a Hugging Face MoE checkpoint: its MoE structure, and one (layer, expert)'s weights, lazily.

No family is described here. What a checkpoint holds, and where each routed expert's tensors are, comes from its
expert manifest (manifest.py): a record of vLLM's own weight loading for that checkpoint. `read_moe_info` gives the
structure (MoE layers, expert count, sizes, top-k, activation); `CheckpointReader.load_expert` replays the
manifest's writes for one (layer, expert) and returns its weights in vLLM's FusedMoE layout, the one the expert
kernel takes: w13 [2I, H] (gate rows then up rows for "silu"; interleaved for "swigluoai"), w2 [H, I], and the
biases where the family has them. Only the bytes that expert needs are read, with `safe_open` slices (a fused
[E, ...] tensor is read one expert's rows at a time); nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from expertmesh.core.manifest import CheckpointError, ExpertManifest, Step, View, manifest_for, weight_files

__all__ = ["CheckpointError", "CheckpointReader", "ExpertTensors", "MoEInfo", "read_moe_info"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MoEInfo:
    """The MoE structure of a checkpoint, as vLLM builds it."""

    path: Path
    model_type: str
    num_layers: int
    moe_layers: list[int]  # indices of layers with routed experts
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per routed expert
    activation: str  # vLLM's MoEActivation value ("silu", "swigluoai", "gelu", ...)
    dtype: torch.dtype
    has_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's three matrices in the checkpoint dtype."""
        return 3 * self.hidden_size * self.intermediate_size * torch.empty((), dtype=self.dtype).element_size()

    def keys(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer in self.moe_layers for e in range(self.num_experts)]


def info_of(path: Path, manifest: ExpertManifest) -> MoEInfo:
    return MoEInfo(
        path=path,
        model_type=manifest.model_type,
        num_layers=manifest.num_layers,
        moe_layers=manifest.moe_layers,
        num_experts=manifest.num_experts,
        top_k=manifest.top_k,
        hidden_size=manifest.hidden_size,
        intermediate_size=manifest.intermediate_size,
        activation=manifest.activation,
        dtype=_DTYPES.get(manifest.dtype, torch.float32),
        has_bias=manifest.has_bias,
        swiglu_limit=manifest.swiglu_limit,
        swiglu_alpha=manifest.swiglu_alpha,
    )


def read_moe_info(path: str | Path) -> MoEInfo:
    """Describe the MoE structure of the checkpoint at `path` (from its expert manifest; a config-only directory
    is enough)."""
    path = Path(path)
    return info_of(path, manifest_for(path))


class ExpertTensors(NamedTuple):
    """One routed expert's weights in vLLM's FusedMoE layout (biases None where the family has none)."""

    w13: torch.Tensor  # [2I, H]
    w2: torch.Tensor  # [H, I]
    w13_bias: torch.Tensor | None  # [2I]
    w2_bias: torch.Tensor | None  # [H]


class CheckpointReader:
    """Lazy access to the routed-expert weights of a checkpoint, one (layer, expert) at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = manifest_for(self.path)
        self.info = info_of(self.path, self.manifest)
        self._weight_map = weight_files(self.path)
        # A write whose chain copies (a de-interleave, a transpose made contiguous) is replayed over its whole
        # tensor; the result serves every expert of that tensor, so the last few are kept.
        self._replayed: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def load_expert(self, layer: int, expert: int) -> ExpertTensors:
        info = self.info
        if layer not in info.moe_layers:
            raise CheckpointError(f"layer {layer} is not an MoE layer (MoE layers: {info.moe_layers})")
        if not 0 <= expert < info.num_experts:
            raise CheckpointError(f"expert {expert} out of range [0, {info.num_experts})")
        if not self._weight_map:
            raise CheckpointError(f"{self.path}: the checkpoint has no weights (config only)")
        params = ("w13_weight", "w2_weight", "w13_bias", "w2_bias") if info.has_bias else ("w13_weight", "w2_weight")
        out: dict[str, torch.Tensor | None] = {"w13_bias": None, "w2_bias": None}
        for param in params:
            out[param] = self._assemble(layer, expert, param)
        return ExpertTensors(out["w13_weight"], out["w2_weight"], out["w13_bias"], out["w2_bias"])

    def _assemble(self, layer: int, expert: int, param: str) -> torch.Tensor:
        """`expert`'s slice of `param`, filled by replaying the manifest's writes into it."""
        shape = self.manifest.param_shape(param)
        block = math.prod(shape)
        buffer = torch.empty(block, dtype=self.info.dtype)
        writes = self.manifest.writes_into(layer, expert, param)
        missing = self.manifest.unwritten(layer, expert, param)
        if missing or not writes:
            raise CheckpointError(
                f"{self.path}: layer {layer} expert {expert} {param}: {missing or block} of {block} values have no "
                "tensor in the checkpoint"
            )
        for write, index in writes:
            dst = write.dst
            if index is None:
                local = View(dst.size, dst.stride, dst.offset - expert * block)
            else:
                local = View(dst.size[1:], dst.stride[1:], dst.offset + index * dst.stride[0] - expert * block)
            src = self._replay(write.tensor, write.chain, index)
            torch.as_strided(buffer, local.size, local.stride, local.offset).copy_(src)
        return buffer.view(shape)

    def _replay(self, name: str, chain: tuple[Step, ...], index: int | None) -> torch.Tensor:
        """The checkpoint tensor `name` through `chain` (then `[index]`), reading as little of it as possible."""
        if len(chain) == 1:  # a view of the stored tensor: select the expert in the view, read only its rows
            view = chain[0].view
            if index is not None:
                view = View(view.size[1:], view.stride[1:], view.offset + index * view.stride[0])
            base, offset = self._read_rows(name, view)
            return torch.as_strided(base, view.size, view.stride, offset)
        key = (name, chain)
        whole = self._replayed.get(key)
        if whole is None:
            base, offset = self._read_rows(name, chain[0].view)
            current = torch.as_strided(base, chain[0].view.size, chain[0].view.stride, offset)
            for step, nxt in zip(chain, chain[1:]):
                assert step.out_stride is not None
                fresh = torch.empty_strided(current.shape, step.out_stride, dtype=current.dtype)
                fresh.copy_(current)
                current = torch.as_strided(fresh, nxt.view.size, nxt.view.stride, nxt.view.offset)
            whole = current
            self._replayed[key] = whole
            while len(self._replayed) > 4:
                self._replayed.popitem(last=False)
        return whole if index is None else whole[index]

    def _read_rows(self, name: str, view: View) -> tuple[torch.Tensor, int]:
        """The rows of stored tensor `name` that `view` touches, and the view's storage offset into them (a read
        may be a view into a larger buffer: as_strided offsets count from that buffer's start)."""
        shard = self._weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} (named by the expert manifest) is not in the checkpoint")
        with safe_open(self.path / shard, framework="pt") as f:
            piece = f.get_slice(name)
            shape = piece.get_shape()
            if len(shape) == 0:
                rows = f.get_tensor(name).reshape(1)
                return rows, view.offset + rows.storage_offset()
            row = 1
            for d in shape[1:]:
                row *= d
            lo, hi = view.span()
            first, last = lo // row, hi // row + 1
            rows = piece[first:last].contiguous().reshape(-1)
            return rows, view.offset - first * row + rows.storage_offset()
