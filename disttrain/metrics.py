"""Per-step figures (loss, learning rate, samples/s, step time), reduced across ranks only
on logging steps, written to TensorBoard by rank 0."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from disttrain.strategies.base import StepStats


class Meter:
    """Accumulates StepStats between logging steps; ``flush`` all-reduces and returns means."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = 0
        self.samples = 0
        self.steps = 0
        self.extra: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        if stats.loss is not None:
            self.loss_sum += stats.loss.detach().to(self.device, torch.float64)
            self.loss_count += 1
        self.samples += stats.samples
        self.steps += 1
        for key, value in stats.extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + float(value)

    def flush(self) -> dict[str, float]:
        """Global figures over the interval (a collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.started
        packed = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64, device=self.device),
                              torch.tensor(float(self.samples), dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(packed)
        loss_sum, loss_count, samples = packed.tolist()
        out = {"loss": loss_sum / max(loss_count, 1.0),
               "samples_per_s": samples / elapsed,
               "step_time_s": elapsed / max(self.steps, 1)}
        out.update({k: v / max(self.steps, 1) for k, v in self.extra.items()})
        self.reset()
        return out


class TensorBoard:
    """Scalars under ``<run dir>/tensorboard`` (rank 0 only; other ranks write nothing)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
