"""The router's last resort for an expert no live replica holds: compute it in the router from the checkpoint.

Why: the routed experts run inside vLLM's forward pass, and an exception there ends vLLM's engine core — every
request in flight fails and the router exits. A replica can always disappear (killed, evicted, its node gone) before
the controller or Serve brings another up, so the dispatcher must not raise when an expert has no holder. After
`EXPERTMESH_MISSING_EXPERT_WAIT_S` without one (counted from when the expert was first found missing, not per
step, so a lasting gap stalls the engine once), the dispatcher hands the expert's assignments here.

`LocalExperts` loads only the (layer, expert) weights it is asked for, with safetensors, through the same
`CheckpointReader` and `ExpertWeights` kernel the replicas use (so the output is the replicas'), and drops a layer's
weights as soon as the directory lists a replica for every expert it holds: memory is spent only during a gap.

    fallback = LocalExperts("/path/to/checkpoint")
    out_rows = fallback.forward(layer, hidden_rows [T_r, H], token_index [n], expert [n], weight [n])  # [T_r, H]
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from expertmesh.core.manifest import config_file

if TYPE_CHECKING:  # imported on first use: a router that never falls back never opens the checkpoint
    from expertmesh.core.checkpoint import CheckpointReader
    from expertmesh.core.kernel import ExpertWeights

log = logging.getLogger("expertmesh.router.fallback")


def resolve_checkpoint(model: str) -> Path | None:
    """The local directory of vLLM's `model` (a path, or a hub id already in the local cache), or None."""
    path = Path(model)
    if config_file(path) is not None:
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a cached hub id either: no fallback for this model
        return None


class LocalExperts:
    """Expert weights loaded on demand in the router, per layer, for the experts no replica holds."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self._reader: CheckpointReader | None = None  # opened on first use
        self._weights: dict[int, ExpertWeights] = {}  # layer -> the weights of that layer's missing experts
        self._lock = threading.Lock()

    def held(self) -> dict[int, list[int]]:
        """layer -> expert ids loaded here now."""
        with self._lock:
            return {layer: sorted(w.held[layer]) for layer, w in self._weights.items()}

    def forward(
        self, layer: int, hidden: torch.Tensor, token_index: np.ndarray, expert: np.ndarray, weight: np.ndarray
    ) -> torch.Tensor:
        """hidden [T_r, H], token_index/expert/weight [n] -> [T_r, H] = sum_n weight[n] * FFN_expert[n](hidden[row])."""
        weights = self._weights_for(layer, np.unique(expert).tolist(), hidden.dtype)
        return weights.forward(layer, hidden, token_index, expert, weight)

    def release_covered(self, covered) -> None:
        """Drop every layer whose held experts all have a live replica again (`covered(layer, experts) -> bool`)."""
        with self._lock:
            for layer in [layer for layer, w in self._weights.items() if covered(layer, sorted(w.held[layer]))]:
                log.warning("layer %d: replicas hold its experts again; the router drops its own copies", layer)
                del self._weights[layer]

    def _weights_for(self, layer: int, experts: list[int], dtype: torch.dtype) -> ExpertWeights:
        from expertmesh.core.checkpoint import CheckpointReader
        from expertmesh.core.kernel import ExpertWeights

        with self._lock:
            current = self._weights.get(layer)
            if current is not None and set(experts) <= current.held[layer] and current.dtype == dtype:
                return current
            if self._reader is None:
                self._reader = CheckpointReader(self.checkpoint)
            keys = sorted(set(experts) | (set(current.held[layer]) if current is not None else set()))
            log.warning(
                "layer %d expert(s) %s: no live replica; the router computes them itself from %s",
                layer,
                keys,
                self.checkpoint,
            )
            self._weights[layer] = ExpertWeights(self._reader, {layer: keys}, dtype=dtype)  # the model's dtype
            return self._weights[layer]
