"""The expert manifest (core/manifest.py): vLLM's own load pass, recorded on the meta device, says where every routed
expert's weights are; a checkpoint that cannot be served gets an error naming the tensor or the reason.

Each case runs the real recording pass (vLLM builds the model on the meta device in a subprocess) on a tiny
checkpoint edited the way a broken download or a wrong manifest would be.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertmesh.core import manifest as manifest_mod
from expertmesh.core.checkpoint import CheckpointError, CheckpointReader, read_moe_info

pytestmark = pytest.mark.slow


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """A cache of its own, so each case records its checkpoint instead of reading another test's manifest."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    manifest_mod._memo.clear()
    manifest_mod._by_stamp.clear()
    yield tmp_path / "cache"
    manifest_mod._memo.clear()
    manifest_mod._by_stamp.clear()


def _rewrite(src, dst, edit):
    """Copy checkpoint `src` to `dst` with its tensors passed through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(edit(tensors), dst / "model.safetensors")
    return dst


def test_the_manifest_is_recorded_once_and_cached(tiny_checkpoint, private_cache):
    path = tiny_checkpoint("qwen3_moe")
    manifest = manifest_mod.manifest_for(path)
    cached = list((private_cache / "expertmesh" / "manifests").glob("*.json"))
    assert [p.stem for p in cached] == [manifest_mod.cache_key(manifest.key, manifest_mod._vllm_version())]
    assert manifest.architecture == "Qwen3MoeForCausalLM" and manifest.activation == "silu"
    # every expert of every MoE layer is written from the checkpoint, gate and up rows and down
    for layer in manifest.moe_layers:
        for e in range(manifest.num_experts):
            assert manifest.unwritten(layer, e, "w13_weight") == 0 and manifest.unwritten(layer, e, "w2_weight") == 0
    manifest_mod._memo.clear()
    manifest_mod._by_stamp.clear()
    assert manifest_mod.manifest_for(path).to_json() == manifest.to_json()  # read back, not recorded again


def test_a_dense_model_is_refused(tiny_checkpoint, tmp_path, private_cache):
    dense = tmp_path / "dense"
    shutil.copytree(tiny_checkpoint("mixtral"), dense)
    config = json.loads((dense / "config.json").read_text())
    config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="without any routed-expert"):
        read_moe_info(dense)


@pytest.mark.parametrize("model_type", ["ernie4_5_moe", "minimax_m2", "nemotron_h", "qwen3_next", "deepseek_v4"])
def test_families_vllm_cannot_run_right_on_cpu_are_refused_with_the_reason(tiny_checkpoint, tmp_path, model_type):
    path = tmp_path / model_type
    shutil.copytree(tiny_checkpoint("mixtral"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
    with pytest.raises(CheckpointError, match=f"model_type '{model_type}' is not served here: .*vLLM"):
        read_moe_info(path)


def test_sparse_attention_is_refused_whatever_the_model_type(tiny_checkpoint, tmp_path):
    """DeepSeek-V3.2 and its kin (a lightning indexer: `index_topk`): vLLM's CPU platform has no backend for it."""
    path = tmp_path / "v32"
    shutil.copytree(tiny_checkpoint("deepseek_v3"), path)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "deepseek_v32", "index_topk": 8, "index_n_heads": 4, "index_head_dim": 64}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'deepseek_v32' is not served here: .*Sparse Attention"):
        read_moe_info(path)


def test_phimoe_without_attention_biases_is_refused(tiny_checkpoint, tmp_path):
    """vLLM's PhiMoE leaves attention biases uninitialised when a checkpoint has none: refused, saying why."""
    path = tmp_path / "phimoe"
    shutil.copytree(tiny_checkpoint("phimoe"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"attention_bias": False}))
    with pytest.raises(CheckpointError, match="model_type 'phimoe' is not served here: .*uninitialised"):
        read_moe_info(path)


def test_a_missing_expert_tensor_is_named(tiny_checkpoint, tmp_path, private_cache):
    gone = "model.layers.1.mlp.experts.5.up_proj.weight"
    path = _rewrite(
        tiny_checkpoint("qwen3_moe"), tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != gone}
    )
    with pytest.raises(
        CheckpointError,
        match="layer 1 expert 5 w13_weight: 8192 of 16384 values never loaded by vLLM: a tensor for it is missing",
    ):
        read_moe_info(path)


def test_a_misshaped_expert_tensor_is_named(tiny_checkpoint, tmp_path, private_cache):
    bad = "model.layers.0.mlp.experts.2.down_proj.weight"

    def shrink(tensors):
        tensors[bad] = tensors[bad][:, :40].contiguous()
        return tensors

    path = _rewrite(tiny_checkpoint("qwen3_moe"), tmp_path / "misshaped", shrink)
    with pytest.raises(
        CheckpointError, match=f"layer 0 expert 2 w2_weight: .* too small \\(loaded from: {bad} \\[128, 40\\]\\)"
    ):
        read_moe_info(path)


def test_a_manifest_that_disagrees_with_the_checkpoint_is_refused(tiny_checkpoint, tmp_path, private_cache):
    src = tiny_checkpoint("qwen3_moe")
    shipped = tmp_path / "shipped"
    shutil.copytree(src, shipped)
    good = manifest_mod.manifest_for(src)
    (shipped / manifest_mod.SHIPPED_NAME).write_text(good.to_json())
    reader = CheckpointReader(shipped)  # a shipped manifest that matches: used as is
    assert torch.equal(reader.load_expert(1, 3).w13, CheckpointReader(src).load_expert(1, 3).w13)

    name = "model.layers.0.mlp.experts.7.gate_proj.weight"
    wrong = json.loads(good.to_json())
    wrong["tensors"][name][1] = [64, 64]
    (shipped / manifest_mod.SHIPPED_NAME).write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=f"tensor {name} is float32 \\[64, 128\\] in the checkpoint"):
        CheckpointReader(shipped)

    wrong["tensors"]["model.layers.0.mlp.experts.99.gate_proj.weight"] = ["float32", [64, 128]]
    del wrong["tensors"][name]
    (shipped / manifest_mod.SHIPPED_NAME).write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="experts.99.gate_proj.weight, which the checkpoint does not have"):
        CheckpointReader(shipped)


def test_pickled_weights_are_refused(tiny_checkpoint, tmp_path, private_cache):
    path = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint("mixtral"), path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        read_moe_info(path)


def test_a_checked_manifest_is_not_checked_again_until_the_files_change(tiny_checkpoint, tmp_path, private_cache):
    """manifest_for reads every shard's header to check a manifest; a second call for unchanged files does not (a
    replica asks once per expert group, the router and the planner again), and a changed file is checked anew."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), path)
    first = manifest_mod.manifest_for(path)
    reads = []
    original = manifest_mod.tensor_headers
    manifest_mod.tensor_headers = lambda *a: reads.append(a) or original(*a)
    try:
        assert manifest_mod.manifest_for(path) is first and not reads
        name = "model.layers.0.mlp.experts.7.gate_proj.weight"
        wrong = json.loads(first.to_json())
        wrong["tensors"][name][1] = [64, 64]
        (path / manifest_mod.SHIPPED_NAME).write_text(json.dumps(wrong))  # now shipped, and wrong
        with pytest.raises(CheckpointError, match=f"tensor {name} is float32"):
            manifest_mod.manifest_for(path)
        assert len(reads) == 1
    finally:
        manifest_mod.tensor_headers = original


def test_a_checkpoint_in_mistral_format_is_read_through_vllms_own_parser(tiny_checkpoint, private_cache):
    """Mistral Large 3 as Mistral ships it (params.json, consolidated.safetensors with Mistral's tensor names): the
    config comes from vLLM's parser, the manifest from vLLM's load pass (its renaming recorded), and an expert's
    rows are the checkpoint's w1 (gate) and w3 (up) stacked, w2 as down."""
    from safetensors.torch import load_file

    path = tiny_checkpoint("mistral_large_3")
    assert not (path / "config.json").exists() and (path / "params.json").exists()
    info = read_moe_info(path)
    assert (info.model_type, info.moe_layers, info.num_experts, info.top_k) == ("deepseek_v3", [1, 2], 16, 4)
    assert manifest_mod.manifest_for(path).architecture == "MistralLarge3ForCausalLM"
    expert = CheckpointReader(path).load_expert(2, 5)
    raw = load_file(path / "consolidated.safetensors")
    w1, w3, w2 = (raw[f"layers.2.experts.5.{w}.weight"] for w in ("w1", "w3", "w2"))
    assert torch.equal(expert.w13, torch.cat([w1, w3])) and torch.equal(expert.w2, w2)


def test_a_family_whose_vllm_module_does_not_import_is_refused_with_the_cause(tiny_checkpoint, private_cache):
    """The multimodal Llama 4 wrapper (`llama4`, text_config + `language_model.` prefix): vLLM's module for it
    imports torchvision, which vLLM's CPU install leaves out (its CUDA build breaks `import vllm`). vLLM itself only
    says the architecture "failed to be inspected"; the refusal names the missing module. Where torchvision is
    installed, the wrapper's experts are found like any family's."""
    import importlib.util

    path = tiny_checkpoint("llama4")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(CheckpointError, match="mllama4.*No module named 'torchvision'"):
            read_moe_info(path)
    else:
        assert read_moe_info(path).model_type == "llama4_text"
