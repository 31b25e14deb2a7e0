"""Pipeline parallelism (torch.distributed.pipelining) equals the unsplit model: loss and
every gradient on the same global batch, for GPipe / 1F1B / interleaved 1F1B, several
micro-batch counts, accumulation and dp x pp; the real CLI's weights after SGD steps match
strategy=single; checkpoints hold the full unsplit state dict and resume bitwise."""
from __future__ import annotations

import pytest
import torch

from _pipeline_checks import CLI_COMMON as COMMON, single_reference
from helpers import run_disttrain, spawn

from disttrain.checkpoint.commit import load_model_state

TOL = 1e-6


def _grad_cases(rank, world_size, cases):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.strategies.pipeline import Pipeline

    import _pipeline_checks as chk

    dist_setup.init(env.detect(), "gloo", 60)
    out = []
    for schedule, m, k, balance, depth in cases:
        build = chk.mlp(depth)
        strategy = Pipeline(micro_batches=m, schedule=schedule, balance=balance)
        strategy.setup(chk.context(build, {}, batch_size=8 * m))
        micro = chk.batches(k, 8 * m)
        out.append(chk.compare(strategy, build, micro, micro))
    dist_setup.teardown()
    return out


CASES_2 = [("gpipe", 1, 1, "params", 3), ("gpipe", 2, 1, "params", 3), ("gpipe", 4, 1, "time", 3),
           ("gpipe", 8, 1, [2, 5], 3), ("1f1b", 2, 1, "params", 3), ("1f1b", 8, 1, "params", 3),
           ("gpipe", 4, 2, "params", 3), ("1f1b", 2, 3, "params", 3)]


def test_gpipe_and_1f1b_loss_and_every_gradient_equal_unsplit_model():
    results = spawn(_grad_cases, 2, CASES_2, timeout=240)
    first, last = results
    for case, a, b in zip(CASES_2, first, last):
        assert a["loss"] is None and a["samples"] == 0, case   # only the last stage reports
        assert abs(b["loss"] - b["ref_loss"]) < TOL, (case, b["loss"], b["ref_loss"])
        assert a["max_grad_diff"] < TOL and b["max_grad_diff"] < TOL, (case, a, b)
        assert set(a["names"]).isdisjoint(b["names"]), case    # each parameter on one stage only
        assert 0.0 <= b["extra"]["pipeline/bubble"] <= 1.0
    # explicit balance [2, 5]: stage 0 holds layers 0-1 (Linear, ReLU) -> 2 parameters
    assert first[3]["names"] == ["0.bias", "0.weight"]


def _interleaved(rank, world_size):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.strategies.pipeline import Pipeline

    import _pipeline_checks as chk

    dist_setup.init(env.detect(), "gloo", 60)
    build = chk.mlp(depth=7)  # 15 layers -> 8 stages on 4 ranks
    strategy = Pipeline(micro_batches=4, schedule="interleaved_1f1b", stages_per_rank=2)
    strategy.setup(chk.context(build, {}, batch_size=16))
    micro = chk.batches(1, 16)
    result = chk.compare(strategy, build, micro, micro)
    dist_setup.teardown()
    return result | {"stages": strategy.stage_ids}


def test_interleaved_1f1b_on_four_ranks_equals_unsplit_model():
    results = spawn(_interleaved, 4, timeout=240)
    assert [r["stages"] for r in results] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert abs(results[3]["loss"] - results[3]["ref_loss"]) < TOL
    assert max(r["max_grad_diff"] for r in results) < TOL
    assert results[0]["extra"]["pipeline/bubble_theory"] == pytest.approx(3 / (2 * 4 + 3))


# ------------------------------------------------------------------ the real CLI

@pytest.fixture(scope="module")
def single_ref(tmp_path_factory):
    return single_reference(tmp_path_factory)


def _assert_same(state, ref):
    assert sorted(state) == sorted(ref)  # the full unsplit state dict, original names
    for key in ref:
        torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=TOL, msg=key)


def test_cli_gpipe_equals_single_logs_bubble_and_resumes_bitwise(single_ref, tmp_path):
    run = tmp_path / "gpipe"
    run_disttrain(["strategy=pipeline", "strategy.schedule=gpipe", "strategy.micro_batches=4",
                   "dist.nproc_per_node=2", "data.batch_size=32", *COMMON], run, timeout=240)
    full = load_model_state(run)
    _assert_same(full, single_ref)
    # resume from the step-2 checkpoint in a fresh run dir: bitwise equal at step 4
    resumed = tmp_path / "resumed"
    run_disttrain(["strategy=pipeline", "strategy.schedule=gpipe", "strategy.micro_batches=4",
                   "dist.nproc_per_node=2", "data.batch_size=32", *COMMON,
                   f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}"], resumed, timeout=240)
    again = load_model_state(resumed)
    assert all(torch.equal(again[k], full[k]) for k in full)
    _assert_bubble_in_tensorboard(run / "tensorboard")


def _assert_bubble_in_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/pipeline/bubble", "train/pipeline/bubble_theory", "train/pipeline/stage0_busy_s",
                "train/pipeline/stage1_idle_s"):
        assert tag in tags, tags
    assert events.Scalars("train/pipeline/bubble_theory")[-1].value == pytest.approx(1 / 5)


def test_cli_dp2_x_pp2_1f1b_with_accumulation_on_four_ranks_equals_single(single_ref, tmp_path):
    # 2 replicas x 2 accumulation steps x batch 8 (2 micro-batches each) = the single run's 32
    run_disttrain(["strategy=pipeline", "strategy.schedule=1f1b", "strategy.micro_batches=2",
                   "trainer.grad_accum_steps=2", "dist.nproc_per_node=4", "dist.dp=2", "dist.pp=2",
                   "data.batch_size=8", *COMMON], tmp_path, timeout=300)
    _assert_same(load_model_state(tmp_path), single_ref)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides,world,key", [
    (["data.batch_size=30", "strategy.micro_batches=4"], 2, "strategy.micro_batches"),
    (["dist.pp=8", "strategy.micro_batches=8"], 8, "only 7 layers"),
    (["dist.pp=3"], 8, "dist.pp=3"),
    (["dist.pp=7", "strategy.schedule=gpipe"], 7, "parameter-free"),
    (["strategy.schedule=1f1b", "strategy.micro_batches=1"], 2, "strategy.micro_batches=1"),
    (["strategy.balance=[3,3]"], 2, "strategy.balance"),
    (["strategy.schedule=zigzag"], 2, "strategy.schedule"),
    (["strategy.stages_per_rank=2"], 2, "strategy.stages_per_rank"),
    (["dist.tp=2"], 2, "dist.tp"),
])
def test_bad_settings_are_rejected_before_training(overrides, world, key):
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=pipeline", *overrides])
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        validate(cfg, world_size=world)


def test_cli_exits_with_a_message_naming_the_setting(tmp_path):
    proc = run_disttrain(["strategy=pipeline", "dist.nproc_per_node=2", "data.batch_size=30",
                          "strategy.micro_batches=4"], tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "strategy.micro_batches" in proc.stderr and "data.batch_size=30" in proc.stderr
