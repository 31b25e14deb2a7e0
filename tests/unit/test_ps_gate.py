"""The staleness gate as pure logic: a simulated server with workers of different speeds
must never apply a gradient older than the bound, and must not block needlessly."""
import random

import pytest

from disttrain.ps.gate import StalenessGate


def simulate(bound, speeds, pushes_each=40, seed=0):
    """Event-driven toy server: a worker computes for ``speed`` ticks after its pull is
    granted, then pushes (applied at once; the server version goes up by one) and asks
    again. Returns the staleness of every applied gradient and the pushes per worker."""
    rng = random.Random(seed)
    gate, version, now = StalenessGate(bound), 0, 0
    waiting, busy = list(range(len(speeds))), {}  # busy: worker -> (finish time, pulled version)
    stale, done = [], [0] * len(speeds)
    while any(d < pushes_each for d in done):
        for worker in list(waiting):
            if done[worker] < pushes_each and gate.may_grant(worker, version):
                gate.granted(worker, version)
                busy[worker] = (now + speeds[worker] + rng.random(), version)
                waiting.remove(worker)
        worker, (now, pulled) = min(busy.items(), key=lambda item: item[1][0])
        del busy[worker]
        gate.pushed(worker)
        stale.append(version - pulled)
        version += 1
        done[worker] += 1
        waiting.append(worker)
    return stale, done


@pytest.mark.parametrize("bound", [1, 2, 4, 8])
@pytest.mark.parametrize("speeds", [[1, 1], [1, 5], [1, 1, 6], [2, 1, 1, 9]])
def test_no_applied_gradient_is_older_than_the_bound(bound, speeds):
    stale, done = simulate(bound, speeds)
    assert max(stale) <= bound
    assert done == [40] * len(speeds)


def test_the_bound_is_reached_so_fast_workers_really_run_ahead():
    stale, _ = simulate(4, [1, 6])
    assert max(stale) == 4


def test_unbounded_staleness_grows_with_a_straggler():
    stale, _ = simulate(None, [1, 10])
    assert max(stale) > 5  # the fast worker pushed many times during one slow step


def test_synchronous_mode_waits_for_the_round():
    gate = StalenessGate(0)
    assert gate.may_grant(0, 0) and gate.may_grant(1, 0)
    gate.granted(0, 0)
    gate.pushed(0)
    assert not gate.may_grant(0, 0)  # its gradient waits for the round: no second one yet
    gate.pushed(1)
    gate.round_applied()
    assert gate.may_grant(0, 1)


def test_a_departed_worker_no_longer_holds_others_back():
    gate = StalenessGate(1)
    gate.granted(0, 0)
    gate.granted(1, 0)
    assert not gate.may_grant(2, 0)
    gate.forget(0)
    assert gate.may_grant(2, 0)
