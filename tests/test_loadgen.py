"""`expertmesh bench` against a real streaming OpenAI-compatible server started here, and compare's pure parts.

The server (FastAPI + uvicorn on a free loopback port, in a thread) streams one word per chunk with known delays
and counts prompt tokens as whitespace-separated words, so every count and lower latency bound is known. It can be
told to answer some requests (by arrival order) with HTTP 500, drop the connection mid-stream, send an error
chunk, stall, or omit usage.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from conftest import free_port
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from expertmesh import cli
from expertmesh.loadgen import (
    BenchConfig,
    BenchError,
    arrival_offsets,
    run_benchmark,
    summarize,
    synthesize_prompts,
)

MODEL = "test-model"
FIRST_TOKEN_DELAY_S = 0.05
TOKEN_DELAY_S = 0.01
REPO = Path(__file__).resolve().parents[1]


class Behaviour:
    """What the test server does with the next requests, keyed by arrival index (0-based since reset)."""

    def reset(self, fail_500=(), drop_after=None, error_chunk=(), stall=(), no_usage=False):
        self.fail_500 = set(fail_500)
        self.drop_after = dict(drop_after or {})  # arrival index -> text chunks sent before the connection drops
        self.error_chunk = set(error_chunk)  # an in-stream {"error": ...} after one token, then [DONE]
        self.stall = set(stall)  # never sends a token
        self.no_usage = no_usage
        self.arrivals = 0
        self.in_flight = 0
        self.peak_in_flight = 0


def build_app(behaviour: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
                404,
            )
        index = behaviour.arrivals
        behaviour.arrivals += 1
        if index in behaviour.fail_500:
            return JSONResponse(
                {"error": {"message": "injected failure", "type": "InternalServerError", "param": None, "code": 500}},
                500,
            )
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        prompt_tokens = len(text.split())
        n_out = int(body["max_tokens"])
        include_usage = (body.get("stream_options") or {}).get("include_usage") and not behaviour.no_usage
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if piece is None else {"content": piece}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            return (
                "data: "
                + json.dumps({"id": f"req-{index}", "object": obj, "model": MODEL, "choices": [choice]})
                + "\n\n"
            )

        async def stream():
            behaviour.in_flight += 1
            behaviour.peak_in_flight = max(behaviour.peak_in_flight, behaviour.in_flight)
            try:
                if chat:  # the role-only first chunk carries no text: it must not count as the first token
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "id": f"req-{index}",
                                "object": obj,
                                "model": MODEL,
                                "choices": [
                                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                ],
                            }
                        )
                        + "\n\n"
                    )
                await asyncio.sleep(3600 if index in behaviour.stall else FIRST_TOKEN_DELAY_S)
                for t in range(n_out):
                    if t:
                        await asyncio.sleep(TOKEN_DELAY_S)
                    if behaviour.drop_after.get(index) == t:
                        raise ConnectionAbortedError("injected drop")  # uvicorn closes mid-chunked-body
                    if index in behaviour.error_chunk and t == 1:
                        yield (
                            "data: "
                            + json.dumps(
                                {
                                    "error": {
                                        "message": "injected stream error",
                                        "type": "InternalServerError",
                                        "code": 500,
                                    }
                                }
                            )
                            + "\n\n"
                        )
                        yield "data: [DONE]\n\n"
                        return
                    yield chunk(f" w{t}")
                yield chunk(None if chat else "", finish="length")
                if include_usage:
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "id": f"req-{index}",
                                "object": obj,
                                "model": MODEL,
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": prompt_tokens,
                                    "completion_tokens": n_out,
                                    "total_tokens": prompt_tokens + n_out,
                                },
                            }
                        )
                        + "\n\n"
                    )
                yield "data: [DONE]\n\n"
            finally:
                behaviour.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    """(base_url, behaviour) of a streaming server running for this module."""
    behaviour = Behaviour()
    behaviour.reset()
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(build_app(behaviour), host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", behaviour
    srv.should_exit = True
    thread.join(timeout=10)


def bench(url: str, **overrides):
    config = BenchConfig(url=url, model=MODEL, show_progress=False, **overrides)
    return asyncio.run(run_benchmark(config))


def assert_sane(d: dict, lower_ms: float) -> None:
    assert d["count"] > 0
    assert lower_ms <= d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert d["min"] <= d["mean"] <= d["max"]


# ------------------------------------------------------------------------------------------ pure parts


def test_prompts_are_deterministic_sized_and_distinct():
    a = synthesize_prompts(6, 20, seed=1)
    assert a == synthesize_prompts(6, 20, seed=1)
    assert a != synthesize_prompts(6, 20, seed=2)
    assert len(set(a)) == 6
    assert all(len(p.split()) == 20 for p in a)


def test_poisson_arrivals():
    assert arrival_offsets(5, None) == [0.0] * 5
    offsets = arrival_offsets(4000, rate=50.0, seed=0)
    assert offsets == arrival_offsets(4000, rate=50.0, seed=0)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    mean_gap = offsets[-1] / (len(offsets) - 1)
    assert 0.019 < mean_gap < 0.021  # exponential gaps with mean 1/rate (4000 samples: ±5% is > 3 sigma)


# ------------------------------------------------------------------------------------------ against the server


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_counts_tokens_and_latencies(server, endpoint):
    url, behaviour = server
    behaviour.reset()
    requests, concurrency, input_len, output_len = 12, 4, 16, 8
    result = bench(
        url,
        endpoint=endpoint,
        num_requests=requests,
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        warmup=1,
    )
    s = result.summary
    assert behaviour.arrivals == requests + 1  # + the warm-up
    assert behaviour.peak_in_flight == concurrency  # the limit is reached and never exceeded
    assert (s["requests"], s["completed"], s["failed"], s["errors"]) == (requests, requests, 0, {})
    assert s["total_output_tokens"] == requests * output_len
    assert s["total_input_tokens"] == requests * input_len
    assert s["requests_without_usage"] == 0
    assert all(len(r.itl_s) == output_len - 1 for r in result.records)
    # three waves of 4, each at least first-token delay + 7 token gaps long
    min_e2e_ms = (FIRST_TOKEN_DELAY_S + (output_len - 1) * TOKEN_DELAY_S) * 1e3
    assert s["duration_s"] >= 3 * min_e2e_ms / 1e3
    # hard lower bounds hold for what the server delays before sending; single inter-token gaps seen by the
    # client can be shorter than the server's (a late chunk makes the next gap short), so those are checked
    # for order and for adding up instead
    assert_sane(s["ttft_ms"], FIRST_TOKEN_DELAY_S * 1e3)
    assert_sane(s["e2el_ms"], min_e2e_ms)
    assert_sane(s["itl_ms"], 0.0)
    assert_sane(s["tpot_ms"], 0.0)
    assert s["itl_ms"]["count"] == requests * (output_len - 1)
    assert s["itl_ms"]["p50"] >= TOKEN_DELAY_S * 1e3 / 2 and s["tpot_ms"]["p50"] >= TOKEN_DELAY_S * 1e3 / 2
    for r in result.records:
        assert r.tpot_s * (output_len - 1) == pytest.approx(r.e2e_s - r.ttft_s)
        assert sum(r.itl_s) <= r.e2e_s - r.ttft_s
    assert s["e2el_ms"]["max"] < 10_000
    assert s["request_throughput"] == pytest.approx(requests / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(requests * output_len / s["duration_s"])
    # goodput from the same records: nothing meets a 1 ms TTFT or TPOT SLO, everything meets a 60 s one
    assert s["good_requests"] == requests
    assert summarize(result.records, s["duration_s"], slo_ttft_ms=1.0)["good_requests"] == 0
    assert summarize(result.records, s["duration_s"], slo_tpot_ms=1.0)["good_requests"] == 0
    generous = summarize(result.records, s["duration_s"], slo_ttft_ms=60_000, slo_tpot_ms=60_000)
    assert generous["good_requests"] == requests
    assert generous["goodput"] == pytest.approx(s["request_throughput"])


def test_errors_are_counted_by_kind_and_never_crash(server):
    url, behaviour = server
    behaviour.reset(fail_500={2, 9}, drop_after={5: 3}, error_chunk={7}, stall={11})
    requests, output_len = 20, 6
    result = bench(
        url, num_requests=requests, concurrency=4, input_len=8, output_len=output_len, warmup=0, timeout_s=1.0
    )
    s = result.summary
    assert behaviour.arrivals == requests
    assert s["errors"] == {"http_500": 2, "stream_error": 2, "timeout": 1}
    assert (s["completed"], s["failed"]) == (15, 5)
    assert s["total_output_tokens"] == 15 * output_len  # failed requests contribute no tokens
    assert s["total_input_tokens"] == 15 * 8
    by_kind = {}
    for r in result.records:
        if not r.ok:
            by_kind.setdefault(r.error_kind, []).append(r.error)
    assert all("injected failure" in e for e in by_kind["http_500"])
    assert any("injected stream error" in e for e in by_kind["stream_error"])
    assert any("RemoteProtocolError" in e for e in by_kind["stream_error"])  # the dropped connection
    assert s["good_requests"] == 15


def test_without_usage_tokens_are_counted_from_chunks(server):
    url, behaviour = server
    behaviour.reset(no_usage=True)
    result = bench(url, num_requests=3, concurrency=3, input_len=5, output_len=4, warmup=0)
    s = result.summary
    assert (s["completed"], s["requests_without_usage"]) == (3, 3)
    assert s["total_output_tokens"] == 12
    assert s["total_input_tokens"] == 0  # unknown without usage, never guessed
    assert all(r.prompt_tokens is None for r in result.records)


def test_rate_spreads_arrivals(server):
    url, behaviour = server
    behaviour.reset()
    rate, requests, seed = 40.0, 8, 3
    result = bench(
        url, num_requests=requests, concurrency=requests, rate=rate, seed=seed, input_len=4, output_len=2, warmup=0
    )
    offsets = arrival_offsets(requests, rate, seed)
    assert offsets[-1] > 0.05
    assert result.summary["completed"] == requests
    for record in result.records:
        assert record.start_s >= offsets[record.index]
    assert result.summary["duration_s"] >= offsets[-1]


def test_cli_writes_table_json_and_plots(server, tmp_path, capsys):
    url, behaviour = server
    behaviour.reset(fail_500={1})
    out_json, plot_dir = tmp_path / "r" / "bench.json", tmp_path / "plots"
    rc = cli.main(
        [
            "bench",
            "--url",
            url + "/v1/",
            "--model",
            MODEL,
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--input-len",
            "8",
            "--output-len",
            "5",
            "--warmup",
            "0",
            "--slo-ttft-ms",
            "60000",
            "--slo-tpot-ms",
            "60000",
            "--json",
            str(out_json),
            "--plot",
            str(plot_dir),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "Successful requests:" in out and "http_500:" in out and "Request goodput" in out
    data = json.loads(out_json.read_text())
    assert data["summary"]["completed"] == 5 and data["summary"]["errors"] == {"http_500": 1}
    assert data["summary"]["total_output_tokens"] == 25 and data["summary"]["good_requests"] == 5
    assert len(data["requests"]) == 6 and "api_key" not in data["config"]
    for name in ("latency_cdf.png", "throughput.png"):
        png = (plot_dir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_every_request_failing_exits_non_zero(server, capsys):
    url, behaviour = server
    behaviour.reset(fail_500=range(100))
    rc = cli.main(["bench", "--url", url, "--model", MODEL, "--requests", "3", "--warmup", "0", "--no-progress"])
    assert rc == 1
    assert "every request failed" in capsys.readouterr().err


def test_failed_warmup_aborts_with_clear_message(server, capsys):
    url, behaviour = server
    behaviour.reset(fail_500={0})
    rc = cli.main(["bench", "--url", url, "--model", MODEL, "--requests", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "warm-up request failed (http_500): injected failure" in err and "Traceback" not in err


def test_unknown_model_is_a_clear_error(server, capsys):
    url, _ = server
    rc = cli.main(["bench", "--url", url, "--model", "nope", "--requests", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model 'nope' is not served" in err and MODEL in err and "Traceback" not in err


def test_unreachable_url_is_a_clear_error(capsys):
    port = free_port()  # nothing listens there
    rc = cli.main(["bench", "--url", f"http://127.0.0.1:{port}", "--model", MODEL, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot connect to" in err and "is the server running?" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--url", "http://x:1", "--model", "m", "--concurrency", "0"], "--concurrency: must be a positive integer"),
        (["--url", "http://x:1", "--model", "m", "--requests", "-3"], "--requests: must be a positive integer"),
        (["--url", "http://x:1", "--model", "m", "--input-len", "ten"], "--input-len: must be a positive integer"),
        (["--url", "http://x:1", "--model", "m", "--rate", "0"], "--rate: must be a positive number"),
        (["--url", "http://x:1", "--model", "m", "--slo-ttft-ms", "nan"], "--slo-ttft-ms: must be a positive number"),
        (["--url", "http://x:1", "--model", "m", "--endpoint", "embeddings"], "--endpoint: invalid choice"),
        (["--url", "localhost:8000", "--model", "m"], "--url: must look like http://HOST:PORT"),
        (["--url", "http://x:99999", "--model", "m"], "--url: has a bad port"),
        (["--url", "http://x:1", "--model", "m", "--extra-body", "[1]"], "--extra-body: must be a JSON object"),
        (["--url", "http://x:1"], "the following arguments are required: --model"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_config_validation_for_api_callers():
    with pytest.raises(BenchError, match="concurrency must be a positive integer"):
        BenchConfig(url="http://127.0.0.1:1", model="m", concurrency=0).validate()
    with pytest.raises(BenchError, match="endpoint must be one of"):
        BenchConfig(url="http://127.0.0.1:1", model="m", endpoint="x").validate()


# ------------------------------------------------------------------------------------------ benchmarks/compare


@pytest.fixture(scope="module")
def compare():
    loader = importlib.machinery.SourceFileLoader("expertmesh_compare", str(REPO / "benchmarks" / "compare"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _write_mixtral(path: Path, layers=2, experts=4, hidden=8, inter=4, vocab=16, tied=False) -> Path:
    """A config.json + model.safetensors with Mixtral tensor names and known sizes (values irrelevant; dense tensors
    other than q_proj left out): enough for vLLM to build the model and say where its experts are (the manifest)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixtral",
                "architectures": ["MixtralForCausalLM"],
                "num_attention_heads": hidden // 32,  # q_proj [hidden, hidden]: heads of 32 (vLLM's CPU sizes)
                "num_key_value_heads": 1,
                "head_dim": 32,
                "vocab_size": vocab,
                "tie_word_embeddings": tied,
                "num_hidden_layers": layers,
                "num_local_experts": experts,
                "num_experts_per_tok": 2,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "torch_dtype": "float32",
            }
        )
    )
    t = {
        "model.embed_tokens.weight": np.zeros((vocab, hidden), np.float32),
        "model.norm.weight": np.zeros(hidden, np.float32),
    }
    if not tied:
        t["lm_head.weight"] = np.zeros((vocab, hidden), np.float32)
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t[f"{p}.self_attn.q_proj.weight"] = np.zeros((hidden, hidden), np.float32)
        t[f"{p}.block_sparse_moe.gate.weight"] = np.zeros((experts, hidden), np.float32)
        for e in range(experts):
            for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                t[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = np.zeros(shape, np.float32)
    save_file(t, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_compare_weight_bytes_and_decode_bound(compare, tmp_path, tied):
    layers, experts, hidden, inter, vocab = 2, 4, 64, 32, 16
    w = compare.weight_bytes(_write_mixtral(tmp_path / "ckpt", layers, experts, hidden, inter, vocab, tied))
    expert = 3 * hidden * inter * 4
    per_layer_dense = (hidden * hidden + experts * hidden) * 4
    head = vocab * hidden * 4
    assert w["expert_bytes"] == {0: expert, 1: expert}
    assert w["routed_bytes"] == layers * experts * expert
    # untied: the embedding is a row lookup (not read per step) and the head is; tied: the one matrix is read
    assert w["dense_bytes"] == layers * per_layer_dense + hidden * 4 + head
    assert w["embedding_bytes_not_read"] == (0 if tied else head)
    assert w["dense_bytes"] + w["routed_bytes"] + w["embedding_bytes_not_read"] == w["total_bytes"]
    assert compare.expected_distinct_experts(experts, 2, 1) == pytest.approx(2.0)
    assert compare.expected_distinct_experts(experts, 2, 1000) == pytest.approx(experts)
    assert compare.step_bytes(w, 1) == pytest.approx(w["dense_bytes"] + 2 * layers * expert)
    assert compare.decode_bound(w, 10.0, 1) == pytest.approx(10e9 / compare.step_bytes(w, 1))
    big = compare.decode_bound(w, 10.0, 1000)  # every expert read once, shared by 1000 tokens
    assert big == pytest.approx(1000 * 10e9 / (w["dense_bytes"] + w["routed_bytes"]))


def _summary(tok_s: float, completed: int = 16) -> dict:
    d = {"mean": 1.0, "p50": 1.0, "p90": 2.0, "p99": 3.0, "min": 0.5, "max": 3.0, "count": completed}
    return {
        "output_throughput": tok_s,
        "request_throughput": tok_s / 64,
        "completed": completed,
        "failed": 0,
        "mean_output_tokens": 64.0,
        "ttft_ms": d,
        "tpot_ms": d,
        "e2el_ms": d,
    }


def test_compare_rows_ratios_and_markdown(compare):
    weights = {
        "num_experts": 8,
        "top_k": 2,
        "dense_bytes": 1_000_000,
        "expert_bytes": {0: 100_000, 1: 100_000},
        "total_bytes": 2_600_000,
    }
    results = {
        "full": {"1": _summary(80.0), "8": {"error": "did not start: boom"}},
        "local": {"1": _summary(100.0), "8": _summary(400.0)},
        "hf": {"1": _summary(50.0), "8": _summary(200.0)},
    }
    rows = compare.build_rows(results, [1, 8], weights, bandwidth_gbs=1.0)
    by = {(r["concurrency"], r["system"]): r for r in rows}
    assert len(rows) == 6
    assert by[(1, "full")]["vs_local"] == pytest.approx(0.8)
    assert by[(1, "full")]["vs_hf"] == pytest.approx(1.6)
    assert by[(8, "local")]["vs_hf"] == pytest.approx(2.0)
    assert by[(1, "local")]["of_bound"] == pytest.approx(100.0 / compare.decode_bound(weights, 1.0, 1))
    assert by[(8, "full")]["error"] == "did not start: boom"
    report = {
        "started_at": "t",
        "model": {"name": "m"},
        "rows": rows,
        "weights": weights,
        "bandwidth": {"read_gbs": 1.0, "read_1t_gbs": 0.5, "numpy_copy_gbs": 0.7},
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "usable_cores": 2,
            "memory_gib": 24,
            "versions": {"torch": "x"},
            "last_level_cache_mib": 32.0,
        },
        "settings": {
            "input_len": 64,
            "output_len": 64,
            "requests": {"1": 16, "8": 16},
            "seed": 0,
            "hf_threads": 1,
            "concurrency": [1, 8],
        },
    }
    md = compare.render_markdown(report)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6 and all(line.count("|") == 14 for line in table)
    assert "| 1 | full | 80.0 |" in md and "| 0.80 | 1.60 |" in md and "failed: did not start: boom" in md
    assert "fits in the 32 MiB last-level cache" in md


def test_compare_rounds_median_and_paired_ratios(compare):
    """--rounds: a point is its median round (a real run: its own latencies), every round is kept, ratios are
    also paired within a round, and the systems take turns in running first."""
    assert compare.round_order(["full", "local", "vllm"], 0) == ["full", "local", "vllm"]
    assert compare.round_order(["full", "local", "vllm"], 1) == ["vllm", "local", "full"]
    assert compare.round_order(["full", "local", "vllm"], 2) == ["full", "local", "vllm"]

    slow, mid, fast = _summary(300.0), _summary(500.0), _summary(900.0)
    mid["ttft_ms"] = {**mid["ttft_ms"], "p50": 42.0}
    full = compare.combine_rounds([fast, {"error": "boom"}, slow, mid])
    assert full["output_throughput"] == 500.0 and full["ttft_ms"]["p50"] == 42.0  # the median round itself
    assert full["rounds_output_throughput"] == [900.0, None, 300.0, 500.0]
    assert compare.combine_rounds([_summary(300.0), _summary(900.0)])["output_throughput"] == 300.0  # lower middle
    assert compare.combine_rounds([{"error": "did not start: x"}, {"error": "y"}]) == {"error": "did not start: x"}

    local = compare.combine_rounds([_summary(1000.0), _summary(1000.0), _summary(600.0), _summary(800.0)])
    results = {"full": {"8": full}, "local": {"8": local}}
    assert compare.paired_ratios(results, "full", "local", 8) == pytest.approx([0.9, 0.5, 0.625])  # round 2 failed
    rows = compare.build_rows(results, [8], None, None)
    by = {r["system"]: r for r in rows}
    assert by["full"]["vs_local"] == pytest.approx(500.0 / 800.0)  # median over median
    assert by["full"]["vs_local_rounds"] == pytest.approx([0.9, 0.5, 0.625])
    report = {
        "started_at": "t",
        "model": {"name": "m"},
        "rows": rows,
        "machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "memory_gib": 24, "versions": {}},
        "settings": {"input_len": 64, "output_len": 64, "requests": {"8": 16}, "seed": 0, "hf_threads": 1},
    }
    md = compare.render_markdown(report)
    assert "Rounds: 4" in md
    assert "- full c=8: 900.0, —, 300.0, 500.0 (× monolithic 0.90, 0.50, 0.62)" in md
    assert "- local c=8: 1000.0, 1000.0, 600.0, 800.0\n" in md


def test_compare_bad_arguments(compare, tmp_path, capsys):
    for argv in (
        ["--concurrency", "0,8"],
        ["--systems", "full,gpu"],
        ["--requests", "-1"],
        ["--rounds", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            compare.parse_args(argv)
        assert exc.value.code == 2
    assert compare.main(["--model", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ benchmarks/disaggregation_ceiling


def test_disaggregation_ceiling_is_the_lower_of_the_expert_and_router_bounds():
    loader = importlib.machinery.SourceFileLoader(
        "expertmesh_ceiling", str(REPO / "benchmarks" / "disaggregation_ceiling.py")
    )
    spec = importlib.util.spec_from_loader(loader.name, loader)
    ceiling = importlib.util.module_from_spec(spec)
    loader.exec_module(ceiling)
    # expert-bound: experts are 70 of a 100 ms monolithic step; a split makes them 105 / 180 ms
    # router-bound: experts are 10 of 100 ms; even a free split leaves the router 90 ms
    bounds = ceiling.ceilings(
        {"32": 100.0, "8": 100.0},
        {"32": {"1": 70.0, "2": 105.0, "4": 180.0}, "8": {"1": 10.0, "2": 12.5}},
    )
    heavy, light = bounds["32"], bounds["8"]
    assert heavy["experts_bound"] == {"2": 0.952, "4": 0.556}  # no m = 1 entry: no overlap without a split
    assert heavy["router_bound"] == 3.333
    assert heavy["ceiling"] == {"2": 0.952, "4": 0.556}
    assert heavy["expert_work_vs_unsplit"] == {"1": 1.0, "2": 1.5, "4": 2.571}
    assert heavy["expert_share_of_monolithic_step"] == 0.7
    assert light["experts_bound"] == {"2": 8.0}
    assert light["ceiling"] == {"2": 1.111}  # the router's core bounds it
    # experts as slow as the whole monolithic step: nothing bounds the router side
    assert ceiling.ceilings({"1": 5.0}, {"1": {"1": 5.0, "2": 6.0}})["1"]["router_bound"] == float("inf")
