"""Reading a Hugging Face MoE checkpoint: its MoE structure, and one (layer, expert)'s FFN weights, lazily.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3. A checkpoint is a directory with
`config.json` and `model.safetensors` or shards + `model.safetensors.index.json`. Expert weights are read
with `safe_open` one tensor (or one slice of a fused 3-D tensor) at a time — never a whole file — whether
the checkpoint stores experts per expert (`...experts.{e}.gate_proj.weight`, Mixtral `w1/w3/w2`) or fused
(`...experts.gate_up_proj` [E, 2I, H] gate rows first, `...experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: unsupported architecture, missing shard, wrong tensor shape."""


@dataclass(frozen=True)
class FamilySpec:
    """How one model family names its MoE config fields and tensors."""

    model_types: tuple[str, ...]
    experts_field: str  # config field with the number of routed experts (see _EXPERT_FIELDS)
    intermediate_field: str
    moe_prefix: str  # module holding the routed experts, under model.layers.{l}.
    per_expert: tuple[str, str, str]  # (gate, up, down) tensor names under experts.{e}.
    shared_field: str | None = None  # config field giving shared-expert size / count


FAMILIES = {
    "mixtral": FamilySpec(
        ("mixtral",), "num_local_experts", "intermediate_size", "block_sparse_moe", ("w1", "w3", "w2")
    ),
    "qwen2_moe": FamilySpec(
        ("qwen2_moe",),
        "num_experts",
        "moe_intermediate_size",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "shared_expert_intermediate_size",
    ),
    "qwen3_moe": FamilySpec(
        ("qwen3_moe",), "num_experts", "moe_intermediate_size", "mlp", ("gate_proj", "up_proj", "down_proj")
    ),
    "olmoe": FamilySpec(("olmoe",), "num_experts", "intermediate_size", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": FamilySpec(
        ("deepseek_v2",),
        "n_routed_experts",
        "moe_intermediate_size",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "n_shared_experts",
    ),
    "deepseek_v3": FamilySpec(
        ("deepseek_v3",),
        "n_routed_experts",
        "moe_intermediate_size",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "n_shared_experts",
    ),
}
SUPPORTED = sorted(FAMILIES)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MoEInfo:
    """The MoE structure of a checkpoint."""

    path: Path
    model_type: str
    num_layers: int
    moe_layers: list[int]  # indices of layers whose MLP is a routed MoE block
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per routed expert
    hidden_act: str
    dtype: torch.dtype
    shared_experts: int = 0  # count (DeepSeek) or 1 (Qwen2-MoE); computed in the router, never remote
    shared_intermediate_size: int = 0
    config: dict = field(default_factory=dict, repr=False)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's three matrices in the checkpoint dtype."""
        return 3 * self.hidden_size * self.intermediate_size * torch.empty((), dtype=self.dtype).element_size()

    def keys(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer in self.moe_layers for e in range(self.num_experts)]


def _moe_layers(model_type: str, cfg: dict, num_layers: int) -> list[int]:
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    if model_type in ("deepseek_v2", "deepseek_v3"):
        first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
        freq = int(cfg.get("moe_layer_freq", 1) or 1)
        return [i for i in range(num_layers) if i >= first_dense and i % freq == 0]
    return list(range(num_layers))


_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _num_experts(cfg: dict, spec: FamilySpec) -> int:
    # transformers renames between releases (Qwen3-MoE saves num_local_experts or num_experts): accept any.
    for name in (spec.experts_field, *_EXPERT_FIELDS):
        if cfg.get(name):
            return int(cfg[name])
    raise CheckpointError(f"config.json names no expert count (looked for {spec.experts_field})")


def read_moe_info(path: str | Path) -> MoEInfo:
    """Describe the MoE structure of the checkpoint at `path` (reads config.json only)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg) if "model_type" not in cfg else cfg
    model_type = cfg.get("model_type", "")
    if model_type not in FAMILIES:
        archs = cfg.get("architectures")
        raise CheckpointError(
            f"{path}: unsupported architecture model_type={model_type!r} architectures={archs}; "
            f"supported model types: {', '.join(SUPPORTED)}"
        )
    spec = FAMILIES[model_type]
    num_layers = int(cfg["num_hidden_layers"])
    shared = 0
    shared_size = 0
    if model_type == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
        shared, shared_size = 1, int(cfg["shared_expert_intermediate_size"])
    elif model_type.startswith("deepseek") and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"])
        shared_size = shared * int(cfg["moe_intermediate_size"])
    dtype_name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return MoEInfo(
        path=path,
        model_type=model_type,
        num_layers=num_layers,
        moe_layers=_moe_layers(model_type, cfg, num_layers),
        num_experts=_num_experts(cfg, spec),
        top_k=int(cfg["num_experts_per_tok"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg[spec.intermediate_field]),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        dtype=_DTYPES.get(dtype_name, torch.float32),
        shared_experts=shared,
        shared_intermediate_size=shared_size,
        config=cfg,
    )


class CheckpointReader:
    """Lazy access to the routed-expert FFN weights of a checkpoint, one (layer, expert) at a time."""

    def __init__(self, path: str | Path):
        self.info = read_moe_info(path)
        self.path = Path(path)
        self._weight_map = self._read_weight_map()
        self._spec = FAMILIES[self.info.model_type]

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise CheckpointError(f"{self.path}: shard {shard} named in the index is missing")
        return weight_map

    def _get(self, name: str, index: int | None = None) -> torch.Tensor:
        shard = self._weight_map[name]
        with safe_open(self.path / shard, framework="pt") as f:
            if index is None:
                return f.get_tensor(name)
            return f.get_slice(name)[index]

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self._spec.moe_prefix}.experts"

    def _find_fused(self, layer: int) -> tuple[str, str] | None:
        for prefix in (self._prefix(layer), f"model.layers.{layer}.mlp.experts"):
            gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
            if gate_up in self._weight_map and down in self._weight_map:
                return gate_up, down
        return None

    def load_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of one routed expert, in the checkpoint's dtype."""
        info = self.info
        if layer not in info.moe_layers:
            raise CheckpointError(f"layer {layer} is not an MoE layer (MoE layers: {info.moe_layers})")
        if not 0 <= expert < info.num_experts:
            raise CheckpointError(f"expert {expert} out of range [0, {info.num_experts})")
        H, I = info.hidden_size, info.intermediate_size
        fused = self._find_fused(layer)
        if fused is not None:
            gate_up = self._get(fused[0], expert)  # [2I, H]
            down = self._get(fused[1], expert)  # [H, I]
            gate, up = gate_up[:I], gate_up[I:]
        else:
            names = [f"{self._prefix(layer)}.{expert}.{n}.weight" for n in self._spec.per_expert]
            missing = [n for n in names if n not in self._weight_map]
            if missing:
                raise CheckpointError(f"{self.path}: tensors missing for layer {layer} expert {expert}: {missing}")
            gate, up, down = (self._get(n) for n in names)
        for what, t, shape in (("gate", gate, (I, H)), ("up", up, (I, H)), ("down", down, (H, I))):
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{self.path}: layer {layer} expert {expert} {what} has shape {list(t.shape)}, "
                    f"expected {list(shape)} from config.json"
                )
        return gate, up, down

    def routed_expert_tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint that holds routed-expert weights (the router must skip them)."""
        pattern = re.compile(r"\.experts\.(\d+\.)?(w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)")
        return [n for n in self._weight_map if pattern.search(n)]
