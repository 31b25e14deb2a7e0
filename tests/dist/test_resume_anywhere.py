"""Resume anywhere (issue 20): a checkpoint continues on another world size or another
strategy with the same samples in the same order, model and optimizer state resharded.

Every run is the real run (``run_rank``: sampler, restore, loop, save) on composed configs
with ``trainer.global_batch_size=8``: 2 steps on one layout, then 2 more resumed from its
step-2 checkpoint on another, compared with an uninterrupted single-process run of 4 steps
(SGD with momentum, so the optimizer state must travel too). Four spawns (2, 1, 2 and 4
ranks); the step-2 checkpoints are copied between them by the test process.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import spawn

import _matrix as mx

STEPS, SAVE_AT, TOL = 4, 2, 1e-5
RUN = [*mx.MODEL, "trainer.global_batch_size=8", f"checkpoint.every_steps={SAVE_AT}", "trainer.log_every=1",
       "metrics.peak_flops=1e11"]
LAYOUTS = {  # name -> overrides (data.batch_size is the micro-batch; the accumulation is derived)
    "single_b8": ["strategy=single", "data.batch_size=8"],
    "single_b4": ["strategy=single", "data.batch_size=4"],          # 2 micro-batches per step
    "ddp_b4": ["strategy=ddp", "data.batch_size=4"],
    "ddp_b2": ["strategy=ddp", "data.batch_size=2"],
    "pipeline": ["strategy=pipeline", "data.batch_size=8", "strategy.micro_batches=2", "strategy.schedule=1f1b"],
    "tensor": ["strategy=model_parallel", "strategy.mode=tensor", "data.batch_size=8"],
}
#: run dir -> (layout of the first 2 steps, layout of the last 2, ranks of the second run)
RESUMES = {"ddp2_to_1": ("ddp_b4", "single_b4", 1), "ddp2_to_4": ("ddp_b4", "ddp_b2", 4),
           "ddp2_to_pipeline2": ("ddp_b4", "pipeline", 2), "pipeline2_to_ddp4": ("pipeline", "ddp_b2", 4),
           "ddp2_to_tensor2": ("ddp_b4", "tensor", 2)}


def _run(run_dir: Path, layout: str, steps: int, *extra: str) -> None:
    from disttrain.engine.run import run_rank

    run_rank(mx.compose(*RUN, *LAYOUTS[layout], f"trainer.max_steps={steps}", *extra), run_dir)


def _first_halves(rank, world, tmp):
    tmp = Path(tmp)
    for first in ("ddp_b4", "pipeline"):
        _run(tmp / f"first_{first}", first, SAVE_AT)
    _run(tmp / "async", "ddp_b4", STEPS, "checkpoint.async_save=true")  # saves at 2 and 4 in the background


def _second_halves(rank, world, tmp):
    tmp = Path(tmp)
    if world == 1:
        _run(tmp / "reference", "single_b8", STEPS)
    for name, (_, second, ranks) in RESUMES.items():
        if ranks == world:
            _run(tmp / name, second, STEPS)
    if world == 2:
        _run(tmp / "async_resumed", "ddp_b4", STEPS, "checkpoint.async_save=true")
    if world == 2:  # an explicit resume path is not re-applied once the run dir has checkpoints
        source = tmp / "first_ddp_b4" / "checkpoints" / f"step_{SAVE_AT:08d}"
        _run(tmp / "explicit", "ddp_b4", STEPS, f"checkpoint.resume={source}")
        _run(tmp / "explicit", "ddp_b4", STEPS + 2, f"checkpoint.resume={source}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from disttrain.checkpoint.commit import load_model_state

    tmp = tmp_path_factory.mktemp("anywhere")
    spawn(_first_halves, 2, str(tmp), timeout=240)
    for name, (first, _, _) in RESUMES.items():
        (tmp / name).mkdir()
        shutil.copytree(tmp / f"first_{first}" / "checkpoints", tmp / name / "checkpoints")
    step_2 = f"step_{SAVE_AT:08d}"
    shutil.copytree(tmp / "async" / "checkpoints" / step_2, tmp / "async_resumed" / "checkpoints" / step_2)
    for world in (1, 2, 4):
        spawn(_second_halves, world, str(tmp), timeout=240)
    reference = load_model_state(tmp / "reference")
    names = [*RESUMES, "async", "async_resumed"]
    return {"tmp": tmp, "diff": {name: mx.max_diff(load_model_state(tmp / name), reference) for name in names},
            "control": mx.max_diff(load_model_state(tmp / "first_ddp_b4"), reference)}


@pytest.mark.parametrize("name", list(RESUMES))
def test_resumed_on_another_layout_equals_the_uninterrupted_single_run(runs, name):
    log = (runs["tmp"] / name / "train.log").read_text()
    assert f"(step {SAVE_AT})" in log and "resumed from" in log
    assert runs["diff"][name] <= TOL, runs["diff"]


@pytest.mark.parametrize("name", ["async", "async_resumed"])
def test_background_saves_hold_the_same_state(runs, name):
    """checkpoint.async_save=true: the run's step-4 checkpoint, and a run resumed from its
    step-2 checkpoint, equal the uninterrupted reference; the loop logged the staging."""
    assert runs["diff"][name] <= TOL, runs["diff"]
    log = (runs["tmp"] / name / "train.log").read_text()
    assert "written and committed in the background" in log and f"checkpoint committed: " in log


def test_the_reference_moved_after_the_checkpoint(runs):
    """Steps 3 and 4 change the weights by far more than the tolerance, so the equalities
    above need the resumed runs to train on the reference's samples with its momentum."""
    assert runs["control"] > 1e3 * TOL, runs["control"]


def test_a_layout_change_is_reported_as_a_resharding(runs):
    log = (runs["tmp"] / "ddp2_to_pipeline2" / "train.log").read_text()
    assert "resharding step_00000002: written by ddp on 2 rank(s)" in log, log[-2000:]
    assert "resumed as pipeline on 2 rank(s)" in log


def test_an_explicit_resume_path_does_not_rewind_a_restarted_run(runs):
    log = (runs["tmp"] / "explicit" / "train.log").read_text()
    first = runs["tmp"] / "first_ddp_b4" / "checkpoints" / f"step_{SAVE_AT:08d}"
    own = runs["tmp"] / "explicit" / "checkpoints" / f"step_{STEPS:08d}"
    assert log.count(f"resumed from {first} (step {SAVE_AT})") == 1, log[-3000:]
    assert f"resumed from {own} (step {STEPS})" in log
    assert "not used: this run dir has its own checkpoint" in log


@pytest.mark.parametrize("name", ["ddp2_to_pipeline2", "ddp2_to_tensor2"])  # stages on 2 ranks; tp shards
def test_export_writes_the_full_model_as_safetensors_and_pt(runs, name, capsys):
    import torch
    from safetensors.torch import load_file

    from disttrain.__main__ import run_subcommand
    from disttrain.checkpoint.commit import load_model_state

    run_dir = runs["tmp"] / name
    expected = load_model_state(run_dir)
    assert run_subcommand("export", [str(run_dir), "--out", str(run_dir / "m.safetensors")]) == 0
    exported = load_file(str(run_dir / "m.safetensors"))
    assert set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert run_subcommand("export", [str(run_dir), "--step", str(SAVE_AT), "--format", "pt"]) == 0
    older = torch.load(run_dir / f"model_step_{SAVE_AT:08d}.pt", weights_only=True)
    assert set(older) == set(expected) and mx.max_diff(older, expected) > 1e3 * TOL  # step 2, not step 4
    assert run_subcommand("export", [str(run_dir), "--step", "99"]) == 2
    assert "step_00000099" in capsys.readouterr().err
