"""Launcher-free dev runs: start ``dist.nproc_per_node`` local workers through torch's
elastic agent (the machinery behind torchrun), so no launcher is needed on one machine."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from disttrain.distributed import forkserver
from disttrain.distributed.process_group import free_port

log = logging.getLogger("disttrain")


def _worker(entry: Callable[[DictConfig, Path], dict], container: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Entry point of each spawned worker (module level: it must pickle)."""
    return entry(OmegaConf.create(container), Path(run_dir))


def launch_local(cfg: DictConfig, run_dir: Path, entry: Callable[[DictConfig, Path], dict],
                 expendable: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Run ``entry(cfg, run_dir)`` (a module-level function: the engine's ``run_rank``) on
    ``dist.nproc_per_node`` local processes; return rank 0's summary. The launcher is given
    the entry instead of importing the engine, so this layer stays below it. ``expendable``:
    ranks whose death the job survives (disttrain.distributed.supervise runs those jobs)."""
    if expendable:
        from disttrain.distributed.supervise import launch_tolerant

        return launch_tolerant(cfg, run_dir, entry, expendable)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = int(cfg.dist.nproc_per_node)
    # Each worker gets one intra-op thread per core it may use, as torchrun does.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dev-{run_dir.name}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_configs={"timeout": 120},
        max_restarts=int(cfg.dist.get("max_restarts", 0)), start_method=forkserver.start_method(), monitor_interval=0.1,
    )
    forkserver.context(entry.__module__)  # the workers fork from a server that imported the engine once
    container = OmegaConf.to_container(cfg, resolve=True)
    log.info("starting %d local workers (dev run); run dir %s", nproc, run_dir)
    results = elastic_launch(config, _worker)(entry, container, str(run_dir))
    return results[0]
