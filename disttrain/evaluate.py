"""Held-out validation: a seeded train/validation split of the dataset, and an evaluation
that runs on every rank's shard of the validation set and all-reduces one global mean.

A sweep must rank trials by how well they generalise, not by the training loss they
happened to reach, so the objective of a trial is this validation loss.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, Subset

from disttrain.loop import to_device


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


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward may broadcast buffers (a collective); ranks can hold different numbers
    # of validation batches, so evaluation uses the plain local module.
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, loss_fn, batch_size: int, shard: tuple[int, int],
             device: torch.device) -> float:
    """Mean loss over the whole validation set: this rank evaluates indices
    ``shard[0]::shard[1]``; sums and counts are all-reduced (a collective: every rank calls)."""
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * samples, samples)
    indices = list(range(shard[0], len(dataset), shard[1]))
    for start in range(0, len(indices), batch_size):
        batch = [dataset[i] for i in indices[start:start + batch_size]]
        inputs, targets = to_device(tuple(torch.stack(column) for column in zip(*batch)), device)
        loss = loss_fn(module(inputs), targets)
        total += torch.stack([loss.double() * len(batch), torch.tensor(float(len(batch)), dtype=torch.float64,
                                                                       device=device)])
    if dist.is_initialized() and shard[1] > 1:
        dist.all_reduce(total)
    module.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def check_finite(step: int, name: str, value: float) -> None:
    """Raise NonFiniteLossError naming the step and the figure that diverged."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{name} became {value} at step {step} (training diverged; "
                                 f"lower optim.lr, or set trainer.stop_on_nonfinite=false to keep going)")
