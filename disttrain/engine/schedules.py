"""Learning-rate schedules (as torch LambdaLR so their state is checkpointable)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0,
                  decay: bool = False, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
