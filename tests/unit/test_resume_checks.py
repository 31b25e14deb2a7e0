"""Resume anywhere, the parts that need no process group: what a checkpoint records about its
writer and what a resume refuses (another model, DeepSpeed's format, code in a file), the
weights-only extras, and ``trainer.global_batch_size``'s derived accumulation."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from disttrain.checkpoint import extras, origin
from disttrain.checkpoint.commit import Checkpointer, CheckpointError
from disttrain.checkpoint.manifest import read_manifest
from disttrain.config.errors import ConfigError
from disttrain.engine import global_batch


def _cfg(**over):
    base = {"strategy": {"_target_": "disttrain.strategies.ddp.DDP"}, "trainer": {"precision": 32, "grad_accum_steps": 1},
            "model": {"_target_": "disttrain.models.mlp.mlp", "hidden": 32, "depth": 3},
            "data": {"batch_size": 4}, "dist": {}}
    return OmegaConf.merge(base, over)


class _Strategy:
    def __init__(self, dp):
        self.dp = dp

    def data_shard(self):
        return 0, self.dp


def test_the_manifest_records_the_writer_and_a_same_model_resume_passes(tmp_path):
    writer = origin.describe(_cfg(), _Strategy(2), 2)
    checkpointer = Checkpointer(tmp_path, writer=writer)
    path = checkpointer.save(3, {"w": torch.ones(2)}, {"step": 3})
    recorded = read_manifest(path)["writer"]
    assert recorded["strategy"] == "ddp" and recorded["world_size"] == 2 and recorded["degrees"]["dp"] == 2
    assert recorded["model"]["hidden"] == 32 and len(recorded["model_hash"]) == 16
    assert (tmp_path / "latest").read_text() == path.name
    assert Checkpointer(tmp_path, writer=writer).check_origin(path) == (True, False)


def test_another_model_is_refused_in_one_line_naming_the_keys(tmp_path):
    path = Checkpointer(tmp_path, writer=origin.describe(_cfg(), _Strategy(2), 2)).save(1, {"w": torch.ones(2)}, {"step": 1})
    other = Checkpointer(tmp_path, writer=origin.describe(_cfg(model={"hidden": 64}), _Strategy(1), 1))
    with pytest.raises(CheckpointError) as caught:
        other.check_origin(path)
    message = str(caught.value)
    assert "\n" not in message and "model.hidden=32 there, 64 here" in message and "hydra.run.dir" in message


def test_another_world_size_or_strategy_is_a_resharding_not_a_refusal():
    written = origin.describe(_cfg(), _Strategy(2), 2)
    now = origin.describe(_cfg(strategy={"_target_": "disttrain.strategies.pipeline.Pipeline"}), _Strategy(1), 2)
    reshard, refusal = origin.compare(written, now, Path("step_00000002"))
    assert refusal is None and "written by ddp on 2 rank(s)" in reshard and "resumed as pipeline" in reshard
    assert origin.compare(written, written, Path("x")) == (None, None)


def test_a_deepspeed_checkpoint_gives_other_strategies_its_weights_and_takes_none():
    deepspeed = origin.describe(_cfg(strategy={"_target_": "disttrain.strategies.deepspeed.DeepSpeed"}), _Strategy(2), 2)
    ddp = origin.describe(_cfg(), _Strategy(2), 2)
    weights, refusal = origin.compare(deepspeed, ddp, Path("step_3"))
    assert refusal is None and weights.startswith(origin.WEIGHTS_ONLY) and "optimizer state starts again" in weights
    _, refusal = origin.compare(ddp, deepspeed, Path("s"))
    assert "deepspeed" in refusal and "disttrain export" in refusal


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint would do: call something when unpickled
        return (Path.touch, (self.marker,))


def test_extras_holding_a_pickled_callable_are_refused_not_run(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "extra_rank0.pt"
    torch.save({"step": 1, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(extras.UnsafeCheckpoint, match="would run code"):
        extras.load(path)
    assert not marker.exists()
    with open(path, "rb") as handle:  # the same file under a plain unpickler does run it
        torch.load(handle, weights_only=False)
    assert marker.exists()


def test_the_real_extras_load_weights_only(tmp_path):
    from disttrain.data.sampler import ResumableBatchSampler
    from disttrain.engine.rng import rng_state

    extra = {"step": 5, "sampler": ResumableBatchSampler(64, 4).state_dict(), "rng": rng_state()}
    extras.save(extra, tmp_path / "e.pt")
    loaded = extras.load(tmp_path / "e.pt")
    assert loaded["sampler"] == extra["sampler"] and torch.equal(loaded["rng"]["torch"], extra["rng"]["torch"])


@pytest.mark.parametrize("world, batch, accum", [(1, 4, 4), (2, 4, 2), (4, 4, 1), (2, 2, 4)])
def test_global_batch_size_derives_the_accumulation(world, batch, accum):
    cfg = _cfg(trainer={"global_batch_size": 16}, data={"batch_size": batch})
    assert global_batch.resolve(cfg, world).trainer.grad_accum_steps == accum


def test_global_batch_size_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.global_batch_size=16 is not a multiple of data.batch_size=4 x 3"):
        global_batch.resolve(_cfg(trainer={"global_batch_size": 16}), 3)
    with pytest.raises(ConfigError, match="contradicts"):
        global_batch.resolve(_cfg(trainer={"global_batch_size": 16, "grad_accum_steps": 3}), 2)
    with pytest.raises(ConfigError, match="not defined for ParamServer"):
        global_batch.resolve(_cfg(trainer={"global_batch_size": 16},
                                  strategy={"_target_": "disttrain.strategies.param_server.ParamServer"}), 3)


def test_the_cli_refuses_another_model_before_any_worker_starts(tmp_path):
    writer = origin.describe(_cfg(), _Strategy(2), 2)
    Checkpointer(tmp_path / "run" / "checkpoints", writer=writer).save(4, {"w": torch.ones(2)}, {"step": 4})
    origin.refuse_other_model(_cfg(), tmp_path / "run")  # the same model: nothing to say
    origin.refuse_other_model(_cfg(model={"depth": 5}, checkpoint={"resume": "never"}), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.depth=3 there, 5 here"):
        origin.refuse_other_model(_cfg(model={"depth": 5}), tmp_path / "run")


def test_extras_written_before_the_tensor_rng_state_still_load(tmp_path):
    """Older checkpoints hold numpy's RNG state as a numpy array: plain data, allowed by name."""
    import numpy as np

    torch.save({"step": 2, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    loaded = extras.load(tmp_path / "old.pt")
    assert loaded["step"] == 2 and loaded["rng"]["numpy"][1].dtype == np.uint32


@pytest.mark.parametrize("strategy", ["deepspeed.DeepSpeed", "param_server.ParamServer"])
def test_async_save_is_refused_where_the_engine_writes_its_own_checkpoints(strategy):
    from disttrain.config.validate import import_target
    from disttrain.engine.preflight import _check_async_save

    cfg = _cfg(strategy={"_target_": f"disttrain.strategies.{strategy}"}, checkpoint={"async_save": True})
    name = strategy.split(".")[0]
    with pytest.raises(ConfigError, match=f"checkpoint.async_save=true is not available with strategy={name}"):
        _check_async_save(cfg, import_target(cfg.strategy._target_, "strategy"))
    _check_async_save(_cfg(checkpoint={"async_save": True}), import_target("disttrain.strategies.ddp.DDP", "s"))
