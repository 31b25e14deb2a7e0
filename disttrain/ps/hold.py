"""A straggler by construction (tests): the servers hold a chosen worker's pushes until no
other worker can move, so its gradients reach the staleness bound whatever the OS does.

A held push is released when every other live worker is either waiting on a pull the gate
refuses (then the held gradient is exactly ``max_staleness`` versions old: the gate allows
no more) or parked at the loop's next synchronisation point (logging, checkpoint, stop
poll, evaluation, the last step), which it cannot pass before the held worker arrives.
Both are facts the server knows; nothing here depends on timing. A long quiet spell
(``fallback_s``) still releases, with a warning, so an unmodelled sync point cannot hang a run.
"""
from __future__ import annotations

import dataclasses
import logging
import time

log = logging.getLogger("disttrain")


@dataclasses.dataclass(frozen=True)
class SyncPoints:
    """The loop steps at which every rank meets: multiples of each cadence, and ``last``."""

    cadences: tuple[int, ...]
    last: int

    @classmethod
    def of(cls, cadences: list[int], last: int) -> "SyncPoints":
        return cls(tuple(sorted({c for c in cadences if c and c > 0})), last)

    def next_at_or_after(self, step: int) -> int:
        return min([-(-step // c) * c for c in self.cadences] + [self.last])


class StragglerHold:
    """Bookkeeping of held pushes for one server (pure logic: the server applies them)."""

    def __init__(self, workers: frozenset, sync: SyncPoints | None, fallback_s: float = 60.0):
        self.workers, self.sync, self.fallback_s = workers, sync, fallback_s
        self.held: dict[int, tuple] = {}
        self.started: set[int] = set()  # held workers that have been granted a pull
        self.step_offset = 0  # loop steps done before this session (a resumed run)
        self.quiet_since = time.monotonic()

    def wants(self, worker: int, synchronous: bool) -> bool:
        return worker in self.workers and not synchronous and self.sync is not None

    def admits(self, worker: int) -> bool:
        """The others start only once every held worker computes: otherwise a held worker that
        comes up late could find the fast ones already done, and no push would be held."""
        return self.sync is None or worker in self.workers or self.workers <= self.started

    def granted(self, worker: int) -> None:
        if worker in self.workers:
            self.started.add(worker)

    def hold(self, worker: int, header, grad) -> None:
        self.held[worker] = (header, grad)

    def ready(self, live: set, outstanding: dict, pulls, session_pushes: list[int]) -> bool:
        """May the held pushes be applied now? (see the module docstring)"""
        if not self.held:
            return False
        others = live - set(self.held)
        if any(w in outstanding for w in others):
            return False  # someone is still computing
        target = self.sync.next_at_or_after(self.step_offset + min(h.clock for h, _ in self.held.values()))
        stuck = all(w in pulls or self.step_offset + session_pushes[w] >= target for w in others)
        if stuck:
            return True
        if time.monotonic() - self.quiet_since > self.fallback_s:
            log.warning("ps: held push released after %.0fs without progress (an unmodelled sync point?)",
                        self.fallback_s)
            return True
        return False

    def take(self) -> list[tuple[int, tuple]]:
        held, self.held = self.held, {}
        return sorted(held.items())
