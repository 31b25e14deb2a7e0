"""One process, no communication: the reference every other strategy must match."""
from __future__ import annotations

from disttrain import precision
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate


class Single(Strategy):
    """Plain local training (each rank trains alone if several are started)."""

    def setup(self, ctx: SetupContext) -> None:
        self.world = ctx.world
        self.model = ctx.build_model().to(ctx.device)
        self.optimizer = ctx.build_optimizer(self.model.parameters())
        self.scheduler = ctx.build_scheduler(self.optimizer)
        self.precision = precision.from_context(ctx)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate(self.model, micro_batches, loss_fn, autocast=self.precision.autocast,
                          scale=self.precision.scale)
        extra = self.precision.step(self.optimizer, self.scheduler)  # skips fp16 overflow steps
        return StepStats(loss=loss, samples=sum(len(b[0]) for b in micro_batches), extra=extra)

    def data_shard(self) -> tuple[int, int]:
        return 0, 1
