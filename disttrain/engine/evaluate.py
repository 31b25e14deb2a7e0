"""Held-out validation: a seeded train/validation split of the dataset, and an evaluation
that runs on every rank's shard of the validation set and all-reduces one global mean.

A sweep must rank trials by how well they generalise, not by the training loss they
happened to reach, so the objective of a trial is this validation loss.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from disttrain.distributed import comm
from disttrain.data.loader import to_device


class NonFiniteLossError(FloatingPointError):
    """Training diverged (NaN/inf loss) and ``trainer.stop_on_nonfinite`` is set."""


def split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation) subsets from one seeded permutation: identical on every rank, and
    disjoint, so no validation sample is ever trained on."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1).")
    if val_fraction == 0.0:
        return dataset, None
    n = len(dataset)
    n_val = max(1, int(round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def split_from_config(cfg: DictConfig, dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """The split ``data.val_fraction`` asks for (0 = no validation set)."""
    fraction = float(cfg.data.get("val_fraction", 0.0) or 0.0)
    return split(dataset, fraction, seed=int(cfg.trainer.seed) + 7919)


def _batches(dataset: Dataset, shard: tuple[int, int] | None, batch_size: int, count: int):
    """This rank's validation indices in batches; every rank yields the same number of
    batches (a strategy's forward may be a collective: pipeline stages, tp shards, ZeRO-3),
    a rank short of data repeats its first batch with weight 0."""
    n = len(dataset)
    per_rank = -(-n // count)
    rounds = -(-per_rank // batch_size)
    mine = list(range(shard[0], n, shard[1])) if shard is not None else []
    for r in range(rounds):
        chunk = mine[r * batch_size:(r + 1) * batch_size]
        yield (chunk, True) if chunk else (mine[:batch_size] or [0], False)


@torch.no_grad()
def evaluate(strategy, dataset: Dataset, loss_fn, batch_size: int, precision, device: torch.device) -> float:
    """Mean loss over the whole validation set under any strategy: each rank runs its eval
    shard through ``strategy.eval_outputs``; the ranks that report add (loss x samples,
    samples); one all-reduce over the world gives every rank the same global mean."""
    strategy.prepare_eval()
    model = strategy.model
    was_training = model.training
    model.eval()
    shard = strategy.eval_shard()
    count = max(shard[1], 1) if shard is not None else 1
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * samples, samples)
    if shard is not None:
        for indices, real in _batches(dataset, shard, batch_size, count):
            batch = [dataset[i] for i in indices]
            inputs, targets = to_device(tuple(torch.stack(column) for column in zip(*batch)), device)
            outputs = strategy.eval_outputs(inputs, precision)
            if outputs is None or not real:
                continue
            outputs = outputs.float() if isinstance(outputs, torch.Tensor) else outputs  # a ModelOutput: the loss reads it
            loss = loss_fn(outputs, targets).double()
            total += torch.stack([loss * len(batch), torch.tensor(float(len(batch)), dtype=torch.float64,
                                                                  device=device)])
    comm.get().sum_(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def check_finite(step: int, name: str, value: float) -> None:
    """Raise NonFiniteLossError naming the step and the figure that diverged."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{name} became {value} at step {step} (training diverged; "
                                 f"lower optim.lr, or set trainer.stop_on_nonfinite=false to keep going)")
