"""Stage splitting and the dp/pp/tp degrees, without processes."""
import pytest
from omegaconf import OmegaConf

from disttrain.models import build_gpt, build_mlp
from disttrain.parallel import split
from disttrain.parallel.mesh import resolve_degrees
from disttrain.parallel.timing import theory_bubble


def test_partition_minimises_the_heaviest_stage():
    assert split.partition([1, 1, 1, 1], 2) == [2, 2]
    assert split.partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert split.partition([1, 2, 3], 3) == [1, 1, 1]
    with pytest.raises(ValueError):
        split.partition([1, 2], 3)


def test_stages_keep_original_names_and_cover_the_model():
    model = build_gpt(vocab_size=32, block_size=8, dim=16, heads=2, layers=2)
    blocks = split.blocks_of(model)
    counts = split.stage_counts(blocks, 2, "params")
    assert sum(counts) == 4
    parts = [split.stage_module(blocks, counts, s) for s in range(2)]
    keys = [k for part in parts for k in part.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())


def test_explicit_balance_and_parameter_free_ranks_are_rejected():
    blocks = split.blocks_of(build_mlp(depth=3))  # 7 layers: L R L R L R L
    with pytest.raises(ValueError, match="strategy.balance"):
        split.stage_counts(blocks, 2, [3, 3])
    with pytest.raises(ValueError, match="parameter-free"):
        split.check_ranks_hold_parameters(blocks, [1, 1, 1, 1, 1, 1, 1], 7)


def test_degrees_derive_the_split_axis_and_check_the_product():
    cfg = OmegaConf.create({"dist": {"dp": 2, "pp": None, "tp": None}})
    degrees = resolve_degrees(cfg, 4, "pp")
    assert (degrees.dp, degrees.pp, degrees.tp) == (2, 2, 1)
    with pytest.raises(ValueError, match="dist.dp=2"):
        resolve_degrees(OmegaConf.create({"dist": {"dp": 2, "pp": 3, "tp": None}}), 4, "pp")
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_degrees(OmegaConf.create({"dist": {"dp": 3, "pp": None, "tp": None}}), 4, "pp")


def test_theory_bubble():
    assert theory_bubble(2, 1) == 0.5
    assert theory_bubble(4, 4, chunks_per_rank=2) == pytest.approx(3 / 11)
