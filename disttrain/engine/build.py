"""From a config to a ready engine: instantiate the strategy, let it parallelize the
model, then put the one optimizer step around it (or the strategy's own engine).
Used by the run, the benchmarks and in-process tests alike."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from disttrain.engine import builders
from disttrain.engine.step import Engine, SelfSteppingEngine
from disttrain.distributed.env import World
from disttrain.strategies.precision import Precision
from disttrain.strategies.base import SelfStepping, SetupContext, Strategy


def setup_context(cfg: DictConfig, world: World, device: torch.device, run_dir: Path | None) -> SetupContext:
    return SetupContext(world=world, device=device, model=builders.model_factory(cfg), cfg=cfg, run_dir=run_dir,
                        settings=builders.train_settings(cfg), apply_memory=builders.block_applier(cfg, run_dir),
                        build_optimizer=builders.optimizer_builder(cfg),
                        build_scheduler=builders.scheduler_builder(cfg),
                        build_dataset=lambda: builders.build_dataset(cfg))


def build_engine(cfg: DictConfig, world: World, device: torch.device, run_dir: Path | None = None):
    """(strategy, engine) for ``cfg`` on this rank; the process group must be up."""
    strategy: Strategy = instantiate(cfg.strategy)
    ctx = setup_context(cfg, world, device, run_dir)
    strategy.setup(ctx)
    if isinstance(strategy, SelfStepping):
        return strategy, SelfSteppingEngine(strategy)
    optimizer = ctx.build_optimizer(strategy.model.parameters())
    scheduler = ctx.build_scheduler(optimizer)
    precision = Precision(ctx.settings.precision, device)
    return strategy, Engine(strategy, optimizer, scheduler, precision, ctx.settings.grad_clip)
