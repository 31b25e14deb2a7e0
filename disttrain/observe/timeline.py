"""A measured pipeline schedule: for one chosen step, every forward/backward of every
micro-batch on every stage, with wall-clock start and end, written to
``<run dir>/timeline/step<N>_rank<r>.json`` for ``disttrain report`` to draw.

It listens to the pipeline strategy's one stage clock (disttrain.parallel.timing.StageClock,
which wraps the stages' per-micro-batch forward/backward). Wall-clock time (time.time) is
shared by the ranks of one host; across hosts it is only as good as their clock sync.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class Timeline:
    def __init__(self, run_dir: Path, rank: int, step: int):
        self.path = run_dir / "timeline" / f"step{step}_rank{rank}.json"
        self.step, self.rank = step, rank
        self.active = False
        self.events: list[dict] = []

    def record(self, stage: int, kind: str, micro: int, start: float, end: float) -> None:
        if self.active:
            self.events.append({"stage": stage, "kind": kind, "micro": micro, "start": start, "end": end})

    def begin(self, step: int) -> None:
        self.active = step == self.step
        if self.active:
            self.step_start = time.time()

    def end(self, step: int) -> None:
        if not self.active:
            return
        self.active = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "rank": self.rank, "step_start": self.step_start, "step_end": time.time(),
                  "events": self.events}
        self.path.write_text(json.dumps(record))


def attach(strategy, run_dir: Path, rank: int, step: int) -> Timeline | None:
    """A timeline for pipelined strategies (those whose stage clock times their stages)."""
    clock = strategy.stage_clock()
    if clock is None or step <= 0:
        return None
    timeline = Timeline(run_dir, rank, step)
    clock.listeners.append(timeline.record)
    return timeline
