"""Model parallelism: the model does not fit one rank, so its parameters are split.

- ``mode=layer``: contiguous layers per rank, run in sequence on one whole batch at a time:
  the "naive" model parallelism, where only one rank computes at any moment. It is
  exactly a GPipe schedule with one micro-batch, so it reuses the pipeline strategy (torch's
  PipelineStage moves activations and gradients) rather than hand-written send/recv.
- ``mode=tensor``: Megatron-style intra-layer parallelism over ``dist.tp`` ranks
  (see disttrain.parallel.tensor), optionally replicated ``dist.dp`` times.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from disttrain.strategies import composed
from disttrain.strategies.capabilities import Capabilities
from disttrain.parallel import mesh as mesh_mod, tensor
from disttrain.parallel.materialize import factory_from_config
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of
from disttrain.strategies.tp_report import ReportsOncePerTPGroup
from disttrain.strategies.pipeline import Pipeline, _balance_value, build_blocks, check_balance

MODES = ("layer", "tensor")


class LayerParallel(Pipeline):
    """Naive layer split = GPipe with a single micro-batch."""

    def __init__(self, balance: Any = "params"):
        super().__init__(micro_batches=1, schedule="gpipe", stages_per_rank=1, balance=balance)


class TensorParallel(ReportsOncePerTPGroup, Strategy):
    """dp x tp: each tp group holds one sharded copy of the model. The plan is applied on
    the meta device; each rank then materializes only its shards (one full layer at a time)."""

    capabilities = composed.TENSOR_PARALLEL

    def setup(self, ctx: SetupContext) -> None:
        self.world, self.device = ctx.world, ctx.device
        self.degrees = mesh_mod.resolve_degrees(ctx.cfg, ctx.world.world_size, split_axis="tp")
        self.mesh = mesh_mod.build_mesh(self.degrees, ctx.device, ("dp", "tp"))
        self.dp_group, self.dp_rank = self.mesh.get_group("dp"), self.mesh.get_local_rank("dp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        sharded = tensor.apply_tp(ctx.model.meta(), self.mesh["tp"])
        self.model = ctx.apply_memory(ctx.model.materialize(sharded, ctx.device))

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

    def __new__(cls, mode: str = "layer", balance: Any = "params"):
        if mode not in MODES:
            raise ValueError(f"strategy.mode={mode!r} must be one of {', '.join(MODES)}.")
        return LayerParallel(_balance_value(balance)) if mode == "layer" else TensorParallel()

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
        if mode == "layer":
            blocks = build_blocks(cfg)
            if degrees.pp > len(blocks):
                raise ValueError(f"dist.pp={degrees.pp} ranks but the model has only {len(blocks)} layers: "
                                 "use fewer ranks or a deeper model.")
            check_balance(blocks, _balance_value(cfg.strategy.balance), degrees.pp, degrees.pp)
        else:
            tensor.check_divisible(factory_from_config(cfg).meta(), degrees.tp)

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> int:
        axis = "pp" if cfg.strategy.get("mode", "layer") == "layer" else "tp"
        return mesh_mod.resolve_degrees(cfg, world_size, split_axis=axis).dp

    def setup(self, ctx: SetupContext) -> None:  # pragma: no cover - __new__ returns the implementation
        raise TypeError("ModelParallel() returns LayerParallel or TensorParallel")

    def forward_backward(self, micro_batches, loss_fn, precision):  # pragma: no cover
        raise TypeError("ModelParallel() returns LayerParallel or TensorParallel")
