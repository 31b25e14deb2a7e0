"""Model parallelism: the model does not fit one rank, so its parameters are split.

- ``mode=layer``: contiguous layers per rank, run in sequence on one whole batch at a time:
  the "naive" model parallelism, where only one rank computes at any moment. It is
  exactly a GPipe schedule with one micro-batch, so it reuses the pipeline strategy (torch's
  PipelineStage moves activations and gradients) rather than hand-written send/recv.
- ``mode=tensor``: Megatron-style intra-layer parallelism over ``dist.tp`` ranks
  (see disttrain.parallel.tensor: the reference models' plans, a transformers model's own
  ``base_model_tp_plan`` or ``strategy.tp_plan``), optionally replicated ``dist.dp`` times.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from disttrain.models.losses import select_output
from disttrain.strategies import composed
from disttrain.strategies.capabilities import Capabilities
from disttrain.parallel import cut_pipeline, mesh as mesh_mod, split, tensor
from disttrain.parallel.materialize import factory_from_config
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of
from disttrain.strategies.tp_report import ReportsOncePerTPGroup
from disttrain.strategies.pipeline import Pipeline, _balance_value, _plain, check_balance

MODES = ("layer", "tensor")


class LayerParallel(Pipeline):
    """Naive layer split = GPipe with a single micro-batch."""

    def __init__(self, balance: Any = "params", split_points: Any = None):
        super().__init__(micro_batches=1, schedule="gpipe", stages_per_rank=1, balance=balance,
                         split_points=split_points)


class TensorParallel(ReportsOncePerTPGroup, Strategy):
    """dp x tp: each tp group holds one sharded copy of the model. The plan is applied on
    the meta device; each rank then materializes only its shards (one full layer at a time)."""

    capabilities = composed.TENSOR_PARALLEL

    def __init__(self, tp_plan: Any = None):
        self.tp_plan = _plain(tp_plan) or None

    def setup(self, ctx: SetupContext) -> None:
        self.world, self.device = ctx.world, ctx.device
        self.degrees = mesh_mod.resolve_degrees(ctx.cfg, ctx.world.world_size, split_axis="tp")
        self.mesh = mesh_mod.build_mesh(self.degrees, ctx.device, ("dp", "tp"))
        self.dp_group, self.dp_rank = self.mesh.get_group("dp"), self.mesh.get_local_rank("dp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        sharded = tensor.apply_tp(ctx.model.meta(), self.mesh["tp"], self.tp_plan)
        self.model = ctx.apply_memory(ctx.model.materialize_part(sharded, ctx.device))
        self.output_key = cut_pipeline.select_key(ctx.cfg)

    @torch.no_grad()
    def eval_outputs(self, inputs: torch.Tensor, precision) -> torch.Tensor:
        """The model's predictions: a dict / dataclass output (transformers) gives its
        ``loss.output_key`` field, which evaluation's loss reads as a tensor."""
        with precision.autocast():
            return select_output(self.model(inputs), self.output_key)

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        loss = accumulate(self.model, micro_batches, loss_fn, autocast=precision.autocast, scale=precision.scale)
        mesh_mod.average_gradients(list(self.model.parameters()), self.dp_group, self.degrees.dp)
        return self.once_per_tp_group(StepStats(loss=loss, samples=samples_of(micro_batches)))

    def data_shard(self) -> tuple[int, int]:
        return self.dp_rank, self.degrees.dp


class ModelParallel(Strategy):
    """``strategy=model_parallel``: constructing it returns the implementation of
    ``strategy.mode`` (LayerParallel or TensorParallel) itself, so the loop, the observer
    and checkpoints see the real strategy (its stages, its groups), not a forwarding shell."""

    def __new__(cls, mode: str = "layer", balance: Any = "params", split_points: Any = None, tp_plan: Any = None):
        if mode not in MODES:
            raise ValueError(f"strategy.mode={mode!r} must be one of {', '.join(MODES)}.")
        return LayerParallel(_balance_value(balance), split_points) if mode == "layer" else TensorParallel(tp_plan)

    @classmethod
    def capabilities_for(cls, cfg: DictConfig) -> Capabilities:
        impl = LayerParallel if cfg.strategy.get("mode", "layer") == "layer" else TensorParallel
        return impl.capabilities_for(cfg)

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        mode = cfg.strategy.mode
        if mode not in MODES:
            raise ValueError(f"strategy.mode={mode!r} must be one of {', '.join(MODES)}.")
        axis = "pp" if mode == "layer" else "tp"
        degrees = mesh_mod.resolve_degrees(cfg, world_size, split_axis=axis)
        other = "tp" if mode == "layer" else "pp"
        if getattr(degrees, other) != 1:
            raise ValueError(f"dist.{other}={getattr(degrees, other)} does not apply to strategy.mode={mode}: "
                             f"split with dist.{axis} (and replicate with dist.dp).")
        meta = factory_from_config(cfg).meta()
        if mode == "layer" and not isinstance(meta, nn.Sequential):
            cut_pipeline.validate(cfg, meta, degrees.pp, 1, "gpipe", "replicate", 1)
        elif mode == "layer":
            blocks = split.blocks_of(meta)
            if degrees.pp > len(blocks):
                raise ValueError(f"dist.pp={degrees.pp} ranks but the model has only {len(blocks)} layers: "
                                 "use fewer ranks or a deeper model.")
            check_balance(blocks, _balance_value(cfg.strategy.balance), degrees.pp, degrees.pp)
        else:
            tensor.check_divisible(meta, degrees.tp, _plain(cfg.strategy.get("tp_plan", None)))

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> int:
        axis = "pp" if cfg.strategy.get("mode", "layer") == "layer" else "tp"
        return mesh_mod.resolve_degrees(cfg, world_size, split_axis=axis).dp

    def setup(self, ctx: SetupContext) -> None:  # pragma: no cover - __new__ returns the implementation
        raise TypeError("ModelParallel() returns LayerParallel or TensorParallel")

    def forward_backward(self, micro_batches, loss_fn, precision):  # pragma: no cover
        raise TypeError("ModelParallel() returns LayerParallel or TensorParallel")
