"""Busy/idle time of pipeline stages, and the bubble a schedule should have in theory.

A stage is busy while it runs a micro-batch's forward or backward (``forward_one_chunk`` /
``backward_one_chunk`` of torch's PipelineStage); everything else inside the schedule's
step is waiting for a neighbour (the bubble) or moving activations.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist


def theory_bubble(ranks: int, micro_batches: int, chunks_per_rank: int = 1) -> float:
    """Idle fraction of a synchronous pipeline: (p-1)/(m+p-1); interleaving v chunks per
    rank shrinks it to (p-1)/(v*m+p-1)."""
    p, m, v = ranks, micro_batches, chunks_per_rank
    return (p - 1) / (v * m + p - 1)


class BusyClock:
    """Accumulates the seconds a stage spends computing, by wrapping the stage's per-chunk
    methods (an instance-level wrap: torch's schedules call them through the instance)."""

    def __init__(self):
        self.busy = 0.0

    def watch(self, stage) -> None:
        for name in ("forward_one_chunk", "backward_one_chunk"):
            setattr(stage, name, self._timed(getattr(stage, name)))

    def _timed(self, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
        return wrapper

    def take(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy


def stage_report(busy: float, wall: float, group, theory: float) -> dict[str, float]:
    """Every stage's busy/idle seconds and the measured bubble (mean idle fraction), gathered
    over the pipeline group so that rank 0 (which writes TensorBoard) sees all stages."""
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    mine = torch.tensor([busy, max(wall - busy, 0.0)], dtype=torch.float64)
    table = [torch.zeros_like(mine) for _ in range(size)]
    if size > 1:
        dist.all_gather(table, mine, group=group)
    else:
        table = [mine]
    out: dict[str, float] = {}
    fractions = []
    for stage, row in enumerate(table):
        b, idle = row.tolist()
        out[f"pipeline/stage{stage}_busy_s"] = b
        out[f"pipeline/stage{stage}_idle_s"] = idle
        fractions.append(idle / max(b + idle, 1e-12))
    out["pipeline/bubble"] = sum(fractions) / len(fractions)
    out["pipeline/bubble_theory"] = theory
    return out
