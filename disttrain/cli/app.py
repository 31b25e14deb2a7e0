"""The ``disttrain`` Hydra application: validate, then train here or start local workers."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from disttrain.config import schema
from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.config.validate import planned_world_size
from disttrain.distributed import env
from disttrain.engine.preflight import validate

log = logging.getLogger("disttrain")


def train_job(cfg: DictConfig) -> dict:
    """One Hydra job (one run, or one trial of a sweep)."""
    world = env.detect()
    validate(cfg, planned_world_size(cfg))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if world.rank == 0:
        from disttrain.checkpoint.origin import refuse_other_model

        refuse_other_model(cfg, run_dir)  # one line before any worker starts, not a failed restore
    if world.launcher == "single" and cfg.dist.nproc_per_node > 1:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        from disttrain.config.validate import import_target
        from disttrain.distributed.local import launch_local
        from disttrain.engine.run import run_rank

        strategy_cls = import_target(cfg.strategy._target_, "strategy")
        expendable = strategy_cls.expendable_ranks(cfg, int(cfg.dist.nproc_per_node))
        return launch_local(cfg, run_dir, run_rank, expendable)
    from disttrain.engine.run import run_rank

    return run_rank(cfg, run_dir)


#: Hydra prints its own composition errors (a type disttrain.config.schema refuses, a missing group
#: option) in several lines with exit code 1, unless $HYDRA_FULL_ERROR is 1: then it re-raises
#: them. hydra_main sets it while Hydra composes (unless the user did), catches those errors,
#: and _job puts the user's value back while a job runs, so training errors keep Hydra's report.
_FULL_ERROR = "HYDRA_FULL_ERROR"
_user_full_error: list[str | None] = []  # [the user's value] while hydra_main owns the variable


def _set_full_error(value: str | None) -> None:
    if value is None:
        os.environ.pop(_FULL_ERROR, None)
    else:
        os.environ[_FULL_ERROR] = value


def hydra_main() -> None:
    """Entry for the Hydra app; errors in the config print as one line, exit code 2."""
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_job)
    if os.environ.get(_FULL_ERROR) == "1":  # the user asked for Hydra's full traceback
        app()
        return
    _user_full_error[:] = [os.environ.get(_FULL_ERROR)]
    _set_full_error("1")
    try:
        app()
    except schema.COMPOSE_ERRORS as exc:
        print(f"disttrain: config error: {schema.explain(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        _set_full_error(_user_full_error.pop())


def _job(cfg: DictConfig):
    if _user_full_error:  # composed: while the job runs, the user's environment
        _set_full_error(_user_full_error[0])
    try:
        from disttrain.sweep.job import run_job  # a sweep trial returns its objective; failures are recorded

        result = run_job(cfg, train_job)
    except ConfigError as exc:
        print(f"disttrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    if _user_full_error:  # the next trial of a multirun is composed after this one
        _set_full_error("1")
    return result
