"""Config composition of every group, and validation errors that name the key and the fix."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.engine.preflight import validate

CONF = Path(config_dir())


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group", ["strategy", "model", "data", "optim", "loss", "scheduler"])
def test_every_option_of_every_group_composes_and_validates(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = _compose(f"{group}={option}")
        assert cfg[group]._target_
        if group != "strategy":  # strategies validate their own world-size needs
            validate(cfg, world_size=1)


def test_experiment_gpt_text_pairs_model_data_loss():
    cfg = _compose("experiment=gpt_text")
    assert cfg.model._target_.endswith("build_gpt") and cfg.data._target_.endswith("char_corpus")
    assert cfg.loss._target_.endswith("SequenceCrossEntropy") and cfg.data.block_size == cfg.model.block_size


@pytest.mark.parametrize("override,key", [
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("dist.backend=mpi", "dist.backend"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("model._target_=nope.missing.fn", "model._target_"),
    ("optim._target_=torch.optim.NoSuchOptimizer", "optim._target_"),
    ("checkpoint.resume=/does/not/exist", "checkpoint.resume"),
    ("trainer.progress=fancy", "trainer.progress"),
    ("dist.dp_shard=2", "dist.dp_shard"),  # HSDP degrees under the default strategy=ddp
])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose(override), world_size=1)


@pytest.mark.parametrize("overrides,key", [
    (["dist.dp_replicate=3"], "dist.dp_replicate"),
    (["dist.dp_replicate=2", "dist.dp_shard=4"], "dist.dp_shard"),
    (["strategy.reshard_after_forward=3"], "strategy.reshard_after_forward"),
    (["strategy.cpu_offload=yes"], "strategy.cpu_offload"),
])
def test_bad_fsdp_degrees_are_refused_before_any_worker_starts(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose("strategy=fsdp", *overrides), world_size=4)
