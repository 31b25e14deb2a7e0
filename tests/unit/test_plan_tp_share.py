"""The share of a step tensor parallelism divides (disttrain.plan.tp_share) and its use in the
compute term: what lies outside the sharded regions every TP rank computes in full."""
import pytest
import torch
from torch import nn

from disttrain.plan import model as pm
from disttrain.plan.tp_share import _regions, sharded_time_share


def test_regions_run_from_the_first_column_layer_to_the_next_row_layer():
    # q, k, v (column) then proj (row) from 1.0 to 4.0; an MLP pair 5.0 .. 7.0; a column layer
    # no row layer closes (an LM head) counts up to its own end: 8.0 .. 8.5 — of 10 s
    events = [("col_start", 1.0), ("col_end", 1.5), ("col_start", 1.5), ("col_end", 2.0), ("col_start", 2.0),
              ("col_end", 2.5), ("row_end", 4.0), ("col_start", 5.0), ("col_end", 6.0), ("row_end", 7.0),
              ("col_start", 8.0), ("col_end", 8.5)]
    assert _regions(events, 0.0, 10.0) == pytest.approx((3.0 + 2.0 + 0.5) / 10.0)
    assert _regions([], 0.0, 1.0) == 0.0


class _Replicated(nn.Module):
    """A Linear pair (what TP shards) behind a slow replicated part."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        for _ in range(200):  # replicated work: elementwise, outside any planned layer
            x = torch.tanh(x) * 1.0001
        return self.b(torch.relu(self.a(x)))


def test_measured_share_tells_a_replicated_model_from_an_all_linear_one():
    torch.set_num_threads(1)
    x = torch.randn(8, 64)
    stack = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))  # planned: colwise, rowwise
    assert sharded_time_share(stack, x) > 0.8
    # its two Linear children pair up as column then row; the tanh loop before them is not sharded
    assert sharded_time_share(_Replicated(), x) < 0.5
    assert sharded_time_share(nn.Sequential(nn.ReLU()), x) == 1.0  # no plan: TP refuses it anyway


def test_tensor_parallel_compute_divides_only_the_sharded_share():
    facts = dict(params=1000, linear_params=1000, flops_per_sample=1e6, act_bytes_per_sample=1.0,
                 boundary_bytes_per_sample=1.0, blocks=1)
    machine = pm.Machine(nproc=2, device_memory=1e12, bandwidth=1e12, latency=0.0, peak_flops=1e9, efficiency=1.0)
    work = pm.Workload(batch=10)
    full = pm.tensor_parallel(pm.ModelFacts(**facts), machine, work).compute_s
    half = pm.tensor_parallel(pm.ModelFacts(**facts, tp_share=0.6), machine, work).compute_s
    assert full == pytest.approx(0.01 / 2)
    assert half == pytest.approx(0.01 * (0.4 + 0.6 / 2))  # 0.7 of one rank's whole step, not 0.5
    single = pm.single(pm.ModelFacts(**facts, tp_share=0.6), machine, work).compute_s
    assert single == pytest.approx(0.01)  # other strategies are untouched
