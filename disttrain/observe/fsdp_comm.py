"""Communication timing for FSDP2: its all-gathers and reduce-scatters run through the
collectives each ``FSDPModule`` is given with ``set_custom_all_gather`` /
``set_custom_reduce_scatter``; these call torch's own ``all_gather_single`` /
``reduce_scatter_single`` (what FSDP2's defaults call) and record when each ran.

``total`` is the time any of them was in flight. ``exposed`` is the time the training thread
spent inside a collective it waited for (a blocking call: on gloo every reduce-scatter and the
unprefetched all-gathers), which includes waiting for slower ranks. On a GPU the collectives
run on FSDP's streams: they are timed with CUDA events and count in ``total`` only.
HSDP's all-reduce across replicas is not one of these two hooks and is not counted.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from disttrain.observe import comm_timing
from disttrain.observe.comm_timing import _seconds, _union


class FSDPCommTimer:
    """Collects one step's collective intervals: (launch, done) and whether the caller waited."""

    def __init__(self):
        self.lock = threading.Lock()  # asynchronous completions arrive on the backend's thread
        self.intervals: list[tuple[float, float, bool]] = []
        self.pending: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(self, tensor: torch.Tensor, run):
        launched = time.perf_counter()
        if tensor.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            work = run()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            with self.lock:
                self.pending.append((launched, start, end))
            return work
        work = run()
        if work is None:  # blocking: the training thread waited the whole time
            self._add(launched, True)
        else:
            work.get_future().then(lambda _fut: self._add(launched, False))
        return work

    def _add(self, launched: float, waited: bool) -> None:
        with self.lock:
            self.intervals.append((launched, time.perf_counter(), waited))

    def take(self) -> tuple[float, float]:
        """(total in-flight seconds, exposed seconds) since the last call."""
        with self.lock:
            intervals = self.intervals + [(t0, t0 + _seconds(s, e), False) for t0, s, e in self.pending]
            self.intervals, self.pending = [], []
        return (_union([(a, b) for a, b, _ in intervals]), _union([(a, b) for a, b, waited in intervals if waited]))


class _Alloc:
    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class TimedAllGather(_Alloc, AllGather):
    def __init__(self, timer: FSDPCommTimer):
        self.timer = timer

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        return self.timer.timed(input_tensor, lambda: dist.all_gather_single(
            output_tensor, input_tensor, group=group, async_op=async_op))


class TimedReduceScatter(_Alloc, ReduceScatter):
    def __init__(self, timer: FSDPCommTimer):
        self.timer = timer

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        return self.timer.timed(input_tensor, lambda: dist.reduce_scatter_single(
            output=output_tensor, input=input_tensor, group=group, op=op, async_op=async_op))


def attach(model):
    """Give every FSDP module of ``model`` the timed collectives, one timer for all; for
    another model, DDP's timing hook (``comm_timing.attach``) or None."""
    if not isinstance(model, FSDPModule):
        return comm_timing.attach(model)
    timer = FSDPCommTimer()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(TimedAllGather(timer))
            module.set_custom_reduce_scatter(TimedReduceScatter(timer))
    return timer
