"""Per-step figures (loss, learning rate, samples/s), reduced across ranks only on logging
steps, written by rank 0 to TensorBoard and to ``<run dir>/metrics.jsonl``.

The step time is the observer's ``time_step_s`` (disttrain.observe: the ranks' mean wall time
of one step, data wait included, logging and checkpoints excluded), the one its compute/comm/
idle split adds up to and MFU divides by; the Meter reports none of its own.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from disttrain.distributed import comm



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

    def add(self, stats) -> None:  # a strategies.base.StepStats (loss tensor or None, samples)
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
        comm.get().sum_(packed)
        loss_sum, loss_count, samples = packed.tolist()
        out = {"loss": loss_sum / max(loss_count, 1.0),
               "samples_per_s": samples / elapsed}  # wall clock of the interval, overheads included
        out.update({k: v / max(self.steps, 1) for k, v in self.extra.items()})
        self.reset()
        return out


class JsonLines:
    """``metrics.jsonl``: one JSON object per logging step, in step order. The loop's own
    figures (prefix ``train``) keep their names (``loss``, ``time_step_s``...), the others
    carry their TensorBoard prefix (``rank1/time_step_s``, ``observe/straggler/count``).
    Figures of a step arrive in several calls; the ``train`` call completes the step's object
    and writes it; a figure recorded for a step after that (the validation loss, computed
    after the step's log) is written at once as an object of its own with the same ``step``.
    Non-finite values are written as null (strict JSON). A resumed run appends: steps
    retrained after a restart appear again, the last object for a step is the current one."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")
        self.pending: dict[int, dict[str, float | None]] = {}
        self.written = -1  # the last step whose train object is written

    def add(self, step: int, values: dict[str, float], prefix: str) -> None:
        record = self.pending.setdefault(step, {})
        for key, value in values.items():
            number = float(value)
            record[key if prefix == "train" else f"{prefix}/{key}"] = number if math.isfinite(number) else None
        if prefix == "train":
            self.written = step
        if prefix == "train" or step <= self.written:
            self.write_through(step)

    def write_through(self, last: int | None = None) -> None:
        """Write the pending objects up to step ``last`` (all of them when None)."""
        for step in sorted(s for s in self.pending if last is None or s <= last):
            record = self.pending.pop(step)  # the loop's own figures first, prefixed ones after
            ordered = dict(sorted(record.items(), key=lambda item: "/" in item[0]))
            self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **ordered}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.write_through()
        self.file.close()


class TensorBoard:
    """Scalars under ``<run dir>/tensorboard`` and in ``<run dir>/metrics.jsonl`` (rank 0 only;
    other ranks write nothing)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        self.jsonl: JsonLines | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = JsonLines(run_dir / "metrics.jsonl")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.jsonl is not None:
            self.jsonl.add(step, values, prefix)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
