"""Hydra sweeps through the real CLI: every trial is a full disttrain run, the sweep writes
summary.csv, failures are recorded and the sweep goes on."""
from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from helpers import cli_env, run_disttrain, run_process

# A tiny reference regression task (MLP on synthetic_regression) with a validation split.
TINY = ["model.hidden=16", "model.depth=2", "data.size=512", "data.val_fraction=0.25", "trainer.eval_every=5",
        "trainer.log_every=5", "checkpoint.every_steps=0"]


def sweep(tmp_path: Path, *overrides: str, timeout: float = 300):
    sweep_dir = tmp_path / "sweep"
    proc = run_disttrain(["-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"], tmp_path / "unused",
                         timeout=timeout)
    with open(sweep_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    return proc, sweep_dir, rows


def _results(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]


@pytest.mark.world_size(2)
def test_grid_sweep_two_ranks_per_trial(tmp_path):
    proc, sweep_dir, rows = sweep(tmp_path, "dist.nproc_per_node=2", "trainer.max_steps=10",
                                  "optim.lr=0.01,0.1", "model.hidden=8,16")
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "result.json").exists())
    assert len(runs) == 4
    for run in runs:  # each trial is a whole 2-rank run with its own outputs
        assert (run / "checkpoints").is_dir() and (run / "tensorboard").is_dir()
        assert (run / "train.rank1.log").exists()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["optim.lr"], r["model.hidden"]) for r in rows} == set(itertools.product(["0.01", "0.1"], ["8", "16"]))
    for result in _results(sweep_dir):  # the objective is the best validation loss of the run
        history = json.loads((Path(result["run_dir"]) / "evals.json").read_text())["history"]
        assert [s for s, _ in history] == [5, 10]
        assert result["objective"] == pytest.approx(min(v for _, v in history))
        assert result["objective_metric"] == "best val_loss" and result["step"] == 10
    best = [r for r in rows if r["best"] == "yes"]
    assert len(best) == 1 and float(best[0]["objective"]) == min(float(r["objective"]) for r in rows)
    assert "best trial: #" + best[0]["num"] in proc.stdout


def test_optuna_tpe_sweep(tmp_path):
    _, sweep_dir, rows = sweep(
        tmp_path, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0", "hydra.sweeper.sampler.n_startup_trials=3",
        "optim.lr=tag(log, interval(1e-4, 0.3))", "strategy=single", "trainer.max_steps=20")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    objectives = [float(r["objective"]) for r in rows]
    assert all(math.isfinite(o) for o in objectives) and len(set(objectives)) == 6
    # What Optuna was told is what the trials returned: its best is the summary's best.
    optuna_best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = next(r for r in rows if r["best"] == "yes")
    assert optuna_best["best_value"] == pytest.approx(float(best["objective"]), rel=1e-5)
    assert optuna_best["best_value"] == pytest.approx(min(objectives), rel=1e-5)
    assert 1e-4 <= float(best["optim.lr"]) <= 0.3


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    # lr=1000 diverges to NaN; activation=bogus crashes while building the model.
    proc, sweep_dir, rows = sweep(tmp_path, "strategy=single", "trainer.max_steps=10", "optim.lr=0.05,1000",
                                  "model.activation=relu,bogus")
    assert proc.returncode == 0 and len(rows) == 4
    by = {(r["model.activation"], r["optim.lr"]): r for r in rows}
    assert by["relu", "0.05"]["status"] == "ok" and by["relu", "0.05"]["best"] == "yes"
    diverged = by["relu", "1000"]
    assert diverged["status"] == "failed" and "NonFiniteLossError" in diverged["reason"]
    assert "nan" in diverged["reason"] and diverged["objective"] == ""
    for lr in ("0.05", "1000"):
        assert by["bogus", lr]["status"] == "failed" and "bogus" in by["bogus", lr]["reason"]
    # `disttrain report <sweep dir>`: objective vs each swept parameter, failures included.
    report = run_process([sys.executable, "-m", "disttrain", "report", str(sweep_dir)], timeout=120, env=cli_env())
    assert report.returncode == 0, report.stderr
    pngs = sorted((sweep_dir / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["objective_vs_model.activation.png", "objective_vs_optim.lr.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)
    assert "objective_vs_optim.lr.png" in report.stdout


def test_pruning_stops_a_trial_worse_than_the_median(tmp_path):
    # Trial 0 trains well; trial 1 (tiny lr) is worse at its first evaluation than trial 0
    # was at the same step, so Optuna's MedianPruner stops it there.
    _, sweep_dir, rows = sweep(tmp_path, "strategy=single", "trainer.max_steps=20", "optim.lr=0.1,0.0001",
                               "sweep.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:1}")
    assert [r["status"] for r in rows] == ["ok", "pruned"]
    assert rows[0]["steps"] == "20" and rows[1]["steps"] == "5"
