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


def test_world_size_change_is_refused():
    state = ResumableBatchSampler(40, 4, world_size=2).state_dict()
    with pytest.raises(ValueError, match="same world size"):
        ResumableBatchSampler(40, 4, world_size=4).load_state_dict(state)
