"""Config validation: every bad setting is reported in one line naming the key and the
fix, before any worker starts."""
from __future__ import annotations

import datetime
import importlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from disttrain import env, schema

#: keys of the ``data`` group that configure the loader, not the dataset callable.
LOADER_KEYS = ("batch_size", "shuffle", "num_workers", "prefetch_factor", "pin_memory",
               "persistent_workers", "debug_delay_s",
               "val_fraction")  # the held-out split (disttrain.evaluate), not a dataset argument


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


def run_id() -> str:
    """A run-directory name every rank of one job computes identically: the launcher's job
    id when there is one (so a restarted or requeued job finds its own checkpoints), else
    a timestamp (single process, or the dev-run parent that then shares it)."""
    world = env.detect()
    if world.run_id:
        return world.run_id.replace("/", "_")
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("disttrain_run_id", run_id, use_cache=True, replace=True)
schema.register()  # conf/config.yaml's first default: the typed sections (disttrain/schema.py)


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


def _check_data_and_precision(cfg: DictConfig) -> None:
    from disttrain import precision
    from disttrain.data import loader

    try:
        loader.validate(cfg)
        precision.validate(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError for the first bad setting found."""
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
    _check_data_and_precision(cfg)
    from disttrain import observe  # metrics.* (issue 7)

    observe.validate(cfg)
    from disttrain import memory  # memory.* (issue 5)

    memory.validate(cfg)
    from disttrain import faults  # fault.* (issue 6)

    try:
        faults.validate(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    strategy_cls = import_target(cfg.strategy._target_, "strategy")
    _check_capabilities(cfg, strategy_cls)
    try:
        strategy_cls.validate(cfg, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_capabilities(cfg: DictConfig, strategy_cls) -> None:
    """Every feature the run asks for is one the strategy declares it honours."""
    from disttrain.engine.capabilities import refusal, requested

    target = str(cfg.strategy._target_)
    module = target.rsplit(".", 2)
    name = module[-2] if target.startswith("disttrain.strategies.") else target
    if name == "model_parallel":
        name += f" strategy.mode={cfg.strategy.get('mode', 'layer')}"
    message = refusal(name, strategy_cls.capabilities_for(cfg), requested(cfg))
    if message:
        raise ConfigError(message)


def planned_world_size(cfg: DictConfig) -> int:
    """World size this run will have: the launcher's, or dist.nproc_per_node for a dev run."""
    world = env.detect()
    return world.world_size if world.launcher != "single" else int(cfg.dist.nproc_per_node)


def dataset_kwargs(data_cfg: DictConfig) -> dict:
    """The data group minus loader settings: what the dataset callable receives."""
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in LOADER_KEYS}


def config_dir() -> str:
    """Absolute path of disttrain's configs: ``disttrain/conf`` inside the package (real files
    in a wheel or sdist; in a checkout or editable install a symlink to the top-level
    ``conf/`` users edit), else a ``conf/`` next to the package (a checkout without the link),
    overridable with $DISTTRAIN_CONFIG_DIR. Users add their own config directories on top
    with Hydra's ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``."""
    override = os.environ.get("DISTTRAIN_CONFIG_DIR")
    if override:
        return os.path.abspath(override)
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate.resolve())  # a checkout: the top-level conf/ itself
    raise ConfigError(f"cannot find disttrain's configs (no config.yaml in {here / 'conf'}): reinstall "
                      "disttrain, or set DISTTRAIN_CONFIG_DIR to a directory holding config.yaml.")
