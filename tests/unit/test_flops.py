"""Model FLOPs: torch's counter on the reference models equals their analytic formulas;
MFU is the achieved FLOP/s over the ranks' peaks."""
import pytest
import torch

from disttrain.models.losses import SequenceCrossEntropy
from disttrain.models import build_gpt, build_mlp
from disttrain.observe.flops import count_train_flops, gpt_train_flops, mlp_train_flops
from disttrain.observe.observer import RANK_FIELDS, _global_fields
from disttrain.observe.peak import measure_peak


@pytest.mark.parametrize("batch,in_dim,hidden,depth,out_dim", [(32, 32, 128, 3, 1), (7, 5, 64, 1, 3)])
def test_mlp_count_equals_formula(batch, in_dim, hidden, depth, out_dim):
    build = lambda: build_mlp(in_dim=in_dim, hidden=hidden, depth=depth, out_dim=out_dim)
    counted = count_train_flops(build, (torch.randn(batch, in_dim), torch.randn(batch, out_dim)), torch.nn.MSELoss())
    assert counted == mlp_train_flops(batch, in_dim, hidden, depth, out_dim)


@pytest.mark.parametrize("kw", [dict(vocab_size=256, block_size=64, dim=64, heads=4, layers=2),
                                dict(vocab_size=50, block_size=16, dim=32, heads=2, layers=3)])
def test_gpt_count_equals_formula(kw):
    batch, seq = 3, kw["block_size"]
    tokens = torch.randint(0, kw["vocab_size"], (batch, seq))
    counted = count_train_flops(lambda: build_gpt(**kw), (tokens, tokens), SequenceCrossEntropy())
    assert counted == gpt_train_flops(batch, seq, **kw)


def test_count_leaves_the_runs_rng_alone():
    """The builder reseeds (every rank builds identical weights); counting must not."""
    batch = (torch.randn(4, 32), torch.randn(4, 1))
    state = torch.get_rng_state()
    count_train_flops(lambda: (torch.manual_seed(0), build_mlp())[1], batch, torch.nn.MSELoss())
    assert torch.equal(state, torch.get_rng_state())


def test_mfu_is_achieved_over_peak():
    rows = []
    for rank, step in enumerate((0.10, 0.12)):
        row = dict.fromkeys(RANK_FIELDS, 0.0)
        row.update(time_step_s=step, flops_per_step=2e9, peak_flops=5e10, samples_per_s=100.0)
        rows.append(row)
    out = _global_fields(rows)
    assert out["flops_per_step"] == pytest.approx(4e9)
    assert out["flops_per_s"] == pytest.approx(4e9 / 0.11)
    assert out["mfu"] == pytest.approx(4e9 / 0.11 / 1e11)
    assert 0 < out["mfu"] < 1


def test_peak_probe_is_positive_and_plausible():
    peak = measure_peak(torch.device("cpu"), seconds=0.05)
    assert 1e8 < peak < 1e14
