"""Straggler detection: a synchronous job runs at the pace of its slowest rank, so every
``metrics.straggler_every`` steps the ranks all-gather their own busy time per step (step
time minus time spent waiting on communication and pipeline idle: waiting for a slow peer
must not make a fast rank look slow) and name those above ``ratio`` x the median."""
from __future__ import annotations

import logging
import statistics


from disttrain.distributed import comm

log = logging.getLogger("disttrain")


def find_stragglers(times: list[float], ratio: float) -> list[int]:
    """Ranks whose time exceeds ``ratio`` times the median of all ranks."""
    median = statistics.median(times)
    return [rank for rank, t in enumerate(times) if median > 0 and t > ratio * median]


def gather_times(value: float) -> list[float]:
    """Every rank's value, in rank order (a collective)."""
    return [row[0] for row in comm.get().gather([value])]


def report(step: int, times: list[float], slow: list[int], tensorboard) -> None:
    """Name stragglers in the log and TensorBoard (rank 0's writer; a no-op elsewhere)."""
    median = statistics.median(times)
    fields = {"straggler/count": float(len(slow)), "straggler/max_ratio": max(times) / median if median else 0.0}
    fields.update({f"straggler/rank{r}": 1.0 for r in slow})
    tensorboard.scalars(step, fields, prefix="observe")
    if not slow:
        return
    names = ", ".join(f"rank {r} ({times[r] * 1e3:.1f} ms/step, {times[r] / median:.2f}x median)" for r in slow)
    message = f"straggler at step {step}: {names}; median {median * 1e3:.1f} ms/step"
    log.warning(message)
    writer = getattr(tensorboard, "writer", None)
    if writer is not None:
        writer.add_text("observe/straggler", message, step)
