"""The one training loop: fetch micro-batches, call the engine's step (disttrain.engine.step),
logging cadence and checkpoint cadence."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import torch

from disttrain.data import timing
from disttrain.data.loader import to_device
from disttrain.observe.metrics import Meter, TensorBoard
from disttrain.observe.base import NullObserver
from disttrain.observe.progress import Progress

log = logging.getLogger("disttrain")


@dataclasses.dataclass
class LoopSettings:
    max_steps: int
    grad_accum_steps: int
    log_every: int
    checkpoint_every: int


@dataclasses.dataclass
class LoopParts:
    """The objects the loop drives; built by ``disttrain.engine.run``."""

    engine: Any                     # disttrain.engine.step.Engine (or SelfSteppingEngine)
    batches: Iterator[Any]
    advance_data: Callable[[int], None]
    loss_fn: torch.nn.Module
    save: Callable[[int], None]
    meter: Meter
    tensorboard: TensorBoard
    progress: Progress
    device: torch.device
    #: polled once per step; True asks for a checkpoint and a clean stop (signals, issue hooks).
    stop_requested: Callable[[], bool] = lambda: False
    #: called on every rank after every step with the logged fields (empty between logging
    #: steps): validation, divergence check, sweep pruning (disttrain.engine.monitor); True stops cleanly.
    after_step: Callable[[int, dict[str, float]], bool] = lambda step, fields: False
    #: throughput, FLOPs/MFU, step-time split, memory, stragglers (disttrain.observe).
    observer: Any = dataclasses.field(default_factory=NullObserver)


def train(settings: LoopSettings, parts: LoopParts, start_step: int) -> int:
    """Run optimizer steps from ``start_step`` to ``max_steps``; return the last step."""
    step = start_step
    saved_at = start_step
    started = time.perf_counter()
    while step < settings.max_steps:
        parts.observer.before_step()
        with timing.waited() as data_wait:  # time the loop stood waiting for input
            micro = [to_device(next(parts.batches), parts.device) for _ in range(settings.grad_accum_steps)]
        stats = parts.engine.train_step(micro, parts.loss_fn)
        stats.extra["data_wait_s"] = data_wait.seconds
        parts.advance_data(settings.grad_accum_steps)
        step += 1
        parts.observer.after_step(step, stats, micro)
        parts.meter.add(stats)
        logged = step % settings.log_every == 0 or step == settings.max_steps
        fields: dict[str, float] = {}
        if logged:
            fields = parts.meter.flush()
            fields.update(parts.observer.flush(step))
            fields["elapsed_s"] = time.perf_counter() - started  # wall time since the loop began (loss vs time)
            timing.add_share_and_warn(step, fields)
            lr = parts.engine.lr()
            if lr is not None:
                fields["lr"] = lr
            parts.tensorboard.scalars(step, fields)
        parts.progress.update(step, fields, logged)
        pruned = parts.after_step(step, fields)
        stop = parts.stop_requested() or pruned
        if stop or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            parts.save(step)
            saved_at = step
        if stop:
            log.warning("stop requested: checkpoint saved at step %d, leaving the loop", step)
            return step
    if saved_at != step:
        parts.save(step)
    return step
