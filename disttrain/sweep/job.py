"""Sweeps: every trial of a Hydra multirun is a full disttrain run; this module turns its
outcome into the objective the sweeper wants, records it in ``<run dir>/result.json``, and
(as a Hydra callback) writes ``<sweep dir>/summary.csv`` and a table when the sweep ends.

A failing trial (divergence, crash) must not end the sweep: Hydra's basic sweeper re-raises
a job's exception, and the Optuna sweeper crashes on a NaN objective, so the job function
catches the failure, records it with its reason, and returns the worst possible value.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from disttrain.distributed import env
from disttrain.config.errors import ConfigError
from disttrain.config.schema import section

log = logging.getLogger("disttrain")
RESULT_FILE = "result.json"
OBJECTIVES = ("best", "final")
DIRECTIONS = ("minimize", "maximize")


def check_config(cfg: DictConfig) -> None:
    """ConfigError for bad sweep/validation settings, before any worker starts."""
    sweep, trainer = section(cfg, "sweep"), section(cfg, "trainer")
    if str(sweep.objective) not in OBJECTIVES:
        raise ConfigError(f"sweep.objective={sweep.objective!r} must be one of {', '.join(OBJECTIVES)} "
                          "(best or final validation loss).")
    if str(sweep.direction) not in DIRECTIONS:
        raise ConfigError(f"sweep.direction={sweep.direction!r} must be minimize or maximize.")
    every = trainer.eval_every
    if not isinstance(every, int) or every < 0:
        raise ConfigError(f"trainer.eval_every={every!r} must be an integer >= 0 (0 = no validation).")
    fraction = cfg.data.get("val_fraction", 0.0) or 0.0
    if not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"data.val_fraction={fraction} must be in [0, 1).")
    if every and not fraction:
        raise ConfigError(f"trainer.eval_every={every} needs a held-out split: set data.val_fraction "
                          "(e.g. data.val_fraction=0.1), or trainer.eval_every=0.")


def _check_sweeper_direction(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """The Optuna sweeper optimises in its own direction: a mismatch would search for the worst trial."""
    theirs = OmegaConf.select(hydra_cfg, "sweeper.direction", default=None)
    theirs = getattr(theirs, "name", theirs)
    ours = str(section(cfg, "sweep").direction)
    if isinstance(theirs, str) and theirs != ours:
        raise ConfigError(f"sweep.direction={ours} but hydra.sweeper.direction={theirs}: "
                          f"set both the same (e.g. hydra.sweeper.direction={ours}).")


def failure_reason(exc: BaseException) -> str:
    """One line saying why a trial failed; for local workers, the worker's own exception
    (torch elastic records it per rank) rather than 'ChildFailedError'."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, failure = sorted(failures.items())[0]
        message = failure.message
        if isinstance(message, dict):  # error file contents: {"message": "...", "extraInfo": ...}
            message = message.get("message", message)
        text = str(message).strip().splitlines()
        return f"rank {rank}: {text[0] if text else f'exit code {failure.exitcode}'}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]  # one line, however nested


def worst(direction: str) -> float:
    """The objective a failed trial reports: Optuna stores it as a completed, worst-possible
    trial (it rejects NaN), which steers its sampler away from what failed."""
    return math.inf if direction == "minimize" else -math.inf


def _add_sweep_dir(cfg: DictConfig, sweep_dir: str) -> None:
    """Tell the trial's workers where the sweep is (the pruner reads the other trials there)."""
    with open_dict(cfg):
        if cfg.get("sweep") is None:  # a user's own primary config without the sweep block
            cfg.sweep = {"objective": "best", "direction": "minimize", "pruner": None}
        cfg.sweep.dir = sweep_dir


def run_job(cfg: DictConfig, train_job: Callable[[DictConfig], dict]) -> Any:
    """Hydra's job function. A plain run returns rank 0's summary; a sweep trial returns
    its objective (a float, what Hydra's Optuna sweeper needs) and never raises for a
    failed trial."""
    check_config(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return train_job(cfg)
    _check_sweeper_direction(cfg, hydra_cfg)
    _add_sweep_dir(cfg, str(hydra_cfg.sweep.dir))
    run_dir, started = Path(hydra_cfg.runtime.output_dir), time.time()
    try:
        summary, reason = dict(train_job(cfg)), ""
    except ConfigError:
        raise
    except Exception as exc:  # a failed trial is a result, not the end of the sweep
        summary, reason = {"status": "failed", "objective": None}, failure_reason(exc)
        log.error("trial %s failed: %s", hydra_cfg.job.num, reason)
    result = {"num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task), "reason": reason,
              "wall_time_s": round(time.time() - started, 3), **summary, "run_dir": str(run_dir)}
    if env.detect().rank == 0:  # one writer per trial, whatever the launcher
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str))
    objective = result.get("objective")
    if result["status"] == "failed" or objective is None or not math.isfinite(objective):
        return worst(str(cfg.sweep.direction))
    return float(objective)


# ---- the summary -------------------------------------------------------------------------

def _params(overrides: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides if "=" in item)


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between trials (what the sweep searched over)."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in _params(row.get("overrides", [])).items():
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 or len(rows) == 1)


def collect(sweep_dir: Path) -> list[dict]:
    """Every trial's result.json under the sweep dir, in job order."""
    rows = [json.loads(path.read_text()) for path in sweep_dir.glob(f"**/{RESULT_FILE}")]
    return sorted(rows, key=lambda row: int(row.get("num", 0)))


def best_trial(rows: list[dict], direction: str) -> dict | None:
    """The best finished trial (status ok; pruned ones only if none finished)."""
    for statuses in (("ok",), ("ok", "pruned")):
        scored = [r for r in rows if r.get("status") in statuses and r.get("objective") is not None
                  and math.isfinite(r["objective"])]
        if scored:
            pick = min if direction == "minimize" else max
            return pick(scored, key=lambda r: r["objective"])
    return None


def write_summary(sweep_dir: Path, direction: str = "minimize") -> tuple[list[dict], dict | None]:
    """Write ``summary.csv`` (one row per trial, one column per override key) and return
    (rows, best)."""
    rows = collect(sweep_dir)
    best = best_trial(rows, direction)
    keys = sorted({k for row in rows for k in _params(row.get("overrides", []))})
    header = ["num", "status", "objective", "steps", "wall_time_s", *keys, "overrides", "best", "reason", "run_dir"]
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            params = _params(row.get("overrides", []))
            writer.writerow([row.get("num"), row.get("status"), _fmt(row.get("objective")), row.get("step", ""),
                             row.get("wall_time_s"), *[params.get(k, "") for k in keys],
                             " ".join(row.get("overrides", [])), "yes" if row is best else "",
                             row.get("reason", ""), row.get("run_dir", "")])
    return rows, best


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict], best: dict | None, sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {sweep_dir} ({len(rows)} trials; full overrides in summary.csv)")
    for column in ("#", "swept overrides", "objective", "steps", "wall s", "status"):
        table.add_column(column)
    keys = swept_keys(rows)
    for row in rows:
        status = row.get("status", "?") + (f": {row['reason']}" if row.get("reason") else "")
        mark = " *" if row is best else ""
        params = _params(row.get("overrides", []))
        table.add_row(f"{row.get('num')}{mark}", " ".join(f"{k}={params.get(k, '')}" for k in keys),
                      _fmt(row.get("objective")),
                      str(row.get("step", "")), _fmt(row.get("wall_time_s")), status)
    console = Console(width=160)
    console.print(table)
    if best is None:
        console.print("no trial finished")
    else:
        console.print(f"best trial: #{best['num']} {' '.join(best['overrides'])}  objective "
                      f"{best['objective']:.6g} ({best.get('objective_metric', '')})  run dir {best['run_dir']}")


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): the summary at the end of
    every multirun, whatever the sweeper or launcher."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        direction = str(config.get("sweep", {}).get("direction", "minimize"))
        rows, best = write_summary(sweep_dir, direction)
        print_table(rows, best, sweep_dir)
