"""The one wire codec: tensors <-> `expertmesh.v1.Tensor` (raw little-endian bytes + dtype + shape).

Decoding is zero-copy (numpy / torch views over the protobuf bytes) and every check on an incoming
ForwardRequest lives here (in `decode_forward`, the one place that reads the request's `whole_layer` flag), each
with its own message, raised as `WireError` (the servers map it to gRPC INVALID_ARGUMENT; `ExpertNotHeld` maps to
NOT_FOUND). No pickle. The request decoder and the encoders run once per MoE layer per step on the latency path,
where every cold torch or numpy call is costly (measured in docs/benchmarks.md): they use views, `tobytes` and
Python builtins rather than array operations.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from expertmesh.core.protos import expert_pb2

_TO_WIRE = {
    torch.float32: expert_pb2.FLOAT32,
    torch.bfloat16: expert_pb2.BFLOAT16,
    torch.float16: expert_pb2.FLOAT16,
    torch.int32: expert_pb2.INT32,
    torch.int64: expert_pb2.INT64,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _TO_WIRE}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts need a byteswap here"
# protobuf bytes are immutable and we never write into the views `decode` returns: silence torch's warning about
# non-writable buffers once here (a catch_warnings block per decode would be paid on every request).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class WireError(ValueError):
    """A message that breaks the wire contract (maps to gRPC INVALID_ARGUMENT)."""


class ExpertNotHeld(LookupError):
    """A request for a (layer, expert) this replica does not hold (maps to gRPC NOT_FOUND)."""


def dtype_name(wire_dtype: int) -> str:
    """Parameters: wire_dtype, an `expert_pb2.DType` value (possibly unknown). Returns: its name, or the number."""
    return expert_pb2.DType.Name(wire_dtype) if wire_dtype in expert_pb2.DType.values() else str(wire_dtype)


def encode(tensor: torch.Tensor) -> expert_pb2.Tensor:
    """Tensor -> wire message. Copies once (to contiguous bytes); bf16 travels as its raw 2-byte words.

    Parameters: tensor, of a wire dtype (float32, bfloat16, float16, int32, int64).
    Returns: a new `expert_pb2.Tensor`. Raises WireError for another dtype."""
    msg = expert_pb2.Tensor()
    encode_into(msg, tensor)
    return msg


def encode_into(msg: expert_pb2.Tensor, tensor: torch.Tensor) -> None:
    """Write `tensor` into `msg` in place (a sub-message set through a constructor would be copied again).

    Parameters: msg, an empty `expert_pb2.Tensor` (usually a field of a request or reply); tensor, as for `encode`.
    Returns: None. Raises WireError for a dtype the wire does not carry."""
    if tensor.dtype not in _TO_WIRE:
        raise WireError(f"dtype {tensor.dtype} is not supported on the wire (supported: {list(_TO_WIRE)})")
    encode_raw_into(msg, tensor.dtype, tensor.shape, raw_bytes(tensor) if tensor.numel() else b"")


def encode_raw_into(msg: expert_pb2.Tensor, dtype: torch.dtype, shape, data: bytes) -> None:
    """Write a tensor given as its raw little-endian bytes (e.g. `raw_bytes`, or a kernel's output) into `msg`.

    Parameters: msg, an empty `expert_pb2.Tensor`; dtype, a wire dtype; shape, its dims; data, prod(shape) *
    itemsize bytes (not checked here: the decoder checks). Returns: None."""
    msg.dtype = _TO_WIRE[dtype]
    msg.shape.extend(shape)
    if data:
        msg.data = data


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as contiguous little-endian bytes (one copy; bf16/fp16 as their raw 2-byte words).

    Parameters: tensor, any CPU or device tensor. Returns: bytes in C order."""
    t = tensor
    if t.requires_grad or not t.is_cpu or not t.is_contiguous():  # a kernel's output is none of these: no copy
        t = t.detach().contiguous().cpu()
    return (
        t.numpy() if t.dtype in _NUMPY else t.view(torch.int16 if t.element_size() == 2 else torch.uint8).numpy()
    ).tobytes()


def decode(msg: expert_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Wire message -> tensor viewing the message's bytes (read-only memory: clone before writing).

    Parameters: msg; name, for error messages. Returns: a tensor of msg's dtype and shape.
    Raises WireError for an unknown dtype, a negative dim or a byte length that does not match."""
    dtype, shape, data = _checked(msg, name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(data, dtype=dtype)
    return t if len(shape) == 1 else t.view(shape)


def decode_owned(msg: expert_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Wire message -> a tensor that owns (a copy of) the bytes, for a caller that hands it on or writes into it:
    one numpy copy where numpy has the dtype (cheaper than decode + a torch copy; docs/benchmarks.md).

    Parameters: msg; name, for error messages. Returns: a writable tensor. Raises WireError as `decode`."""
    dtype, shape, data = _checked(msg, name)
    if dtype in _NUMPY and data:
        return torch.from_numpy(np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape).copy())
    return decode(msg, name).clone()


def _checked(msg: expert_pb2.Tensor, name: str) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """(dtype, shape, bytes) of a wire tensor whose dtype is known, dims non-negative and byte length right."""
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{name}: unknown dtype {dtype_name(msg.dtype)}")
    shape = tuple(msg.shape)
    numel = 1
    for d in shape:
        if d < 0:
            raise WireError(f"{name}: negative dimension in shape {list(shape)}")
        numel *= d
    data = msg.data
    expected = numel * _ITEMSIZE[dtype]
    if len(data) != expected:
        raise WireError(
            f"{name}: {len(data)} bytes do not match shape {list(shape)} x {dtype_name(msg.dtype)} "
            f"({expected} bytes expected)"
        )
    return dtype, shape, data


@dataclass
class ForwardBatch:
    """A validated ForwardRequest. Every array stays a numpy view over the message's bytes (bf16/fp16 gate weights
    excepted: a float32 copy): on a replica's latency
    path a torch or numpy call costs tens of microseconds when the process has just woken up, where a view costs
    nothing (docs/benchmarks.md, "dispatch round trip"), so torch is touched only by the kernel's one op call."""

    layer: int
    hidden_data: np.ndarray  # [T, H] float32, or the raw uint16 words of bf16/fp16 (numpy has no bf16)
    dtype: torch.dtype  # hidden's dtype
    token_index: np.ndarray | None  # [N] int32 or int64, as sent; None for a whole-layer call
    expert: np.ndarray  # [N] int32 or int64, as sent
    weight: np.ndarray  # [N] float32
    whole_layer: bool = False  # all K assignments of each row, in row order: assignment n is row n // K

    @property
    def rows(self) -> int:
        return self.hidden_data.shape[0]

    @property
    def top_k(self) -> int:
        """K of a whole-layer call (N / T; 0 without rows)."""
        rows = self.hidden_data.shape[0]
        return self.expert.shape[0] // rows if rows else 0

    def row_index(self) -> np.ndarray:
        """[N] row of each assignment: token_index, or for a whole-layer call the materialised n // K (int32)."""
        if self.token_index is not None:
            return self.token_index
        return np.repeat(np.arange(self.rows, dtype=np.int32), self.top_k)

    @property
    def hidden(self) -> torch.Tensor:
        """[T, H] in `dtype`, viewing the message's (read-only) bytes."""
        t = torch.from_numpy(self.hidden_data)
        return t if self.dtype == torch.float32 else t.view(self.dtype)


def encode_forward(
    layer: int,
    hidden: torch.Tensor,
    token_index: torch.Tensor | np.ndarray | None,
    expert: torch.Tensor | np.ndarray,
    weight: torch.Tensor | np.ndarray,
) -> expert_pb2.ForwardRequest:
    """One layer's assignments for one replica -> a ForwardRequest.

    The router's latency path: numpy views and `tobytes`, no casts or torch calls beyond the one `numpy()` per
    tensor (docs/benchmarks.md).

    Parameters
    ----------
    layer: the model layer.
    hidden: [T, H] float tensor, one row per distinct token sent.
    token_index: [N] ints (sent as int32), the row of each assignment; or None for the whole-layer form: all K
        assignments of each row in row order (N = T * K), sent as `whole_layer` with no token_index at all.
    expert: [N] ints, the expert id of each assignment (int32 and int64 travel as they are).
    weight: [N] gate weights (sent as float32).
    Each array may be a tensor or a numpy array.

    Returns
    -------
    The request message (`decode_forward` is its inverse and its validator).
    """
    req = expert_pb2.ForwardRequest(layer=layer)
    encode_into(req.hidden, hidden)
    if token_index is None:
        req.whole_layer = True
    else:
        _encode_array_into(req.token_index, token_index, _WIRE_INT32)  # rows < 2^31
    _encode_array_into(req.expert, expert, _WIRE_INTS)
    _encode_array_into(req.weight, weight, _WIRE_FLOATS)
    return req


def as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """An array as numpy: itself, or a tensor's host view (bf16/fp16 as float32 copies: numpy has no bf16).

    Parameters: values, a numpy array or a tensor on any device. Returns: a numpy array (a view where it can)."""
    if isinstance(values, np.ndarray):
        return values
    if values.dtype in (torch.bfloat16, torch.float16):
        values = values.float()
    if values.requires_grad or not values.is_cpu:
        values = values.detach().cpu()
    return values.numpy()


def _encode_array_into(msg: expert_pb2.Tensor, values: torch.Tensor | np.ndarray, allowed: tuple) -> None:
    """An [N] assignment array, as it is if its dtype is in `allowed` (numpy dtypes), else cast to allowed[0]."""
    values = as_numpy(values)
    if values.dtype not in allowed:
        values = values.astype(allowed[0])
    msg.dtype = _NUMPY_TO_WIRE[values.dtype]
    msg.shape.append(values.size)
    if values.size:
        msg.data = values.tobytes()  # C order whatever the strides


def _decode_small(msg: expert_pb2.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> tuple[np.ndarray, bytes]:
    """An assignment array ([N] ints or floats) as a read-only numpy view, and its wire bytes."""
    dtype, shape, data = _checked(msg, name)
    if dtype not in allowed:
        raise WireError(f"{name}: dtype {dtype} not allowed (expected one of {list(allowed)})")
    if len(shape) != 1:
        raise WireError(f"{name}: expected 1 dim [assignments], got shape {list(shape)}")
    if dtype in _NUMPY:
        return np.frombuffer(data, dtype=_NUMPY[dtype]), data
    return as_numpy(decode(msg, name)), data  # bf16/fp16 gate weights as float32: numpy has no bf16


_INDEX_DTYPES = (torch.int32, torch.int64)
_FORWARD_FIELDS = ("hidden", "expert", "weight")  # and token_index, unless whole_layer


def decode_forward(
    req: expert_pb2.ForwardRequest,
    *,
    held: dict[int, frozenset[int]] | dict[int, set[int]],
    hidden_size: int,
    num_layers: int | None = None,
    num_experts: int | None = None,
    max_rows: int = 1 << 20,
) -> ForwardBatch:
    """Validate and decode a ForwardRequest against what the replica holds: every check of a ForwardRequest.

    On a replica's latency path once per call: every extra numpy/torch call costs the round trip several times its
    hot time here (docs/benchmarks.md), so the common case (a whole-layer call to a replica holding the layer) is
    checked with builtins only: a whole-layer call has no token index to range-check, and its expert ids are
    checked with one builtin max.

    Parameters
    ----------
    req: the parsed request.
    held: layer -> expert ids this replica holds.
    hidden_size: the model's H.
    num_layers: the model's layer count (None: unchecked).
    num_experts: experts per layer (None: ids are checked against `held` only).
    max_rows: the most rows (T) one request may carry.

    Returns
    -------
    ForwardBatch: numpy views over the request's bytes; `whole_layer` set (and token_index None) for the
    whole-layer form.

    Raises
    ------
    WireError (INVALID_ARGUMENT): a missing field, an unknown or wrong dtype, a bad shape or byte length, lengths
    that differ, an id out of range, a whole-layer call that also sends a token_index or whose assignments are not a
    multiple of its rows. ExpertNotHeld (NOT_FOUND): a layer or expert this replica does not hold.
    """
    layer = req.layer
    if num_layers is not None and layer >= num_layers:
        raise WireError(f"layer {layer} out of range: the model has {num_layers} layers")
    for field in _FORWARD_FIELDS:
        if not req.HasField(field):
            raise WireError(f"missing field '{field}'")
    whole = req.whole_layer
    if whole:
        if req.HasField("token_index"):
            raise WireError(
                "whole_layer call with a token_index: the whole-layer form implies row n // K, send one or the other"
            )
    elif not req.HasField("token_index"):
        raise WireError("missing field 'token_index'")
    dtype, shape, data = _checked(req.hidden, "hidden")
    if dtype not in FLOAT_DTYPES:
        raise WireError(f"hidden: dtype {dtype_name(req.hidden.dtype)} is not a float type")
    if len(shape) != 2:
        raise WireError(f"hidden: expected 2 dims [tokens, hidden], got shape {list(shape)}")
    rows = shape[0]
    if shape[1] != hidden_size:
        raise WireError(f"hidden: hidden size {shape[1]} does not match the model's {hidden_size}")
    if rows > max_rows:
        raise WireError(f"hidden: {rows} rows exceed the limit of {max_rows}")
    hidden = np.frombuffer(data, dtype=_HIDDEN_WORDS[dtype]).reshape(shape)  # [T, H] view
    expert, expert_data = _decode_small(req.expert, "expert", _INDEX_DTYPES)
    weight, _ = _decode_small(req.weight, "weight", FLOAT_DTYPES)
    n = expert.shape[0]
    if whole:
        token_index = ti_data = None
        if weight.shape[0] != n:
            raise WireError(f"assignment lengths differ: expert {n}, weight {weight.shape[0]}")
        if n and (rows == 0 or n % rows):
            raise WireError(f"whole_layer: {n} assignments are not a multiple of the {rows} rows")
    else:
        token_index, ti_data = _decode_small(req.token_index, "token_index", _INDEX_DTYPES)
        if token_index.shape[0] != n or weight.shape[0] != n:
            raise WireError(
                f"assignment lengths differ: token_index {token_index.shape[0]}, expert {n}, weight {weight.shape[0]}"
            )
    top = 0
    if n:
        # Range checks with builtins over the bytes read as unsigned (a negative id reads as a huge value): a cold
        # numpy reduction per call costs more than the whole check with builtins (docs/benchmarks.md). A
        # whole-layer call's rows n // K are in range by construction.
        # (token_index and its bytes are None exactly for a whole-layer call)
        if (
            token_index is not None
            and ti_data is not None
            and max(memoryview(ti_data).cast(_UNSIGNED_CODE[token_index.dtype])) >= rows
        ):
            raise WireError(f"token_index out of range [0, {rows})")
        top = max(memoryview(expert_data).cast(_UNSIGNED_CODE[expert.dtype]))
        if num_experts is not None and top >= num_experts:
            raise WireError(f"expert id out of range [0, {num_experts})")
    held_here = held.get(layer)
    if held_here is None:
        raise ExpertNotHeld(f"this replica holds no experts of layer {layer}")
    if n:
        # A replica that holds every expert of the layer (the default plan) needs no per-id check; otherwise one
        # gather through a cached lookup table. The exact list of missing experts is only computed for the error.
        size = num_experts if num_experts is not None else max(held_here, default=-1) + 1
        table, holds_all = _held_table(held_here, size)
        if top >= size or (not holds_all and not table[expert].all()):
            missing = sorted(set(np.unique(expert).tolist()) - set(held_here))
            raise ExpertNotHeld(f"this replica does not hold layer {layer} expert(s) {missing}")
    return ForwardBatch(layer, hidden, dtype, token_index, expert, weight, whole)


_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32}
_NUMPY_TO_WIRE: dict[np.dtype, int] = {np.dtype(v): _TO_WIRE[k] for k, v in _NUMPY.items()}
_WIRE_INTS: tuple[np.dtype, ...] = (np.dtype(np.int32), np.dtype(np.int64))
_WIRE_INT32: tuple[np.dtype, ...] = (np.dtype(np.int32),)
_WIRE_FLOATS: tuple[np.dtype, ...] = (np.dtype(np.float32),)
# memoryview formats of the unsigned views
_UNSIGNED_CODE: dict[np.dtype, Literal["I", "Q"]] = {np.dtype(np.int32): "I", np.dtype(np.int64): "Q"}
# numpy words viewing hidden's bytes: float32 as is, bf16/fp16 as their raw 16-bit words
_HIDDEN_WORDS = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.int16}
_HELD_TABLES: dict[tuple[frozenset, int], tuple[np.ndarray, bool]] = {}


def _held_table(held: frozenset[int] | set[int], size: int) -> tuple[np.ndarray, bool]:
    """([size] bool, True where the expert id is held; whether all `size` are held), cached per (held set, size):
    a replica has a few."""
    key = (held if isinstance(held, frozenset) else frozenset(held), size)
    entry = _HELD_TABLES.get(key)
    if entry is None:
        if len(_HELD_TABLES) > 1024:  # bounded: held sets only change with a replica's plan
            _HELD_TABLES.clear()
        table: np.ndarray = np.zeros(size, dtype=bool)  # [size]
        table[[e for e in key[0] if 0 <= e < size]] = True
        entry = _HELD_TABLES[key] = (table, bool(table.all()))
    return entry
