"""One process, no communication: the reference every other strategy must match."""
from __future__ import annotations

from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of


class Single(Strategy):
    """Plain local training (each rank trains alone if several are started)."""

    def setup(self, ctx: SetupContext) -> None:
        self.world = ctx.world
        self.model = ctx.apply_memory(ctx.model.full(ctx.device))

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        loss = accumulate(self.model, micro_batches, loss_fn, autocast=precision.autocast, scale=precision.scale)
        return StepStats(loss=loss, samples=samples_of(micro_batches))

    @classmethod
    def data_parallel_degree(cls, cfg, world_size: int) -> int:
        return 1

    def data_shard(self) -> tuple[int, int]:
        return 0, 1

    def eval_shard(self) -> tuple[int, int] | None:
        return 0, 1
