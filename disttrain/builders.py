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
from disttrain.config import dataset_kwargs
from disttrain.data.sampler import ResumableBatchSampler
from disttrain.data import loader as loader_settings


def model_builder(cfg: DictConfig, run_dir=None) -> Callable[[], nn.Module]:
    """A function that builds the model with the run's seed: every rank (and the
    single-process reference) starts from identical weights. The ``memory`` section
    (activation checkpointing/offload) is applied here, so every strategy gets it."""

    def build() -> nn.Module:
        torch.manual_seed(cfg.trainer.seed)
        model = instantiate(cfg.model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model._target_={cfg.model._target_} returned {type(model).__name__}, not nn.Module")
        return memory.apply(model, cfg, run_dir)

    return build


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
                                    seed=cfg.trainer.seed, shuffle=cfg.data.get("shuffle", True))
    loader = DataLoader(loader_settings.with_debug_delay(dataset, cfg), batch_sampler=sampler,
                        **loader_settings.loader_options(cfg, shard[0]))
    return loader, sampler


def build_loss(cfg: DictConfig) -> nn.Module:
    return instantiate(cfg.loss)
