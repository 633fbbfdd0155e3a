"""vLLM's engine arguments for a checkpoint (`router.vllm_args`), and that the router applies them: an fp32 MLA model
on CPU gets the CPU_MLA attention backend (vLLM's CPU platform picks AMX_MLA where AMX exists, and AMX_MLA takes only
bf16/fp16/int8), anything else vLLM's own choice; the dtype is the checkpoint's."""

from __future__ import annotations

import json
import logging


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


def test_router_takes_the_checkpoints_dtype_and_backend(tiny_checkpoint, monkeypatch):
    """router/openai_server.prepare: `--dtype auto` becomes the checkpoint's dtype and, for fp32 MLA on CPU, the
    CPU_MLA backend; a user's own --attention-backend wins."""
    from expertmesh.router import openai_server

    for name in ("EXPERTMESH_EXPERT_MODE", "EXPERTMESH_DIRECTORY", "EXPERTMESH_COUNTERS_FILE"):
        monkeypatch.delenv(name, raising=False)
    parser = openai_server.make_parser()
    mla = str(tiny_checkpoint("deepseek_v3"))
    args = openai_server.prepare(parser.parse_args([mla, "--expert-mode", "local"]))
    assert (args.dtype, args.attention_backend) == ("float32", "CPU_MLA")
    own = openai_server.prepare(parser.parse_args([mla, "--expert-mode", "local", "--attention-backend", "TORCH_SDPA"]))
    assert own.attention_backend == "TORCH_SDPA"
    plain = openai_server.prepare(parser.parse_args([str(tiny_checkpoint("mixtral")), "--expert-mode", "local"]))
    assert (plain.dtype, plain.attention_backend) == ("float32", None)


def test_saved_dtype_reads_the_config_in_vllms_order():
    """The checkpoint's dtype as vLLM itself reads it (`get_torch_dtype`): the root config's first, a multimodal
    model's `text_config` only where the root says nothing; "auto" (vLLM then reads the shards) where neither does."""
    import vllm.config  # noqa: F401 - vLLM's config package first (its modules import each other in this order)
    from transformers import Llama4Config
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    from expertmesh.router.vllm_args import saved_dtype

    for root, text in (("float32", "bfloat16"), (None, "bfloat16"), ("float16", None)):
        config = Llama4Config()
        config.dtype = root
        config.text_config.dtype = text
        vllms = ModelArchConfigConvertorBase.get_torch_dtype(config, "/nonexistent", None, "hf")
        assert saved_dtype(config.to_dict()) == str(vllms).removeprefix("torch."), (root, text)
    assert saved_dtype({"text_config": {}}) == "auto"
