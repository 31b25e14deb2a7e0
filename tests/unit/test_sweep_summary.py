"""Sweep bookkeeping without training: summary rows, best trial, pruning verdicts, config checks."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from disttrain.engine import evaluate
from disttrain.sweep import job as sweep
from disttrain.config.errors import ConfigError
from disttrain.sweep.prune import Pruner


def _trial(sweep_dir: Path, num: int, status: str, objective, lr: str, history=None, reason="") -> None:
    run = sweep_dir / str(num)
    run.mkdir(parents=True)
    result = {"num": num, "status": status, "objective": objective, "overrides": [f"optim.lr={lr}", "x=1"],
              "step": 10, "wall_time_s": 1.0, "reason": reason, "run_dir": str(run)}
    (run / "result.json").write_text(json.dumps(result))
    if history is not None:
        (run / "evals.json").write_text(json.dumps({"history": history}))


def test_summary_rows_best_and_failures(tmp_path):
    _trial(tmp_path, 0, "ok", 0.5, "0.1")
    _trial(tmp_path, 1, "failed", None, "10", reason="NonFiniteLossError: nan")
    _trial(tmp_path, 2, "ok", 0.2, "0.01")
    _trial(tmp_path, 3, "pruned", 0.1, "0.001")  # pruned early: not a finished trial
    rows, best = sweep.write_summary(tmp_path, "minimize")
    assert best["num"] == 2
    with open(tmp_path / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["num"] for r in table] == ["0", "1", "2", "3"]
    assert [r["best"] for r in table] == ["", "", "yes", ""]
    assert table[1]["status"] == "failed" and table[1]["objective"] == "" and "nan" in table[1]["reason"]
    assert [r["optim.lr"] for r in table] == ["0.1", "10", "0.01", "0.001"]
    assert sweep.swept_keys(rows) == ["optim.lr"]  # x=1 is the same everywhere
    assert sweep.best_trial(rows, "maximize")["num"] == 0


def test_failed_trial_objective_is_the_worst_value():
    assert sweep.worst("minimize") == math.inf and sweep.worst("maximize") == -math.inf


def test_pruner_compares_with_finished_trials_at_the_same_step(tmp_path):
    cfg = OmegaConf.create({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2})
    for num, scale in enumerate((1.0, 2.0, 3.0)):
        _trial(tmp_path, num, "ok", scale * 0.1, "0.1", history=[[5, scale], [10, scale * 0.1]])
    _trial(tmp_path, 3, "failed", None, "9", history=[[5, 0.0]])  # failed trials do not count
    own = tmp_path / "4"
    pruner = Pruner(cfg, tmp_path, own, "minimize")
    assert pruner.should_prune([(5, 2.5)])        # worse than the median (2.0) at step 5
    assert not pruner.should_prune([(5, 1.5)])
    assert not Pruner(cfg, tmp_path, own, "maximize").should_prune([(5, 2.5)])


def test_no_pruning_before_enough_trials_finished(tmp_path):
    cfg = OmegaConf.create({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2})
    _trial(tmp_path, 0, "ok", 0.1, "0.1", history=[[5, 1.0]])
    assert not Pruner(cfg, tmp_path, tmp_path / "1", "minimize").should_prune([(5, 100.0)])


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"eval_every": 0, **trainer}, "data": {"val_fraction": 0.0},
                             "sweep": {"objective": "best", "direction": "minimize"}})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        sweep.check_config(_cfg(eval_every=10))
    bad = _cfg()
    bad.sweep.objective = "median"
    with pytest.raises(ConfigError, match="sweep.objective"):
        sweep.check_config(bad)
    bad = _cfg()
    bad.sweep.direction = "down"
    with pytest.raises(ConfigError, match="sweep.direction"):
        sweep.check_config(bad)


def test_split_is_seeded_disjoint_and_complete():
    data = TensorDataset(torch.arange(100).float().unsqueeze(1), torch.zeros(100, 1))
    train, val = evaluate.split(data, 0.2, seed=3)
    train2, val2 = evaluate.split(data, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80 and val.indices == val2.indices
    assert sorted(train.indices + val.indices) == list(range(100))
    assert evaluate.split(data, 0.0, seed=3) == (data, None)
