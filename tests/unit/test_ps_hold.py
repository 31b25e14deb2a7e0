"""The deterministic straggler: a held push is released exactly when no other worker can
move (blocked by the staleness gate, or parked at the loop's next sync point)."""
from types import SimpleNamespace

from disttrain.ps.hold import StragglerHold, SyncPoints


def test_sync_points_are_the_cadences_multiples_and_the_last_step():
    sync = SyncPoints.of([10, 0, 25], last=100)
    assert [sync.next_at_or_after(s) for s in (1, 10, 11, 21, 26, 95)] == [10, 10, 20, 25, 30, 100]
    assert SyncPoints.of([30, 50], last=30).next_at_or_after(5) == 30  # 50 lies past the end


def _hold(offset=0):
    hold = StragglerHold(frozenset({0}), SyncPoints.of([10], last=30), fallback_s=1e9)
    hold.step_offset = offset
    hold.hold(0, SimpleNamespace(clock=4), "grad")
    return hold


def test_released_only_when_every_other_worker_is_blocked_or_parked():
    live, pushes = {0, 1, 2}, [4, 6, 10]
    assert not _hold().ready(live, {1: 3}, [], pushes)          # worker 1 still computing
    assert not _hold().ready(live, {}, [], pushes)              # worker 1 idle before the sync point
    assert _hold().ready(live, {}, [1], pushes)                 # 1 refused by the gate, 2 parked at step 10
    assert _hold().ready(live, {}, [1, 2], pushes)              # both refused by the gate
    assert not _hold(offset=10).ready(live, {}, [1], [4, 6, 9])  # resumed at 10: 2 is at 19, short of 20
    assert not StragglerHold(frozenset({0}), None).wants(0, synchronous=False)  # no sync points: no hold
    assert not _hold().wants(0, synchronous=True) and _hold().wants(0, synchronous=False)


def test_the_others_start_only_after_the_held_worker_computes():
    hold = StragglerHold(frozenset({0}), SyncPoints.of([10], last=30))
    assert hold.admits(0) and not hold.admits(1)
    hold.granted(1)
    assert not hold.admits(2)
    hold.granted(0)
    assert hold.admits(1) and hold.admits(2)
    assert StragglerHold(frozenset(), None).admits(1)  # no hold configured: nothing waits
