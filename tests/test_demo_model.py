"""The shipped demo checkpoint (models/demo/): shape, size, tokenizer, chat template, and that it learned English.

transformers only (no vLLM, no network). The quality bounds come from the training run recorded in
models/demo/README.md; the held-out text below is from the final 5% of two plays, which
scripts/train_demo_model.py keeps out of training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "models" / "demo"

# Perplexity of the shipped checkpoint on these two held-out snippets, measured once: 34.2 (on the whole
# held-out split, 79.6k tokens: 52.9, see README.md). Bound = measured x 1.5 = 51.3. For scale: a uniform
# guess over the 4096-token vocabulary scores 4096, and the same script run for 1 minute scored 177 here.
HELDOUT_PERPLEXITY_BOUND = 34.2 * 1.5

# Hamlet V.2 and Macbeth V.8, both inside the held-out final 5% of their play.
HELDOUT_TEXT = """King.
Stay, give me drink.--Hamlet, this pearl is thine;
Here's to thy health.--

[Trumpets sound, and cannon shot off within.]

Give him the cup.

Ham.
I'll play this bout first; set it by awhile.--
Come.--Another hit; what say you?

[They play.]

Laer.
A touch, a touch, I do confess.

King.
Our son shall win.

Queen.
He's fat, and scant of breath.--
Here, Hamlet, take my napkin, rub thy brows:
The queen carouses to thy fortune, Hamlet.

Ham.
Good madam!

King.
Gertrude, do not drink.

Queen.
I will, my lord; I pray you pardon me.

King.
[Aside.] It is the poison'd cup; it is too late.

Ham.
I dare not drink yet, madam; by-and-by.

Queen.
Come, let me wipe thy face.

Laer.
My lord, I'll hit him now.

King.
I do not think't.

Laer.
[Aside.] And yet 'tis almost 'gainst my conscience.

Ham.
Come, for the third, Laertes: you but dally;
I pray you pass with your best violence:
I am afeard you make a wanton of me.
"""

HELDOUT_TEXT_2 = """SCENE VIII. The same. Another part of the field.

[Enter Macbeth.]

MACBETH.
Why should I play the Roman fool, and die
On mine own sword? whiles I see lives, the gashes
Do better upon them.

[Enter Macduff.]

MACDUFF.
Turn, hell-hound, turn!

MACBETH.
Of all men else I have avoided thee:
But get thee back; my soul is too much charg'd
With blood of thine already.

MACDUFF.
I have no words,--
My voice is in my sword: thou bloodier villain
Than terms can give thee out!

[They fight.]

MACBETH.
Thou losest labour:
As easy mayst thou the intrenchant air
With thy keen sword impress, as make me bleed:
Let fall thy blade on vulnerable crests;
I bear a charmed life, which must not yield
To one of woman born.
"""

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def test_checkpoint_is_a_small_fp32_mixtral():
    from safetensors import safe_open

    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (4, 128, 256)
    assert config["head_dim"] % 32 == 0  # vLLM's CPU attention rejects other head sizes
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 4096

    weights = DEMO / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    with safe_open(weights, framework="pt") as f:
        names = list(f.keys())
        assert {f.get_slice(name).get_dtype() for name in names} == {"F32"}
    # Mixtral's on-disk per-expert layout, all 8 experts of every layer present.
    for layer in range(4):
        for expert in range(8):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight" in names


def test_loaded_model_routes_top2_over_8_experts(model, tokenizer):
    ids = tokenizer("My lord, I will go.", return_tensors="pt")["input_ids"]  # [1, T]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == 4
    for router_logits in out.router_logits:
        assert router_logits.shape == (ids.shape[1], 8)  # [T, E]


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak as Hamlet."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a player.<|im_end|>\n"
        "<|im_start|>user\nSpeak as Hamlet.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    # The markers are single special tokens, not spelled out in bytes.
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]  # chat replies stop at <|im_end|>


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
        "  leading spaces, tabs\tand\n\nblank lines  ",
        "Ünïcödé, emoji 🎭 and 中文 are bytes too.",
        "<|im_start|>user\nhi<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 4096 and max(ids) < 4096


def test_heldout_perplexity_is_far_below_uniform(model, tokenizer):
    total_nll, total_tokens = 0.0, 0
    for text in (HELDOUT_TEXT, HELDOUT_TEXT_2):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, T]
        for start in range(0, ids.shape[1] - 1, 256):  # the training context length
            window = ids[:, start : start + 257]
            with torch.no_grad():
                logits = model(input_ids=window[:, :-1]).logits  # [1, S, V]
            total_nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            total_tokens += window.shape[1] - 1
    perplexity = math.exp(total_nll / total_tokens)
    assert total_tokens > 500
    assert perplexity < HELDOUT_PERPLEXITY_BOUND, perplexity


def test_greedy_continuation_is_mostly_real_words(model, tokenizer):
    vocabulary = set((DEMO / "corpus_words.txt").read_text().split())  # every word of the training text
    assert len(vocabulary) > 20000
    prompt = "MACBETH.\nIf it were done when 'tis done, then 'twere well\n"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=80, do_sample=False)
    completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = WORD.findall(completion.lower())
    assert len(words) >= 20, completion
    known = sum(word in vocabulary for word in words) / len(words)
    assert known >= 0.7, (known, completion)
    assert len(set(words)) >= 8, completion  # not one word repeated


def test_chat_reply_stops_at_im_end(model, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Speak as Romeo."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=200, do_sample=False)
    reply = out[0, ids.shape[1] :].tolist()
    assert reply[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(reply) < 200
    assert len(WORD.findall(tokenizer.decode(reply, skip_special_tokens=True).lower())) >= 3


def _training_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", REPO_ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def test_corpus_cleaning_and_split():
    script = _training_script()
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "Ham.\r\nWords, words, words.   \r\n\r\n\r\n\r\n\r\n\r\nPol.\r\nWhat is the matter?\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicense text\r\n"
    )
    clean = script.clean_gutenberg(raw)
    assert clean == "Ham.\nWords, words, words.\n\n\nPol.\nWhat is the matter?\n"
    train, val = script.split_work("A.\none\n\nB.\ntwo\n\nC.\nthree\n", 0.5)
    assert train == "A.\none\n\nB.\ntwo\n" and val == "C.\nthree\n"  # cut at a blank line, no speech split
    assert script.speeches("[Enter Hamlet.]\n\nHam.\nWords, words.\n[Aside.]\nMore.\n") == [
        ("Ham", "Words, words.\nMore.")
    ]
