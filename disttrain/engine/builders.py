"""Turn the config groups into objects: model, dataset, loader, loss, optimizer, schedule.

Everything named by ``_target_`` is built through Hydra's instantiate, so a user's own
callable plugs in exactly like the reference ones.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from disttrain import memory
from disttrain.config.schema import section
from disttrain.config.validate import dataset_kwargs
from disttrain.data.sampler import ResumableBatchSampler
from disttrain.data import loader as loader_settings
from disttrain.parallel.materialize import ModelFactory, factory_from_config
from disttrain.strategies.base import TrainSettings


def model_factory(cfg: DictConfig) -> ModelFactory:
    """The run's model as a factory (see ``factory_from_config``)."""
    return factory_from_config(cfg)


def model_builder(cfg: DictConfig, run_dir=None) -> Callable[[], nn.Module]:
    """A function that builds the whole initialised model with the ``memory`` section
    applied: the single-process reference (tests, benchmarks, the plan's probe)."""

    def build() -> nn.Module:
        factory = model_factory(cfg)
        on_meta = torch.empty(()).is_meta  # called under `with torch.device("meta")`: shapes only
        return memory_applier(cfg, run_dir)(factory.meta() if on_meta else factory.full("cpu"))

    return build


def memory_applier(cfg: DictConfig, run_dir=None) -> Callable[[nn.Module], nn.Module]:
    """Applies the ``memory`` section (activation checkpointing / offload) to the part of
    the model a strategy keeps: the whole model, or a pipeline stage of blocks."""
    mem = section(cfg, "memory")
    return lambda module: memory.apply(module, mem, run_dir)


def block_applier(cfg: DictConfig, run_dir=None) -> Callable[[nn.Module], nn.Module]:
    """What every strategy applies per block to the part it keeps (``SetupContext.apply_memory``):
    the memory levers, then ``trainer.compile`` (so the compiled graph holds the recomputation,
    and data-parallel wrappers such as FSDP2's ``fully_shard`` come after both)."""
    from disttrain.engine.compile import compiler

    levers, compile_ = memory_applier(cfg, run_dir), compiler(cfg)
    return lambda module: compile_(levers(module))


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The step settings every strategy honours the same way (trainer.*)."""
    from disttrain.strategies.precision import configured

    clip = OmegaConf.select(cfg, "trainer.grad_clip", default=None)
    return TrainSettings(precision=configured(cfg), grad_clip=float(clip) if clip is not None else None,
                         grad_accum_steps=int(cfg.trainer.grad_accum_steps))


def optimizer_builder(cfg: DictConfig) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    factory = instantiate(cfg.optim)
    return lambda params: factory(params)


def scheduler_builder(cfg: DictConfig):
    factory = instantiate(cfg.scheduler)
    return lambda optimizer: factory(optimizer)


def build_dataset(cfg: DictConfig) -> Dataset:
    target = OmegaConf.create({"_target_": cfg.data._target_, **dataset_kwargs(cfg.data)})
    dataset = instantiate(target)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"data._target_={cfg.data._target_} must return a map-style Dataset "
                        "(__getitem__ and __len__) of (input, target) pairs")
    return dataset


def build_loader(cfg: DictConfig, dataset: Dataset, shard: tuple[int, int]) -> tuple[DataLoader, ResumableBatchSampler]:
    """A DataLoader over this rank's shard, driven by the resumable batch sampler."""
    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, rank=shard[0], world_size=shard[1],
                                    seed=cfg.trainer.seed, shuffle=cfg.data.get("shuffle", True),
                                    micro_per_step=int(OmegaConf.select(cfg, "trainer.grad_accum_steps", default=1)))
    loader = DataLoader(loader_settings.with_debug_delay(dataset, cfg), batch_sampler=sampler,
                        **loader_settings.loader_options(cfg, shard[0]))
    return loader, sampler


def build_loss(cfg: DictConfig) -> nn.Module:
    return instantiate(cfg.loss)
