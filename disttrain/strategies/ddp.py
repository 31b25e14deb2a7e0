"""Synchronous all-reduce data parallelism through torch's DistributedDataParallel
(bucketed all-reduce overlapped with backward)."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from disttrain import precision
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate


class DDP(Strategy):
    """Every rank holds the whole model; gradients are averaged once per optimizer step."""

    def __init__(self, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = True,
                 static_graph: bool = False, find_unused_parameters: bool = False):
        self.ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                               static_graph=static_graph, find_unused_parameters=find_unused_parameters)

    def setup(self, ctx: SetupContext) -> None:
        self.world = ctx.world
        module = ctx.build_model().to(ctx.device)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.model = DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)
        self.optimizer = ctx.build_optimizer(self.model.parameters())
        self.scheduler = ctx.build_scheduler(self.optimizer)
        self.precision = precision.from_context(ctx)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate(self.model, micro_batches, loss_fn, no_sync=self.model.no_sync,
                          autocast=self.precision.autocast, scale=self.precision.scale)
        extra = self.precision.step(self.optimizer, self.scheduler)  # skips fp16 overflow steps
        return StepStats(loss=loss, samples=sum(len(b[0]) for b in micro_batches), extra=extra)
