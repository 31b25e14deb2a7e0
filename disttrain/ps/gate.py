"""When may a worker start computing on the server's current parameters?

Staleness of a gradient = server version when it is applied − version it was computed on
(the number of updates it did not see). The gate answers pull requests so that bound
``s`` can never be broken, without ever dropping a gradient:

* ``s = 0`` (synchronous): gradients are aggregated per round; a worker may pull as soon
  as its own gradient of the round has been applied. Same result as synchronous SGD.
* ``s >= 1`` (stale-synchronous, every push applied on arrival): granting a pull at
  version v to a worker adds it to the outstanding set O (pulled, not yet pushed). Each
  outstanding worker can push at most once before any other outstanding one, so the
  worst staleness of worker k is (v − pulled_k) + (|O| − 1). A pull is granted only if
  that stays <= s for every k; otherwise the worker waits for the slow ones to push.
* ``s = None`` (fully asynchronous, Downpour-style): always granted.
"""
from __future__ import annotations


class StalenessGate:
    """Bookkeeping of outstanding computations for one server (pure logic, no I/O)."""

    def __init__(self, max_staleness: int | None):
        self.max_staleness = max_staleness
        self.outstanding: dict[int, int] = {}  # worker -> version it pulled
        self.in_round: set[int] = set()        # s=0: workers whose gradient awaits the round

    @property
    def synchronous(self) -> bool:
        return self.max_staleness == 0

    def may_grant(self, worker: int, version: int) -> bool:
        if self.synchronous:
            return worker not in self.in_round
        if self.max_staleness is None:
            return True
        others = {w: v for w, v in self.outstanding.items() if w != worker}
        oldest = min(others.values(), default=version)
        return (version - oldest) + len(others) <= self.max_staleness

    def granted(self, worker: int, version: int) -> None:
        self.outstanding[worker] = version

    def pushed(self, worker: int) -> None:
        self.outstanding.pop(worker, None)
        if self.synchronous:
            self.in_round.add(worker)

    def round_applied(self) -> None:
        self.in_round.clear()

    def forget(self, worker: int) -> None:
        """A worker left (finished or died): it no longer holds anyone back."""
        self.outstanding.pop(worker, None)
        self.in_round.discard(worker)
