"""Pictures of the expert pool from the gateway's `GET /experts` JSON: where the routed tokens go and how the
replicas followed them.

    expert_load.png   heatmap of routed tokens per (layer, expert)
    replicas.png      replicas per expert group over time (from the controller's history), with the pool's
                      routed tokens/s on a second axis

`expertmesh bench --plot DIR` writes them next to its latency plots when the server has `/experts`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np


def load_matrix(experts: list[dict]) -> tuple[list[int], np.ndarray]:
    """(layer ids, [L, E] routed tokens) from /experts rows {layer, expert, routed_tokens, ...}."""
    layers = sorted({int(r["layer"]) for r in experts})
    num_experts = 1 + max((int(r["expert"]) for r in experts), default=-1)
    row = {layer: i for i, layer in enumerate(layers)}
    load = np.zeros((len(layers), num_experts))  # [L, E]
    for r in experts:
        load[row[int(r["layer"])], int(r["expert"])] = float(r["routed_tokens"])
    return layers, load


def write_expert_plots(experts_json: dict, out_dir: str | Path) -> list[Path]:
    """Write expert_load.png (always, if there are rows) and replicas.png (if the controller has a history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = experts_json.get("experts") or []
    if rows:
        layers, load = load_matrix(rows)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * load.shape[1] + 2), max(2.5, 0.35 * len(layers) + 1.5)))
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_title("routed tokens per (layer, expert)", fontsize=10)
        fig.colorbar(image, ax=ax, label="tokens")
        fig.tight_layout()
        path = out_dir / "expert_load.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    history = (experts_json.get("controller") or {}).get("history") or []
    if history:
        times = [datetime.fromtimestamp(h["t"]) for h in history]
        groups = sorted({g for h in history for g in h["replicas"]})
        fig, ax = plt.subplots(figsize=(8, 4))
        for g in groups:
            ax.step(times, [h["replicas"].get(g, 0) for h in history], where="post", label=g)
        ax.set_ylabel("replicas")
        ax.set_xlabel("time")
        twin = ax.twinx()
        twin.plot(
            times, [h.get("tokens_per_s", 0.0) for h in history], color="0.6", linestyle=":", label="routed tokens/s"
        )
        twin.set_ylabel("routed tokens/s")
        ax.legend(loc="upper left", fontsize=7, ncol=2)
        ax.set_title("replicas per expert group", fontsize=10)
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out_dir / "replicas.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
