"""Split an ``nn.Sequential`` into contiguous, balanced pipeline stages.

(Models whose blocks live in an nn.ModuleList, e.g. transformers models, are cut by module
name instead: disttrain.parallel.fqn_split.)

Stages keep the ORIGINAL child names ("3", "4", ...), so a stage's state_dict keys are
exactly the unsplit model's keys for those layers: every stage checkpoints its own part
and the union of the parts is the full model's state dict.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The splittable layers of a model: the children of an ``nn.Sequential``."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model._target_ built a {type(model).__name__}; pipeline and layer splitting "
                         "need an nn.Sequential (list the blocks in order).")
    return list(model.named_children())


def partition(weights: Sequence[float], parts: int) -> list[int]:
    """Layer counts of ``parts`` contiguous, non-empty groups minimising the heaviest group
    (classic linear partition by dynamic programming; n and parts are small)."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} non-empty stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[k][i]: minimal max-group-weight splitting the first i layers into k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = cost, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


def param_weights(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    # +1 per layer so parameter-free layers (activations) still count as a little work.
    return [1.0 + sum(p.numel() for p in module.parameters()) for _, module in blocks]


def time_weights(blocks: list[tuple[str, nn.Module]], sample: torch.Tensor, repeats: int = 3,
                 materialize: Callable[[nn.Module], nn.Module] = lambda m: m) -> list[float]:
    """Measured forward+backward seconds of each layer on ``sample`` (median of ``repeats``);
    meta-device layers are timed on a scratch copy (``materialize``), one layer at a time."""
    weights, x = [], sample
    for _, meta_module in blocks:
        module = materialize(meta_module)
        runs = []
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            out = module(inp)
            out.float().sum().backward()
            runs.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
        weights.append(sorted(runs)[len(runs) // 2])
        x = out.detach()
    return weights


def stage_counts(blocks: list[tuple[str, nn.Module]], stages: int, balance,
                 sample_fn: Callable[[], torch.Tensor] | None = None,
                 reduce_fn: Callable[[list[float]], list[float]] = lambda w: w,
                 materialize: Callable[[nn.Module], nn.Module] = lambda m: m) -> list[int]:
    """Layers per stage for ``strategy.balance``: 'params', 'time' or an explicit list.
    ``reduce_fn`` makes measured times identical on every rank (they must agree on the split)."""
    if isinstance(balance, str) and balance == "params":
        return partition(param_weights(blocks), stages)
    if isinstance(balance, str) and balance == "time":
        if sample_fn is None:
            raise ValueError("strategy.balance=time needs a sample batch")
        return partition(reduce_fn(time_weights(blocks, sample_fn(), materialize=materialize)), stages)
    counts = [int(c) for c in balance]
    check_explicit(counts, len(blocks), stages)
    return counts


def check_explicit(counts: list[int], layers: int, stages: int) -> None:
    if len(counts) != stages or sum(counts) != layers or min(counts) < 1:
        raise ValueError(f"strategy.balance={counts} must list {stages} positive layer counts (one per "
                         f"stage) summing to the model's {layers} layers, or be 'params' or 'time'.")


def stage_module(blocks: list[tuple[str, nn.Module]], counts: list[int], stage: int) -> nn.Sequential:
    """Stage ``stage`` as a Sequential of the original layers under their original names."""
    start = sum(counts[:stage])
    return nn.Sequential(OrderedDict(blocks[start:start + counts[stage]]))


def union(modules: list[nn.Sequential]) -> nn.Sequential:
    """One module holding several stages' layers (interleaved schedules place several on a
    rank), for the optimizer and the checkpoint; its forward is never called."""
    return nn.Sequential(OrderedDict(item for module in modules for item in module.named_children()))


def check_ranks_hold_parameters(blocks: list[tuple[str, nn.Module]], counts: list[int], ranks: int,
                                rank_of: Callable[[int], int] | None = None) -> None:
    """Every pipeline rank must own at least one parameter (stage s lives on rank
    ``rank_of(s)``, default s % ranks): a rank of parameter-free layers (activations only)
    would have nothing to optimize."""
    rank_of = rank_of or (lambda s: s % ranks)
    for rank in range(ranks):
        owned = [stage_module(blocks, counts, s) for s in range(len(counts)) if rank_of(s) == rank]
        if not any(p.numel() for m in owned for p in m.parameters()):
            raise ValueError(f"with layer counts {counts} pipeline rank {rank} holds only parameter-free "
                             "layers: use fewer stages (dist.pp / strategy.stages_per_rank) or an explicit "
                             "strategy.balance list.")
