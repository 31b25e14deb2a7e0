"""The deterministic straggler: a held push is released exactly when no other worker can
move (each waits on a pull the staleness gate refuses)."""
from types import SimpleNamespace

from disttrain.ps.hold import StragglerHold


def _hold():
    hold = StragglerHold(frozenset({0}), fallback_s=1e9)
    hold.hold(0, SimpleNamespace(clock=4), "grad")
    return hold


def test_released_only_when_every_other_worker_waits_on_a_refused_pull():
    live = {0, 1, 2}
    assert not _hold().ready(live, {1: 3}, [2])     # worker 1 still computing
    assert not _hold().ready(live, {}, [1])         # worker 2 between its push and its next pull
    assert _hold().ready(live, {}, [1, 2])          # both refused by the gate
    assert _hold().ready({0, 1}, {}, [1])           # worker 2 is gone: only 1 counts
    assert not StragglerHold(frozenset({0})).ready(live, {}, [1, 2])  # nothing held
    assert not _hold().wants(0, synchronous=True) and _hold().wants(0, synchronous=False)
    assert not _hold().wants(1, synchronous=False)


def test_the_others_start_only_after_the_held_worker_computes():
    hold = StragglerHold(frozenset({0}))
    assert hold.admits(0) and not hold.admits(1)
    hold.granted(1)
    assert not hold.admits(2)
    hold.granted(0)
    assert hold.admits(1) and hold.admits(2)
    assert StragglerHold(frozenset()).admits(1)  # no hold configured: nothing waits


def test_held_pushes_are_dropped_when_the_run_ends():
    hold = _hold()
    hold.drop()
    assert not hold.held and not hold.ready({0, 1}, {}, [1])
