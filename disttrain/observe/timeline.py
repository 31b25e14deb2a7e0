"""A measured pipeline schedule: for one chosen step, every forward/backward of every
micro-batch on every stage, with wall-clock start and end, written to
``<run dir>/timeline/step<N>_rank<r>.json`` for ``disttrain report`` to draw.

It wraps the stages' ``forward_one_chunk`` / ``backward_one_chunk`` (the calls torch's
schedules make per micro-batch) on the instance, as the pipeline strategy's busy clock
does, so the pipeline code needs no change. Wall-clock time (time.time) is shared by the
ranks of one host; across hosts it is only as good as their clock sync.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path


class Timeline:
    def __init__(self, run_dir: Path, rank: int, step: int):
        self.path = run_dir / "timeline" / f"step{step}_rank{rank}.json"
        self.step, self.rank = step, rank
        self.active = False
        self.events: list[dict] = []

    def watch(self, stage) -> None:
        index = int(getattr(stage, "stage_index", 0))
        for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B")):
            setattr(stage, name, self._timed(getattr(stage, name), index, kind))

    def _timed(self, method, stage: int, kind: str):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return method(*args, **kwargs)
            finally:
                if self.active:
                    chunk = args[0] if args else next(iter(kwargs.values()), -1)
                    self.events.append({"stage": stage, "kind": kind, "micro": int(chunk),
                                        "start": start, "end": time.time()})
        return wrapper

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
    """A timeline for pipeline strategies (those exposing torch PipelineStage objects)."""
    stages = getattr(strategy, "stages", None)
    if not stages or step <= 0:
        return None
    timeline = Timeline(run_dir, rank, step)
    for stage in stages:
        timeline.watch(stage)
    return timeline
