"""When does a server close the step it is forming under a bound s >= 1, and when should a
worker that would get the weights it already holds wait for the next ones instead?

Why: with momentum (SGD 0.9 here), a gradient one version old is poison. A delay of one
step shrinks heavy-ball's stable step size from lr*h < 3.8 to about 0.2 (linear analysis),
and it showed: one update per push, or a step of any num_workers gradients, left a slow
worker's gradients (and, with equal workers, every other one) a version old, and the loss
oscillated between 0.08 and 0.3 where DDP reaches 0.02. So a step waits for one fresh
gradient of every live worker, and a fast worker fills the wait with more gradients on the
same weights (it is never idle for a slow one: the asynchrony that pays). Only a worker more
than ``CAP``x slower than the step misses steps, and the staleness gate bounds how far.

Timing enters only to avoid idle time, never the numbers' bounds: the server learns each
worker's compute time (grant to push, an average) and

* answers a pull at once with the same weights when the worker's next gradient should land
  before the step can close; otherwise the pull waits for the step (equal workers: the
  first to push waits the moment until the second's gradient closes the step, and both
  compute on the new weights, as in DDP);
* once a step could close, waits (at most ``patience`` of a compute time) for a gradient
  it expects on the step's weights, so it is not left one version old.
"""
from __future__ import annotations

CAP = 2  # a step closes without a missing worker once it holds CAP x num_workers gradients


class RoundPolicy:
    """Per-worker compute times and the timing decisions (pure logic: ``now`` is passed in)."""

    def __init__(self, num_workers: int, patience: float = 0.25, smoothing: float = 0.3):
        self.num_workers, self.patience, self.smoothing = num_workers, patience, smoothing
        self.compute: dict[int, float] = {}  # worker -> average seconds from grant to push
        self.started: dict[int, tuple[float, int]] = {}  # worker -> (grant time, version)

    def granted(self, worker: int, version: int, now: float) -> None:
        self.started[worker] = (now, version)

    def pushed(self, worker: int, now: float) -> None:
        if worker not in self.started:
            return
        took = now - self.started.pop(worker)[0]
        old = self.compute.get(worker)
        self.compute[worker] = took if old is None else old + self.smoothing * (took - old)

    def forget(self, worker: int) -> None:
        self.started.pop(worker, None)

    def expected(self, worker: int) -> float | None:
        """When the worker's gradient in flight should arrive (None: unknown or not computing)."""
        if worker not in self.started or worker not in self.compute:
            return None
        return self.started[worker][0] + self.compute[worker]

    def may_close(self, count: int, contributors: set, live: set, version: int, now: float) -> tuple[bool, float | None]:
        """(close now?, when to look again). ``count`` gradients from ``contributors``."""
        if count < self.num_workers:
            return False, None
        if not live <= contributors and count < CAP * self.num_workers:
            return False, None
        # a gradient on these weights due within its slack (and not already later than that)
        due = [t + self._slack(w) for w, (_, v) in self.started.items() if v == version and w in live
               for t in [self.expected(w)] if t is not None and t - self._slack(w) <= now <= t + self._slack(w)]
        if due:
            return False, max(due)
        return True, None

    def pull_deadline(self, worker: int, missing: set, now: float) -> float | None:
        """A pull that would return the weights ``worker`` holds, while the step waits for
        ``missing`` workers: None = answer now; else wait for the step until this time."""
        mine = self.compute.get(worker)
        closes = [self.expected(w) for w in missing]
        if mine is None or not closes or any(t is None for t in closes):
            return None
        close = max(closes)
        if now + mine <= close + self._slack(worker):
            return None  # its next gradient lands in this step
        return close + self._slack(worker)

    def _slack(self, worker: int) -> float:
        return self.patience * self.compute.get(worker, 0.0)
