"""Mixed precision from one key, ``trainer.precision`` = 32 | bf16 | fp16, for every strategy.

What each mode does:

* ``32``: nothing (autocast off, no scaler).
* ``bf16``: ``torch.autocast`` runs the forward in bfloat16 where it is safe; bf16 has fp32's
  exponent range, so no loss scaling is needed. Works on CPU and GPU.
* ``fp16``: autocast in float16 plus torch's dynamic loss scaler (``torch.amp.GradScaler``): the
  loss is multiplied by the scale before backward, gradients are unscaled before the update,
  a step whose gradients hold inf/nan is skipped (optimizer *and* scheduler) and the scale is
  lowered; after ``growth_interval`` clean steps it grows again. CPU fp16 autocast and the CPU
  GradScaler exist since torch 2.3/2.4; older versions get a clear error.

Parameters, gradients and optimizer state stay fp32 (autocast casts copies for the matmuls),
so the "master weights" are simply the model's own parameters: no second copy to keep in sync.

The engine's step (disttrain.engine.step) owns it: strategies call ``autocast`` and ``scale``
inside ``forward_backward``; the engine calls ``unscale_`` (before clipping) and ``step``.

DeepSpeed keeps its own scaler: a DeepSpeed strategy takes ``deepspeed_config(cfg)`` into its
config instead of calling ``step``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("disttrain")

MODES = ("32", "bf16", "fp16")
_ALIASES = {"32": "32", "fp32": "32", "float32": "32", "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "16": "fp16", "float16": "fp16"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def normalize(value: Any) -> str:
    """The canonical mode for a config value (Hydra turns ``trainer.precision=32`` into an int)."""
    mode = _ALIASES.get(str(value).lower())
    if mode is None:
        raise ValueError(f"trainer.precision={value!r} is not a precision: use 32, bf16 or fp16.")
    return mode


def configured(cfg: DictConfig) -> str:
    """The run's mode (32 when the key is absent, e.g. in hand-built configs)."""
    return normalize(OmegaConf.select(cfg, "trainer.precision", default=32))


def validate(cfg: DictConfig) -> None:
    """Reject an unknown mode, or fp16 where this torch has no CPU fp16 autocast, up front."""
    mode = configured(cfg)
    if mode == "fp16" and not torch.cuda.is_available() and not _cpu_fp16_supported():
        raise ValueError(f"trainer.precision=fp16 needs CPU float16 autocast (torch>=2.4; this is "
                         f"{torch.__version__}): use trainer.precision=bf16 on CPU.")


def _cpu_fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return True
    except (RuntimeError, ValueError):
        return False


def _scaler(device_type: str, init_scale: float, growth_interval: int):
    """torch's dynamic loss scaler; with several ranks the sharded variant, whose unscale_
    all-reduces found-inf over the world so all ranks skip (or take) the same steps."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type, init_scale=init_scale, growth_interval=growth_interval)
    return torch.amp.GradScaler(device_type, init_scale=init_scale, growth_interval=growth_interval)


class Precision:
    """Autocast, loss scaling and the guarded optimizer step for one mode on one device."""

    def __init__(self, mode: Any = 32, device: torch.device | str = "cpu", init_scale: float = 2.0**16,
                 growth_interval: int = 2000):
        self.mode = normalize(mode)
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES.get(self.mode)
        self.scaler = _scaler(self.device_type, init_scale, growth_interval) if self.mode == "fp16" else None
        self.skipped = 0  # steps skipped for inf/nan gradients, over the whole run

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (and loss); backward runs outside it, as torch advises."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on (multiplied by the loss scale in fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: divide the gradients by the loss scale before clipping; the inf/nan check
        is agreed by every rank (each holds only its shard or stage of the gradients)."""
        if self.scaler is not None:
            # A rank that never computed the loss (a first pipeline stage) holds scaled
            # gradients too; scaling a dummy sets up its scaler's state for this step.
            self.scaler.scale(torch.zeros((), device=self.device_type))
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict[str, float]:
        """Update (unless fp16 gradients overflowed), step the scheduler with it, and return
        figures for StepStats.extra (``loss_scale`` and ``skipped_step`` in fp16)."""
        if self.scaler is None:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            return {}
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscales, checks for inf/nan, calls optimizer.step only if clean
        self.scaler.update()
        after = self.scaler.get_scale()
        skipped = after < before  # the scale only backs off when inf/nan was found
        if skipped:
            self.skipped += 1
            log.warning("fp16: inf/nan gradients, optimizer step skipped (%d so far); loss scale %g -> %g",
                        self.skipped, before, after)
        elif scheduler is not None:  # a skipped update must not advance the schedule either
            scheduler.step()
        return {"loss_scale": after, "skipped_step": float(skipped)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Scaler state as tensors (torch.distributed.checkpoint saves tensors natively)."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {"scale": torch.tensor(float(state.get("scale", self.scaler.get_scale())), dtype=torch.float64),
                "growth_tracker": torch.tensor(int(state.get("_growth_tracker", 0)), dtype=torch.int64),
                "skipped": torch.tensor(self.skipped, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.scaler is None or not state:
            return
        self.scaler.load_state_dict({"scale": float(state["scale"]), "_growth_tracker": int(state["growth_tracker"]),
                                     "growth_factor": self.scaler.get_growth_factor(),
                                     "backoff_factor": self.scaler.get_backoff_factor(),
                                     "growth_interval": self.scaler.get_growth_interval()})
        self.skipped = int(state["skipped"])


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``bf16`` / ``fp16`` sections of a DeepSpeed config for ``trainer.precision``, so a
    DeepSpeed run takes its precision from the same key (loss_scale 0 = DeepSpeed's dynamic
    scaler, starting at 2**16 like torch's)."""
    mode = configured(cfg)
    return {"bf16": {"enabled": mode == "bf16"},
            "fp16": {"enabled": mode == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
