"""The one optimizer step, the same for every strategy that does not own its engine.

    zero_grad -> strategy.forward_backward (autocast, loss scale, dp-averaged gradients)
              -> unscale (fp16; found-inf agreed by all ranks) -> clip by the global norm
              -> optimizer.step (skipped on fp16 overflow) -> scheduler.step

``Engine`` also owns what the step updates (optimizer, scheduler, loss-scaler state) and so
their checkpoint state; ``SelfSteppingEngine`` gives DeepSpeed and the parameter server the
same face for the loop.
"""
from __future__ import annotations

from typing import Any

from disttrain.parallel.clip import clip_grad_norm
from disttrain.strategies.precision import Precision
from disttrain.strategies.base import Batch, LossFn, SelfStepping, StepStats, Strategy


class Engine:
    """Drives one strategy: its model part, the optimizer over that part, the schedule."""

    owns_step = True
    stop_check_every = 1  # synchronous: a stop request is polled every step

    def __init__(self, strategy: Strategy, optimizer, scheduler, precision: Precision, grad_clip: float | None):
        self.strategy, self.optimizer, self.scheduler = strategy, optimizer, scheduler
        self.precision, self.grad_clip = precision, grad_clip
        self.params = [p for p in strategy.model.parameters() if p.requires_grad]

    @property
    def model(self):
        return self.strategy.model

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.strategy.forward_backward(micro_batches, loss_fn, self.precision)
        self.precision.unscale_(self.optimizer)
        if self.grad_clip is not None:
            norm = clip_grad_norm(self.params, self.grad_clip, self.strategy.stage_group())
            stats.extra["grad_norm"] = float(norm)
        stats.extra.update(self.precision.step(self.optimizer, self.scheduler))
        return stats

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """model / optim / scheduler (+ loss scaler) for torch.distributed.checkpoint; the
        model keys are the unsplit model's FQNs, whatever this rank holds."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = self.strategy.state_dict_options()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}
        if self.precision.scaler is not None:
            state["precision"] = self.precision.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.strategy.state_dict_options())
        self.scheduler.load_state_dict(state["scheduler"])
        if "precision" in state:
            self.precision.load_state_dict(state["precision"])

    def load_weights(self, full: dict[str, Any]) -> None:
        """The full model's weights (another engine's checkpoint) into this rank's part: a stage
        takes its own keys, a shard its slice; the optimizer state starts again."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        mine = {name for name, _ in self.model.state_dict().items()}
        set_model_state_dict(self.model, {k: v for k, v in full.items() if k in mine},
                             options=StateDictOptions(full_state_dict=True))
        # get_state_dict (called to build the restore target) initialises the optimizer state
        # with a zero-gradient step; a fresh start must not count it (Adam's bias correction)
        self.optimizer.state.clear()

    def native_checkpoint(self):
        return None

    def peer_stop(self) -> bool:
        return self.strategy.peer_stop()

    def close(self) -> None:
        self.strategy.close()


class SelfSteppingEngine:
    """The Engine face over a strategy that owns its step (DeepSpeed, parameter server)."""

    owns_step = False

    def __init__(self, strategy: SelfStepping):
        self.strategy = strategy
        self.stop_check_every = strategy.stop_check_every

    @property
    def model(self):
        return self.strategy.model

    @property
    def optimizer(self):
        return self.strategy.optimizer

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        return self.strategy.train_step(micro_batches, loss_fn)

    def lr(self) -> float | None:
        optimizer = self.strategy.optimizer
        return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)

    def load_weights(self, full: dict[str, Any]) -> None:
        raise RuntimeError(f"{type(self.strategy).__name__} cannot start from another engine's weights: resume "
                           "it from its own checkpoints, or start a new run dir.")

    def native_checkpoint(self):
        return self.strategy.native_checkpoint()

    def peer_stop(self) -> bool:
        return self.strategy.peer_stop()

    def close(self) -> None:
        self.strategy.close()
