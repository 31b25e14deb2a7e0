"""Validation on real gloo ranks: each rank evaluates its shard, the all-reduced mean equals
one process evaluating everything; a diverging worker's reason reaches the sweep."""
from __future__ import annotations

import pytest
import torch

from helpers import spawn


def _data_and_model():
    from torch.utils.data import TensorDataset

    from disttrain.models import build_mlp

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(37, 4, generator=gen), torch.randn(37, 1, generator=gen))  # 37: uneven shards
    torch.manual_seed(0)
    return data, build_mlp(in_dim=4, hidden=8, depth=2, out_dim=1)


class _Replica:
    """What evaluate() asks of a strategy: a local model and this rank's shard."""

    def __init__(self, model, shard):
        self.model, self.shard = model, shard

    def prepare_eval(self):
        pass

    def eval_shard(self):
        return self.shard

    def eval_outputs(self, inputs, precision):
        return self.model(inputs)


def _eval_on_rank(rank, world_size):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.engine import evaluate
    from disttrain.strategies.precision import Precision

    dist_setup.init(env.detect(), "gloo", 60)
    try:
        data, model = _data_and_model()
        return evaluate.evaluate(_Replica(model, (rank, world_size)), data, torch.nn.MSELoss(), 5, Precision(32),
                                 torch.device("cpu"))
    finally:
        dist_setup.teardown()


@pytest.mark.world_size(2)
def test_sharded_validation_equals_one_process():
    from disttrain.engine import evaluate
    from disttrain.strategies.precision import Precision

    data, model = _data_and_model()
    reference = evaluate.evaluate(_Replica(model, (0, 1)), data, torch.nn.MSELoss(), 37, Precision(32),
                                  torch.device("cpu"))
    with torch.no_grad():
        assert reference == pytest.approx(torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item())
    values = spawn(_eval_on_rank, 2)
    assert values[0] == values[1] == pytest.approx(reference, rel=1e-6)  # fp32 sums in other orders


def _diverge():
    from disttrain.engine.evaluate import check_finite

    check_finite(7, "training loss", float("nan"))


def test_worker_failure_reason_reaches_the_sweep():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from disttrain.distributed.process_group import free_port
    from disttrain.sweep.job import failure_reason

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, run_id="t", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{free_port()}", start_method="spawn", monitor_interval=0.1,
                          max_restarts=0)
    with pytest.raises(ChildFailedError) as info:
        elastic_launch(config, _diverge)()
    reason = failure_reason(info.value)
    assert reason.startswith("rank 0: NonFiniteLossError: training loss became nan at step 7"), reason
