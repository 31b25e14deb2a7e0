"""The ``disttrain`` Hydra application: validate, then train here or start local workers."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from disttrain import config as config_mod, env

log = logging.getLogger("disttrain")


def train_job(cfg: DictConfig) -> dict:
    """One Hydra job (one run, or one trial of a sweep)."""
    world = env.detect()
    config_mod.validate(cfg, config_mod.planned_world_size(cfg))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if world.launcher == "single" and cfg.dist.nproc_per_node > 1:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        from disttrain.launch_local import launch_local

        return launch_local(cfg, run_dir)
    from disttrain.run import run_rank

    return run_rank(cfg, run_dir)


def hydra_main() -> None:
    """Entry for the Hydra app; errors in the config print as one line, exit code 2."""
    app = hydra.main(config_path=config_mod.config_dir(), config_name="config", version_base="1.3")(_job)
    app()


def _job(cfg: DictConfig):
    try:
        from disttrain.sweep import run_job  # a sweep trial returns its objective; failures are recorded

        return run_job(cfg, train_job)
    except config_mod.ConfigError as exc:
        print(f"disttrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
