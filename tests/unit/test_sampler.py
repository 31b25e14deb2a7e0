"""The resumable sampler: disjoint, covering, and exact after a restore."""
import itertools

import pytest

from disttrain.data.sampler import ResumableBatchSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_are_disjoint_and_cover_the_global_batch():
    single = _take(ResumableBatchSampler(64, 8, seed=3), 1)[0]
    ranks = [_take(ResumableBatchSampler(64, 4, rank=r, world_size=2, seed=3), 1)[0] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(single)


def test_restore_mid_epoch_and_across_epochs_continues_exactly():
    reference = _take(ResumableBatchSampler(40, 4, seed=1), 25)  # 10 batches/epoch: crosses 2 epochs
    for cut in (3, 10, 17):
        first = ResumableBatchSampler(40, 4, seed=1)
        first.advance(cut)
        resumed = ResumableBatchSampler(40, 4, seed=1)
        resumed.load_state_dict(first.state_dict())
        assert _take(resumed, 25 - cut) == reference[cut:]


def test_epochs_reshuffle():
    batches = _take(ResumableBatchSampler(40, 4, seed=1), 20)
    assert batches[:10] != batches[10:]


def test_too_small_dataset_names_batch_size():
    with pytest.raises(ValueError, match="data.batch_size"):
        ResumableBatchSampler(10, 8, rank=0, world_size=2)


def _steps(shape, steps, start_state=None, seed=5, n=100):
    """The sets of sample indices each optimizer step trains on, over all ranks of ``shape``
    = (data-parallel ranks, data.batch_size, micro-batches per step)."""
    world, batch, micro = shape
    samplers = [ResumableBatchSampler(n, batch, rank=r, world_size=world, seed=seed, micro_per_step=micro)
                for r in range(world)]
    if start_state is not None:
        for sampler in samplers:
            sampler.load_state_dict(start_state)
    streams = [_take(sampler, steps * micro) for sampler in samplers]
    return [sorted(i for stream in streams for b in stream[s * micro:(s + 1) * micro] for i in b)
            for s in range(steps)], samplers


#: the same global batch of 8 on 1, 2 and 4 ranks, with and without accumulation
SHAPES = [(1, 8, 1), (1, 4, 2), (2, 4, 1), (2, 2, 2), (4, 2, 1), (4, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_the_data_order_is_the_jobs_not_the_ranks(shape):
    """Step by step, over 3 epochs (12 steps of 8 out of 100 samples each), every shape trains
    on the samples of the single-rank run: the order is defined per global batch."""
    reference, _ = _steps(SHAPES[0], 36)
    steps, _ = _steps(shape, 36)
    assert steps == reference
    assert all(len(set(s)) == 8 for s in steps)  # no sample twice within a step


@pytest.mark.parametrize("before", [(2, 4, 1), (1, 8, 1)])
@pytest.mark.parametrize("after", [(1, 4, 2), (4, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("cut", [5, 12, 17])  # mid-epoch, at an epoch boundary, in the second epoch
def test_resuming_on_another_world_size_continues_the_same_samples(before, after, cut):
    reference, _ = _steps(SHAPES[0], 30)
    _, samplers = _steps(before, 0)
    for sampler in samplers:
        sampler.advance(cut * before[2])
    resumed, _ = _steps(after, 30 - cut, start_state=samplers[0].state_dict())
    assert resumed == reference[cut:]


def test_another_global_batch_continues_where_it_divides_and_is_refused_where_not():
    sampler = ResumableBatchSampler(100, 4, world_size=2)  # global batch 8
    sampler.advance(3)  # 24 samples into the epoch
    ResumableBatchSampler(100, 12).load_state_dict(sampler.state_dict())  # 24 = 2 x 12: continues
    with pytest.raises(ValueError, match="trainer.global_batch_size=8"):
        ResumableBatchSampler(100, 16).load_state_dict(sampler.state_dict())


def test_a_state_from_before_the_global_order_needs_the_same_world_size():
    old = {"epoch": 0, "consumed": 3, "seed": 0, "world_size": 2}
    ResumableBatchSampler(40, 4, world_size=2).load_state_dict(old)
    with pytest.raises(ValueError, match="same world size"):
        ResumableBatchSampler(40, 4, world_size=4).load_state_dict(old)


def test_another_seed_is_refused():
    state = ResumableBatchSampler(40, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="trainer.seed"):
        ResumableBatchSampler(40, 4, seed=2).load_state_dict(state)
