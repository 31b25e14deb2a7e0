"""Busy/idle time of pipeline stages, and the bubble a schedule should have in theory.

A stage is busy while it runs a micro-batch's forward or backward (``forward_one_chunk`` /
``backward_one_chunk`` of torch's PipelineStage); everything else inside the schedule's
step is waiting for a neighbour (the bubble) or moving activations.
"""
from __future__ import annotations

import functools
import time


from disttrain.distributed import comm


def theory_bubble(ranks: int, micro_batches: int, chunks_per_rank: int = 1) -> float:
    """Idle fraction of a synchronous pipeline: (p-1)/(m+p-1); interleaving v chunks per
    rank shrinks it to (p-1)/(v*m+p-1)."""
    p, m, v = ranks, micro_batches, chunks_per_rank
    return (p - 1) / (v * m + p - 1)


class StageClock:
    """The one timing wrapper of pipeline stages: wraps each stage's per-chunk methods once
    (on the instance: torch's schedules call them through it), accumulates busy seconds for
    the bubble figure and hands every chunk's (stage, kind, micro, start, end) to listeners
    (the timeline recorder). Wall-clock (time.time) so ranks of one host share a clock."""

    def __init__(self):
        self.busy = 0.0
        self.listeners: list = []

    def watch(self, stage) -> None:
        index = int(stage.stage_index)
        # zero-bubble schedules run a backward as backward_one_chunk (input gradients only)
        # plus backward_weight_one_chunk (weight gradients): both are busy time
        for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"), ("backward_weight_one_chunk", "W")):
            setattr(stage, name, self._timed(getattr(stage, name), index, kind))

    def _timed(self, method, index: int, kind: str):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return method(*args, **kwargs)
            finally:
                end = time.time()
                self.busy += end - start
                if self.listeners:
                    micro = int(args[0] if args else next(iter(kwargs.values()), -1))
                    for listener in self.listeners:
                        listener(index, kind, micro, start, end)
        return wrapper

    def take(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy


def stage_report(busy: float, wall: float, group, theory: float) -> dict[str, float]:
    """Every stage's busy/idle seconds and the measured bubble (mean idle fraction), gathered
    over the pipeline group so that rank 0 (which writes TensorBoard) sees all stages."""
    table = comm.get().gather([busy, max(wall - busy, 0.0)], group)
    out: dict[str, float] = {}
    fractions = []
    for stage, (b, idle) in enumerate(table):
        out[f"pipeline/stage{stage}_busy_s"] = b
        out[f"pipeline/stage{stage}_idle_s"] = idle
        fractions.append(idle / max(b + idle, 1e-12))
    out["pipeline/bubble"] = sum(fractions) / len(fractions)
    out["pipeline/bubble_theory"] = theory
    return out
