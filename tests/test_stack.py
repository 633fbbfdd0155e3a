"""End to end through `expertmesh serve` (a real subprocess: Ray + expert pool + router + gateway + controller):

- the official `openai` SDK: chat (plain and streaming), completions, models, usage consistent with the tokenizer;
- OpenTelemetry: a real OTLP TraceService receiver collects spans from every process, and one request's spans
  form one connected tree gateway -> router (vLLM's server) -> forward pass -> layer dispatch -> expert replica;
- hot experts: the checkpoint's gate is biased so every token routes to one expert; under load that expert gets
  more replicas (its own group), no other expert does, all requests succeed with unchanged output, and when the
  load stops it scales back down;
- Ctrl-C stops everything: no process of the stack is left, its Ray cluster is gone.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ctrl_c_leaves_nothing, descendants, free_port, running_serve, serve_flags
from otlp_collector import Collector as _Collector
from safetensors.torch import load_file, save_file

from expertmesh.core.checkpoint import read_moe_info
from expertmesh.core.plan import Autoscaling, default_plan

pytestmark = pytest.mark.slow

HOT_LAYER, HOT_EXPERT = 1, 3


@pytest.fixture(scope="module")
def hot_model(tiny_checkpoint, tmp_path_factory):
    """Tiny DeepSeek-V3 (one MoE layer, top-1) whose correction bias sends every token to one expert."""
    src = tiny_checkpoint("deepseek_v3", num_hidden_layers=2, num_experts_per_tok=1)
    dst = tmp_path_factory.mktemp("hot-model")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    bias = tensors[f"model.layers.{HOT_LAYER}.mlp.gate.e_score_correction_bias"]
    bias.zero_()
    bias[HOT_EXPERT] = 10.0
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def stack(hot_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("stack")
    collector = _Collector()
    info = read_moe_info(hot_model)
    assert info.moe_layers == [HOT_LAYER]
    plan = default_plan(info).model_copy(
        update={"autoscaling": Autoscaling(target_tokens_per_second=1.0, upscale_delay_s=2, downscale_delay_s=10)}
    )
    plan.save(work / "plan.yaml")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{collector.port}",
            "EXPERTMESH_CONTROLLER_SETTINGS": json.dumps(
                {
                    "interval_s": 1.0,
                    "window_s": 4.0,
                    "rebalance_cooldown_s": 5.0,
                    "max_replicas_per_group": 2,
                    "max_total_replicas": 8,  # this test is about the mechanism; a 2-core budget would be 1
                    "min_tokens_per_s_to_rebalance": 1.0,
                    "drain_grace_s": 1.0,
                    # one holder per cold expert: this test watches the hot expert alone get its replicas (second
                    # holders for every expert are tests/test_controller.py's)
                    "min_holders": 1,
                }
            ),
            "HOME": str(work),  # logs and pool state files land in the test's own directory
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "expertmesh.cli",
        "serve",
        "--model",
        str(hot_model),
        *serve_flags(port),
        "--plan",
        str(work / "plan.yaml"),
    ]
    url = f"http://127.0.0.1:{port}"
    with running_serve(cmd, env, work, 600) as (proc, curl):
        yield {"proc": proc, "url": url, "curl": curl, "collector": collector, "work": work, "model": hot_model}
    collector.server.stop(0)


def _client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_sdk_against_the_stack(stack):
    from transformers import AutoTokenizer

    client = _client(stack)
    models = client.models.list()
    name = models.data[0].id
    tok = AutoTokenizer.from_pretrained(stack["model"])
    messages = [{"role": "user", "content": "Every expert serves a token"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert 1 <= chat.usage.completion_tokens <= 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    streamed = client.chat.completions.create(
        model=name, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(model=name, prompt="A mixture of experts", max_tokens=8, temperature=0)
    assert comp.usage.prompt_tokens == len(tok("A mixture of experts")["input_ids"])
    assert comp.choices[0].text and comp.choices[0].finish_reason in ("length", "stop")
    # the curl that `serve` printed works as printed
    out = subprocess.run(stack["curl"], shell=True, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["choices"][0]["message"]["role"] == "assistant"


def test_one_connected_trace_from_gateway_to_expert_replica(stack):
    client = _client(stack)
    name = client.models.list().data[0].id
    client.completions.create(model=name, prompt="trace me", max_tokens=4, temperature=0)
    want = {"expertmesh-gateway", "expertmesh-router", "expertmesh-engine", "expertmesh-experts"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = stack["collector"].snapshot()
        if want <= {svc for svc, _ in spans} and any(s.name == "expert forward" for _, s in spans):
            break
        time.sleep(0.5)
    spans = stack["collector"].snapshot()
    by_id = {s.span_id: (svc, s) for svc, s in spans}
    roots = [s for svc, s in spans if svc == "expertmesh-gateway" and not s.parent_span_id and "completions" in s.name]
    assert roots, f"no gateway root span among {sorted({s.name for _, s in spans})}"
    # walk up from every replica span: some chain must reach a gateway root through router, step and dispatch
    chains = []
    for svc, s in spans:
        if svc != "expertmesh-experts":
            continue
        chain, cur = [], s
        while cur is not None:
            chain.append((by_id[cur.span_id][0], cur))
            cur = by_id.get(cur.parent_span_id, (None, None))[1] if cur.parent_span_id else None
        chains.append(chain)
    assert chains, "no expert replica span arrived"
    full = [c for c in chains if c[-1][0] == "expertmesh-gateway"]
    assert full, f"no replica span connects to a gateway root: {[[x.name for _, x in c] for c in chains[:3]]}"
    names = [span.name for _, span in full[0]]
    services = [svc for svc, _ in full[0]]
    assert names[0] == "expert forward" and names[1].startswith("dispatch layer"), names
    assert "forward pass" in names, names  # the model's forward, in vLLM's worker process
    assert services[-1] == "expertmesh-gateway" and services[-2] == "expertmesh-router", services
    assert "expertmesh-engine" in services, services
    assert len({span.trace_id for _, span in full[0]}) == 1  # one trace, across three processes


def _replicas_of(stack) -> dict[tuple[int, int], int]:
    """(layer, expert) -> live replicas holding it, from the gateway's /experts."""
    data = httpx.get(stack["url"] + "/experts", timeout=10).json()
    return {(e["layer"], e["expert"]): e["replicas"] for e in data["experts"]}


def test_hot_expert_gets_replicas_and_scales_back(stack):
    client = _client(stack)
    name = client.models.list().data[0].id
    prompts = [f"request {i}: the quick brown fox" for i in range(6)]
    before = [
        client.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts
    ]
    start = _replicas_of(stack)
    assert set(start.values()) == {1}, start
    # the controller's first status (its plan) comes after its first two reads of the router's counters
    deadline = time.monotonic() + 60
    while httpx.get(stack["url"] + "/experts", timeout=10).json()["plan"] is None:
        assert time.monotonic() < deadline, "no controller status on /experts"
        time.sleep(0.5)
    stop = threading.Event()
    errors: list[BaseException] = []
    outputs: list[tuple[int, str]] = []

    def drive(i):
        while not stop.is_set():
            try:
                r = client.completions.create(model=name, prompt=prompts[i % len(prompts)], max_tokens=8, temperature=0)
                outputs.append((i % len(prompts), r.choices[0].text))
            except BaseException as exc:  # noqa: BLE001 - every failure is a test failure, collected
                errors.append(exc)

    pool = concurrent.futures.ThreadPoolExecutor(4)
    for i in range(4):
        pool.submit(drive, i)
    scaled = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            now = _replicas_of(stack)
            hot_group = [
                g
                for g in httpx.get(stack["url"] + "/experts", timeout=10).json()["plan"]["groups"]
                if g["keys"] in ({str(HOT_LAYER): [HOT_EXPERT]}, {HOT_LAYER: [HOT_EXPERT]})
            ]
            if (
                hot_group
                and now.get((HOT_LAYER, HOT_EXPERT), 0) >= 2
                and all(v == 1 for k, v in now.items() if k != (HOT_LAYER, HOT_EXPERT))
            ):
                scaled = now
                break
            time.sleep(1)
        time.sleep(3)
    finally:
        stop.set()
        pool.shutdown(wait=True)
    assert scaled is not None, f"the hot expert did not get its own replicas: {_replicas_of(stack)}"
    assert not errors, errors[:3]
    assert len(outputs) >= 8
    # Same prompts, one at a time (as `before` ran: greedy output depends on batch composition in fp32), now with
    # the hot expert split over its two replicas: unchanged. The load window keeps the replicas up meanwhile.
    after = [
        client.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts
    ]
    assert _replicas_of(stack)[(HOT_LAYER, HOT_EXPERT)] >= 2
    assert after == before
    # load gone: the hot group scales back to its minimum of one replica
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _replicas_of(stack).get((HOT_LAYER, HOT_EXPERT)) == 1:
            break
        time.sleep(1)
    assert _replicas_of(stack).get((HOT_LAYER, HOT_EXPERT)) == 1
    assert [
        client.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts
    ] == before


def test_bench_against_the_stack_writes_latency_and_expert_plots(stack, tmp_path):
    """`expertmesh bench` end to end: counts add up, and --plot adds the expert heatmap and replicas over time."""
    from expertmesh.cli import main

    name = _client(stack).models.list().data[0].id
    code = main(
        [
            "bench",
            "--url",
            stack["url"],
            "--model",
            name,
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["summary"]["completed"] == 4 and result["summary"]["failed"] == 0
    for png in ("latency_cdf.png", "throughput.png", "expert_load.png", "replicas.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    from expertmesh.plots import load_matrix

    layers, load = load_matrix(httpx.get(stack["url"] + "/experts", timeout=10).json()["experts"])
    assert layers == [HOT_LAYER] and load[0].argmax() == HOT_EXPERT  # the heatmap shows the biased gate


def test_ctrl_c_stops_everything(stack):
    proc = stack["proc"]
    before = descendants(proc.pid)
    assert len(before) >= 3  # router, gateway, ray processes at least
    ctrl_c_leaves_nothing(proc, before, stack["url"])
