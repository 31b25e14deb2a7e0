"""Data-wait: how long the loop stood still waiting for its next batch, and the
"input-bound" warning when that is a large share of the step.

The loop wraps its batch fetch (``next`` + copy to the device) in ``waited()`` and reports
the seconds as ``data_wait_s`` in StepStats.extra, so the Meter averages it per step and
TensorBoard shows it next to ``time_step_s``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

log = logging.getLogger("disttrain")

#: a logging interval whose data-wait is at least this share of the step time is input-bound.
INPUT_BOUND_SHARE = 0.25


class Waited:
    seconds: float = 0.0


@contextlib.contextmanager
def waited() -> Iterator[Waited]:
    """``with waited() as w: batch = next(it)`` leaves the wall time in ``w.seconds``."""
    result = Waited()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start


def add_share_and_warn(step: int, fields: dict[str, float]) -> None:
    """Add ``data_wait_share`` (data-wait / step time, this rank) to a flushed interval's
    figures and log a warning naming the knobs when the run is input-bound."""
    wait, step_time = fields.get("data_wait_s"), fields.get("time_step_s")
    if wait is None or not step_time:
        return
    share = min(wait / step_time, 1.0)
    fields["data_wait_share"] = share
    if share >= INPUT_BOUND_SHARE:
        log.warning("input-bound at step %d: %.0f%% of the step time (%.4f s of %.4f s) waiting for data; "
                    "raise data.num_workers / data.prefetch_factor or speed up the dataset",
                    step, 100 * share, wait, step_time)
