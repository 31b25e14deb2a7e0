"""A straggler on purpose, for benchmarks that compare strategies fairly: the reference
MLP whose forward sleeps on one chosen global rank (any strategy, same mechanism).
``strategy.debug_slow_workers`` does the same inside param_server only."""
from __future__ import annotations

import os
import time

from torch import nn

from disttrain.models.mlp import build_mlp


def slow_mlp(slow_rank: int = -1, delay_s: float = 0.0, **mlp_kwargs) -> nn.Module:
    """``build_mlp(**mlp_kwargs)``; on global rank ``slow_rank`` each forward first sleeps
    ``delay_s`` seconds (a sleep, so the slow rank leaves the CPU to the others)."""
    model = build_mlp(**mlp_kwargs)
    if delay_s > 0 and int(os.environ.get("RANK", "0")) == slow_rank:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay_s))
    return model
