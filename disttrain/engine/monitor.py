"""What a run contributes to a sweep, computed inside the training loop on every rank:
periodic validation, the divergence check, Optuna pruning, and the trial's objective."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from disttrain.config.schema import SweepConfig, TrainerConfig
from disttrain.distributed import comm
from disttrain.engine import evaluate
from disttrain.observe.metrics import TensorBoard

log = logging.getLogger("disttrain")
EVALS_FILE = "evals.json"  # rank 0's validation history; read by the pruner of later trials


class TrialMonitor:
    """The loop's ``after_step`` hook. Evaluates every ``trainer.eval_every`` steps (and at
    the last step), raises NonFiniteLossError on divergence, and returns True when the
    pruner stops the trial. Every rank calls it: evaluation and the prune decision are
    collectives, so all ranks agree."""

    def __init__(self, trainer: TrainerConfig, sweep: SweepConfig, batch_size: int, strategy, val_set, loss_fn,
                 device: torch.device, tensorboard: TensorBoard, run_dir: Path, rank: int, start_step: int,
                 precision=None):
        """``trainer`` and ``sweep`` are the run's typed sections (``config.schema.section``)."""
        self.sweep, self.batch_size = sweep, int(batch_size)
        self.strategy, self.val_set, self.loss_fn = strategy, val_set, loss_fn
        self.precision = precision
        self.device, self.tensorboard, self.run_dir, self.rank = device, tensorboard, run_dir, rank
        self.eval_every = int(trainer.eval_every or 0)
        self.max_steps = int(trainer.max_steps)
        self.stop_on_nonfinite = bool(trainer.stop_on_nonfinite)
        self.direction = str(sweep.direction)
        self.history = [(s, v) for s, v in self._saved_history() if s <= start_step]  # resumed runs keep theirs
        self.train_loss = math.nan
        self.pruned_at: int | None = None
        from disttrain.sweep.prune import Pruner  # optuna is optional: imported only when a pruner is set

        self.pruner = Pruner.from_config(sweep, run_dir, self.direction) if rank == 0 else None

    def _saved_history(self) -> list[tuple[int, float]]:
        path = self.run_dir / EVALS_FILE
        if not path.exists():
            return []
        return [(int(s), float(v)) for s, v in json.loads(path.read_text())["history"]]

    def after_step(self, step: int, fields: dict[str, float]) -> bool:
        if "loss" in fields:
            self.train_loss = fields["loss"]
            if self.stop_on_nonfinite:
                evaluate.check_finite(step, "training loss", fields["loss"])
        due = self.eval_every and (step % self.eval_every == 0 or step == self.max_steps)
        if not due or self.val_set is None:
            return False
        value = evaluate.evaluate(self.strategy, self.val_set, self.loss_fn, self.batch_size,
                                  self.precision, self.device)
        if self.stop_on_nonfinite:
            evaluate.check_finite(step, "validation loss", value)
        self.history.append((step, value))
        self.tensorboard.scalars(step, {"loss": value}, prefix="val")
        if self.rank == 0:
            log.info("step %d  val_loss %.6g", step, value)
            (self.run_dir / EVALS_FILE).write_text(json.dumps({"history": self.history}))
        return self._prune(step)

    def _prune(self, step: int) -> bool:
        if not self.sweep.pruner or step == self.max_steps:
            return False
        mine = self.pruner.should_prune(self.history) if self.pruner is not None else False
        decision = [comm.get().broadcast_object(mine, src=0)]  # rank 0 decides for the whole job
        if decision[0]:
            self.pruned_at = step
            log.warning("trial pruned at step %d (val_loss %.6g worse than the pruner allows)", step,
                        self.history[-1][1])
        return bool(decision[0])

    def summary(self) -> dict:
        """The trial's figures; ``objective`` follows ``sweep.objective`` (final | best
        validation loss), or the last logged training loss where no validation ran."""
        values = [v for _, v in self.history]
        pick = min if self.direction == "minimize" else max
        best = pick(values) if values else None
        final = values[-1] if values else None
        mode = str(self.sweep.objective)
        if values:
            objective, metric = (best, "best val_loss") if mode == "best" else (final, "final val_loss")
        else:
            objective, metric = self.train_loss, "final train loss"
        return {"objective": objective, "objective_metric": metric, "val_loss": final, "best_val_loss": best,
                "train_loss": self.train_loss, "evals": len(values),
                "status": "pruned" if self.pruned_at is not None else "ok"}
