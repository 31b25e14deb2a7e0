"""A straggler by construction (tests): the servers hold a chosen worker's pushes until no
other worker can move, so its gradients reach the staleness bound whatever the OS does.

A held push is released when every other live worker waits on a pull the gate refuses: then
the held gradient is exactly ``max_staleness`` versions old (the gate allows no more). Workers
run free (they never park at a job-wide sync point), and each sends its next pull right after
its push, so "waiting on a refused pull" is the only way a worker can stand still; the server
knows it without any timing. A long quiet spell (``fallback_s``) still releases, with a
warning, so an unmodelled wait cannot hang a run.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("disttrain")


class StragglerHold:
    """Bookkeeping of held pushes for one server (pure logic: the server applies them)."""

    def __init__(self, workers: frozenset, fallback_s: float = 60.0):
        self.workers, self.fallback_s = workers, fallback_s
        self.held: dict[int, tuple] = {}
        self.started: set[int] = set()  # held workers that have been granted a pull
        self.quiet_since = time.monotonic()

    def wants(self, worker: int, synchronous: bool) -> bool:
        return worker in self.workers and not synchronous

    def admits(self, worker: int) -> bool:
        """The others start only once every held worker computes: otherwise a held worker that
        comes up late could find the fast ones already done, and no push would be held."""
        return worker in self.workers or self.workers <= self.started

    def granted(self, worker: int) -> None:
        if worker in self.workers:
            self.started.add(worker)

    def hold(self, worker: int, header, grad) -> None:
        self.held[worker] = (header, grad)

    def ready(self, live: set, outstanding: dict, pulls) -> bool:
        """May the held pushes be applied now? (see the module docstring)"""
        if not self.held:
            return False
        others = live - set(self.held)
        if all(w not in outstanding and w in pulls for w in others):
            return True
        if time.monotonic() - self.quiet_since > self.fallback_s:
            log.warning("ps: held push released after %.0fs without progress (an unmodelled wait?)",
                        self.fallback_s)
            return True
        return False

    def take(self) -> list[tuple[int, tuple]]:
        held, self.held = self.held, {}
        return sorted(held.items())

    def drop(self) -> None:
        """The run is over: held pushes are never applied."""
        self.held = {}
