"""Further MoE families through the whole stack: `expertmesh serve --model DIR` on a tiny Llama 4, a tiny GPT-OSS and
a tiny Mistral Large 3 in Mistral's own format (params.json + consolidated.safetensors) checkpoint, asked through the
OpenAI API, answers as plain vLLM does on the same checkpoint.

Neither family is named anywhere in expertmesh's code: the stack records the checkpoint's expert manifest from
vLLM's own load pass (core/manifest.py) before starting anything, the replicas read their experts through it (Llama
4: fused, transposed gate_up tensors, MoE every other layer, the gate weight applied to the input; GPT-OSS:
interleaved gate/up rows with biases and a clamped SwiGLU), and the router's routed-token counters show that every
MoE layer's experts were computed remotely.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, running_serve, serve_flags

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Serving systems batch requests"]
MAX_TOKENS = 16


def _monolithic_greedy(path: Path) -> list[str]:
    """Plain vLLM (experts in-process) on the same checkpoint, greedy."""
    from vllm import LLM, SamplingParams

    from expertmesh.router import plugin
    from expertmesh.router.vllm_args import engine_kwargs

    plugin.configure_local()
    llm = LLM(str(path), enforce_eager=True, max_model_len=256, seed=0, **engine_kwargs(path))
    # One prompt at a time, as the stack is asked below: vLLM's CPU MLA (Mistral Large 3) gives a request different
    # numbers depending on which requests share its batch (docs/architecture.md, micro-batches).
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    texts = [llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text for prompt in PROMPTS]
    del llm
    gc.collect()
    return texts


def _routed_tokens_per_layer(url: str) -> dict[int, int]:
    """Routed tokens per MoE layer from the gateway's /experts, once every layer has counted some (the counters
    are published by the model's process on their own schedule; 15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        routed: dict[int, int] = {}
        for row in httpx.get(f"{url}/experts", timeout=30).json()["experts"]:
            routed[row["layer"]] = routed.get(row["layer"], 0) + row["routed_tokens"]
        if (routed and all(routed.values())) or time.monotonic() > deadline:
            return routed
        time.sleep(0.5)


@pytest.mark.parametrize("family", ["llama4_text", "gpt_oss", "mistral_large_3"])
def test_serve_answers_as_plain_vllm(family, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(family)
    port = free_port()
    env = dict(os.environ)
    for leaked in ("VLLM_ENABLE_V1_MULTIPROCESSING", "EXPERTMESH_COUNTERS_FILE", "EXPERTMESH_EXPERT_MODE"):
        env.pop(leaked, None)  # set in this process by in-process engines of earlier tests; not a user's
    env.update(
        {
            "HOME": str(tmp_path),  # logs, pool state and the manifest cache in the test's own directory
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm"),
            "EXPERTMESH_CONTROLLER_SETTINGS": json.dumps({"imbalance_threshold": 1e9, "hot_expert_skew": 1e9}),
        }
    )
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(path), *serve_flags(port)]
    cmd += ["--", "--max-model-len", "256"]
    url = f"http://127.0.0.1:{port}"
    with running_serve(cmd, env, tmp_path, 420, f"expertmesh serve ({family})"):
        texts = []
        for prompt in PROMPTS:
            body = {"model": path.name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        routed = _routed_tokens_per_layer(url)
    assert (tmp_path / ".cache" / "expertmesh" / "manifests").is_dir()  # recorded by this stack, for this checkpoint
    assert routed and all(n > 0 for n in routed.values()), routed  # every MoE layer's experts went to the pool
    assert texts == _monolithic_greedy(path)
