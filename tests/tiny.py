"""Tiny random Hugging Face MoE checkpoints (fp32) with an offline tokenizer, for tests and benchmarks.

`build_tiny_checkpoint(family, out_dir)` writes config.json, model.safetensors and tokenizer files that
transformers and vLLM (CPU) both load. Sizes respect vLLM's CPU limits: attention head sizes are multiples
of 32, and DeepSeek's MLA uses kv_lora_rank 512 + rope dim 64 (the only shapes its CPU kernel takes).
Nothing is downloaded: the tokenizer is a byte-level BPE trained on a fixed in-repo text.
"""

from __future__ import annotations

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


def build_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Write a tiny random fp32 checkpoint of `family` (see FAMILIES) to out_dir and return the path."""
    import transformers

    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config_cls, kwargs = CONFIGS[family]
    kwargs = dict(
        kwargs,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    kwargs.update(overrides or {})
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-flat logits; a larger spread makes greedy choices and routing decisive,
    # so exactness tests compare real decisions rather than ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data.pop("bos_token_id", None)
        gen.write_text(json.dumps(data, indent=2))
    return out_dir
