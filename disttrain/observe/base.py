"""The hooks the training loop calls; the no-op default keeps the loop usable without
observability (unit tests that build LoopParts by hand, for instance)."""
from __future__ import annotations

import time
from typing import Any


class NullObserver:
    """``before_step`` / ``after_step`` each step, ``flush`` on logging steps. It still
    times steps: ``time_step_s`` (the one step-time figure) exists wherever the loop runs."""

    def __init__(self):
        self._t0 = self._wall = 0.0
        self._steps = 0

    def wrap(self, batches):
        return batches

    def before_step(self) -> None:
        self._t0 = time.perf_counter()

    def after_step(self, step: int, stats: Any, micro: list) -> None:
        self._wall += time.perf_counter() - self._t0
        self._steps += 1

    def flush(self, step: int) -> dict[str, float]:
        out = {"time_step_s": self._wall / self._steps} if self._steps else {}
        self._wall, self._steps = 0.0, 0
        return out
