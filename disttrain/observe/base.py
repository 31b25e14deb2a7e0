"""The hooks the training loop calls; the no-op default keeps the loop usable without
observability (unit tests that build LoopParts by hand, for instance)."""
from __future__ import annotations

from typing import Any


class NullObserver:
    """``before_step`` / ``after_step`` each step, ``flush`` on logging steps."""

    def wrap(self, batches):
        return batches

    def before_step(self) -> None:
        pass

    def after_step(self, step: int, stats: Any, micro: list) -> None:
        pass

    def flush(self, step: int) -> dict[str, float]:
        return {}
