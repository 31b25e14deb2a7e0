"""The one contract every strategy implements, and the pieces most of them share.

A strategy owns a whole optimizer step (forward, backward, communication, update) for the
micro-batches the loop hands it; the loop owns everything around it (data, logging,
checkpoint cadence). Keep this contract small: later strategies plug in without touching
the loop.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from disttrain import precision
from disttrain.env import World

Batch = Sequence[torch.Tensor]  # (inputs, targets)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class StepStats:
    """What one optimizer step reports. ``loss`` stays a tensor so the loop decides when
    to pay for a device sync (only on logging steps)."""

    loss: torch.Tensor | None
    samples: int
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SetupContext:
    """Everything a strategy needs to build its model and optimizer."""

    world: World
    device: torch.device
    build_model: Callable[[], nn.Module]
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    build_scheduler: Callable[[torch.optim.Optimizer], Any]
    cfg: DictConfig
    run_dir: Path


class Strategy(abc.ABC):
    """Base class: subclasses implement ``setup`` and ``train_step``; the state-dict
    methods below fit any strategy that holds one local model/optimizer/scheduler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    world: World
    #: steps between the loop's job-wide polls for a stop request (an all-reduce). 1 for
    #: synchronous strategies; asynchronous ones (param_server) raise it so that per-step
    #: polling does not re-synchronise workers that may run ahead of each other.
    stop_check_every: int = 1

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        """Reject bad settings before any worker starts (raise ValueError naming the key)."""

    @abc.abstractmethod
    def setup(self, ctx: SetupContext) -> None: ...

    @abc.abstractmethod
    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats: ...

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's data-parallel shard."""
        return self.world.rank, self.world.world_size

    def state_dict(self) -> dict[str, Any]:
        """A torch.distributed.checkpoint-compatible state (model, optimizer, scheduler)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        state.update(precision.strategy_state(self))  # fp16 loss-scaler state, when there is one
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        precision.load_strategy_state(self, state)

    def close(self) -> None:
        """Release resources (threads, servers); called once after training."""


def accumulate(model: nn.Module, micro_batches: list[Batch], loss_fn: LossFn,
               no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> torch.Tensor:
    """Forward and backward over k micro-batches with the loss divided by k, so k
    micro-batches of b give the gradient of one batch of k*b. ``no_sync`` (DDP's) wraps all
    but the last micro-step, so gradients are all-reduced once per step."""
    k = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (inputs, targets) in enumerate(micro_batches):
        ctx = no_sync() if (no_sync is not None and i < k - 1) else contextlib.nullcontext()
        with ctx:
            with autocast():
                loss = loss_fn(model(inputs), targets) / k
            scale(loss).backward()
        total += loss.detach().float()
    return total
