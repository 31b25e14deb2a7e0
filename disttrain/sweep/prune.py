"""Optuna pruning for trials of any Hydra sweep.

Hydra's Optuna sweeper asks Optuna for trials and tells it the results, but never hands
the ``optuna.Trial`` to the job, so the job cannot ``trial.report`` / ``should_prune``
through it. Instead each trial rebuilds a small in-memory study from the validation
histories the sweep's other trials wrote (``<run dir>/evals.json`` + ``result.json``) and
asks a real Optuna pruner (``sweep.pruner``, e.g. MedianPruner) about its own history.
This works with every sweeper and launcher that shares the sweep directory.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("disttrain")

#: result.json status -> Optuna state for the rebuilt study; trials still running are left out.
_STATES = {"ok": "COMPLETE", "pruned": "PRUNED"}


def _finished_trials(sweep_dir: Path, own_run_dir: Path) -> list[tuple[str, list[tuple[int, float]]]]:
    """(status, history) of the sweep's other trials that have finished."""
    out = []
    for evals in sorted(sweep_dir.glob(f"**/{'evals.json'}")):
        run_dir = evals.parent
        result = run_dir / "result.json"
        if run_dir.resolve() == own_run_dir.resolve() or not result.exists():
            continue
        status = json.loads(result.read_text()).get("status")
        if status in _STATES:
            out.append((status, [(int(s), float(v)) for s, v in json.loads(evals.read_text())["history"]]))
    return out


class Pruner:
    """``should_prune(history)``: the configured Optuna pruner's verdict on this trial."""

    def __init__(self, pruner_cfg: DictConfig, sweep_dir: Path, run_dir: Path, direction: str):
        self.pruner_cfg, self.sweep_dir, self.run_dir, self.direction = pruner_cfg, sweep_dir, run_dir, direction

    @classmethod
    def from_config(cls, sweep, run_dir: Path, direction: str) -> "Pruner | None":
        """``sweep``: the run's typed ``sweep`` section (``config.schema.SweepConfig``)."""
        if not sweep.pruner or not sweep.dir:
            return None  # no pruner, or not a sweep (nothing to compare with)
        return cls(sweep.pruner, Path(sweep.dir), run_dir, direction)

    def should_prune(self, history: list[tuple[int, float]]) -> bool:
        import optuna
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction=self.direction, pruner=instantiate(self.pruner_cfg))
        with warnings.catch_warnings():  # add_trial/create_trial are 'experimental' in optuna 2.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for status, other in _finished_trials(self.sweep_dir, self.run_dir):
                state = getattr(TrialState, _STATES[status])
                study.add_trial(create_trial(state=state, value=other[-1][1] if state == TrialState.COMPLETE
                                             else None, intermediate_values=dict(other)))
        trial = study.ask()
        for step, value in history:
            trial.report(value, step)
        return trial.should_prune()
