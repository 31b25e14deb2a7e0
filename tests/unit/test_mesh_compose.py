"""Composition on one DeviceMesh (fsdp x tp, pp x fsdp x tp): the degrees every rank derives
from dist.*, and every impossible product refused before any worker starts, in one line that
names the key and the fix."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.engine.preflight import validate
from disttrain.parallel.mesh import Layout, resolve_degrees, resolve_layout
from disttrain.strategies import composed

FSDP_TP = ["strategy=fsdp", "dist.tp=2"]
PP_SHARD = ["strategy=pipeline", "strategy.data_parallel=shard", "strategy.micro_batches=2"]
GPT = ["model=gpt_tiny", "model.dim=32", "model.heads=2", "data=text", "loss=cross_entropy"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _dist(**degrees):
    return OmegaConf.create({"dist": degrees})


def test_one_unset_degree_takes_what_the_others_leave():
    assert resolve_degrees(_dist(pp=2, tp=2), 8, "pp").dp == 2          # the split axis is set: dp derives
    assert resolve_degrees(_dist(tp=2), 8, "pp").pp == 4                # both unset: the split axis derives
    assert resolve_layout(_dist(tp=2), 4, "dp") == Layout(1, 2, 1, 2)
    assert resolve_layout(_dist(tp=2, dp_replicate=2), 8, "dp") == Layout(2, 2, 1, 2)
    assert resolve_layout(_dist(tp=2, dp_shard=2), 8, "pp") == Layout(1, 2, 2, 2)  # dp from the HSDP degrees
    assert resolve_layout(_dist(pp=2, tp=2, dp_replicate=2), 16, "pp") == Layout(2, 2, 2, 2)


def test_mesh_axes_are_outermost_first_and_skip_unit_axes():
    assert Layout(1, 2, 1, 2).axes("dp_shard") == {"dp_shard": 2, "tp": 2}
    assert Layout(2, 2, 2, 2).axes() == {"dp_replicate": 2, "dp_shard": 2, "pp": 2, "tp": 2}
    assert Layout(1, 1, 2, 2).axes("dp_shard", "pp") == {"dp_shard": 1, "pp": 2, "tp": 2}


@pytest.mark.parametrize("overrides,world", [
    (FSDP_TP, 4),
    ([*FSDP_TP, "dist.dp_replicate=2"], 8),
    ([*FSDP_TP, *GPT], 4),
    ([*PP_SHARD, "dist.pp=2", "dist.tp=2"], 8),
    ([*PP_SHARD, "dist.pp=2", "dist.dp_replicate=2", "dist.dp_shard=2"], 8),
    (["strategy=pipeline", "strategy.micro_batches=2", "dist.pp=2", "dist.tp=2"], 8),   # replicate x pp x tp
])
def test_possible_products_are_accepted(overrides, world):
    validate(_compose(*overrides), world_size=world)


@pytest.mark.parametrize("overrides,world,message", [
    # dp x pp x tp != world
    ([*FSDP_TP, "dist.dp=3"], 8, "world size 8 is not a multiple of dist.dp=3 x dist.tp=2"),
    ([*PP_SHARD, "dist.dp=3", "dist.pp=2", "dist.tp=2"], 8, "dist.dp=3 x dist.pp=2 x dist.tp=2 = 12 but the world size is 8"),
    # dp_replicate x dp_shard != dp
    ([*FSDP_TP, "dist.dp_replicate=2", "dist.dp_shard=3"], 8, "dist.dp_replicate=2 x dist.dp_shard=3 = 6 but the "
                                                              "data-parallel degree"),
    ([*FSDP_TP, "dist.dp_replicate=3"], 8, "dist.dp_replicate=3 does not divide the data-parallel degree 4"),
    ([*PP_SHARD, "dist.pp=2", "dist.tp=2", "dist.dp_shard=3"], 8, "dist.dp_shard=3 does not divide"),
    # tp must divide the widths and the heads, of the model or of each stage
    (["strategy=fsdp", "dist.tp=3", "model.hidden=32"], 6, "dist.tp=3 does not divide layer 0 (32 features)"),
    (["strategy=fsdp", "dist.tp=4", *GPT], 4, "dist.tp=4 does not divide model.heads=2"),
    ([*PP_SHARD, "dist.pp=2", "dist.tp=4", *GPT, "model.layers=2"], 8, "dist.tp=4 does not divide model.heads=2"),
    ([*PP_SHARD, "dist.pp=4", "dist.tp=2", "strategy.micro_batches=4"], 8, "pipeline stage 0 (layers 0, 1): "
                                                                          "tensor parallelism (dist.tp > 1) needs"),
    # pp > layers, stages without tp, pp under fsdp
    ([*PP_SHARD, "dist.pp=8", "dist.tp=2", "strategy.micro_batches=8"], 16, "8 stages but the model has only 7 layers"),
    (["strategy=pipeline", "dist.tp=2", "strategy.micro_batches=2"], 2, "dist.tp=2 leaves a single pipeline stage"),
    ([*FSDP_TP, "dist.pp=2"], 8, "dist.pp=2: strategy=fsdp shards over data parallelism"),
    # keys that mean nothing here
    (["strategy=pipeline", "strategy.data_parallel=zero"], 2, "strategy.data_parallel='zero' must be one of"),
    (["strategy=pipeline", "dist.dp_shard=2"], 4, "dist.dp_shard (HSDP) apply only to strategy=fsdp or "
                                                  "strategy=pipeline strategy.data_parallel=shard"),
    # features an axis cannot honour, refused naming the axis
    ([*FSDP_TP, "trainer.compile=true"], 4, "strategy=fsdp does not support trainer.compile=true: with dist.tp=2"),
    ([*PP_SHARD, "memory.activation_offload=cpu"], 2, "memory.activation_offload=cpu: with strategy.data_parallel=shard"),
])
def test_impossible_products_are_refused_before_any_worker_starts(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_compose(*overrides), world_size=world)


def test_a_composition_honours_what_every_axis_honours():
    both = composed.narrow(composed.TENSOR_PARALLEL, composed.SHARDED)
    assert both.activation_offload == ("none",) and both.compile is False and both.precision == ("32", "bf16", "fp16")
    assert both.why["activation_offload"] == composed.SHARDED.why["activation_offload"]  # the narrower one's reason
    assert both.why["compile"] == composed.TENSOR_PARALLEL.why["compile"]
    assert composed.because(composed.SHARDED, "x=1").why["activation_offload"].startswith("with x=1, ")
