"""The per-rank observer the loop drives: times each step and its parts, counts model
FLOPs once, and on logging steps gathers every rank's figures into global ones (written
to the log and TensorBoard by the loop) and per-rank ones (TensorBoard ``rank<r>/``).

Step-time split per rank (seconds per step):
  compute = step - comm - idle
  comm    = exposed communication (DDP hook timings; strategies may add ``extra["comm_s"]``)
  idle    = waiting for data (``extra["data_wait_s"]``, timed by the loop) + pipeline idle
            (``extra["idle_s"]`` from the strategy)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from disttrain.config.errors import ConfigError
from disttrain.config.schema import MetricsConfig, section
from disttrain.distributed.env import World
from disttrain.distributed import comm
from disttrain.observe import comm_timing, fsdp_comm, memory, peak, straggler, timeline
from disttrain.observe.base import NullObserver
from disttrain.observe.flops import flops_per_sample

log = logging.getLogger("disttrain")

#: per-rank figures gathered on logging steps, in this order.
RANK_FIELDS = ("samples_per_s", "tokens_per_s", "time_step_s", "time_compute_s", "time_comm_s",
               "time_idle_s", "time_data_s", "comm_inflight_s", "peak_mem_gb", "train_mem_gb", "flops_per_step",
               "peak_flops")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for a bad ``metrics.*`` setting (called by config.validate)."""
    s = section(cfg, "metrics")
    if s.peak_flops is not None and not float(s.peak_flops) > 0:
        raise ConfigError(f"metrics.peak_flops={s.peak_flops} must be > 0 FLOP/s (or null to measure it).")
    if not isinstance(s.straggler_every, int) or s.straggler_every < 0:
        raise ConfigError(f"metrics.straggler_every={s.straggler_every!r} must be an integer >= 0 (0 = off).")
    if not float(s.straggler_ratio) > 1.0:
        raise ConfigError(f"metrics.straggler_ratio={s.straggler_ratio} must be > 1 (e.g. 1.5 = 50% slower than the median).")
    if s.peak_dtype != "auto" and not isinstance(getattr(torch, s.peak_dtype, None), torch.dtype):
        raise ConfigError(f"metrics.peak_dtype={s.peak_dtype!r} is not a torch dtype (e.g. float32, bfloat16).")


class _Sums:
    """Per-rank running sums between two flushes."""

    def __init__(self):
        self.started = time.perf_counter()
        self.steps = 0
        self.samples = self.tokens = self.flops = 0.0
        self.wall = self.comm = self.idle = self.data = self.inflight = 0.0


class Observer(NullObserver):
    def __init__(self, settings: MetricsConfig, world: World, device: torch.device, tensorboard,
                 comm_timer: comm_timing.CommTimer | None, peak_flops: float | None,
                 count: Callable[[Any], float | None] | None):
        self.s, self.world, self.device, self.tensorboard = settings, world, device, tensorboard
        self.comm_timer, self.peak_flops, self.count = comm_timer, peak_flops, count
        self.per_sample: float | None = None
        self.sums, self.window_busy, self.window_steps = _Sums(), 0.0, 0
        self.t0, self.last_step = 0.0, 0
        self.timeline: timeline.Timeline | None = None
        self.train_memory: memory.TrainingMemory | None = None  # set last by build_observer
        self.stragglers: list[int] = []  # ranks named at the last check (every rank knows)
        self.idle_key = "idle_s"  # pipeline strategies: this rank's stage idle (set by build_observer)

    def before_step(self) -> None:
        self.t0 = time.perf_counter()
        if self.timeline is not None:
            self.timeline.begin(self.last_step + 1)
        if self.world.rank == self.s.debug_slow_rank and self.s.debug_slow_s > 0:
            time.sleep(self.s.debug_slow_s)  # testing aid: a rank made slow on purpose

    def after_step(self, step: int, stats: Any, micro: list) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels belong to this step's time
        wall = time.perf_counter() - self.t0
        inflight, exposed = self.comm_timer.take() if self.comm_timer else (0.0, 0.0)
        comm_s = exposed + float(stats.extra.get("comm_s", 0.0))
        pipe_idle = float(stats.extra.get(self.idle_key, 0.0))
        self.last_step = step
        if self.timeline is not None:
            self.timeline.end(step)
        if self.count is not None and micro[0] is not None:  # None: a rank that reads no data
            self.per_sample, self.count = self.count(micro[0]), None
        data_s = float(stats.extra.get("data_wait_s", 0.0))  # measured by the loop (disttrain.data.timing)
        self._add(wall, comm_s, pipe_idle, data_s, inflight, stats.samples, _tokens(micro))
        self.window_busy += wall - comm_s - pipe_idle
        self.window_steps += 1
        if self.s.straggler_every and step % self.s.straggler_every == 0:
            self._check_stragglers(step)

    def _add(self, wall, comm_s, pipe_idle, data_s, inflight, samples, tokens) -> None:
        s = self.sums
        s.steps += 1
        s.wall += wall
        s.comm += comm_s
        s.idle += pipe_idle + data_s
        s.data += data_s
        s.inflight += inflight
        s.samples += samples
        s.tokens += tokens
        s.flops += (self.per_sample or 0.0) * samples

    def _check_stragglers(self, step: int) -> None:
        times = straggler.gather_times(self.window_busy / max(self.window_steps, 1))
        self.window_busy, self.window_steps = 0.0, 0
        slow = self.stragglers = straggler.find_stragglers(times, self.s.straggler_ratio)
        if self.world.rank == 0:
            straggler.report(step, times, slow, self.tensorboard)

    def flush(self, step: int) -> dict[str, float]:
        """Global figures (returned) and per-rank ones (TensorBoard); a collective."""
        table = self._gather(self._local_row())
        self.sums = _Sums()
        if self.world.rank == 0:
            self._write_ranks(step, table)
        return _global_fields(table)

    def _local_row(self) -> list[float]:
        s, n = self.sums, max(self.sums.steps, 1)
        elapsed = max(time.perf_counter() - s.started, 1e-9)
        return [s.samples / elapsed, s.tokens / elapsed, s.wall / n, max(0.0, s.wall - s.comm - s.idle) / n,
                s.comm / n, s.idle / n, s.data / n, s.inflight / n, memory.peak_bytes(self.device) / 1e9,
                self.train_memory.peak() / 1e9 if self.train_memory else 0.0,
                s.flops / n, self.peak_flops or 0.0]

    def _gather(self, row: list[float]) -> list[dict[str, float]]:
        return [dict(zip(RANK_FIELDS, values)) for values in comm.get().gather(row)]

    def _write_ranks(self, step: int, table: list[dict[str, float]]) -> None:
        for rank, row in enumerate(table):
            self.tensorboard.scalars(step, {k: v for k, v in row.items() if k != "peak_flops"}, prefix=f"rank{rank}")
        if len(table) > 1:
            # A person needs the per-rank table only when ranks disagree (a straggler was named).
            log.log(logging.INFO if self.stragglers else logging.DEBUG,
                    "step %d per rank: samples/s %s  step ms %s  comm ms %s  peak mem GB %s", step,
                     _fmt(table, "samples_per_s", 1), _fmt(table, "time_step_s", 1e3),
                     _fmt(table, "time_comm_s", 1e3), _fmt(table, "peak_mem_gb", 1))


def _fmt(table: list[dict[str, float]], key: str, scale: float) -> str:
    return "[" + " ".join(f"{row[key] * scale:.3g}" for row in table) + "]"


def _tokens(micro: list) -> int:
    """Tokens are the elements of integer inputs (token ids); other models have none."""
    inputs = [b[0] for b in micro if b is not None]  # None: a rank that reads no data
    return sum(x.numel() for x in inputs if not torch.is_floating_point(x))


def _global_fields(table: list[dict[str, float]]) -> dict[str, float]:
    """Sums of throughput and FLOPs over ranks, means of times, max of memory; MFU is the
    achieved model FLOP/s over the sum of the ranks' peaks."""
    n = len(table)
    mean = {k: sum(row[k] for row in table) / n for k in RANK_FIELDS}
    out = {"time_step_s": mean["time_step_s"], "time_compute_s": mean["time_compute_s"],
           "time_comm_s": mean["time_comm_s"], "time_idle_s": mean["time_idle_s"],
           "peak_mem_gb": max(row["peak_mem_gb"] for row in table),
           "train_mem_gb": max(row["train_mem_gb"] for row in table)}
    if mean["tokens_per_s"] > 0:
        out["tokens_per_s"] = mean["tokens_per_s"] * n
    flops_step = mean["flops_per_step"] * n
    peaks = mean["peak_flops"] * n
    if flops_step > 0 and out["time_step_s"] > 0:
        out["flops_per_step"] = flops_step
        out["flops_per_s"] = flops_step / out["time_step_s"]
        if peaks > 0:
            out["mfu"] = out["flops_per_s"] / peaks
    return out


def _peak_dtype(settings: MetricsConfig, precision: str) -> torch.dtype:
    """The dtype the model's matmuls run in: trainer.precision's, unless set explicitly."""
    if settings.peak_dtype != "auto":
        return getattr(torch, settings.peak_dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _peak(settings: MetricsConfig, precision: str, world: World, device: torch.device, run_dir: Path) -> float:
    """metrics.peak_flops, or the cached probe (local rank 0 measures, the others wait)."""
    if settings.peak_flops:
        return float(settings.peak_flops)
    dtype = _peak_dtype(settings, precision)
    if world.local_rank == 0:
        value = peak.cached_peak(run_dir, device, dtype)
    comm.get().barrier()
    if world.local_rank != 0:
        value = peak.read_cached(run_dir, device, dtype) or peak.cached_peak(run_dir, device, dtype)
    return value


def build_observer(settings: MetricsConfig, precision: str, world: World, device: torch.device, run_dir: Path,
                   strategy, tensorboard, build_model: Callable, loss_fn) -> Observer:
    """Attach the communication timing (DDP's hook or FSDP2's collectives), settle the peak FLOP/s, and arm the one-time FLOP count.
    ``settings`` is the run's ``metrics`` section, ``precision`` the normalized trainer.precision."""
    timer = fsdp_comm.attach(strategy.communicated_module())  # DDP's hook, or FSDP2's collectives
    peak_flops = _peak(settings, precision, world, device, run_dir)
    count = (lambda batch: flops_per_sample(build_model, batch, loss_fn)) if settings.count_flops else None
    log.info("observe: peak %.3g FLOP/s per rank (%s); communication timing %s", peak_flops,
             "metrics.peak_flops" if settings.peak_flops else "matmul probe", "on" if timer else "off")
    observer = Observer(settings, world, device, tensorboard, timer, peak_flops, count)
    observer.timeline = timeline.attach(strategy, run_dir, world.rank, settings.timeline_step)
    observer.train_memory = memory.TrainingMemory(device, strategy.model)
    if strategy.pipeline_stages():  # pipelined strategies report every stage's idle seconds
        observer.idle_key = f"pipeline/stage{dist.get_rank(strategy.stage_group())}_idle_s"
    return observer
