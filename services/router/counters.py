"""Routed-token counters: how many (token, expert) assignments each (layer, expert) received, per router process.

The dispatcher adds one bincount per MoE layer per step (`add`), which is a numpy add into a shared-memory
file, so a controller in another process (or the gateway's `/experts`) reads live counts with
`RoutedTokenCounters.open(path).snapshot()` without any RPC. vLLM may run the model in an engine-core
subprocess; the file is what crosses that boundary.

File layout (both written once by the process that runs the model, then only the array changes):

    <path>          .npy file (numpy `open_memmap`): uint64 [num_moe_layers, num_experts], row i = layer layers[i]
    <path>.json     {"layers": [...], "num_experts": E, "pid": writer pid}

Default path: `EXPERTMESH_COUNTERS_FILE`, else `/dev/shm/expertmesh-routed-tokens-<pid>.npy` (the pid of the
process that configured the router; `plugin.configure_remote` pins it in the environment so an engine-core
subprocess writes where the server reads). Counts are monotonic (Prometheus counters are derived from them);
warm-up passes vLLM runs at start-up are counted too.

Prometheus (`install_prometheus`): a collector reads the same array at scrape time, so counting costs
nothing per step beyond the bincount: `expertmesh_routed_tokens_total{layer,expert}`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from expertmesh.core import settings

ENV_COUNTERS_FILE = "EXPERTMESH_COUNTERS_FILE"


def default_counters_path() -> str:
    explicit = settings.counters_file()
    if explicit:
        return explicit
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"expertmesh-routed-tokens-{os.getpid()}.npy")


def remove_counters_file(path: str | Path) -> None:
    """Delete a counters file and its metadata (a router that chose the path removes it when it stops)."""
    for p in (Path(path), Path(str(path) + ".json")):
        p.unlink(missing_ok=True)


class RoutedTokenCounters:
    """uint64 [num_moe_layers, num_experts] counts backed by a memory-mapped file."""

    def __init__(self, path: str | Path, array: np.memmap, layers: list[int], num_experts: int, writable: bool):
        self.path = Path(path)
        self._array = array  # [L, E] uint64, memory-mapped
        self.layers = list(layers)  # model layer index of each row
        self.num_experts = num_experts
        self.writable = writable
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        # Plain ndarray views of each row over the same shared memory: `add` runs once per MoE layer per step, and
        # indexing the np.memmap subclass costs several times an add of a few counts.
        self._rows = {layer: np.asarray(array)[i] for i, layer in enumerate(self.layers)}

    @classmethod
    def create(cls, path: str | Path, layers: list[int], num_experts: int) -> RoutedTokenCounters:
        """(Re)create the file with zero counts; the writer side (the process that runs the model)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        layers = sorted(int(x) for x in layers)
        meta = {"layers": layers, "num_experts": int(num_experts), "pid": os.getpid()}
        # Write to temporary names and rename, so a reader never sees a half-written header.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint64, shape=(len(layers), int(num_experts)))
        array.flush()
        meta_tmp = tmp.with_suffix(".json")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, str(path) + ".json")
        os.replace(tmp, path)
        return cls(path, array, layers, int(num_experts), writable=True)

    @classmethod
    def open(cls, path: str | Path) -> RoutedTokenCounters:
        """Open read-only (controller, gateway, tests)."""
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no routed-token counters at {path} (is a router running in remote mode?)")
        meta = json.loads(meta_path.read_text())
        array = np.load(path, mmap_mode="r")
        if array.dtype != np.uint64 or array.shape != (len(meta["layers"]), meta["num_experts"]):
            raise ValueError(f"{path}: array {array.dtype} {array.shape} does not match its metadata {meta}")
        return cls(path, array, meta["layers"], meta["num_experts"], writable=False)

    def row(self, layer: int) -> int:
        return self._row[layer]

    def add(self, layer: int, counts: torch.Tensor | np.ndarray) -> None:
        """counts: [num_experts] non-negative integers routed to each expert of `layer` in one step."""
        if isinstance(counts, torch.Tensor):
            counts = counts.numpy()
        row = self._rows[layer]
        np.add(row, counts, out=row, casting="unsafe")  # int64 counts into the uint64 row, no temporary

    def snapshot(self) -> np.ndarray:
        """A copy of the counts: uint64 [num_moe_layers, num_experts] (row i = layer `layers[i]`)."""
        return np.array(self._array, copy=True)

    def by_layer(self) -> dict[int, np.ndarray]:
        snap = self.snapshot()
        return {layer: snap[i] for i, layer in enumerate(self.layers)}


class _CountersCollector:
    """Prometheus collector exposing a RoutedTokenCounters at scrape time."""

    def __init__(self, get_counters):
        self._get = get_counters

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "expertmesh_routed_tokens",
            "Tokens routed to each (layer, expert) by this router",
            labels=["layer", "expert"],
        )
        counters = self._get()
        if counters is not None:
            snap = counters.snapshot()
            for i, layer in enumerate(counters.layers):
                for e in range(counters.num_experts):
                    family.add_metric([str(layer), str(e)], float(snap[i, e]))
        yield family


def install_prometheus(get_counters, registry=None) -> None:
    """Register the collector (once per registry); `get_counters()` returns the live counters or None."""
    from prometheus_client import REGISTRY

    (registry or REGISTRY).register(_CountersCollector(get_counters))
