"""Generic config checks (positive counts, choices, importable targets, the resume path) and
small helpers on the raw config. Each subsystem checks its own section; the whole pre-flight
that runs them all before any worker starts is ``disttrain.engine.preflight.validate``."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from disttrain.config.errors import ConfigError
from disttrain.distributed import env

#: keys of the ``data`` group that configure the loader, not the dataset callable.
LOADER_KEYS = ("batch_size", "shuffle", "num_workers", "prefetch_factor", "pin_memory",
               "persistent_workers", "debug_delay_s",
               "val_fraction")  # the held-out split (disttrain.engine.evaluate), not a dataset argument


def import_target(path: str, key: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported ({exc}); "
                          f"give an importable 'package.module.callable'.") from None


def _positive(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}.")


def _check_targets(cfg: DictConfig) -> None:
    for group in ("strategy", "model", "data", "optim", "loss", "scheduler"):
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            raise ConfigError(f"{group} has no _target_: choose one with {group}=<name> "
                              f"or set {group}._target_=package.module.callable.")
        import_target(node._target_, group)


def _check_resume(cfg: DictConfig) -> None:
    resume = str(cfg.checkpoint.resume)
    if resume in ("auto", "never"):
        return
    if not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume={resume} does not exist: give a checkpoint directory "
                          f"(…/checkpoints/step_N), 'auto' or 'never'.")


def check_core(cfg: DictConfig) -> None:
    """The checks that need no subsystem: counts, choices, importable targets, resume path."""
    for key in ("trainer.max_steps", "trainer.grad_accum_steps", "data.batch_size",
                "dist.nproc_per_node", "trainer.log_every", "checkpoint.keep"):
        _positive(cfg, key)
    _positive(cfg, "checkpoint.every_steps", minimum=0)
    if cfg.dist.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"dist.backend={cfg.dist.backend!r} must be auto, gloo or nccl.")
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s={cfg.dist.timeout_s} must be > 0.")
    if cfg.trainer.progress not in ("auto", "bar", "log"):
        raise ConfigError(f"trainer.progress={cfg.trainer.progress!r} must be auto, bar or log.")
    _check_targets(cfg)
    _check_resume(cfg)
    _check_hsdp_keys(cfg)


def _check_hsdp_keys(cfg: DictConfig) -> None:
    """dist.dp_replicate / dist.dp_shard split FSDP's data parallelism; elsewhere they would be ignored."""
    keys = [key for key in ("dist.dp_replicate", "dist.dp_shard") if OmegaConf.select(cfg, key) is not None]
    target = str(cfg.strategy._target_)
    sharded_pipeline = target.startswith("disttrain.strategies.pipeline.") and \
        cfg.strategy.get("data_parallel", "replicate") == "shard"
    if keys and not (target.startswith("disttrain.strategies.fsdp.") or sharded_pipeline):
        raise ConfigError(f"{' and '.join(keys)} (HSDP) apply only to strategy=fsdp or strategy=pipeline "
                          "strategy.data_parallel=shard: unset them, or use dist.dp.")


def planned_world_size(cfg: DictConfig) -> int:
    """World size this run will have: the launcher's, or dist.nproc_per_node for a dev run."""
    world = env.detect()
    return world.world_size if world.launcher != "single" else int(cfg.dist.nproc_per_node)


def dataset_kwargs(data_cfg: DictConfig) -> dict:
    """The data group minus loader settings: what the dataset callable receives."""
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in LOADER_KEYS}
