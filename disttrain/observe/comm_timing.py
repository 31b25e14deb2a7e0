"""Communication timing for DDP through a communication hook that wraps torch's own
all-reduce hook (same arithmetic as DDP's default: average of the bucket over ranks).

Per step it yields two figures: ``total`` = time with any bucket in flight (mostly
overlapped with backward), and ``exposed`` = from the last bucket's launch (the end of
backward compute, near enough) to the last completion: the time the step really waits on
the network, which includes waiting for slower ranks.
"""
from __future__ import annotations

import logging
import threading
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("disttrain")


class CommTimer:
    """Collects (launch, done) intervals of one step's buckets."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.lock = threading.Lock()  # completions arrive on the backend's thread
        self.intervals: list[tuple[float, float]] = []
        self.pending: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []

    def hook(self, _state, bucket):
        launched = time.perf_counter()
        start_event = None
        if bucket.buffer().is_cuda:  # NCCL futures complete on streams: time them with events
            start_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        future = default_hooks.allreduce_hook(self.process_group, bucket)

        def done(fut):
            if start_event is None:
                with self.lock:
                    self.intervals.append((launched, time.perf_counter()))
            else:
                end_event = torch.cuda.Event(enable_timing=True)
                end_event.record()
                with self.lock:
                    self.pending.append((launched, start_event, end_event))
            return fut.value()[0]

        return future.then(done)

    def take(self) -> tuple[float, float]:
        """(total in-flight seconds, exposed seconds) of the buckets since the last call."""
        with self.lock:
            intervals = self.intervals + [(t0, t0 + _seconds(s, e)) for t0, s, e in self.pending]
            self.intervals, self.pending = [], []
        if not intervals:
            return 0.0, 0.0
        return _union(intervals), max(0.0, max(e for _, e in intervals) - max(s for s, _ in intervals))


def _seconds(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def attach(model) -> CommTimer | None:
    """Register the timing hook on a DDP model (None for other models, or when another
    feature already registered a hook: DDP takes only one)."""
    if not isinstance(model, DistributedDataParallel):
        return None
    timer = CommTimer(model.process_group)
    try:
        model.register_comm_hook(None, timer.hook)
    except RuntimeError as exc:
        log.warning("communication timing off: %s", exc)
        return None
    return timer
