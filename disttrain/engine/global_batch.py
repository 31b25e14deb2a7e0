"""``trainer.global_batch_size``: one number that fixes the data stream whatever the world size.

The sampler orders data by optimizer step over the whole job (disttrain.data.sampler), so two
runs with the same global batch see the same samples step for step, on 1 rank or on 8. A user
who resumes on another number of ranks keeps ``data.batch_size`` (the micro-batch, what fits
in memory) and the global batch; the accumulation steps are what changes:
``grad_accum_steps = global_batch_size / (data.batch_size x data-parallel ranks)``.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from disttrain.config.errors import ConfigError
from disttrain.config.validate import import_target


def resolve(cfg: DictConfig, world_size: int) -> DictConfig:
    """``cfg`` with ``trainer.grad_accum_steps`` derived from ``trainer.global_batch_size`` (a
    copy; ``cfg`` itself when the key is unset). ConfigError when it cannot be met."""
    wanted = OmegaConf.select(cfg, "trainer.global_batch_size", default=None)
    if wanted is None:
        return cfg
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ConfigError(f"trainer.global_batch_size={wanted!r} must be an integer >= 1 (or null).")
    strategy = import_target(cfg.strategy._target_, "strategy")
    try:
        dp = strategy.data_parallel_degree(cfg, world_size)
    except ValueError as exc:  # bad degrees: the strategy's own check names them
        raise ConfigError(str(exc)) from None
    if dp is None:
        raise ConfigError(f"trainer.global_batch_size is not defined for {strategy.__name__} (its workers step "
                          "on their own): set data.batch_size and trainer.grad_accum_steps instead.")
    micro = int(cfg.data.batch_size)
    if wanted % (micro * dp):
        raise ConfigError(f"trainer.global_batch_size={wanted} is not a multiple of data.batch_size={micro} x "
                          f"{dp} data-parallel ranks = {micro * dp}: choose a data.batch_size that divides "
                          f"{wanted // dp if wanted % dp == 0 else wanted} (or another global batch).")
    accum, given = wanted // (micro * dp), int(cfg.trainer.grad_accum_steps)
    if given not in (1, accum):
        raise ConfigError(f"trainer.grad_accum_steps={given} contradicts trainer.global_batch_size={wanted} "
                          f"(data.batch_size={micro} x {dp} ranks needs {accum}): unset one of them.")
    return OmegaConf.merge(cfg, {"trainer": {"grad_accum_steps": accum}})
