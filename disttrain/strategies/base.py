"""The contract every strategy implements, and the pieces most of them share.

A strategy provides two things: ``setup`` parallelizes the model (cut, shard or replicate a
meta-device model, then materialize only this rank's part) and ``forward_backward`` runs the
step's micro-batches (plain accumulation with ``no_sync``, or a pipeline schedule) and leaves
data-parallel-averaged gradients on ``self.model``'s parameters. Everything around it, the
same for all strategies, is the engine's (``disttrain.engine.step``): zero_grad, autocast and
the fp16 loss scaler, clipping by the global norm, optimizer and scheduler.

Engines that own their whole step (DeepSpeed, the asynchronous parameter server) implement
``SelfStepping`` instead and receive the same settings (precision, clipping) in ``setup``.

What a strategy can honour is declared in ``capabilities`` and checked before any worker
starts (``disttrain.strategies.capabilities``). Optional views are explicit methods with safe
defaults (``pipeline_stages``, ``stage_group``, ``eval_outputs``), never ``hasattr`` probes.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from disttrain.strategies.capabilities import Capabilities
from disttrain.distributed.env import World

Batch = Sequence[torch.Tensor]  # (inputs, targets)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class StepStats:
    """What one optimizer step reports. ``loss`` stays a tensor so the loop decides when
    to pay for a device sync (only on logging steps); None on ranks that do not report."""

    loss: torch.Tensor | None
    samples: int
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The step settings every strategy honours the same way (from ``trainer.*``)."""

    precision: str = "32"            # 32 | bf16 | fp16
    grad_clip: float | None = None   # max global norm; None = off
    grad_accum_steps: int = 1


@dataclasses.dataclass
class SetupContext:
    """Everything a strategy needs to build its part of the model."""

    world: World
    device: torch.device
    model: Any                       # disttrain.parallel.materialize.ModelFactory
    cfg: DictConfig                  # read by strategies only for their own section and dist.*
    run_dir: Path
    settings: TrainSettings = TrainSettings()
    #: applies the ``memory`` section (activation checkpointing / offload) and then
    #: ``trainer.compile`` to a module whose children are blocks; strategies call it on what
    #: they keep (a stage, the whole model), before any data-parallel wrapper.
    apply_memory: Callable[[nn.Module], nn.Module] = lambda module: module
    #: only for SelfStepping strategies, which build their own optimizer and scheduler.
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    build_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    #: the training dataset, for strategies that measure on real inputs (pipeline balance=time).
    build_dataset: Callable[[], Any] | None = None


class Strategy(abc.ABC):
    """Parallelize the model; run forward/backward over a step's micro-batches."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    model: nn.Module  # this rank's part: what the optimizer steps and the checkpoint saves
    world: World

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        """Reject bad settings before any worker starts (raise ValueError naming the key)."""

    @classmethod
    def capabilities_for(cls, cfg: DictConfig) -> Capabilities:
        """What this strategy honours under ``cfg`` (a strategy with modes may differ per mode)."""
        return cls.capabilities

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> int | None:
        """How many ranks read different data (``data_shard()``'s count), known before any
        worker starts; None where one optimizer step has no global batch (free-running workers)."""
        return world_size

    @classmethod
    def expendable_ranks(cls, cfg: DictConfig, world_size: int) -> frozenset[int]:
        """Ranks whose death the job survives (a launcher-free run keeps the others going)."""
        return frozenset()

    @abc.abstractmethod
    def setup(self, ctx: SetupContext) -> None:
        """Build ``self.model`` (this rank's materialized part)."""

    @abc.abstractmethod
    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        """Gradients of the mean loss over the micro-batches, averaged over data parallelism."""

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's data-parallel shard."""
        return self.world.rank, self.world.world_size

    def stage_group(self) -> Any:
        """The group whose ranks hold disjoint parts of the model (pipeline stages): gradient
        norms are summed over it. None when every rank's part is complete or replicated."""
        return None

    def pipeline_stages(self) -> list:
        """torch PipelineStage objects on this rank; [] if not pipelined."""
        return []

    def stage_clock(self):
        """The one timing wrapper of this rank's pipeline stages (observers listen), or None."""
        return None

    def communicated_module(self):
        """The module whose gradient all-reduces can be hooked (DDP's wrapper), or None."""
        return None

    def eval_shard(self) -> tuple[int, int] | None:
        """(index, count) of the validation shard this rank runs, or None when it runs none."""
        return self.data_shard()

    def prepare_eval(self) -> None:
        """Collective hook before evaluation (e.g. fetch the current weights)."""

    @torch.no_grad()
    def eval_outputs(self, inputs: torch.Tensor, precision) -> torch.Tensor | None:
        """Model outputs for ``inputs`` (forward only), or None on ranks that do not report
        (their forward still runs where the others need it: pipeline stages, tp shards)."""
        with precision.autocast():
            return self.model(inputs)

    def state_dict_options(self):
        """torch.distributed.checkpoint StateDictOptions for model and optimizer.

        The optimizer state is flattened to per-parameter keys (``optim.state.<fqn>.exp_avg``,
        ``optim.param_groups.<fqn>.lr``) for every strategy, not kept per param-group index:
        a pipeline stage holds a subset of the parameters, so group 0 of one layout is not
        group 0 of another, and only FQN keys let one layout's checkpoint load into another."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    # ---- ranks outside the loop (the asynchronous parameter server's workers) ----------
    def loop_group(self) -> Any:
        """The group whose ranks run the loop's collectives (meter, checkpoints, evaluation,
        stop polls) on this rank; None = every rank of the job."""
        return None

    def reads_data(self) -> bool:
        """False on a rank whose steps use no batches (a parameter server): the loop then
        hands it None instead of loading batches on its critical path."""
        return True

    def runs_free(self) -> bool:
        """True on a rank that does not run the loop but ``work`` (no collectives at all)."""
        return False

    def work(self, loader, sampler, loss_fn, device, grad_accum: int, tick) -> dict[str, Any]:
        """A free-running rank's whole run; ``tick(n) -> bool`` reports a local stop signal."""
        raise TypeError(f"{type(self).__name__} runs every rank in the loop")

    def peer_stop(self) -> bool:
        """A free-running peer received a stop signal (the loop then stops the job)."""
        return False

    def clean_exit(self) -> bool:
        """False when a peer died: the teardown must not wait for it at a barrier."""
        return True

    def close(self) -> None:
        """Release resources (threads, servers); called once after training."""


class SelfStepping(Strategy):
    """An engine that owns its whole step (DeepSpeed, parameter server): ``train_step``
    replaces forward_backward + the engine's update; it holds optimizer and scheduler."""

    optimizer: Any = None
    scheduler: Any = None
    #: stop polls fall on multiples of this many steps (an engine whose ranks meet only there)
    stop_check_every: int = 1

    @abc.abstractmethod
    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats: ...

    def forward_backward(self, micro_batches, loss_fn, precision) -> StepStats:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} owns its step: call train_step")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def native_checkpoint(self):
        """An object with save_checkpoint(dir)/load_checkpoint(dir) (DeepSpeed's own format),
        or None when the DCP state dict above is the checkpoint."""
        return None


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


def samples_of(micro_batches: list[Batch]) -> int:
    return sum(len(b[0]) for b in micro_batches)
