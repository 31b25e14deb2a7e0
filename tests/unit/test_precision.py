"""trainer.precision: fp16 loss scaling skips overflowing steps; bf16 trains the reference
task to the fp32 loss; the scaler state survives a checkpoint; bad values are rejected."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from disttrain.engine import builders
from disttrain.distributed import env
from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.engine.preflight import validate
from disttrain.strategies.precision import Precision, deepspeed_config
from disttrain.engine.build import build_engine

#: bf16 keeps 8 bits of mantissa: after 150 SGD steps on the reference regression task its
#: mean loss over the last 10 steps must land within 5% (relative) of fp32's
#: (measured on this CPU: 1.4%; fp16 with the scaler: 0.1%).
BF16_TOLERANCE = 0.05


def _compose(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _strategy(cfg):
    """The run's engine (strategy=single) in this process: the step under test."""
    return build_engine(cfg, env.detect({}), torch.device("cpu"), Path("."))[1]


def _batches(cfg, steps):
    loader, sampler = builders.build_loader(cfg, builders.build_dataset(cfg), (0, 1))
    it = iter(loader)
    for _ in range(steps):
        yield next(it)
        sampler.advance(1)


def _train(precision: str, steps: int = 150):
    cfg = _compose(f"trainer.precision={precision}", "strategy=single", "optim.lr=0.05")
    strategy, loss_fn = _strategy(cfg), builders.build_loss(cfg)
    losses = [strategy.train_step([batch], loss_fn).loss.item() for batch in _batches(cfg, steps)]
    return losses[0], sum(losses[-10:]) / 10, strategy


def test_bf16_reaches_the_fp32_loss_on_the_reference_task():
    start, fp32, _ = _train("32")
    _, bf16, strategy = _train("bf16")
    with strategy.precision.autocast():  # the forward really runs in bf16
        assert strategy.model(torch.randn(2, 32)).dtype == torch.bfloat16
    assert fp32 < 0.2 * start  # it learned something
    assert bf16 != fp32
    assert abs(bf16 - fp32) / fp32 < BF16_TOLERANCE, (bf16, fp32)


def _overflow_run(precision: str):
    """Three steps; the second gets inputs that overflow float16 (|x| ~ 1e6 > 65504)."""
    cfg = _compose(f"trainer.precision={precision}", "strategy=single")
    strategy, loss_fn = _strategy(cfg), builders.build_loss(cfg)
    batches = list(_batches(cfg, 3))
    batches[1] = (batches[1][0] * 1e6, batches[1][1])
    history = []
    for batch in batches:
        before = [p.detach().clone() for p in strategy.model.parameters()]
        stats = strategy.train_step([batch], loss_fn)
        changed = any(not torch.equal(a, p) for a, p in zip(before, strategy.model.parameters()))
        history.append((stats, changed, strategy.scheduler.last_epoch))
    return strategy, history


def test_fp16_skips_the_overflowing_step_and_lowers_the_scale():
    strategy, history = _overflow_run("fp16")
    (first, moved1, sched1), (second, moved2, sched2), (third, moved3, sched3) = history
    assert moved1 and first.extra == {"loss_scale": 2.0**16, "skipped_step": 0.0}
    assert not moved2 and second.extra["skipped_step"] == 1.0  # weights untouched
    assert second.extra["loss_scale"] == 2.0**15  # backed off by half
    assert sched2 == sched1  # the schedule did not advance on the skipped step
    assert moved3 and third.extra["skipped_step"] == 0.0 and sched3 == sched1 + 1
    assert strategy.precision.skipped == 1
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


def test_without_loss_scaling_the_same_overflow_destroys_the_weights():
    strategy, _ = _overflow_run("32")
    assert not all(torch.isfinite(p).all() for p in strategy.model.parameters())


def test_scaler_state_rides_in_the_engine_state_dict():
    strategy, _ = _overflow_run("fp16")
    state = strategy.state_dict()
    assert float(state["precision"]["scale"]) == 2.0**15 and int(state["precision"]["skipped"]) == 1
    fresh = _strategy(_compose("trainer.precision=fp16", "strategy=single"))
    fresh.load_state_dict(state)
    assert fresh.precision.scaler.get_scale() == 2.0**15 and fresh.precision.skipped == 1
    assert "precision" not in _strategy(_compose("strategy=single")).state_dict()  # fp32: nothing extra


def test_growth_after_clean_steps_and_fp32_is_a_no_op():
    p = Precision("fp16", "cpu", init_scale=8.0, growth_interval=2)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        with p.autocast():
            loss = model(torch.ones(1, 3)).float().sum()
        p.scale(loss).backward()
        p.step(opt)
    assert p.scaler.get_scale() == 16.0
    plain = Precision(32)
    assert plain.scale(torch.tensor(2.0)) == 2.0 and plain.state_dict() == {}


@pytest.mark.parametrize("value,ok", [(32, True), ("bf16", True), ("fp16", True), ("fp8", False), ("64", False)])
def test_validation_names_the_key(value, ok):
    cfg = _compose("strategy=single")
    OmegaConf.update(cfg, "trainer.precision", value)
    if ok:
        validate(cfg, world_size=1)
    else:
        with pytest.raises(ConfigError, match=r"trainer.precision=.*use 32, bf16 or fp16"):
            validate(cfg, world_size=1)


def test_deepspeed_sections_follow_the_same_key():
    assert deepspeed_config(_compose("trainer.precision=bf16")) ["bf16"] == {"enabled": True}
    fp16 = deepspeed_config(_compose("trainer.precision=fp16"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]
    plain = deepspeed_config(_compose())
    assert not plain["fp16"]["enabled"] and not plain["bf16"]["enabled"]
