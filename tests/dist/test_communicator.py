"""disttrain's own collectives go through one communicator: each figure lands on the device its
group's backend carries, and every rank gets the same, correct numbers."""
from __future__ import annotations

import torch

from disttrain.testing import spawn


def _collectives(rank: int, world_size: int):
    from disttrain.distributed import comm, env, process_group

    process_group.init(env.detect(), "gloo", 60)
    c = comm.get()
    pair = torch.distributed.new_group([0, 1])
    running = torch.tensor([float(rank + 1)], dtype=torch.float64)
    out = {
        "installed": c is comm.get() and c.device == torch.device("cpu"),
        "device": str(c.device_for()),
        "sum": c.sum([rank, 1.0]),
        "max": c.max([rank, -rank]),
        "gather": c.gather([rank, rank * 10]),
        "pair_gather": c.gather([rank], pair) if rank < 2 else None,
        "sum_": c.sum_(running).tolist(),
        "object": c.broadcast_object({"rank": rank}, src=0),
        "host_max": c.host_max([0.0 if rank else 7.0]),
    }
    process_group.teardown()
    out["after"] = comm.get().sum([5.0])  # no group: a single-process communicator
    return out


def test_communicator_figures_are_global_and_on_the_right_device():
    results = spawn(_collectives, 3)
    for rank, r in enumerate(results):
        assert r["installed"] and r["device"] == "cpu"
        assert r["sum"] == [0 + 1 + 2, 3.0]
        assert r["max"] == [2.0, 0.0]
        assert r["gather"] == [[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]]
        assert r["pair_gather"] == ([[0.0], [1.0]] if rank < 2 else None)
        assert r["sum_"] == [6.0]
        assert r["object"] == {"rank": 0}
        assert r["host_max"] == [7.0]
        assert r["after"] == [5.0]
