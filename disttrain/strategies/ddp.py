"""Synchronous all-reduce data parallelism through torch's DistributedDataParallel
(bucketed all-reduce overlapped with backward)."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of


class DDP(Strategy):
    """Every rank holds the whole model; gradients are averaged once per optimizer step."""

    def __init__(self, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = True,
                 static_graph: bool = False, find_unused_parameters: bool = False):
        self.ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                               static_graph=static_graph, find_unused_parameters=find_unused_parameters)

    def setup(self, ctx: SetupContext) -> None:
        self.world = ctx.world
        module = ctx.apply_memory(ctx.model.full(ctx.device))
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)
        # The optimizer and the checkpoint see the plain module (unsplit FQNs, no "module.").
        self.model = module

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        loss = accumulate(self.ddp, micro_batches, loss_fn, no_sync=self.ddp.no_sync,
                          autocast=precision.autocast, scale=precision.scale)
        return StepStats(loss=loss, samples=samples_of(micro_batches))

    @torch.no_grad()
    def eval_outputs(self, inputs, precision):
        # The plain module: DDP's forward may broadcast buffers (a collective), and ranks
        # can hold different numbers of validation batches.
        with precision.autocast():
            return self.model(inputs)

    def communicated_module(self):
        """The DDP wrapper (observers hook its all-reduces)."""
        return self.ddp
