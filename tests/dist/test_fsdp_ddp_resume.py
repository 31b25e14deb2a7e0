"""An fsdp checkpoint resumes a ddp run of the same world size, and a ddp checkpoint an fsdp
run (issue 13): checkpoints are keyed by the unsplit model's FQNs, model and optimizer state
alike, so the layout that wrote them does not matter to the one that reads them.

One 2-rank spawn runs the real run (``run_rank``: restore, sampler, RNG, loop, final save) six
times on composed configs: an uninterrupted ddp reference of 4 steps; fsdp 2 steps then ddp on
the same run dir (``checkpoint.resume=auto``) to step 4; ddp then fsdp likewise; and a control
that resumes fsdp's step-2 checkpoint as ddp with the optimizer state left out, which shows the
SGD momentum carried in the checkpoint is what makes the resumed runs equal the reference.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import spawn

import _matrix as mx

RANKS, STEPS, SAVE_AT = 2, 4, 2
TOL = 1e-6
RUN = [*mx.MODEL, "optim=sgd", "optim.lr=0.1", "optim.momentum=0.9", "data.batch_size=8",
       f"checkpoint.every_steps={SAVE_AT}", "trainer.log_every=1", "metrics.peak_flops=1e11"]  # no FLOP probe

#: run dir -> the strategies of its consecutive runs (the first runs to SAVE_AT, the second to STEPS)
RUNS = {"reference": ("ddp",), "fsdp_to_ddp": ("fsdp", "ddp"), "ddp_to_fsdp": ("ddp", "fsdp")}


def _run(tmp: Path, name: str, strategy: str, steps: int, *extra: str) -> None:
    from disttrain.engine.run import run_rank

    run_rank(mx.compose(*RUN, f"strategy={strategy}", f"trainer.max_steps={steps}", *extra), tmp / name)


def _without_optimizer_state(tmp: Path) -> None:
    """The control: fsdp's step-2 checkpoint resumed as ddp with the optimizer state dropped
    after the restore (what a weights-only checkpoint gives: momentum starts again from the
    next gradient). DCP loads in place, so the state is cleared rather than not loaded."""
    from disttrain.engine.step import Engine

    real = Engine.load_state_dict

    def load_model_only(self, state):
        real(self, state)
        self.optimizer.state.clear()

    Engine.load_state_dict = load_model_only
    try:
        _run(tmp, "no_optim", "ddp", STEPS, f"checkpoint.resume={_step_dir(tmp, 'fsdp_to_ddp')}")
    finally:
        Engine.load_state_dict = real


def _step_dir(tmp: Path, name: str) -> Path:
    return tmp / name / "checkpoints" / f"step_{SAVE_AT:08d}"


def _checkpoint_layout(directory: Path) -> dict[str, int]:
    """Key of every tensor in a DCP checkpoint -> the number of chunks it was written in."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key: len(meta.chunks) for key, meta in metadata.items() if hasattr(meta, "chunks")}


def _job(rank: int, world_size: int, tmp: str):
    from disttrain.checkpoint.commit import load_model_state

    tmp = Path(tmp)
    for name, strategies in RUNS.items():
        for index, strategy in enumerate(strategies):
            _run(tmp, name, strategy, STEPS if index == len(strategies) - 1 else SAVE_AT)
    _without_optimizer_state(tmp)
    if rank != 0:
        return None
    ref, names = load_model_state(tmp / "reference"), [*RUNS, "no_optim"]
    source = {name: _step_dir(tmp, "fsdp_to_ddp" if name == "no_optim" else name) for name in names}
    return {"diff": {name: mx.max_diff(load_model_state(tmp / name), ref) for name in names},
            "resumed": {name: f"resumed from {source[name]} (step {SAVE_AT})" in (tmp / name / "train.log").read_text()
                        for name in names if name != "reference"},
            "fsdp_layout": _checkpoint_layout(_step_dir(tmp, "fsdp_to_ddp")),
            "ddp_layout": _checkpoint_layout(_step_dir(tmp, "ddp_to_fsdp")),
            "fqns": [name for name, _ in _unsplit_model().named_parameters()]}


def _unsplit_model() -> torch.nn.Module:
    from hydra.utils import instantiate

    return instantiate(mx.compose(*RUN).model)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return spawn(_job, RANKS, str(tmp_path_factory.mktemp("fsdp_ddp")), timeout=240)[0]


def test_each_second_run_resumed_from_the_first_runs_checkpoint(result):
    assert all(result["resumed"].values()), result["resumed"]


@pytest.mark.parametrize("name", ["fsdp_to_ddp", "ddp_to_fsdp"])
def test_switching_strategy_on_resume_equals_an_uninterrupted_ddp_run(result, name):
    assert result["diff"][name] <= TOL, result["diff"]


def test_without_the_optimizer_state_the_resumed_run_differs(result):
    """The control: momentum restarted from zero moves the final weights far beyond TOL, so the
    equality above needs the momentum buffers carried from one layout to the other."""
    assert result["diff"]["no_optim"] > 1e3 * TOL, result["diff"]


def test_checkpoints_are_keyed_by_fqn_and_fsdp_writes_shards(result):
    """Both layouts write the same keys (the unsplit model's FQNs, momentum keyed by them too);
    fsdp writes every tensor as one shard per rank, ddp writes it whole, once."""
    fqns = result["fqns"]
    expected = {f"model.{n}" for n in fqns} | {f"optim.state.{n}.momentum_buffer" for n in fqns}
    assert set(result["fsdp_layout"]) == set(result["ddp_layout"]) == expected, result
    assert set(result["fsdp_layout"].values()) == {RANKS}, result["fsdp_layout"]
    assert set(result["ddp_layout"].values()) == {1}, result["ddp_layout"]
