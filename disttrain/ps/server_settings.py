"""What a shard server is told (``ServerSettings``) and reports per loop step
(``StepSummary``), apart from the server's logic so each file keeps one job."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    max_staleness: int | None
    staleness_lr: str      # "none" | "inverse": lr / (1 + staleness)
    num_servers: int
    num_workers: int
    grad_clip: float | None = None  # clip each applied gradient to this global norm
    servers_group: Any = None       # s=0 clipping / checkpoint cuts with several servers
    #: debug (tests): workers whose pushes are held back until no other worker can make
    #: progress (disttrain.ps.hold).
    hold_workers: frozenset = frozenset()


@dataclasses.dataclass
class StepSummary:
    """What the gradients applied during one loop step of a server amount to."""

    loss_sum: float = 0.0
    gradients: int = 0
    samples: int = 0


def clip_coef(max_norm: float | None, norm: float) -> float:
    """torch's clip_grad_norm_ factor: max_norm / (norm + 1e-6), never above 1."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
