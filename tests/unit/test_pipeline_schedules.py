"""The schedule table without processes: placement, preconditions, and the simulated
bubble the zero-bubble schedules' theory column comes from (checked on orders whose
bubble has a closed form)."""
from __future__ import annotations

import pytest
from torch.distributed.pipelining.schedules import B, F, I, W, _Action

from disttrain.parallel.timing import theory_bubble
from disttrain.strategies import pipeline_schedules as ps


def test_v_placement_puts_first_and_last_stage_on_rank_zero():
    assert [ps.stage_ids("zbv", r, 4, 2) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [ps.stage_ids("interleaved_zb", r, 4, 2) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for name in ("zbv", "interleaved_zb", "gpipe"):
        v = 1 if name == "gpipe" else 2
        assert all(ps.rank_of_stage(name, s, 4) == r for r in range(4) for s in ps.stage_ids(name, r, 4, v))


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 8)])
def test_simulated_gpipe_order_has_the_closed_form_bubble(p, m):
    order = {r: [_Action(r, F, i) for i in range(m)] + [_Action(r, B, i) for i in range(m)] for r in range(p)}
    assert ps.simulated_bubble(order, p) == pytest.approx(theory_bubble(p, m))


def test_simulated_split_backward_fills_the_cooldown_with_weight_passes():
    # p=2, m=2, one stage per rank: F F | I I then W W. Rank 1's W's fill nothing (it ends
    # first), rank 0's I's wait for rank 1's; deferring W shortens rank 0's wait by one unit.
    full = {0: [_Action(0, F, 0), _Action(0, F, 1), _Action(0, B, 0), _Action(0, B, 1)],
            1: [_Action(1, F, 0), _Action(1, F, 1), _Action(1, B, 0), _Action(1, B, 1)]}
    split = {0: [_Action(0, F, 0), _Action(0, F, 1), _Action(0, I, 0), _Action(0, I, 1), _Action(0, W, 0),
                 _Action(0, W, 1)],
             1: [_Action(1, F, 0), _Action(1, F, 1), _Action(1, I, 0), _Action(1, I, 1), _Action(1, W, 0),
                 _Action(1, W, 1)]}
    assert ps.simulated_bubble(full, 2) == pytest.approx(1 / 3)   # span 9, busy 6 per rank
    assert ps.simulated_bubble(split, 2) == pytest.approx(2 / 8)  # span 8: W no longer on the critical path


def test_an_order_that_waits_forever_is_reported():
    with pytest.raises(ValueError, match="deadlocks"):
        ps.simulated_bubble({0: [_Action(0, B, 0), _Action(0, F, 0)], 1: [_Action(1, F, 0), _Action(1, B, 0)]}, 2)


@pytest.mark.parametrize("args,key", [
    ((4, "zbv", 1, 2), "stages_per_rank=2"), ((4, "interleaved_zb", 1, 2), "stages_per_rank>=2"),
    ((9, "interleaved_zb", 2, 4), "micro_batches=9"), ((3, "dualpipev", 2, 2), "micro_batches=3 < 4"),
    ((4, "1f1b", 2, 2), "needs strategy.schedule=interleaved_1f1b, interleaved_zb or zbv"),
])
def test_preconditions_name_the_key(args, key):
    if args[1] not in ps.SCHEDULES:
        pytest.skip("not in this torch")
    with pytest.raises(ValueError, match=key):
        ps.check_schedule(*args, "strategy.")
    ps.check_schedule(8, args[1], 2 if ps.SCHEDULES[args[1]].multi else 1, 2, "strategy.")  # a good one passes
