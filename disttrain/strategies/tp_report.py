"""The ranks of one tensor-parallel group compute the same loss and the same outputs from the
same data (their forward ends in an all-reduce), so only the group's first rank reports them:
the loop's mean loss and samples/s, and evaluation, would count a batch tp times otherwise."""
from __future__ import annotations

import torch

from disttrain.strategies.base import StepStats


class ReportsOncePerTPGroup:
    """Mixin for strategies with a tp axis; ``tp_rank`` is this rank's coordinate on it."""

    tp_rank: int = 0

    def once_per_tp_group(self, stats: StepStats) -> StepStats:
        if self.tp_rank != 0:
            stats.loss, stats.samples = None, 0
        return stats

    @torch.no_grad()
    def eval_outputs(self, inputs: torch.Tensor, precision) -> torch.Tensor | None:
        with precision.autocast():
            outputs = self.model(inputs)  # every tp rank: the forward has collectives
        return outputs if self.tp_rank == 0 else None
