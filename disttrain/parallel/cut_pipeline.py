"""What the pipeline strategy needs for a model cut by FQN (disttrain.parallel.fqn_split):
the sample the cut is traced with, the blocks per stage, the model inputs every stage
receives, and the tied parameters whose copies live on different stages.

Tied weights (input embedding == output projection): the first stage holds the embedding's
copy, the last the head's. After each step's backward passes the copies' gradients are
summed between the ranks that hold them, which is the unsplit model's gradient of the one
tensor; the copies start equal (broadcast from the holder of the first name) and receive
equal gradients and optimizer updates, so they stay equal. The copies not holding the first
name are marked ``DUPLICATE`` (disttrain.parallel.clip.TIED_DUPLICATE) so that the global
gradient norm counts the tensor once.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from disttrain.config.validate import dataset_kwargs
from disttrain.parallel import clip, fqn_split, split, tensor
from disttrain.parallel.materialize import seeded_by_module

#: schedules that keep one stage per rank (the cut model's stage module is the rank's model)
ONE_STAGE_SCHEDULES = ("gpipe", "1f1b")
#: attribute set on the copies of a tied parameter that are not the first name's holder:
#: the global gradient norm must count the tensor once
DUPLICATE = clip.TIED_DUPLICATE


def sample_input(cfg: DictConfig, micro: int) -> Any:
    """One micro-batch of model inputs (dataset item 0 repeated): shapes for the trace."""
    node = OmegaConf.create({"_target_": cfg.data._target_, **dataset_kwargs(cfg.data)})
    item = instantiate(node)[0][0]
    main, _ = split_inputs(item)
    return torch.as_tensor(main).unsqueeze(0).expand(max(1, micro), *torch.as_tensor(main).shape).clone()


def split_inputs(inputs: Any, key: str = "input_ids") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the model's first argument, the other keyword inputs) of a batch's inputs: a tensor,
    or a dict such as {input_ids, attention_mask, position_ids} (batch first in each)."""
    if not isinstance(inputs, Mapping):
        return inputs, {}
    main_key = key if key in inputs else next(iter(inputs))
    return inputs[main_key], {k: v for k, v in inputs.items() if k != main_key}


def stage_counts(meta: nn.Module, plan: fqn_split.CutPlan, stages: int, balance: Any,
                 split_points: Sequence[str] | None) -> list[int]:
    """Blocks per stage: ``strategy.split_points`` when given, else ``strategy.balance``
    (params: the blocks' parameters plus the embedding on the first and the head on the last)."""
    if stages > len(plan.names):
        raise ValueError(f"{stages} pipeline stages but {plan.blocks} holds only {len(plan.names)} blocks: use "
                         "fewer stages (dist.pp) or a deeper model.")
    if split_points:
        return fqn_split.counts_from_split_points(plan, list(split_points), stages)
    if balance == "time":
        raise ValueError("strategy.balance=time measures the layers of an nn.Sequential; for a model cut by "
                         "module name use strategy.balance=params, a list of block counts, or strategy.split_points.")
    if balance == "params":
        return split.partition(fqn_split.block_weights(meta, plan), stages)
    counts = [int(c) for c in balance]
    split.check_explicit(counts, len(plan.names), stages)
    return counts


def check_schedule(schedule: str, model: nn.Module) -> None:
    if schedule not in ONE_STAGE_SCHEDULES:
        raise ValueError(f"strategy.schedule={schedule} places several stages on a rank; {type(model).__name__} "
                         f"is cut by module name, which runs one stage per rank: use strategy.schedule=1f1b or gpipe.")


def stage_bounds(counts: list[int], stage: int) -> tuple[int, int]:
    start = sum(counts[:stage])
    return start, start + counts[stage]


class TiedCopies:
    """The tied parameters of this rank's stage whose other copies live on other pipeline
    ranks, with one process group per holder set (created collectively on every rank)."""

    def __init__(self, plan: fqn_split.CutPlan, counts: list[int], stage: nn.Module, mesh, pp_rank: int):
        holders = [self._holders(plan, counts, group) for group in plan.tied]
        self.synced: list[tuple[nn.Parameter, Any, int]] = []   # (param, group, src global rank)
        here = dict(stage.named_parameters(remove_duplicate=False))
        pp_dim = mesh.mesh_dim_names.index("pp")
        lines = mesh.mesh.movedim(pp_dim, -1).reshape(-1, mesh.mesh.shape[pp_dim]).tolist()
        for group, stages_of in zip(plan.tied, holders):
            ranks_pp = sorted(set(stages_of.values()))
            if len(ranks_pp) < 2:
                continue  # all copies on one stage: tied in place
            mine = None
            for line in lines:  # one group per (dp, tp) coordinate, the same order on every rank
                ranks = [line[r] for r in ranks_pp]
                pg = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = (pg, line[stages_of[group[0]]])
            names = [n for n in group if n in here]
            if names and mine is not None:
                param = here[names[0]]
                if stages_of[group[0]] != pp_rank:
                    setattr(param, DUPLICATE, True)
                self.synced.append((param, *mine))

    @staticmethod
    def _holders(plan: fqn_split.CutPlan, counts: list[int], group: tuple[str, ...]) -> dict[str, int]:
        """The stage (= pipeline rank, one stage per rank) holding each name of a tied group."""
        stages = len(counts)
        where = {}
        for name in group:
            if any(fqn_split.within(name, fqn) for fqn in plan.first):
                where[name] = 0
            elif any(fqn_split.within(name, fqn) for fqn in plan.last):
                where[name] = stages - 1
            else:
                index = next(i for i, n in enumerate(plan.names) if fqn_split.within(name, plan.block_fqn(i)))
                where[name] = next(s for s in range(stages) if index < sum(counts[:s + 1]))
        return where

    @torch.no_grad()
    def start_equal(self) -> None:
        """Every copy takes the first name's holder's initial value."""
        for param, group, src in self.synced:
            dist.broadcast(param.data, src=src, group=group)

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Each copy's gradient becomes the sum over the copies: the tensor's full gradient."""
        for param, group, _ in self.synced:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)

    def __len__(self) -> int:
        return len(self.synced)


def select_key(cfg: DictConfig) -> str:
    """The field of a dict / dataclass model output the loss reads (``loss.output_key``)."""
    return str(OmegaConf.select(cfg, "loss.output_key", default="logits") or "logits")



def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def validate(cfg: DictConfig, meta: nn.Module, pp: int, tp: int, schedule: str, data_parallel: str,
             micro_batches: int) -> None:
    """Pre-flight for a model cut by module name: it can be cut (traced on meta), the
    schedule runs one stage per rank, the stages and the tensor plan fit, and it can be
    initialised under the chosen data parallelism."""
    s = cfg.strategy
    check_schedule(schedule, meta)
    every = OmegaConf.select(cfg, "memory.checkpoint_every", default=1) or 1
    if OmegaConf.select(cfg, "memory.activation_checkpointing", default="none") == "every_n" and every > 1:
        raise ValueError(f"memory.activation_checkpointing=every_n groups the layers of an nn.Sequential; "
                         f"{type(meta).__name__} is cut by module name: use memory.activation_checkpointing=full.")
    if OmegaConf.select(cfg, "trainer.compile", default=False):
        raise ValueError(f"trainer.compile=true is not supported for {type(meta).__name__} under pipeline stages cut "
                         "by module name: set trainer.compile=false.")
    plan = fqn_split.plan_cut(meta, sample_input(cfg, cfg.data.batch_size // max(1, micro_batches)))
    balance = _plain(s.get("balance", "params"))
    counts = stage_counts(meta, plan, pp, balance, _plain(s.get("split_points", None)))
    if tp > 1:
        tensor.check_divisible(meta, tp, _plain(s.get("tp_plan", None)))
    if data_parallel == "shard" and not seeded_by_module(meta):
        raise ValueError(f"strategy.data_parallel=shard cannot initialise stages of {type(meta).__name__} (modules "
                         "without reset_parameters(): initialised from one real build): use "
                         "strategy.data_parallel=replicate.")
