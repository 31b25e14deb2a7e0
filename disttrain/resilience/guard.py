"""Fault tolerance around the training loop, wired in by ``disttrain.engine.run`` in three calls:
``Guard(...)``, ``guard.wrap(parts)``, ``guard.finish()``.

* preemption: ``fault.requeue_signal`` (USR1) and SIGTERM stop every rank after the same
  step, save a checkpoint (``fault.save_on_signal``) and requeue a Slurm job;
* hang detection: a heartbeat per step phase, watched by ``disttrain.resilience.watchdog``;
* the restart count (torchrun ``--max-restarts``, Slurm requeues) in TensorBoard;
* debug faults for the tests (``fault.debug.*``): kill or stall one rank at a chosen step,
  slow one checkpoint write, slow every step. They act only on a job's first attempt (restart count 0), so a
  restarted job runs clean.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig

from disttrain.config.schema import FaultConfig, section
from disttrain.distributed import slurm
from disttrain.distributed.env import World
from disttrain.resilience.signals import StopPoll, StopSignal, parse_signal
from disttrain.resilience.watchdog import Heartbeat, Watchdog

log = logging.getLogger("disttrain")
#: fraction of dist.timeout_s after which a rank without progress is reported: the report
#: must come before the collective's own timeout turns the hang into an anonymous error.
HANG_FRACTION = 0.9


DEBUG_KEYS = {"kill_rank", "kill_step", "stall_rank", "stall_step", "slow_save_step", "save_delay_s", "step_delay_s"}


def validate(cfg: DictConfig) -> None:
    """Raise ValueError naming the bad ``fault.*`` key (called by the engine's pre-flight)."""
    fault = section(cfg, "fault")
    parse_signal(fault.requeue_signal)
    if str(fault.requeue) not in ("auto", "never"):
        raise ValueError(f"fault.requeue={fault.requeue!r} must be auto or never.")
    hang = fault.hang_timeout_s
    if hang is not None and hang <= 0:
        raise ValueError(f"fault.hang_timeout_s={hang!r} must be a number of seconds > 0, or null "
                         "(= 0.9 * dist.timeout_s).")
    if fault.stop_poll_s < 0:
        raise ValueError(f"fault.stop_poll_s={fault.stop_poll_s} must be >= 0 seconds (0 = poll every step).")
    unknown = set(fault.debug or {}) - DEBUG_KEYS
    if unknown:
        raise ValueError(f"fault.debug.{sorted(unknown)[0]} is not a debug setting; known: {sorted(DEBUG_KEYS)}.")


_END = object()  # the end of the batches


class SignalStop(RuntimeError):
    """A stop signal ended an earlier job of this process: later sweep jobs must not start."""


#: set once a signal stopped a job: the process is being preempted or shut down, so the next
#: job of a Hydra multirun sweep fails at once instead of starting to train.
_SIGNAL_STOPPED: list[str] = []


class Guard:
    """Signals, watchdog and debug faults for one rank of one job."""

    def __init__(self, fault: FaultConfig, timeout_s: float, world: World, run_dir: Path, device,
                 checkpointer=None):
        """``fault``: the run's typed ``fault`` section; ``timeout_s``: dist.timeout_s."""
        if _SIGNAL_STOPPED:
            raise SignalStop(f"{_SIGNAL_STOPPED[0]} stopped an earlier job of this sweep; not starting "
                             f"{run_dir}. Re-run the sweep (same hydra.sweep.dir) to resume its jobs.")
        self.fault, self.world, self.checkpointer = fault, world, checkpointer
        self.debug: dict[str, Any] = dict(fault.debug or {}) if world.restart_count == 0 else {}
        self.requeue = str(fault.requeue)
        self.stop_signal = None
        self.poll = None  # StopPoll, armed in wrap() once the strategy's cadence is known
        if fault.save_on_signal:
            sigs = [parse_signal(fault.requeue_signal), signal.SIGTERM]
            self.stop_signal = StopSignal(sigs, device).install()
        self.heartbeat = Heartbeat()
        self.watchdog = None
        if fault.watchdog:
            deadline = float(fault.hang_timeout_s or HANG_FRACTION * float(timeout_s))
            self.watchdog = Watchdog(self.heartbeat, world.rank, world.world_size, run_dir, deadline)
        self.step = 0
        self.saved_on_stop = False  # requeue only a job whose stop checkpoint is safely written

    def wrap(self, parts, start_step: int) -> "Guard":
        """Hook this guard into the loop's parts (batches, save, stop_requested)."""
        self.step = start_step
        self.engine = parts.engine
        if self.stop_signal is not None:  # the strategy's cadence: param_server ranks meet only at log steps
            self.poll = StopPoll(self.stop_signal, self.fault.stop_poll_s, start_step, parts.engine.stop_check_every)
        self.heartbeat.enter("between steps", start_step + 1)
        parts.batches = self._batches(parts.batches)
        parts.save = self._save(parts.save)
        parts.stop_requested = self._stop_requested
        parts.tensorboard.scalars(start_step, {"restart_count": float(self.world.restart_count)}, prefix="fault")
        if self.watchdog is not None:
            self.watchdog.start()
        return self

    def _batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        while True:
            self.heartbeat.enter("data loader")
            self._maybe_stall()
            batch = next(batches, _END)
            if batch is _END:  # (None is a batch: a rank that reads no data gets None)
                return
            self.heartbeat.enter("train_step (forward/backward/collectives)")
            yield batch

    def _save(self, save: Callable[[int], None]) -> Callable[[int], None]:
        def guarded(step: int) -> None:
            self.heartbeat.enter("checkpoint save")
            slow = self.debug.get("slow_save_step") == step and self.checkpointer is not None
            if slow:  # widen the window in which a kill lands inside the write
                self.checkpointer.write_delay_s = float(self.debug.get("save_delay_s", 30))
            try:
                save(step)
            finally:
                if slow:
                    self.checkpointer.write_delay_s = 0.0
            self.saved_on_stop = self.stop_signal is not None and self.stop_signal.stopped
        return guarded

    def _debug_faults(self, step: int) -> None:
        if self.debug.get("kill_step") == step and self.debug.get("kill_rank") == self.world.rank:
            log.warning("fault.debug: SIGKILL to rank %d at step %d", self.world.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.debug.get("step_delay_s"):  # a slow step: time for a test to signal mid-run
            time.sleep(float(self.debug["step_delay_s"]))

    def tick_alone(self, step: int) -> bool:
        """For a rank that runs free, outside the loop (a parameter-server worker): the debug
        faults of its ``step``, and whether this process received a stop signal. No
        collective: the rank tells its peers itself."""
        self._debug_faults(step)
        return self.stop_signal is not None and self.stop_signal.received is not None

    def _stop_requested(self) -> bool:
        self.step += 1
        self._debug_faults(self.step)
        if self.stop_signal is not None and self.engine.peer_stop():  # a free-running rank was signalled
            self.stop_signal.request(signal.SIGTERM)
        self.heartbeat.enter("stop-signal all-reduce", self.step)
        stop = self.poll(self.step) if self.poll is not None else False
        self.heartbeat.enter("between steps", self.step + 1)
        return stop

    def _maybe_stall(self) -> None:
        if self.debug.get("stall_step") == self.heartbeat.step and self.debug.get("stall_rank") == self.world.rank:
            log.warning("fault.debug: rank %d stalls in the data loader at step %d", self.world.rank, self.heartbeat.step)
            while True:  # a deadlocked loader: never returns; the watchdog must catch it
                time.sleep(1)

    def finish(self) -> None:
        """After the loop: stop watching, restore signal handlers, requeue if a signal stopped us."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.stop_signal is not None:
            self.stop_signal.restore()
        if self.saved_on_stop:
            _SIGNAL_STOPPED.append(self.stop_signal.received.name)
        if self.saved_on_stop and self.world.rank == 0 and self.requeue == "auto" and slurm.job_id():
            slurm.requeue()
