"""FSDP2 materializes each rank's shards with the unsplit model's initial values, for a model
whose modules re-initialise themselves (seeded per module) and for one with a module that
cannot (``reset_parameters`` missing: values copied from one real, seeded build)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from helpers import spawn


class Scale(nn.Module):
    """A learned per-feature scale with no ``reset_parameters``: forces the seeded copy."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.weight


def build(custom: bool) -> nn.Module:
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers, Scale(3)) if custom else nn.Sequential(*layers)


def _shards_vs_unsplit(rank, world_size, custom):
    from omegaconf import OmegaConf

    from disttrain.distributed import env, process_group
    from disttrain.parallel.materialize import ModelFactory
    from disttrain.strategies.base import SetupContext
    from disttrain.strategies.fsdp import FSDP

    world = env.detect()
    device = process_group.init(world, "gloo", 60)
    factory = ModelFactory(build=functools.partial(build, custom), seed=3)
    strategy = FSDP()
    strategy.setup(SetupContext(world=world, device=device, model=factory, cfg=OmegaConf.create({}), run_dir=None))
    reference = factory.full()
    local = {n: p.to_local().numel() for n, p in strategy.model.named_parameters()}
    diff = max((p.full_tensor() - reference.get_parameter(n)).abs().max().item()
               for n, p in strategy.model.named_parameters())
    process_group.teardown()
    return {"diff": diff, "local": local, "total": {n: p.numel() for n, p in reference.named_parameters()}}


def test_shards_hold_the_unsplit_initial_values():
    from disttrain.parallel.materialize import seeded_by_module

    for custom in (False, True):
        assert seeded_by_module(build(custom)) is not custom  # both init paths are exercised
        out = spawn(_shards_vs_unsplit, 2, custom, timeout=120)
        for rank in range(2):
            assert out[rank]["diff"] == 0.0, (custom, rank, out[rank]["diff"])
        total = out[0]["total"]
        assert {n: out[0]["local"][n] + out[1]["local"][n] for n in total} == total  # disjoint shards
        assert out[0]["local"]["0.weight"] == total["0.weight"] // 2


def test_reshard_after_forward_is_a_bool_or_a_divisor_of_the_shard_group():
    import pytest
    from omegaconf import OmegaConf

    from disttrain.strategies.fsdp import FSDP

    def cfg(value, **dist):
        return OmegaConf.create({"strategy": {"reshard_after_forward": value}, "dist": dist})

    FSDP.validate(cfg(False), 2)
    FSDP.validate(cfg(2), 4)
    FSDP.validate(cfg(2, dp_replicate=2, dp_shard=4), 8)
    for value, world in ((3, 4), (1, 4), (4, 2), ("2", 4)):
        with pytest.raises(ValueError, match=r"strategy.reshard_after_forward=.* must be true, false or an integer"):
            FSDP.validate(cfg(value), world)
    with pytest.raises(ValueError, match=r"dist.dp_shard=2"):  # the shard group, not the world
        FSDP.validate(cfg(4, dp_replicate=2), 4)


def test_hsdp_degrees_must_multiply_to_the_data_parallel_degree():
    import pytest
    from omegaconf import OmegaConf

    from disttrain.strategies.fsdp import FSDP

    def degrees(world, **dist):
        return FSDP.degrees(OmegaConf.create({"dist": dist}), world)

    assert degrees(4) == (1, 4)
    assert degrees(4, dp_replicate=2) == degrees(4, dp_shard=2) == (2, 2)
    assert degrees(8, dp=8, dp_replicate=2, dp_shard=4) == (2, 4)
    for dist, match in (({"dp_replicate": 3}, "dist.dp_replicate=3 does not divide"),
                        ({"dp_replicate": 2, "dp_shard": 4}, "dist.dp_replicate=2 x dist.dp_shard=4 = 8"),
                        ({"dp_shard": 0}, "dist.dp_shard=0 must be an integer"),
                        ({"pp": 2}, "strategy=fsdp shards over data parallelism")):  # dist.tp: fsdp x tp
        with pytest.raises(ValueError, match=match):
            degrees(4, **dist)
