"""Tiny random Hugging Face MoE checkpoints (fp32) with an offline tokenizer, for tests and benchmarks.

`build_tiny_checkpoint(family, out_dir)` writes config.json, model.safetensors and tokenizer files that
transformers and vLLM (CPU) both load. Sizes respect vLLM's CPU limits: attention head sizes are multiples
of 32, and DeepSeek's MLA uses kv_lora_rank 512 + rope dim 64 (the only shapes its CPU kernel takes).
Nothing is downloaded: the tokenizer is a byte-level BPE trained on a fixed in-repo text.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    torch_dtype="float32",
)

CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral": (
        "MixtralConfig",
        dict(
            _COMMON, num_hidden_layers=2, intermediate_size=64, head_dim=32, num_local_experts=8, num_experts_per_tok=2
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            intermediate_size=96,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            intermediate_size=96,
            head_dim=32,
            moe_intermediate_size=64,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            intermediate_size=64,
            num_experts=16,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            _COMMON,
            num_hidden_layers=3,
            intermediate_size=128,
            moe_intermediate_size=64,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_group=1,
            topk_group=1,  # vLLM's router needs both
            routed_scaling_factor=1.0,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            num_key_value_heads=4,
            head_dim=64,
            norm_topk_prob=False,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            _COMMON,
            num_hidden_layers=3,
            intermediate_size=128,
            moe_intermediate_size=64,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            # as in released V3 configs; vLLM reads these two (HF assumes them)
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            num_key_value_heads=4,
            head_dim=64,
            norm_topk_prob=True,
        ),
    ),
}

# Further MoE families (issue 20) that vLLM 0.32 runs on this CPU in fp32 (tests/test_more_families.py): greedy
# output identical to transformers, except kimi_k2, which vLLM runs exactly as deepseek_v3 (its MLA attention
# differs from transformers' as for DeepSeek-V3). CONFIGS also has "llama4" (the multimodal wrapper), which vLLM
# cannot load here: its Llama 4 module imports transformers' Llama 4 image processor, which needs torchvision.
MORE_FAMILIES = (
    "glm4_moe",
    "kimi_k2",
    "llama4_text",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "hunyuan_v1_moe",
    "dots1",
    "phimoe",
    "granitemoehybrid",
)

CONFIGS.update(
    {
        "glm4_moe": (
            "Glm4MoeConfig",
            dict(
                _COMMON,
                num_hidden_layers=3,
                intermediate_size=128,
                head_dim=32,
                moe_intermediate_size=64,
                n_routed_experts=16,
                n_shared_experts=1,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,  # layer 0 dense
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                use_qk_norm=True,
                num_nextn_predict_layers=0,  # no MTP layer in the tiny checkpoint
            ),
        ),
        # Kimi K2 is a DeepSeek-V3 checkpoint whose config.json says model_type "kimi_k2" (CONFIG_EDITS); vLLM maps
        # that type to DeepseekV3Config and keeps architectures ["DeepseekV3ForCausalLM"]. As released: one group.
        "kimi_k2": (
            "DeepseekV3Config",
            dict(
                _COMMON,
                num_hidden_layers=3,
                intermediate_size=128,
                moe_intermediate_size=64,
                n_routed_experts=16,
                n_shared_experts=1,
                num_experts_per_tok=4,
                n_group=1,
                topk_group=1,
                topk_method="noaux_tc",
                scoring_func="sigmoid",
                first_k_dense_replace=1,
                routed_scaling_factor=2.827,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_rope_head_dim=64,
                qk_nope_head_dim=32,
                v_head_dim=32,
                num_key_value_heads=4,
                head_dim=64,
                norm_topk_prob=True,
            ),
        ),
        "llama4_text": (
            "Llama4TextConfig",
            dict(
                _COMMON,
                num_hidden_layers=4,  # MoE in layers 1 and 3 (interleave step 2), dense MLP in 0 and 2
                head_dim=32,
                intermediate_size=64,  # routed and shared expert width
                intermediate_size_mlp=128,  # dense layers
                num_local_experts=8,
                num_experts_per_tok=1,
                interleave_moe_layer_step=2,
                use_qk_norm=True,
                attention_chunk_size=8192,  # longer than any test sequence
            ),
        ),
        "gpt_oss": (
            "GptOssConfig",
            dict(
                _COMMON,
                num_hidden_layers=2,  # layer 0 sliding window, layer 1 full attention
                head_dim=32,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                sliding_window=8,  # shorter than the test sequences, so the window matters
            ),
        ),
        "granitemoe": (
            "GraniteMoeConfig",
            dict(
                _COMMON,
                num_hidden_layers=2,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.125,
                logits_scaling=2.0,
            ),
        ),
        "granitemoeshared": (
            "GraniteMoeSharedConfig",
            dict(
                _COMMON,
                num_hidden_layers=2,
                intermediate_size=64,
                shared_intermediate_size=96,
                num_local_experts=8,
                num_experts_per_tok=2,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.125,
                logits_scaling=2.0,
            ),
        ),
        "hunyuan_v1_moe": (
            "HunYuanMoEV1Config",
            dict(
                _COMMON,
                num_hidden_layers=2,
                head_dim=32,
                intermediate_size=64,
                num_experts=8,
                moe_topk=2,
            ),
        ),
        "dots1": (
            "Dots1Config",
            dict(
                _COMMON,
                num_hidden_layers=3,
                intermediate_size=128,
                moe_intermediate_size=64,
                n_routed_experts=16,
                n_shared_experts=1,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
            ),
        ),
        "phimoe": (
            "PhimoeConfig",
            dict(
                _COMMON,
                num_hidden_layers=2,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,  # sparsemixer routing is top-2 only
                # As released (Phi-3.5-MoE): vLLM's PhiMoE always builds q/k/v/o biases, and without them in the
                # checkpoint leaves them uninitialised (NaN logits). It also builds an lm_head bias but never adds
                # it to the logits, so none here.
                attention_bias=True,
                lm_head_bias=False,
            ),
        ),
        "granitemoehybrid": (
            "GraniteMoeHybridConfig",
            dict(
                _COMMON,
                num_hidden_layers=3,
                layer_types=["linear_attention", "full_attention", "linear_attention"],  # Mamba2, attention, Mamba2
                intermediate_size=64,
                shared_intermediate_size=96,
                num_local_experts=8,
                num_experts_per_tok=2,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.125,
                logits_scaling=2.0,
                mamba_n_heads=8,
                mamba_d_head=32,  # n_heads * d_head = mamba_expand * hidden_size
                mamba_d_state=16,
                mamba_n_groups=1,
                mamba_expand=2,
            ),
        ),
    }
)

# Llama 4 as released: the multimodal wrapper (config.json with text_config + vision_config, weights under
# `language_model.` and `vision_model.`), here with a one-layer vision tower.
CONFIGS["llama4"] = (
    "Llama4Config",
    dict(
        text_config={k: v for k, v in CONFIGS["llama4_text"][1].items() if k != "torch_dtype"},
        vision_config=dict(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=128,
            vision_output_dim=128,
            image_size=56,
            patch_size=14,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=128,
            projector_output_dim=128,
        ),
        tie_word_embeddings=False,
        torch_dtype="float32",
    ),
)

# The class to build where AutoModelForCausalLM would build something else (for Llama4Config: the text model only).
MODEL_CLASSES: dict[str, str] = {"llama4": "Llama4ForConditionalGeneration"}

# Post-save edits of config.json: keys merged over what save_pretrained wrote, for released checkpoints whose
# config.json says something transformers' config class does not write.
CONFIG_EDITS: dict[str, dict] = {"kimi_k2": {"model_type": "kimi_k2"}}

# Families whose 1-D parameters other than norms (biases, DeepSeek-style e_score_correction_bias, attention sinks)
# get random values too: left at their zero init they would not show whether vLLM applies them.
RANDOM_1D = frozenset(MORE_FAMILIES) | {"llama4"}

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few experts. "
    "Each expert is a small feed-forward network; the gate picks the best ones and weighs their outputs. "
    "Serving systems batch requests, cache keys and values, and stream tokens back to the user. "
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear too, with punctuation: commas, periods; colons! "
)


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer with ChatML specials, trained offline on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


@contextlib.contextmanager
def _canonical_model_type(config_class):
    """`config_class` with its own model_type while a checkpoint is built. vLLM re-registers some transformers config
    classes under its model types for the whole process (a kimi_k2 config makes DeepseekV3Config.model_type
    "kimi_k2"), and transformers then saves such a model without converting its experts to the per-expert layout."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    own = next((t for t, name in CONFIG_MAPPING_NAMES.items() if name == config_class.__name__), None)
    before = config_class.model_type
    if own is not None:
        config_class.model_type = own
    try:
        yield config_class
    finally:
        config_class.model_type = before


def _randomize(model, family: str) -> None:
    """Random init at std 0.02 gives near-flat logits; a larger spread makes greedy choices and routing decisive,
    so exactness tests compare real decisions rather than ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.08)
            elif family in RANDOM_1D and p.dim() == 1 and "norm" not in name:
                p.normal_(0.0, 0.08)
    model.eval()


def build_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Write a tiny random fp32 checkpoint of `family` (see FAMILIES, MORE_FAMILIES) to out_dir and return the path."""
    import transformers

    if family == MISTRAL_FORMAT:
        return build_mistral_checkpoint(out_dir, seed=seed)
    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + MORE_FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config_cls, kwargs = CONFIGS[family]
    tokens = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    if "text_config" in kwargs:  # multimodal wrapper: the vocabulary belongs to the language model
        kwargs = dict(kwargs, text_config=dict(kwargs["text_config"], **tokens), **tokens)
    else:
        kwargs = dict(kwargs, **tokens)
    kwargs.update(overrides or {})
    with _canonical_model_type(getattr(transformers, config_cls)) as config_class:
        config = config_class(**kwargs)
        torch.manual_seed(seed)
        if family in MODEL_CLASSES:
            model = getattr(transformers, MODEL_CLASSES[family])._from_config(config, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, family)
        model.save_pretrained(out_dir, safe_serialization=True)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data.pop("bos_token_id", None)
        gen.write_text(json.dumps(data, indent=2))
    if family in CONFIG_EDITS:
        config_path = out_dir / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **CONFIG_EDITS[family]}, indent=2))
    return out_dir


MISTRAL_FORMAT = "mistral_large_3"  # build_tiny_checkpoint's name for build_mistral_checkpoint


# Mistral's own checkpoint format (issue 20: Mistral Large 3): params.json + consolidated.safetensors with Mistral's
# tensor names, which vLLM reads itself (transformers_utils/configs/mistral.py: a MoE with shared experts becomes
# MistralLarge3ForCausalLM, DeepSeek-V3's architecture with softmax routing; models/mistral_large_3.py renames the
# tensors). Built from a tiny DeepSeek-V3 (MLA at vLLM's CPU sizes: kv_lora_rank 512, rope 64) by renaming.
_TO_MISTRAL = [
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.(\w+)", r"layers.\1.attention.wq_a.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"layers.\1.attention.q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.(\w+)", r"layers.\1.attention.wq_b.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.(\w+)", r"layers.\1.attention.wkv_a_with_mqa.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"layers.\1.attention.kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.(\w+)", r"layers.\1.attention.wkv_b.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(\w+)", r"layers.\1.attention.wo.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(\w+)", r"layers.\1.feed_forward.w1.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(\w+)", r"layers.\1.feed_forward.w2.\2"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(\w+)", r"layers.\1.feed_forward.w3.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.(\w+)", r"layers.\1.shared_experts.w1.\2"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.(\w+)", r"layers.\1.shared_experts.w2.\2"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.(\w+)", r"layers.\1.shared_experts.w3.\2"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.(\w+)", r"layers.\1.experts.\2.w1.\3"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.(\w+)", r"layers.\1.experts.\2.w2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.(\w+)", r"layers.\1.experts.\2.w3.\3"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"lm_head\.weight", "output.weight"),
]


def build_mistral_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random fp32 Mistral Large 3 in Mistral's format: params.json, consolidated.safetensors, and the tiny
    byte-level tokenizer (tokenizer.json: vLLM's "auto" tokenizer mode reads it; no tekken.json)."""
    import re
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tiny_checkpoint("deepseek_v3", Path(tmp) / "hf", seed=seed, overrides={"q_lora_rank": 64})
        config = json.loads((hf / "config.json").read_text())
        tensors = {}
        for path in sorted(hf.glob("*.safetensors")):
            for name, tensor in load_file(path).items():
                if name.endswith("e_score_correction_bias"):
                    continue  # Mistral Large 3 routes by softmax, without a correction bias
                new = next((re.sub(f"^{a}$", b, name) for a, b in _TO_MISTRAL if re.fullmatch(a, name)), None)
                if new is None:
                    raise ValueError(f"no Mistral name for {name}")
                tensors[new] = tensor.contiguous()
        save_file(tensors, out_dir / "consolidated.safetensors")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (hf / name).exists():
                shutil.copy(hf / name, out_dir / name)
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "hidden_dim": config["intermediate_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "head_dim": config["qk_nope_head_dim"] + config["qk_rope_head_dim"],
        "norm_eps": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"],
        "rope_theta": 10000.0,
        "max_position_embeddings": config["max_position_embeddings"],
        "max_seq_len": config["max_position_embeddings"],
        "tied_embeddings": False,
        "q_lora_rank": config["q_lora_rank"],
        "kv_lora_rank": config["kv_lora_rank"],
        "qk_nope_head_dim": config["qk_nope_head_dim"],
        "qk_rope_head_dim": config["qk_rope_head_dim"],
        "v_head_dim": config["v_head_dim"],
        "moe": {
            "num_experts": config["n_routed_experts"],
            "num_experts_per_tok": config["num_experts_per_tok"],
            "expert_hidden_dim": config["moe_intermediate_size"],
            "num_shared_experts": config["n_shared_experts"],
            "first_k_dense_replace": config["first_k_dense_replace"],
            "route_every_n": 1,
            "routed_scale": config["routed_scaling_factor"],
            "num_expert_groups": config["n_group"],
            "num_expert_groups_per_tok": config["topk_group"],
        },
        "llama_4_scaling": {"original_max_position_embeddings": config["max_position_embeddings"], "beta": 0.1},
    }
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    return out_dir
