"""The spawn helper itself: real gloo processes that all-reduce."""
from helpers import spawn


def _allreduce(rank, world_size):
    import torch
    import torch.distributed as dist

    from disttrain import dist as dist_setup, env

    dist_setup.init(env.detect(), "gloo", 30)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    dist_setup.teardown()
    return value.item()


def test_allreduce_on_three_ranks():
    assert spawn(_allreduce, 3) == [6.0, 6.0, 6.0]
