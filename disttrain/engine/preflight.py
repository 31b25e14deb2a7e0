"""The pre-flight check: every bad setting is reported in one line naming the key and the
fix, before any worker starts. It lives in the engine because it asks every subsystem the
engine composes (data, precision, observe, memory, resilience, the strategy) to check its
own section; the lower layers never import each other for it."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from disttrain import memory, observe
from disttrain.config.errors import ConfigError
from disttrain.config.validate import check_core, import_target
from disttrain.data import loader
from disttrain.engine import compile as compile_, global_batch
from disttrain.resilience import guard
from disttrain.strategies import precision
from disttrain.strategies.capabilities import refusal, requested


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError for the first bad setting found."""
    check_core(cfg)
    cfg = global_batch.resolve(cfg, world_size)  # the accumulation the ranks will use
    for check in (loader.validate, precision.validate, observe.validate, memory.validate, guard.validate):
        try:
            check(cfg)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    strategy_cls = import_target(cfg.strategy._target_, "strategy")
    _check_capabilities(cfg, strategy_cls)
    _check_async_save(cfg, strategy_cls)
    try:
        compile_.validate(cfg)  # after the strategy's refusal: that one is the better message
        strategy_cls.validate(cfg, world_size)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_async_save(cfg: DictConfig, strategy_cls) -> None:
    """Background saves go through torch.distributed.checkpoint on every rank of the job; an
    engine that owns its step also owns its checkpoint (DeepSpeed's format, the parameter
    server's servers-only saves)."""
    from disttrain.strategies.base import SelfStepping

    if OmegaConf.select(cfg, "checkpoint.async_save", default=False) and issubclass(strategy_cls, SelfStepping):
        name = str(cfg.strategy._target_).rsplit(".", 2)[-2]
        raise ConfigError(f"checkpoint.async_save=true is not available with strategy={name}, which writes its "
                          "own checkpoints: set checkpoint.async_save=false (or another strategy).")


def _check_capabilities(cfg: DictConfig, strategy_cls) -> None:
    """Every feature the run asks for is one the strategy declares it honours."""
    target = str(cfg.strategy._target_)
    module = target.rsplit(".", 2)
    name = module[-2] if target.startswith("disttrain.strategies.") else target
    if name == "model_parallel":
        name += f" strategy.mode={cfg.strategy.get('mode', 'layer')}"
    message = refusal(name, strategy_cls.capabilities_for(cfg), requested(cfg))
    if message:
        raise ConfigError(message)
