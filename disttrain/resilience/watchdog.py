"""Hang detection: name the rank that stopped making progress, dump every rank's stacks, exit.

The training thread only records where it is (step number and operation: a few attribute
writes per step). A daemon thread per rank publishes that record to the job's key-value
store (the process group's own TCPStore, a side channel that still works while a collective
is stuck) and, when its rank has made no progress for ``deadline_s``, compares every rank's
record: the rank furthest behind is the stalled one, the others are waiting for it in a
collective. The first rank to notice posts a ``hang`` key; every rank that sees it writes its
Python stacks (``faulthandler``, all threads) to ``<run dir>/hang/`` and the job exits non-zero,
so a launcher with restarts (torchrun ``--max-restarts``, Slurm requeue) starts it again.

Hand-written because torch's equivalents do not name the culprit on CPU: gloo's collective
timeout only says "timed out"; ``monitored_barrier`` needs every rank to call it (a stuck one
cannot); the NCCL flight recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE``) covers NCCL only.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("disttrain")

#: operations in the order a step runs them: the rank at the earliest point is the one behind.
PHASES = ("between steps", "data loader", "train_step (forward/backward/collectives)",
          "stop-signal all-reduce", "checkpoint save")
HANG_EXIT_CODE = 3
_KEY = "disttrain/watchdog"


class Heartbeat:
    """Where this rank is; written by the training thread, read by the watchdog."""

    def __init__(self) -> None:
        self.step, self.phase, self.since = 0, 0, time.monotonic()

    def enter(self, phase: str, step: int | None = None) -> None:
        self.phase = PHASES.index(phase)
        if step is not None:
            self.step = step
        self.since = time.monotonic()


def _default_store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return dist.PrefixStore(_KEY, _get_default_store())


class Watchdog(threading.Thread):
    """One per rank; ``start()`` after the process group is up, ``stop()`` at the end."""

    def __init__(self, heartbeat: Heartbeat, rank: int, world_size: int, run_dir: Path, deadline_s: float):
        super().__init__(name="disttrain-watchdog", daemon=True)
        self.heartbeat, self.rank, self.world_size = heartbeat, rank, world_size
        self.dump_dir, self.deadline_s = Path(run_dir) / "hang", deadline_s
        self.poll_s = min(1.0, deadline_s / 10)
        self.store = _default_store()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self._tick()
            except Exception as exc:  # the store is gone (rank 0 exited): keep watching alone
                log.debug("watchdog lost the store (%s); watching this rank only", exc)
                self.store = None

    def _tick(self) -> None:
        beat = self.heartbeat
        record = {"step": beat.step, "phase": beat.phase, "idle_s": time.monotonic() - beat.since,
                  "time": time.time()}
        if self.store is not None:
            self.store.set(f"rank{self.rank}", json.dumps(record))
            if self.store.check(["hang"]):
                self._fail(self.store.get("hang").decode())
        # A save is not a hang: a large checkpoint may take longer than the deadline, and its
        # own collectives are bounded by dist.timeout_s (a rank that dies mid-save ends them).
        if record["idle_s"] > self.deadline_s and PHASES[beat.phase] != "checkpoint save":
            message = self.diagnose()
            if self.store is not None:  # first rank to notice wins; the others report its message
                message = self.store.compare_set("hang", "", message).decode() or message
            self._fail(message)

    def _records(self) -> dict[int, dict]:
        records = {}
        for rank in range(self.world_size):
            key = f"rank{rank}"
            if self.store is not None and self.store.check([key]):
                records[rank] = json.loads(self.store.get(key))
        return records

    def diagnose(self) -> str:
        """One line naming the stalled rank(s) and what they and the others are doing."""
        records = self._records() or {self.rank: {"step": self.heartbeat.step, "phase": self.heartbeat.phase,
                                                  "idle_s": time.monotonic() - self.heartbeat.since,
                                                  "time": time.time()}}
        behind = min((r["step"], r["phase"]) for r in records.values())
        stalled = sorted(rank for rank, r in records.items() if (r["step"], r["phase"]) == behind)
        silent = sorted(rank for rank, r in records.items() if time.time() - r["time"] > 5 * self.poll_s + 2)
        missing = sorted(set(range(self.world_size)) - set(records))
        others = sorted(set(records) - set(stalled))
        parts = [f"hang detected: rank {','.join(map(str, stalled))} made no progress for "
                 f"{self.deadline_s:.0f}s in {PHASES[behind[1]]} at step {behind[0]}"]
        if others:
            parts.append("waiting for it: " + "; ".join(
                f"rank {r} in {PHASES[records[r]['phase']]} at step {records[r]['step']}" for r in others))
        if silent or missing:
            parts.append(f"ranks not reporting (dead, or frozen holding the GIL): {silent + missing}")
        parts.append(f"Python stacks of every rank: {self.dump_dir}/")
        return "; ".join(parts)

    def dump_stacks(self) -> Path:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"stacks.rank{self.rank}.txt"
        with path.open("w") as handle:
            handle.write(f"rank {self.rank} pid {os.getpid()} step {self.heartbeat.step} "
                         f"in {PHASES[self.heartbeat.phase]}\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        return path

    def _fail(self, message: str) -> None:
        """Dump this rank's stacks, wait briefly for the others to dump theirs, exit non-zero."""
        self.dump_stacks()
        log.error("%s", message)
        if self.store is not None:
            self.store.set(f"dumped{self.rank}", "1")
            keys = [f"dumped{r}" for r in range(self.world_size)]
            give_up = time.monotonic() + min(10.0, self.deadline_s)
            while time.monotonic() < give_up and not self.store.check(keys):
                time.sleep(0.1)
        if self.rank == 0:
            (self.dump_dir / "report.txt").write_text(message + "\n")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HANG_EXIT_CODE)  # the training thread is stuck: only a hard exit ends the process
