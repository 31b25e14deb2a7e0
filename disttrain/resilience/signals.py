"""Preemption signals: a signal on any rank asks the whole job to stop after the current step.

Slurm warns a job before its time limit or a preemption (``sbatch --signal=USR1@90``) and
sends SIGTERM when it ends it. A handler only sets a flag (nothing else is safe inside a
signal handler); the loop polls :meth:`StopSignal.agreed`, which all-reduces the flag so
every rank leaves the loop after the *same* step and the checkpoint they save together is
consistent. A signal that reaches only one rank (or one node) is enough. :class:`StopPoll`
spaces the polls ``fault.stop_poll_s`` seconds apart (one all-reduce per step cost a small
model several percent of its throughput), with a step cadence every rank derives from the
same all-reduced figures, so all ranks still poll at the same steps.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any

import torch

from disttrain.distributed import comm

log = logging.getLogger("disttrain")


def parse_signal(name: str | int, key: str = "fault.requeue_signal") -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` -> ``signal.SIGUSR1``; anything else names the key."""
    try:
        if isinstance(name, int) or str(name).isdigit():
            return signal.Signals(int(name))
        text = str(name).upper()
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"{key}={name!r} is not a signal name; use e.g. USR1, USR2 or TERM.") from None


class StopSignal:
    """Catches the given signals and turns them into a job-wide, step-aligned stop."""

    def __init__(self, signals: list[signal.Signals], device: torch.device):
        self.signals = list(dict.fromkeys(signals))
        self.device = device  # kept for callers; the flag itself always lives on the CPU
        # The flag travels over the communicator's gloo host group on the CPU: a CUDA flag
        # (NCCL) would need a .item() that waits for the whole GPU stream.
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._stopped = False

    def install(self) -> "StopSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart interrupted system calls: the signal may land while this thread waits in
            # a collective's socket read, which must not fail because of it.
            signal.siginterrupt(sig, False)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signal.Signals(signum)

    def request(self, sig: signal.Signals) -> None:
        """A peer outside the job's collectives (a parameter-server worker) received ``sig``:
        count it as received here, so the next poll stops the job the usual way."""
        self.received = self.received or sig

    def agreed(self, local_figure: float = 0.0) -> tuple[bool, float]:
        """(stop, the largest ``local_figure`` over the ranks): True on every rank once any rank
        has received a signal. A collective: all ranks call it at the same step."""
        local = 0.0 if self.received is None else float(self.received.value)
        received, figure = comm.get().host_max([local, float(local_figure)])
        if received and not self._stopped:
            self._stopped = True
            self.received = self.received or signal.Signals(int(received))
            log.warning("%s received: finishing this step, saving a checkpoint and stopping", self.received.name)
        return self._stopped, figure

    @property
    def stopped(self) -> bool:
        return self._stopped

    def restore(self) -> None:
        """Put the previous handlers back (the next Hydra multirun job installs its own)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class StopPoll:
    """At which steps the ranks agree on a stop: about every ``poll_s`` seconds of training.
    Each poll all-reduces the stop flag together with this rank's seconds per step since the
    last poll (MAX: the slowest rank's), and every rank derives the next poll step from that
    same agreed figure, so the ranks keep polling at the same steps without another collective.
    ``multiple``: polls fall on multiples of it (a strategy whose ranks meet only there)."""

    MAX_INTERVAL = 10_000

    def __init__(self, stop: StopSignal, poll_s: float, start_step: int, multiple: int = 1):
        self.stop, self.poll_s, self.multiple = stop, float(poll_s), max(1, int(multiple))
        self.last_step, self.last_time = start_step, time.monotonic()
        self.next_step = self._aligned(start_step + 1)  # the first step is timed, then the cadence adapts

    def _aligned(self, step: int) -> int:
        return math.ceil(step / self.multiple) * self.multiple

    def __call__(self, step: int) -> bool:
        """Called after every step; a collective only at the poll steps."""
        if step < self.next_step:
            return False
        now = time.monotonic()
        stopped, slowest = self.stop.agreed((now - self.last_time) / max(1, step - self.last_step))
        interval = 1 if self.poll_s <= 0 else int(min(self.MAX_INTERVAL, max(1.0, self.poll_s / max(slowest, 1e-9))))
        self.last_step, self.last_time = step, now
        self.next_step = self._aligned(step + interval)
        return stopped
