"""Where the configs live and the ``${disttrain_run_id:}`` resolver the run directory uses."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from omegaconf import OmegaConf

from disttrain.config import schema
from disttrain.config.errors import ConfigError
from disttrain.distributed import env


def run_id() -> str:
    """A run-directory name every rank of one job computes identically: the launcher's job
    id when there is one (so a restarted or requeued job finds its own checkpoints), else
    a timestamp (single process, or the dev-run parent that then shares it)."""
    world = env.detect()
    if world.run_id:
        return world.run_id.replace("/", "_")
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("disttrain_run_id", run_id, use_cache=True, replace=True)
schema.register()  # conf/config.yaml's first default: the typed sections (disttrain/config/schema.py)


def config_dir() -> str:
    """Absolute path of disttrain's configs: ``disttrain/conf`` inside the package (real files
    in a wheel or sdist; in a checkout or editable install a symlink to the top-level
    ``conf/`` users edit), else a ``conf/`` next to the package (a checkout without the link),
    overridable with $DISTTRAIN_CONFIG_DIR. Users add their own config directories on top
    with Hydra's ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``."""
    override = os.environ.get("DISTTRAIN_CONFIG_DIR")
    if override:
        return os.path.abspath(override)
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate.resolve())  # a checkout: the top-level conf/ itself
    raise ConfigError(f"cannot find disttrain's configs (no config.yaml in {package / 'conf'}): reinstall "
                      "disttrain, or set DISTTRAIN_CONFIG_DIR to a directory holding config.yaml.")
