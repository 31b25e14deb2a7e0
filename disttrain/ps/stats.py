"""A server's own counters: staleness histogram and maximum, pushes per second per
worker, the workers' loss. Totals are tensors so they go into checkpoints (and tests
read them back from there); interval figures go to the log and to TensorBoard."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("disttrain")
HIST_BINS = 64  # staleness >= 63 shares the last bin; the exact maximum is kept apart


class ServerStats:
    """Counts what one server applied. ``record`` per update, ``log_interval`` per log step."""

    def __init__(self, num_workers: int, server: int, tb_dir: Path | None):
        self.server = server
        self.totals = {"version": torch.zeros((), dtype=torch.int64),
                       "steps": torch.zeros((), dtype=torch.int64),  # loop steps served
                       "staleness_hist": torch.zeros(HIST_BINS, dtype=torch.int64),
                       "staleness_max": torch.zeros((), dtype=torch.int64),
                       "violations": torch.zeros((), dtype=torch.int64),
                       "pushes": torch.zeros(num_workers, dtype=torch.int64),   # received
                       "applied": torch.zeros(num_workers, dtype=torch.int64)}  # in the weights
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))
        self._reset_interval()
        self.step_staleness: list[int] = []

    def _reset_interval(self) -> None:
        self.interval_staleness: list[int] = []
        self.interval_pushes = [0] * len(self.totals["pushes"])
        self.last_push = [0.0] * len(self.totals["pushes"])
        self.loss_sum, self.loss_count = 0.0, 0
        self.started = time.perf_counter()

    @property
    def version(self) -> int:
        return int(self.totals["version"])

    def push_received(self, worker: int) -> None:
        self.totals["pushes"][worker] += 1
        self.interval_pushes[worker] += 1
        self.last_push[worker] = time.perf_counter()

    def record_update(self, staleness: list[int], bound: int | None, workers: list[int], losses: list[float]) -> None:
        """One optimizer step applied, made of the gradients of ``workers`` (their staleness
        values and losses)."""
        self.totals["version"] += 1
        for worker, loss in zip(workers, losses):
            self.totals["applied"][worker] += 1
            self.loss_sum += loss
            self.loss_count += 1
        for value in staleness:
            self.totals["staleness_hist"][min(value, HIST_BINS - 1)] += 1
            self.totals["staleness_max"].fill_(max(int(self.totals["staleness_max"]), value))
            if bound is not None and value > bound:
                self.totals["violations"] += 1
                log.error("ps server %d applied a gradient of staleness %d > bound %d", self.server, value, bound)
        self.interval_staleness += staleness
        self.step_staleness += staleness

    def step_extra(self) -> dict[str, float]:
        """Scalars for StepStats.extra (the loop's meter averages them over the log interval)."""
        values = self.step_staleness or [0]
        self.step_staleness = []
        return {"ps_staleness_mean": sum(values) / len(values), "ps_staleness_max": float(max(values))}

    def log_interval(self, step: int) -> None:
        # per worker: its pushes over the time it was pushing (a worker that died or finished
        # early is not charged for the time after its last push)
        rates = [n / max(last - self.started, 1e-9) for n, last in zip(self.interval_pushes, self.last_push)]
        stale = self.interval_staleness or [0]
        loss = self.loss_sum / self.loss_count if self.loss_count else float("nan")
        hist = {i: int(n) for i, n in enumerate(self.totals["staleness_hist"].tolist()) if n}
        log.info("ps server %d step %d: version %d, staleness max %d (interval max %d, mean %.2f), histogram %s, "
                 "pushes/s per worker %s, worker loss %.4g", self.server, step, self.version,
                 int(self.totals["staleness_max"]), max(stale), sum(stale) / len(stale), hist,
                 [round(r, 1) for r in rates], loss)
        if self.writer is not None:
            self._write(step, stale, rates, loss)
        self._reset_interval()

    def _write(self, step: int, stale: list[int], rates: list[float], loss: float) -> None:
        self.writer.add_histogram("ps/staleness", torch.tensor(stale, dtype=torch.float32), step)
        self.writer.add_scalar("ps/staleness_max", int(self.totals["staleness_max"]), step)
        self.writer.add_scalar("ps/version", self.version, step)
        if loss == loss:
            self.writer.add_scalar("ps/worker_loss", loss, step)
        for worker, rate in enumerate(rates):
            self.writer.add_scalar(f"ps/pushes_per_s/worker{worker}", rate, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
