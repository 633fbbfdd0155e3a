"""The vLLM engine arguments this project uses for a checkpoint, computed in one place.

The router's engine (`router.engine`) and every reference `vllm.LLM` (parity tests, benchmarks) take their dtype
and attention backend from `engine_kwargs`, so both sides of a comparison run the same kernels:

- dtype: the checkpoint's own (vLLM's "auto" picks bf16 on CPU even for an fp32 checkpoint, and exactness
  tests need fp32);
- hf_overrides: the architecture name vLLM registers, where transformers 5 renamed it (core/manifest.py's
  ARCHITECTURE_ALIASES, e.g. PhiMoE);
- attention backend: for an MLA model (DeepSeek-V2/V3 style: `kv_lora_rank` in its config) in fp32 on a CPU
  platform, `CPU_MLA`. vLLM's CPU platform (`vllm/platforms/cpu.py`, `CpuPlatform.get_attn_backend_cls`) picks
  `AMX_MLA` for every MLA model on an x86 CPU with AMX tiles unless `CPU_MLA` was asked for, and AMX_MLA's
  `process_weights_after_loading` refuses fp32 weights (only bf16/fp16/int8/fp8/uint8). Without AMX vLLM picks
  `CPU_MLA` itself, so naming it changes nothing there. Anything else keeps vLLM's own choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("expertmesh.router.vllm_args")

CPU_MLA_BACKEND = "CPU_MLA"
_FP32 = {"float32", "float", "fp32", "torch.float32"}


def checkpoint_config(model_dir: str | Path) -> dict:
    """The checkpoint's config (config.json, or Mistral's params.json as vLLM reads it); {} if it has none."""
    from expertmesh.core.manifest import config_file, read_config

    return read_config(Path(model_dir)) if config_file(Path(model_dir)) is not None else {}


def text_config(config: dict) -> dict:
    """`config` with a multimodal model's `text_config` merged over it."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def saved_dtype(config: dict) -> str:
    """The dtype the checkpoint was saved in ("float32", "bfloat16", ...), "auto" if `config` does not say. In vLLM's
    order (`get_torch_dtype`): the root config's, then a multimodal model's `text_config`'s."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None and isinstance(config.get("text_config"), dict):
        dtype = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return str(dtype) if dtype else "auto"


def is_mla(config: dict) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3 style): what vLLM's `ModelConfig.use_mla` keys on."""
    return config.get("kv_lora_rank") is not None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(
    model_dir: str | Path, dtype: str | None = None, cpu: bool | None = None, config: dict | None = None
) -> dict:
    """Keyword arguments for `vllm.LLM(...)` / `EngineArgs(...)`: {"dtype": ...} plus, for an fp32 MLA model on a
    CPU platform, {"attention_config": {"backend": "CPU_MLA"}}.

    `dtype` overrides the checkpoint's own; `cpu` overrides the platform check (None: ask vLLM's platform);
    `config`: the checkpoint's config where the caller has read it already (else it is read here).
    """
    from expertmesh.core.manifest import architecture_overrides

    if config is None:  # read once: for params.json it is vLLM's parser, which reads the shards
        config = checkpoint_config(model_dir)
    dtype = dtype or saved_dtype(config)
    kwargs: dict = {"dtype": dtype}
    overrides = architecture_overrides(config)
    if overrides:  # an architecture name transformers 5 renamed and vLLM registers under its older name
        kwargs["hf_overrides"] = overrides
    if is_mla(text_config(config)) and dtype in _FP32 and (_on_cpu() if cpu is None else cpu):
        kwargs["attention_config"] = {"backend": CPU_MLA_BACKEND}
        log.info("attention backend CPU_MLA: fp32 MLA model; AMX_MLA takes only bf16/fp16/int8")
    return kwargs
