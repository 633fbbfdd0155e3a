"""The router's gRPC server as the Helm chart runs it (`python -m expertmesh.router.server ...` subprocesses).

Two routers on the tiny fp32 Mixtral, started once for the module (eager, 1 GiB KV cache, max_model_len 256):
- local experts (the monolithic baseline): Generate streaming against transformers as the oracle (greedy tokens
  identical, logprobs within 1e-4), logprobs/prompt logprobs, stop strings, seeded sampling, cancellation on
  client disconnect (the request leaves the engine), every bad input -> INVALID_ARGUMENT, Health, Stats;
- remote experts: a real expert directory + a real ExpertServer (in this process) holding every expert. Same
  greedy output as the local router, routed-token counters in Stats, and when the only replica leaves: Health
  reports the missing experts, Generate ends with UNAVAILABLE, and the server serves again once a replica is back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import free_port

from expertmesh.core.protos import router_pb2 as pb
from expertmesh.core.protos import router_pb2_grpc as pbg

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox jumps over"


# ---- router subprocess (also used by tests/test_gateway.py) ---------------------------------------------------


@dataclass
class RouterProc:
    proc: subprocess.Popen
    address: str
    metrics_port: int
    log_path: Path

    def stub(self) -> pbg.RouterStub:
        return pbg.RouterStub(grpc.insecure_channel(self.address))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def metric(self, name: str, labels: str = "") -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, labels: str, expected: float, timeout: float = 10.0) -> float:
        """The metric once it equals `expected` (or its value at the timeout). For counters a request's handler
        bumps as it unwinds: e.g. the engine goes idle on an abort before the gRPC handler counts it."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, labels)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn_router(model: Path, log_path: Path, *extra: str, env: dict | None = None) -> RouterProc:
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "expertmesh.router.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        *extra,
    ]
    # Each router chooses its own counters file, as a user's would: not one an in-process test of this session
    # pinned in this process's environment (plugin.configure_remote exports it).
    inherited = {k: v for k, v in os.environ.items() if k != "EXPERTMESH_COUNTERS_FILE"}
    full_env = dict(inherited, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return RouterProc(proc, f"127.0.0.1:{port}", metrics_port, log_path)


def wait_ready(router: RouterProc, timeout: float = 420.0, want_ok: bool = True) -> pb.HealthResponse:
    stub = router.stub()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.proc.poll() is not None:
            raise RuntimeError(f"router exited with {router.proc.returncode}:\n{router.log()}")
        try:
            health = stub.Health(pb.HealthRequest(), timeout=2)
            if health.ok or not want_ok:
                return health
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"router not ready after {timeout:.0f}s:\n{router.log()}")


def generate(stub, prompt=PROMPT, **params) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(params=pb.SamplingParams(**params))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return list(stub.Generate(request, timeout=120))


def tokens_of(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


# ---- fixtures --------------------------------------------------------------------------------------------------


class Pool:
    """A real expert directory and one real ExpertServer holding every (layer, expert), in this process."""

    def __init__(self, model: Path):
        from expertmesh.core.checkpoint import read_moe_info
        from expertmesh.discovery.directory import DirectoryClient, DirectoryServer

        info = read_moe_info(model)
        self.model = model
        self.keys = {layer: list(range(info.num_experts)) for layer in info.moe_layers}
        self.num_keys = sum(len(v) for v in self.keys.values())
        self.directory = DirectoryServer()
        self.address = f"127.0.0.1:{self.directory.start()}"
        self.client = DirectoryClient(self.address)
        self.server = None

    def add_replica(self, replica_id: str = "all") -> None:
        from expertmesh.core.protos import expert_pb2
        from expertmesh.experts.replica import ExpertServer, keys_to_proto

        self.server = ExpertServer(self.model, self.keys, replica_id=replica_id, group="all")
        port = self.server.start()
        self.client.register(
            expert_pb2.ReplicaEntry(
                replica_id=replica_id, group="all", endpoint=f"127.0.0.1:{port}", keys=keys_to_proto(self.keys)
            ),
            lease_seconds=3600,
        )
        self.replica_id = replica_id

    def remove_replica(self) -> None:
        self.client.deregister(self.replica_id)
        self.server.stop(grace=0)
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
        self.client.close()
        self.directory.stop()


@dataclass
class Routers:
    local: RouterProc
    remote: RouterProc
    pool: Pool
    model: Path


@pytest.fixture(scope="module")
def routers(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("mixtral")
    logs = tmp_path_factory.mktemp("router-logs")
    pool = Pool(model)
    pool.add_replica()
    # Both engines start at once (start-up is mostly waiting on imports and warm-up).
    local = spawn_router(model, logs / "local.log", "--local-experts")
    remote = spawn_router(
        model,
        logs / "remote.log",
        "--directory",
        pool.address,
        env={"EXPERTMESH_MISSING_EXPERT_WAIT_S": "1", "EXPERTMESH_DISPATCH_DEADLINE_S": "3"},
    )
    try:
        wait_ready(local)
        wait_ready(remote)
        yield Routers(local, remote, pool, model)
    finally:
        local.stop()
        remote.stop()
        pool.close()


@pytest.fixture(scope="module")
def oracle(routers):
    """transformers on the same checkpoint: greedy continuation and teacher-forced logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(routers.model)
    model = AutoModelForCausalLM.from_pretrained(routers.model, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:  # [len(ids), V] log-softmax of the next-token logits
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def greedy(prompt_ids: list[int], n: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(int(logprobs(ids)[-1].argmax()))
        return ids[len(prompt_ids) :]

    return tokenizer, greedy, logprobs


# ---- local experts ---------------------------------------------------------------------------------------------


def test_greedy_stream_matches_transformers(routers, oracle):
    tokenizer, greedy, logprobs = oracle
    stub = routers.local.stub()
    messages = generate(stub, max_tokens=24, temperature=0, logprobs=0)
    prompt_ids = tokenizer.encode(PROMPT)
    assert list(messages[0].prompt_token_ids) == prompt_ids
    assert all(not m.prompt_token_ids for m in messages[1:])
    out = tokens_of(messages)
    assert out == greedy(prompt_ids, 24)
    # per-token logprobs equal transformers' (teacher-forced on the generated sequence)
    reference = logprobs(prompt_ids + out)[len(prompt_ids) - 1 : -1]  # [24, V]
    got = torch.tensor([lp.logprob for m in messages for lp in m.logprobs])
    want = reference[torch.arange(24), torch.tensor(out)]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # streaming bookkeeping: counts accumulate, only the last message finishes, text deltas add up
    assert [m.completion_tokens for m in messages] == list(
        torch.cumsum(torch.tensor([len(m.token_ids) for m in messages]), 0).tolist()
    )
    assert all(m.prompt_tokens == len(prompt_ids) for m in messages)
    assert [m.finish_reason for m in messages] == [""] * (len(messages) - 1) + ["length"]
    assert "".join(m.text for m in messages) == tokenizer.decode(out, skip_special_tokens=True)
    # the same prompt as token ids gives the same tokens
    assert tokens_of(generate(stub, prompt_ids, max_tokens=24, temperature=0)) == out


def test_logprobs_and_prompt_logprobs(routers, oracle):
    tokenizer, _, logprobs = oracle
    messages = generate(routers.local.stub(), max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2)
    out = tokens_of(messages)
    entries = [lp for m in messages for lp in m.logprobs]
    assert len(entries) == len(out) == 6
    for token_id, entry in zip(out, entries):
        assert entry.token_id == token_id
        assert len(entry.top) == 3
        tops = [t.logprob for t in entry.top]
        assert tops == sorted(tops, reverse=True)
        assert entry.top[0].token_id == token_id and entry.top[0].logprob == entry.logprob  # greedy
    prompt_ids = list(messages[0].prompt_token_ids)
    prompt_lps = list(messages[0].prompt_logprobs)
    assert len(prompt_lps) == len(prompt_ids)
    assert prompt_lps[0] == pb.TokenLogprob()  # no logprob for the first prompt token
    reference = logprobs(prompt_ids)  # [P, V]
    for i in range(1, len(prompt_ids)):
        assert prompt_lps[i].token_id == prompt_ids[i]
        assert abs(prompt_lps[i].logprob - float(reference[i - 1, prompt_ids[i]])) < 1e-4
        assert len(prompt_lps[i].top) == 2
        assert prompt_lps[i].top[0].token_id == int(reference[i - 1].argmax())


def test_stop_string(routers):
    stub = routers.local.stub()
    full = "".join(m.text for m in generate(stub, max_tokens=24, temperature=0))
    assert len(full) >= 8, full
    stop = full[4:7]
    first = full.index(stop)
    messages = generate(stub, max_tokens=24, temperature=0, stop=[stop])
    assert messages[-1].finish_reason == "stop"
    assert "".join(m.text for m in messages) == full[:first]


def test_seeded_sampling_is_deterministic(routers):
    stub = routers.local.stub()
    a = tokens_of(generate(stub, max_tokens=16, temperature=1.0, seed=11))
    b = tokens_of(generate(stub, max_tokens=16, temperature=1.0, seed=11))
    c = tokens_of(generate(stub, max_tokens=16, temperature=1.0, seed=12))
    assert a == b
    assert a != c


def test_min_tokens_and_ignore_eos_run_to_max_tokens(routers):
    messages = generate(routers.local.stub(), max_tokens=40, min_tokens=40, temperature=0, ignore_eos=True)
    assert len(tokens_of(messages)) == 40 and messages[-1].finish_reason == "length"


def test_min_tokens_holds_back_an_early_stop(routers):
    """A stop string that ends the greedy continuation at its 2nd token is not honoured before min_tokens tokens."""
    stub = routers.local.stub()
    greedy = generate(stub, max_tokens=16, temperature=0, ignore_eos=True)
    full = tokens_of(greedy)
    assert len(full) == 16
    one = "".join(m.text for m in generate(stub, max_tokens=1, temperature=0, ignore_eos=True))
    two = "".join(m.text for m in generate(stub, max_tokens=2, temperature=0, ignore_eos=True))
    stop = two[len(one) :]  # the 2nd token's text
    assert stop, (one, two)
    early = generate(stub, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    assert early[-1].finish_reason == "stop" and len(tokens_of(early)) <= 2
    held = generate(stub, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], min_tokens=8)
    assert len(tokens_of(held)) >= 8, (tokens_of(held), held[-1].finish_reason)
    assert tokens_of(held)[:8] == full[:8]


def test_client_disconnect_aborts_the_request(routers):
    router = routers.local
    stub = router.stub()
    cancelled_before = router.metric("expertmesh_router_requests_total", '{status="cancelled"}')
    max_tokens = MAX_MODEL_LEN - 16  # the prompt is 12 tokens: as long as the context allows
    call = stub.Generate(
        pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    )
    first = next(call)
    assert first.prompt_token_ids
    assert stub.Stats(pb.StatsRequest()).requests_running == 1  # it is in the engine now
    call.cancel()
    deadline = time.monotonic() + 10
    while stub.Stats(pb.StatsRequest()).requests_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.Stats(pb.StatsRequest()).requests_running == 0  # aborted in vLLM, not run to the end
    assert (
        router.wait_metric("expertmesh_router_requests_total", '{status="cancelled"}', cancelled_before + 1)
        == cancelled_before + 1
    )
    assert tokens_of(generate(stub, max_tokens=4, temperature=0))  # and the router carries on


def test_cancelled_big_request_leaves_router_serving(routers):
    """One /v1/completions with 100 prompts and n=16 reaches the router as 1,600 concurrent Generate calls (the
    gateway's fan-out). The client goes away mid-way (the first tokens are out, most adds are still queued behind
    them): every call is cancelled at once, and the router carries on: healthy, nothing left in the engine, the
    same greedy tokens as before."""
    router = routers.local
    stub = router.stub()
    want = tokens_of(generate(stub, max_tokens=8, temperature=0))
    prompts = [[5 + p % 50, 60 + p, 7, 23 + p % 17, 11] for p in range(100)]  # token ids, as from the gateway
    calls = [
        stub.Generate(
            pb.GenerateRequest(
                request_id=f"gw{p * 16 + i}",
                token_ids=pb.TokenIds(ids=ids),
                params=pb.SamplingParams(max_tokens=64, temperature=1.0, seed=i, ignore_eos=True),
            ),
            timeout=120,
        )
        for p, ids in enumerate(prompts)
        for i in range(16)
    ]
    try:
        assert next(calls[0]).token_ids  # generation is under way
    finally:
        for call in calls:
            call.cancel()
    deadline = time.monotonic() + 60
    while stub.Stats(pb.StatsRequest()).requests_running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub.Stats(pb.StatsRequest()).requests_running == 0, router.log()
    health = stub.Health(pb.HealthRequest(), timeout=5)
    assert health.ok, health.detail
    assert tokens_of(generate(stub, max_tokens=8, temperature=0)) == want
    assert router.proc.poll() is None


BAD_REQUESTS = [
    ("empty text", dict(text=""), dict(max_tokens=4), "prompt is empty"),
    ("whitespace text", dict(text="   "), dict(max_tokens=4), "prompt is empty"),
    ("no prompt", dict(), dict(max_tokens=4), "prompt is empty"),
    ("empty token ids", dict(token_ids=pb.TokenIds(ids=[])), dict(max_tokens=4), "prompt is empty"),
    (
        "token id out of vocabulary",
        dict(token_ids=pb.TokenIds(ids=[5, 100000])),
        dict(max_tokens=4),
        "token id 100000 is out of vocabulary",
    ),
    ("negative token id", dict(token_ids=pb.TokenIds(ids=[-1])), dict(max_tokens=4), "out of vocabulary"),
    ("max_tokens 0", dict(text="hi"), dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (
        "beyond the context",
        dict(token_ids=pb.TokenIds(ids=[5] * 200)),
        dict(max_tokens=100),
        "This model's maximum context length is 256 tokens. However, you requested 300 tokens "
        "(200 in the messages, 100 in the completion).",
    ),
    (
        "prompt alone beyond the context",
        dict(token_ids=pb.TokenIds(ids=[5] * 300)),
        dict(max_tokens=1),
        "This model's maximum context length is 256 tokens. However, you requested 301 tokens",
    ),
    ("negative temperature", dict(text="hi"), dict(max_tokens=4, temperature=-0.5), "temperature must be"),
    ("temperature above 2", dict(text="hi"), dict(max_tokens=4, temperature=2.5), "temperature must be in [0, 2]"),
    (
        "nan temperature",
        dict(text="hi"),
        dict(max_tokens=4, temperature=float("nan")),
        "temperature must be a finite number",
    ),
    ("top_p above 1", dict(text="hi"), dict(max_tokens=4, top_p=1.5), "top_p must be in (0, 1]"),
    ("top_k below -1", dict(text="hi"), dict(max_tokens=4, top_k=-2), "top_k must be"),
    (
        "presence_penalty",
        dict(text="hi"),
        dict(max_tokens=4, presence_penalty=2.5),
        "presence_penalty must be in [-2, 2]",
    ),
    (
        "frequency_penalty",
        dict(text="hi"),
        dict(max_tokens=4, frequency_penalty=-3),
        "frequency_penalty must be in [-2, 2]",
    ),
    (
        "repetition_penalty",
        dict(text="hi"),
        dict(max_tokens=4, repetition_penalty=-1),
        "repetition_penalty must be greater than zero",
    ),
    ("too many logprobs", dict(text="hi"), dict(max_tokens=4, logprobs=50), "logprobs of 50"),
    ("min_tokens above max_tokens", dict(text="hi"), dict(max_tokens=4, min_tokens=5), "min_tokens"),
    ("empty stop string", dict(text="hi"), dict(max_tokens=4, stop=[""]), "stop strings must not be empty"),
]


@pytest.mark.parametrize("prompt,params,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument(routers, prompt, params, message):
    stub = routers.local.stub()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(params=pb.SamplingParams(**params), **prompt), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert stub.Stats(pb.StatsRequest()).requests_running == 0


def test_health_and_stats_local(routers):
    stub = routers.local.stub()
    health = stub.Health(pb.HealthRequest())
    assert health.ok and health.detail == ""
    assert health.model == str(routers.model)
    assert health.max_model_len == MAX_MODEL_LEN
    assert health.local_experts and health.missing_experts == 0
    stats = stub.Stats(pb.StatsRequest())
    assert stats.uptime_seconds > 0
    assert list(stats.experts) == []  # vLLM computes the experts: no dispatcher, no counters
    assert stats.requests_running == 0
    assert routers.local.metric("expertmesh_router_generated_tokens_total") > 0


# ---- remote experts --------------------------------------------------------------------------------------------


def test_remote_router_matches_local_and_counts_routed_tokens(routers):
    local, remote = routers.local.stub(), routers.remote.stub()
    health = remote.Health(pb.HealthRequest())
    assert health.ok and not health.local_experts and health.missing_experts == 0
    before = {(e.layer, e.expert): e.routed_tokens for e in remote.Stats(pb.StatsRequest()).experts}
    assert len(before) == routers.pool.num_keys
    prompt = "Each expert is a small feed-forward network"  # not seen before by this router: no prefix-cache hit
    want = generate(local, prompt, max_tokens=12, temperature=0, logprobs=0)
    got = generate(remote, prompt, max_tokens=12, temperature=0, logprobs=0)
    assert tokens_of(got) == tokens_of(want)
    diff = max(
        abs(a.logprob - b.logprob)
        for a, b in zip([lp for m in got for lp in m.logprobs], [lp for m in want for lp in m.logprobs])
    )
    assert diff <= 1e-5
    stats = remote.Stats(pb.StatsRequest())
    assert all(e.replicas == 1 for e in stats.experts)
    # every computed token went to top-2 experts in each MoE layer: prefill P tokens + (12 - 1) decode steps
    computed = len(got[0].prompt_token_ids) + 12 - 1
    for layer in routers.pool.keys:
        added = sum(e.routed_tokens - before[(e.layer, e.expert)] for e in stats.experts if e.layer == layer)
        assert added == 2 * computed


def test_remote_router_without_replica_fails_requests_and_stays_up(routers):
    stub, pool = routers.remote.stub(), routers.pool
    want = tokens_of(generate(stub, max_tokens=8, temperature=0))
    pool.remove_replica()
    try:
        deadline = time.monotonic() + 15
        while stub.Health(pb.HealthRequest()).missing_experts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = stub.Health(pb.HealthRequest())
        assert not health.ok
        assert health.missing_experts == pool.num_keys
        assert "no live replica" in health.detail
        assert all(e.replicas == 0 for e in stub.Stats(pb.StatsRequest()).experts)
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, "A different prompt", max_tokens=8, temperature=0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live replica" in err.value.details()
        assert stub.Stats(pb.StatsRequest()).requests_running == 0
    finally:
        pool.add_replica("all-again")
    wait_ready(routers.remote, timeout=30)
    assert tokens_of(generate(stub, max_tokens=8, temperature=0)) == want


def test_stopped_router_removes_the_counters_file_it_chose(routers):
    """Last in this module (it stops the remote router): the routed-token counters file a router chose for itself
    (none configured) lives as long as the router, not in /dev/shm forever after."""
    from expertmesh.router.counters import RoutedTokenCounters

    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = Path(base) / f"expertmesh-routed-tokens-{routers.remote.proc.pid}.npy"
    assert RoutedTokenCounters.open(path) is not None, "the running router's counters file"
    routers.remote.stop()
    assert routers.remote.proc.returncode == 0, routers.remote.log()
    assert not path.exists() and not Path(f"{path}.json").exists()
