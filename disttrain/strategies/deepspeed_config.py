"""The DeepSpeed JSON config, generated from disttrain's Hydra config so the two never disagree.

Batch sizes, accumulation and precision come from ``data.batch_size``, ``trainer.grad_accum_steps``
and ``trainer.precision``; the optimizer and scheduler are the ones built from ``optim=`` and
``scheduler=`` (passed to ``deepspeed.initialize`` as objects, so DeepSpeed's config holds none).
``strategy.config`` may add any other DeepSpeed key; setting one of the keys generated here is an
error that names the disttrain key to use instead.
"""
from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, OmegaConf

from disttrain.strategies import precision

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu")
#: DeepSpeed keys we generate -> the disttrain setting that owns each.
OWNED = {
    "train_batch_size": "data.batch_size (x trainer.grad_accum_steps x ranks)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "optimizer": "optim=<name> / optim.*",
    "scheduler": "scheduler=<name> / scheduler.*",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer": "strategy.offload_optimizer",
    "gradient_clipping": "trainer.grad_clip",
}


def _check_extra(extra: dict[str, Any]) -> None:
    for key, owner in OWNED.items():
        head, _, tail = key.partition(".")
        node = extra.get(head) if not tail else (extra.get(head) or {}).get(tail)
        if node is not None:
            raise ValueError(f"strategy.config.{key} is generated from {owner}: set that instead "
                             f"(the DeepSpeed config is built from disttrain's config so they cannot disagree).")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cfg: DictConfig, world_size: int, zero_stage: int, offload_optimizer: str = "none",
          extra: dict[str, Any] | None = None, pin_memory: bool = False) -> dict[str, Any]:
    """The config dict for ``deepspeed.initialize``; ValueError naming the key on bad input."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"strategy.zero_stage={zero_stage!r} must be one of 0, 1, 2, 3.")
    if offload_optimizer not in OFFLOAD_DEVICES:
        raise ValueError(f"strategy.offload_optimizer={offload_optimizer!r} must be none or cpu.")
    if offload_optimizer == "cpu" and zero_stage == 0:
        raise ValueError("strategy.offload_optimizer=cpu needs strategy.zero_stage >= 1 "
                         "(ZeRO-Offload moves the partitioned optimizer states).")
    extra = extra or {}
    _check_extra(extra)
    micro, accum = int(cfg.data.batch_size), int(cfg.trainer.grad_accum_steps)
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "zero_optimization": zero,
        # Our optimizer is a torch one (optim=...): keep it, even with ZeRO-Offload, instead of
        # DeepSpeed's compiled Adam; that also avoids compiling cpu_adam/fused_adam ops.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # disttrain's loop logs; DeepSpeed's own step lines would repeat it
        **precision.deepspeed_config(cfg),
    }
    # Always written: without the key DeepSpeed clips at 1.0 while no other strategy clips.
    grad_clip = OmegaConf.select(cfg, "trainer.grad_clip", default=None)
    config["gradient_clipping"] = float(grad_clip) if grad_clip is not None else 0.0
    return _merge(config, extra)
