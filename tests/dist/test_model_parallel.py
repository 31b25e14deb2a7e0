"""Model parallelism equals the unsplit model: tensor parallel (Megatron-style through
torch.distributed.tensor.parallel) on gpt_tiny and mlp, and the naive layer split;
outputs, gradients and the weights after a few SGD steps."""
from __future__ import annotations

import pytest
import torch

from _pipeline_checks import CLI_COMMON, single_reference
from helpers import run_disttrain, spawn

from disttrain.checkpoint.commit import load_model_state

TOL = 1e-6


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _tp_gpt(rank, world_size):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.models.losses import SequenceCrossEntropy
    from disttrain.models import build_gpt
    from disttrain.strategies.model_parallel import TensorParallel

    import _pipeline_checks as chk

    dist_setup.init(env.detect(), "gloo", 60)

    from disttrain.parallel.materialize import ModelFactory

    factory = ModelFactory(build=lambda: build_gpt(vocab_size=64, block_size=16, dim=32, heads=4, layers=2), seed=0)
    strategy = TensorParallel()
    strategy.setup(chk.context(factory, {}))
    engine = chk.engine_for(strategy)
    ref = factory.full()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)
    out = {"out_diff": (strategy.model(x) - ref(x)).abs().max().item(),
           "sharded": sorted(n for n, p in strategy.model.named_parameters() if hasattr(p, "placements"))}
    loss_fn = SequenceCrossEntropy()
    for step in range(3):
        stats = engine.train_step([(x, y)], loss_fn)
        ref_opt.zero_grad()
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        if step == 0:
            grads = dict(ref.named_parameters())
            out["grad_diff"] = max((_full(p.grad) - grads[n].grad).abs().max().item()
                                   for n, p in strategy.model.named_parameters())
            out["loss_diff"] = None if stats.loss is None else abs(stats.loss.item() - ref_loss.item())
        ref_opt.step()
    ref_params = dict(ref.named_parameters())
    out["weight_diff"] = max((_full(p.detach()) - ref_params[n].detach()).abs().max().item()
                             for n, p in strategy.model.named_parameters())
    out["local_shape"] = tuple(strategy.model.get_submodule("1.attn.q").weight.to_local().shape)
    dist_setup.teardown()
    return out


def test_tensor_parallel_gpt_outputs_gradients_and_weights_equal_unsplit():
    results = spawn(_tp_gpt, 2, timeout=240)
    for r in results:
        assert r["out_diff"] < TOL and r["grad_diff"] < TOL and r["weight_diff"] < TOL, r
        assert r["local_shape"] == (16, 32)  # q's output features (heads) split in two
        assert "1.attn.q.weight" in r["sharded"] and "1.out.weight" in r["sharded"]
    assert results[0]["loss_diff"] < TOL and results[1]["loss_diff"] is None  # reported once


# ------------------------------------------------------------------ the real CLI
COMMON = [*CLI_COMMON, "data.batch_size=32", "dist.nproc_per_node=2"]


@pytest.fixture(scope="module")
def single_ref(tmp_path_factory):
    return single_reference(tmp_path_factory)


def _assert_same(state, ref):
    assert sorted(state) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=TOL, msg=key)


@pytest.mark.parametrize("mode", ["layer", "tensor"])
def test_cli_model_parallel_weights_equal_single(single_ref, tmp_path, mode):
    run_disttrain(["strategy=model_parallel", f"strategy.mode={mode}", *COMMON], tmp_path, timeout=240)
    _assert_same(load_model_state(tmp_path), single_ref)


@pytest.mark.parametrize("overrides,world,key", [
    (["strategy.mode=tensor", "model.hidden=130"], 4, "dist.tp=4"),
    (["strategy.mode=tensor", "dist.pp=2"], 4, "dist.pp=2"),
    (["strategy.mode=diagonal"], 2, "strategy.mode"),
    (["dist.pp=8"], 8, "only 7 layers"),
    (["dist.dp=3"], 4, "dist.dp=3"),
])
def test_bad_settings_are_rejected_before_training(overrides, world, key):
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=model_parallel", *overrides])
    with pytest.raises(ConfigError, match=key):
        validate(cfg, world_size=world)
