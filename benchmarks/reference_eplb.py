"""DeepSeek's Expert-Parallelism Load Balancer (EPLB), re-implemented in NumPy as the baseline for eplb_sim.

Algorithm: deepseek-ai/EPLB (https://github.com/deepseek-ai/EPLB, eplb.py; MIT License, Copyright (c) 2025
DeepSeek). This file re-implements its published algorithm step by step for comparison only -- it is not
used by expertmesh itself (our planner is services/control/planner.py). Same steps, same tie-breaking:

  replicate_experts   repeat (num_phy - num_log) times: one more replica for argmax(weight / count)
                      (first index on ties, like torch.max).
  balanced_packing    items sorted by weight, descending; each goes to the lightest pack that still has
                      room (exactly n / m items per pack; first pack on ties).
  rebalance_experts_hierarchical
                      1. pack expert groups to nodes, 2. replicate within each node, 3. pack the
                      physical experts of a node to its GPUs.
  rebalance_experts   hierarchical when num_groups % num_nodes == 0; the global policy is the
                      hierarchical one with one group and one node (as the first published version does).

Shapes: weight [layers, num_logical_experts]; returns phy2log [layers, num_replicas] (slot r lives on
GPU r // (num_replicas / num_gpus)), log2phy [layers, num_logical, max_count] (-1 padded), logcnt
[layers, num_logical].
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_index, rank_in_pack [X, n]: n items into num_packs packs of exactly n / num_packs items."""
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0
    per_pack = num_items // num_packs
    if per_pack == 1:
        ids = np.broadcast_to(np.arange(num_items), weight.shape).copy()
        return ids, np.zeros_like(ids)
    order = np.argsort(-weight, axis=-1, kind="stable")  # heaviest first
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    for i in range(num_layers):
        pack_weight = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in order[i]:
            pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weight.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weight[pack] += float(weight[i, item])
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """phy2log, rank [X, num_phy] and logcnt [X, num_log]: greedy on the largest load per replica."""
    n, num_log = weight.shape
    assert num_phy >= num_log
    rows = np.arange(n)
    phy2log = np.broadcast_to(np.arange(num_phy), (n, num_phy)).copy()
    rank = np.zeros((n, num_phy), dtype=np.int64)
    logcnt = np.ones((n, num_log), dtype=np.int64)
    for i in range(num_log, num_phy):
        chosen = (weight / logcnt).argmax(-1)
        phy2log[:, i] = chosen
        rank[:, i] = logcnt[rows, chosen]
        logcnt[rows, chosen] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_layers, num_logical = weight.shape
    assert num_logical % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_physical_experts % num_gpus == 0
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus

    # 1. expert groups -> nodes
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)).reshape(
        num_layers, num_logical
    )
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node: [layers * nodes, logical per node]
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, 1).reshape(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # 3. physical experts -> GPUs within each node
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, 1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1)
        + np.arange(0, num_logical, num_logical // num_nodes)[None, :, None]
    ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, 1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entry point: phy2log [L, R], log2phy [L, E, max count], logcnt [L, E]."""
    num_layers, num_logical = weight.shape
    weight = np.asarray(weight, dtype=np.float32)  # EPLB casts to float32 (weight.float())
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_count = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_count), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * max_count + phyrank,
        np.broadcast_to(np.arange(num_replicas), (num_layers, num_replicas)),
        axis=1,
    )
    return phy2log, log2phy.reshape(num_layers, num_logical, max_count), logcnt
