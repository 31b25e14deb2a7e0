"""The share of a model's step time that tensor parallelism divides among its ranks.

Megatron-style TP splits the work between a column-parallel layer's input and the next
row-parallel layer's output (the Linear layers and, in attention, the per-head core between
them). What lies outside those regions (embeddings, norms, residual adds, the LM head, the
loss) every TP rank computes in full. Counting FLOPs misses that: gpt_tiny has ~87% of its
FLOPs in the sharded regions but spends ~76% of its forward time there on this CPU
(norms, softmax and residuals are cheap in FLOPs, not in time). Measured here, once, by
timing those regions with forward hooks; backward is taken to split as forward does (hooks on
every backward would need module backward hooks, which in-place ops on outputs refuse).
"""
from __future__ import annotations

import statistics
import time

from torch import nn


def _regions(events: list[tuple[str, float]], start: float, end: float) -> float:
    """Seconds inside sharded regions: from a column-parallel layer's forward start (the first
    of several, as q/k/v are) to the next row-parallel layer's forward end; a region no
    row-parallel layer closes ends with the last column-parallel layer's forward."""
    inside, opened, last_col_end = 0.0, None, None
    for kind, t in events:
        if kind == "col_start" and opened is None:
            opened, last_col_end = t, None
        elif kind == "col_end" and opened is not None:
            last_col_end = t
        elif kind == "row_end" and opened is not None:
            inside, opened = inside + t - opened, None
    if opened is not None:
        inside += (last_col_end or opened) - opened
    return min(inside / (end - start), 1.0) if end > start else 1.0


def sharded_time_share(model: nn.Module, inputs, reps: int = 8) -> float:
    """Median over ``reps`` forwards (after one warm-up) of the time share inside the regions
    the model's TP plan shards; 1.0 for a model without a plan (TP then refuses it anyway)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from disttrain.parallel.tensor import plan_for

    try:
        plan = plan_for(model)
    except ValueError:
        return 1.0
    events: list[tuple[str, float]] = []

    def mark(kind: str):
        return lambda *_: events.append((kind, time.perf_counter()))

    handles = []
    for name, style in plan.items():
        module = model.get_submodule(name)
        if isinstance(style, ColwiseParallel):
            handles += [module.register_forward_pre_hook(mark("col_start")),
                        module.register_forward_hook(mark("col_end"))]
        elif isinstance(style, RowwiseParallel):
            handles.append(module.register_forward_hook(mark("row_end")))
    if not handles:
        return 1.0
    shares = []
    try:
        for _ in range(reps + 1):  # with autograd on, as training runs (its per-op cost included)
            events.clear()
            start = time.perf_counter()
            model(inputs)
            shares.append(_regions(events, start, time.perf_counter()))
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares[1:])
