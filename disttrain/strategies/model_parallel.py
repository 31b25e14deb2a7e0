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

from omegaconf import DictConfig, OmegaConf

from disttrain.parallel import mesh as mesh_mod, tensor
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate
from disttrain.strategies.pipeline import Pipeline, _balance_value, build_blocks, check_balance

MODES = ("layer", "tensor")


class LayerParallel(Pipeline):
    """Naive layer split = GPipe with a single micro-batch."""

    def __init__(self, balance: Any = "params"):
        super().__init__(micro_batches=1, schedule="gpipe", stages_per_rank=1, balance=balance)


class TensorParallel(Strategy):
    """dp x tp: each tp group holds one sharded copy of the model."""

    def setup(self, ctx: SetupContext) -> None:
        self.world, self.device = ctx.world, ctx.device
        self.degrees = mesh_mod.resolve_degrees(ctx.cfg, ctx.world.world_size, split_axis="tp")
        self.mesh = mesh_mod.build_mesh(self.degrees, ctx.device, ("dp", "tp"))
        self.dp_group, self.dp_rank = self.mesh.get_group("dp"), self.mesh.get_local_rank("dp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        self.model = tensor.apply_tp(ctx.build_model().to(ctx.device), self.mesh["tp"])
        self.optimizer = ctx.build_optimizer(self.model.parameters())
        self.scheduler = ctx.build_scheduler(self.optimizer)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate(self.model, micro_batches, loss_fn)
        mesh_mod.average_gradients(list(self.model.parameters()), self.dp_group, self.degrees.dp)
        self.optimizer.step()
        self.scheduler.step()
        # Every tp rank computes the same (replicated) loss: report it once per replica.
        first = self.tp_rank == 0
        return StepStats(loss=loss if first else None,
                         samples=sum(len(b[0]) for b in micro_batches) if first else 0)

    def data_shard(self) -> tuple[int, int]:
        return self.dp_rank, self.degrees.dp


class ModelParallel(Strategy):
    """Chooses the layer or tensor implementation; forwards the strategy contract to it."""

    def __init__(self, mode: str = "layer", balance: Any = "params"):
        if mode not in MODES:
            raise ValueError(f"strategy.mode={mode!r} must be one of {', '.join(MODES)}.")
        self.mode = mode
        self.impl: Strategy = LayerParallel(_balance_value(balance)) if mode == "layer" else TensorParallel()

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
            from hydra.utils import instantiate

            tensor.check_divisible(instantiate(OmegaConf.to_container(cfg.model, resolve=True)), degrees.tp)

    def setup(self, ctx: SetupContext) -> None:
        self.impl.setup(ctx)
        self.world = ctx.world

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        return self.impl.train_step(micro_batches, loss_fn)

    # The loop and checkpointing read these; they live on the implementation.
    model = property(lambda self: self.impl.model)
    optimizer = property(lambda self: self.impl.optimizer)
    scheduler = property(lambda self: self.impl.scheduler)

    def data_shard(self) -> tuple[int, int]:
        return self.impl.data_shard()

    def state_dict(self) -> dict[str, Any]:
        return self.impl.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.impl.load_state_dict(state)
