"""`expertmesh bench`: a load generator for any OpenAI-compatible server, in the manner of vLLM's benchmark_serving.

Streams M requests (SSE over httpx, `stream_options: {include_usage: true}`) with at most N in flight, either as
fast as that allows or with Poisson arrivals at a given rate, and reports per-request TTFT, TPOT, inter-token
latency and end-to-end latency (mean, p50, p90, p99), request and token throughput, goodput against SLOs, and
errors by kind (`http_<status>`, `timeout`, `stream_error`, `connect_error`). Failed requests are counted, never
raised. Results go to stdout (a table), optionally a JSON file and PNG plots (latency CDFs, throughput over time).

The OpenAI API has no `ignore_eos`, so output length is *requested* with `max_tokens=K` and *measured* from the
server's `usage.completion_tokens`; prompt tokens are likewise counted from `usage.prompt_tokens`. Prompts are
~L words from a fixed word list (deterministic by seed), or exactly L tokens when a tokenizer is given.

Importable API (used by benchmarks/compare): `run_benchmark(BenchConfig(...)) -> BenchResult` (async).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httpx
import numpy as np

from expertmesh.core import settings

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# Common short English words: each is one token in most BPE vocabularies, so L words make a prompt of about L tokens.
WORDS = tuple(
    """
the of and to in is was he for it with as his on be at by had are but from or have an they which one you were
her all she there would their we him been has when who will more no if out so said what up its about into than
them can only other new some could time these two may then do first any my now such like our over man me even
most made after also did many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come since against go came
right used take three states himself few house use during without again place around however home small found
thought went say part once general high upon school every number public course another water form less light
""".split()
)


class BenchError(Exception):
    """A run that cannot start or finish: unreachable server, unknown model, failed warm-up. Message is for users."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class BenchConfig:
    url: str  # base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)
    model: str
    concurrency: int = 1  # requests in flight at most
    num_requests: int = 32
    input_len: int = 64  # prompt length target (words, or tokens with `tokenizer`)
    output_len: int = 64  # max_tokens of every request
    rate: float | None = None  # requests/s with Poisson arrivals; None = as fast as concurrency allows
    endpoint: str = "completions"  # "completions" (raw prompt) or "chat"
    api_key: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    timeout_s: float = 600.0  # per request, whole stream
    warmup: int = 1  # requests sent (and checked) before the measured run
    temperature: float = 0.0
    tokenizer: str | None = None  # HF tokenizer dir/name: prompts of exactly input_len tokens
    prompts: list[str] | None = None  # explicit prompts (cycled); overrides synthesis
    extra_body: dict = field(default_factory=dict)  # merged into every request body (e.g. vLLM's ignore_eos)
    show_progress: bool = True

    def validate(self) -> None:
        for name in ("concurrency", "num_requests", "input_len", "output_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BenchError(f"{name} must be a positive integer, got {value!r}", 2)
        for name in ("rate", "slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise BenchError(f"{name} must be a positive number, got {value!r}", 2)
        if not self.timeout_s > 0:
            raise BenchError(f"timeout_s must be positive, got {self.timeout_s!r}", 2)
        if self.warmup < 0:
            raise BenchError(f"warmup must be >= 0, got {self.warmup!r}", 2)
        if self.endpoint not in ENDPOINTS:
            raise BenchError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}", 2)
        if self.prompts is not None and not self.prompts:
            raise BenchError("prompts, when given, must not be empty", 2)
        normalize_url(self.url)


@dataclass
class RequestRecord:
    """One measured request. Times are seconds; `start_s` and `chunk_times_s` are offsets from the run's start."""

    index: int
    start_s: float = 0.0
    ok: bool = False
    error_kind: str | None = None  # http_<status> | timeout | stream_error | connect_error | client_error
    error: str | None = None
    ttft_s: float | None = None  # to the first chunk carrying generated text
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between successive text chunks
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # from usage (None when the server sent no usage)
    output_tokens: int = 0  # from usage, else the number of text chunks
    usage_reported: bool = False

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's definition); None for < 2 tokens."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---------------------------------------------------------------------------------------------- inputs


def normalize_url(url: str) -> str:
    """Base URL without a trailing slash or /v1; ValueError-free: raises BenchError with the reason."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"--url must look like http://HOST:PORT, got {url!r}", 2)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise BenchError(f"--url has a bad port: {url!r} ({exc})", 2) from None
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


def synthesize_prompts(n: int, input_len: int, seed: int = 0, tokenizer=None) -> list[str]:
    """n distinct prompts drawn from WORDS, deterministic by seed.

    Without a tokenizer each prompt is exactly `input_len` words (≈ tokens for BPE vocabularies). With one
    (anything with `encode`/`decode`, e.g. a transformers tokenizer) each is cut to `input_len` tokens.
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=input_len)]
        text = " ".join(words)
        if tokenizer is not None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            while len(ids) < input_len:  # words that encode to < 1 token each: add more
                text += " " + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=input_len))
                ids = tokenizer.encode(text, add_special_tokens=False)
            text = tokenizer.decode(ids[:input_len])
        prompts.append(text)
    return prompts


def arrival_offsets(n: int, rate: float | None, seed: int = 0) -> list[float]:
    """Send time of each request, seconds from start: all 0 without a rate, else a Poisson process at `rate`/s."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n)  # [n]
    gaps[0] = 0.0  # the first request goes at once, as in vLLM
    return np.cumsum(gaps).tolist()


def _load_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise BenchError(f"--tokenizer needs transformers: {exc}") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear message
        raise BenchError(f"cannot load tokenizer {name!r}: {exc}", 2) from None


# ---------------------------------------------------------------------------------------------- one request


def _request_body(config: BenchConfig, prompt: str) -> dict:
    body: dict = {
        "model": config.model,
        "max_tokens": config.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(config.extra_body)
    return body


def _chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choice.get("text") or ""


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error", data)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:300]


async def _stream_one(
    client: httpx.AsyncClient, path: str, body: dict, record: RequestRecord, endpoint: str, t0: float
) -> None:
    """Send one streaming request and fill `record`; raises only httpx/asyncio errors (classified by the caller)."""
    start = time.perf_counter()
    record.start_s = start - t0
    last = start
    chunks = 0
    done = False
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            record.error_kind = f"http_{response.status_code}"
            record.error = _error_message(await response.aread())
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                record.error_kind, record.error = "stream_error", f"malformed SSE data: {payload[:120]!r}"
                return
            if "error" in chunk:
                record.error_kind = "stream_error"
                err = chunk["error"]
                record.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                return
            now = time.perf_counter()
            if _chunk_text(chunk, endpoint):
                chunks += 1
                if record.ttft_s is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last = now
                record.chunk_times_s.append(now - t0)
            usage = chunk.get("usage")
            if usage:
                record.usage_reported = True
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = int(usage.get("completion_tokens") or 0)
    if not done:
        record.error_kind, record.error = "stream_error", "stream ended before data: [DONE]"
        return
    record.e2e_s = time.perf_counter() - start
    if not record.usage_reported:
        record.output_tokens = chunks
    record.ok = True


async def _send(client: httpx.AsyncClient, config: BenchConfig, prompt: str, index: int, t0: float) -> RequestRecord:
    """One request, never raising: every failure becomes an error kind on the record."""
    record = RequestRecord(index=index)
    body = _request_body(config, prompt)
    try:
        await asyncio.wait_for(
            _stream_one(client, ENDPOINTS[config.endpoint], body, record, config.endpoint, t0), timeout=config.timeout_s
        )
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        record.error_kind, record.error = (
            "timeout",
            f"no complete response within {config.timeout_s:g} s ({type(exc).__name__})",
        )
    except httpx.ConnectError as exc:
        record.error_kind, record.error = "connect_error", str(exc) or type(exc).__name__
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.StreamError, httpx.NetworkError) as exc:
        record.error_kind, record.error = "stream_error", f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - errors never crash the run
        record.error_kind, record.error = "client_error", f"{type(exc).__name__}: {exc}"[:300]
    if record.error_kind is not None:
        record.ok = False
    return record


# ---------------------------------------------------------------------------------------------- aggregation


def distribution(values_s: list[float]) -> dict:
    """mean/p50/p90/p99/min/max in milliseconds (None when there are no values)."""
    if not values_s:
        return {k: None for k in ("mean", "p50", "p90", "p99", "min", "max", "count")} | {"count": 0}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3  # [n]
    # [3]: a list of percentiles gives an array (mypy picks the scalar overload: numpy's typing aliases are skipped)
    p50, p90, p99 = cast(np.ndarray, np.percentile(ms, [50, 90, 99]))
    return {
        "mean": float(ms.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(ms.min()),
        "max": float(ms.max()),
        "count": int(ms.size),
    }


def is_good(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """A successful request meeting every SLO given (TPOT is not defined, hence met, for one-token outputs)."""
    if not record.ok:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1e3 > slo_ttft_ms):
        return False
    tpot = record.tpot_s
    if slo_tpot_ms is not None and tpot is not None and tpot * 1e3 > slo_tpot_ms:
        return False
    return True


def summarize(
    records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> dict:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error_kind or "unknown"] = errors.get(r.error_kind or "unknown", 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(is_good(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "requests_without_usage": sum(not r.usage_reported for r in ok),
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "good_requests": good,
        "goodput": per_s(good),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
        "e2el_ms": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


@dataclass
class BenchResult:
    config: BenchConfig
    records: list[RequestRecord]
    duration_s: float
    started_at: str
    summary: dict

    def to_dict(self, with_requests: bool = True) -> dict:
        config = asdict(self.config)
        prompts = config.pop("prompts")
        config["explicit_prompts"] = len(prompts) if prompts else 0
        config.pop("api_key")  # never write secrets to result files
        out: dict[str, object] = {"started_at": self.started_at, "config": config, "summary": self.summary}
        if with_requests:
            out["requests"] = [
                {
                    "index": r.index,
                    "ok": r.ok,
                    "error_kind": r.error_kind,
                    "error": r.error,
                    "start_s": r.start_s,
                    "ttft_ms": _ms(r.ttft_s),
                    "tpot_ms": _ms(r.tpot_s),
                    "e2el_ms": _ms(r.e2e_s),
                    "itl_ms": [g * 1e3 for g in r.itl_s],
                    "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens,
                    "usage_reported": r.usage_reported,
                }
                for r in self.records
            ]
        return out

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def write_plots(self, out_dir: str | Path) -> list[Path]:
        return write_plots(self, out_dir)

    def table(self) -> str:
        return format_table(self)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def format_table(result: BenchResult) -> str:
    s, c = result.summary, result.config
    width = 50
    lines = ["=" * 16 + " Serving Benchmark Result " + "=" * 8]

    def row(label: str, value) -> None:
        lines.append(f"{label:<{width - 14}}{value:>14}")

    row("Endpoint:", f"{c.endpoint}")
    row("Concurrency / rate:", f"{c.concurrency} / {'inf' if c.rate is None else f'{c.rate:g}/s'}")
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    for kind, n in s["errors"].items():
        row(f"  {kind}:", n)
    row("Benchmark duration (s):", f"{s['duration_s']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    slo = s["slo"]
    if slo["ttft_ms"] is not None or slo["tpot_ms"] is not None:
        row("Request goodput (req/s):", f"{s['goodput']:.2f}")
    for key, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
    ):
        lines.append(f"{'-' * 6} {title} {'-' * max(1, width - 8 - len(title))}")
        d = s[key]
        name = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p90", "p99"):
            row(
                f"{stat.capitalize() if stat == 'mean' else stat.upper()} {name} (ms):",
                "n/a" if d[stat] is None else f"{d[stat]:.2f}",
            )
    lines.append("=" * width)
    return "\n".join(lines)


def write_plots(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, ITL, E2E) and throughput.png (output tokens/s and requests in flight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result.records if r.ok]
    series = {
        "TTFT": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "TPOT": [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None],
        "Inter-token latency": [g * 1e3 for r in ok for g in r.itl_s],
        "End-to-end latency": [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None],
    }
    slo = {"TTFT": result.config.slo_ttft_ms, "TPOT": result.config.slo_tpot_ms}
    title = (
        f"{result.config.model} @ {result.config.url} — concurrency {result.config.concurrency}, "
        f"{result.summary['completed']}/{result.summary['requests']} ok"
    )

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items()):
        if values:
            xs = np.sort(np.asarray(values))  # [n]
            ys = np.arange(1, xs.size + 1) / xs.size
            ax.step(xs, ys, where="post")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if slo.get(name) is not None:
            ax.axvline(slo[name], color="red", linestyle="--", label=f"SLO {slo[name]:g} ms")
            ax.legend(loc="lower right")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "Inter-token latency" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    cdf_path = out_dir / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    duration = max(result.duration_s, 1e-3)
    bucket = max(0.1, duration / 60)
    n_buckets = int(math.ceil(duration / bucket)) + 1
    tokens = np.zeros(n_buckets)  # [B] output tokens per bucket
    for r in ok:
        if r.chunk_times_s:
            # usage gives the exact token count; spread it evenly over the chunks that carried it
            per_chunk = r.output_tokens / len(r.chunk_times_s)
            idx = np.minimum((np.asarray(r.chunk_times_s) / bucket).astype(int), n_buckets - 1)
            np.add.at(tokens, idx, per_chunk)
    edges = np.arange(n_buckets) * bucket  # [B]
    in_flight = np.zeros(n_buckets)  # [B] requests in flight at each bucket start
    for r in result.records:
        end = r.start_s + (r.e2e_s if r.e2e_s is not None else 0.0)
        in_flight += (edges >= r.start_s) & (edges < end)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(edges, tokens / bucket, where="post", label="output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.step(edges, in_flight, where="post", color="tab:orange", alpha=0.7, label="requests in flight")
    ax2.set_ylabel("requests in flight")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tput_path = out_dir / "throughput.png"
    fig.savefig(tput_path, dpi=100)
    plt.close(fig)
    return [cdf_path, tput_path]


# ---------------------------------------------------------------------------------------------- the run


async def _check_server(client: httpx.AsyncClient, base: str, model: str) -> None:
    """Fail early and clearly: unreachable server, bad API key, or a model the server does not list."""
    try:
        response = await client.get("/v1/models", timeout=15.0)
    except httpx.ConnectError as exc:
        raise BenchError(f"cannot connect to {base} ({exc or type(exc).__name__}); is the server running?", 2) from None
    except httpx.TimeoutException:
        raise BenchError(f"{base} did not answer GET /v1/models within 15 s", 2) from None
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot talk to {base}: {type(exc).__name__}: {exc}", 2) from None
    if response.status_code in (401, 403):
        raise BenchError(f"{base} refused the API key (HTTP {response.status_code}): pass --api-key KEY", 2)
    if response.status_code != 200:
        return  # no /v1/models on this server: the warm-up request checks the model instead
    try:
        served = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        return
    if served and model not in served:
        raise BenchError(f"model {model!r} is not served at {base}; it serves: {', '.join(served)}", 2)


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run the benchmark described by `config`. Raises BenchError only for a run that cannot start."""
    config.validate()
    base = normalize_url(config.url)
    tokenizer = _load_tokenizer(config.tokenizer) if config.tokenizer and config.prompts is None else None
    if config.prompts is not None:
        prompts = [config.prompts[i % len(config.prompts)] for i in range(config.num_requests + config.warmup)]
    else:
        prompts = synthesize_prompts(config.num_requests + config.warmup, config.input_len, config.seed, tokenizer)
    warmup_prompts, prompts = prompts[: config.warmup], prompts[config.warmup :]
    offsets = arrival_offsets(config.num_requests, config.rate, config.seed)

    headers = {}
    api_key = config.api_key or settings.openai_api_key()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx.Limits(max_connections=config.concurrency + 1, max_keepalive_connections=config.concurrency + 1)
    timeout = httpx.Timeout(config.timeout_s, connect=15.0)
    # trust_env=False: a benchmark must not go through an HTTP proxy from the environment
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        await _check_server(client, base, config.model)
        for i, prompt in enumerate(warmup_prompts):
            rec = await _send(client, config, prompt, -1 - i, time.perf_counter())
            if not rec.ok:
                raise BenchError(f"warm-up request failed ({rec.error_kind}): {rec.error}")

        from tqdm import tqdm

        bar = tqdm(
            total=config.num_requests,
            file=sys.stderr,
            unit="req",
            disable=not config.show_progress,
            desc=f"bench c={config.concurrency}",
            dynamic_ncols=True,
        )
        semaphore = asyncio.Semaphore(config.concurrency)
        failed = 0
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()

        async def limited(i: int) -> RequestRecord:
            nonlocal failed
            async with semaphore:  # timing starts inside: client-side queueing is not server latency
                record = await _send(client, config, prompts[i], i, t0)
            failed += not record.ok
            bar.update(1)
            if failed:
                bar.set_postfix(errors=failed)
            return record

        tasks = []
        try:
            for i in range(config.num_requests):
                delay = t0 + offsets[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(i)))
            records = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        duration = time.perf_counter() - t0

    summary = summarize(records, duration, config.slo_ttft_ms, config.slo_tpot_ms)
    return BenchResult(config=config, records=records, duration_s=duration, started_at=started_at, summary=summary)


# ---------------------------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _url(text: str) -> str:
    try:
        return normalize_url(text)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--url ", "")) from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, type=_url, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model name as the server knows it (see GET /v1/models)")
    parser.add_argument("--concurrency", type=_positive_int, default=1, help="requests in flight at most (default 1)")
    parser.add_argument("--requests", type=_positive_int, default=32, help="measured requests (default 32)")
    parser.add_argument(
        "--input-len",
        type=_positive_int,
        default=64,
        help="prompt length: words, or tokens with --tokenizer (default 64)",
    )
    parser.add_argument("--output-len", type=_positive_int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        help="Poisson arrivals at this many requests/s (default: as fast as concurrency allows)",
    )
    parser.add_argument(
        "--endpoint",
        choices=sorted(ENDPOINTS),
        default="completions",
        help="/v1/completions (raw prompt, default) or /v1/chat/completions",
    )
    parser.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY if set)")
    parser.add_argument("--slo-ttft-ms", type=_positive_float, default=None, help="goodput SLO on time to first token")
    parser.add_argument(
        "--slo-tpot-ms", type=_positive_float, default=None, help="goodput SLO on time per output token"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt and arrival seed (default 0)")
    parser.add_argument("--timeout", type=_positive_float, default=600.0, help="per-request timeout, s (default 600)")
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=1,
        help="unmeasured requests sent first; a failure aborts the run (default 1)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer dir: prompts of exactly --input-len tokens")
    parser.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        help="JSON merged into every request body, e.g. '{\"ignore_eos\": true}' for vLLM",
    )
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the result as JSON")
    parser.add_argument(
        "--plot",
        dest="plot_dir",
        default=None,
        metavar="DIR",
        help="write latency_cdf.png and throughput.png into DIR (and, against expertmesh's "
        "gateway, expert_load.png and replicas.png from GET /experts)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        url=args.url,
        model=args.model,
        concurrency=args.concurrency,
        num_requests=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        rate=args.rate,
        endpoint=args.endpoint,
        api_key=args.api_key,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        seed=args.seed,
        timeout_s=args.timeout,
        warmup=args.warmup,
        temperature=args.temperature,
        tokenizer=args.tokenizer,
        extra_body=args.extra_body,
        show_progress=not args.no_progress,
    )


def expert_plots(config: BenchConfig, out_dir: str | Path) -> list[Path]:
    """expert_load.png and replicas.png from the server's GET /experts (expertmesh's gateway); [] elsewhere."""
    from expertmesh.plots import write_expert_plots

    headers = {}
    api_key = config.api_key or settings.openai_api_key()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        reply = httpx.get(normalize_url(config.url) + "/experts", headers=headers, timeout=10)
        data = reply.json() if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("experts"), list):
        return []  # not an expertmesh gateway: only the latency plots
    return write_expert_plots(data, out_dir)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        result = asyncio.run(run_benchmark(config))
    except BenchError as exc:
        print(f"expertmesh bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("expertmesh bench: interrupted", file=sys.stderr)
        return 130
    print(result.table())
    try:
        if args.json_path:
            print(f"wrote {result.write_json(args.json_path)}")
        if args.plot_dir:
            for path in result.write_plots(args.plot_dir) + expert_plots(config, args.plot_dir):
                print(f"wrote {path}")
    except OSError as exc:
        print(f"expertmesh bench: error: cannot write results: {exc}", file=sys.stderr)
        return 1
    if result.summary["completed"] == 0:
        print("expertmesh bench: error: every request failed", file=sys.stderr)
        return 1
    return 0
