"""Sharded data parallelism through torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each repeated block of the model and then the root are sharded over the data-parallel ranks
while the model is still on the meta device, so no rank ever holds the whole model: a rank
materializes only its shard of each parameter. Parameters are all-gathered per block for
forward and backward and gradients are reduce-scattered, so every rank ends the step with
the averaged gradient of its own shard, and the engine's optimizer steps the shards.
"""
from __future__ import annotations

import contextlib

from disttrain.memory.checkpointing import find_blocks
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of
from disttrain.strategies.capabilities import Capabilities


class FSDP(Strategy):
    """``fully_shard`` per block and on the root (the layout torchtitan uses)."""

    # Precision comes from the engine's autocast (fp32 parameters, reductions and master
    # weights, like DDP here); FSDP2's MixedPrecisionPolicy (bf16 all-gathers) is not wired yet.
    capabilities = Capabilities(
        activation_offload=("none",),
        why={"activation_offload": "its saved-tensor hooks crash FSDP2's backward (a segfault on torch 2.13, gloo); "
                                   "use memory.activation_checkpointing instead"})

    def __init__(self, reshard_after_forward: bool = True):
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        value = cfg.strategy.get("reshard_after_forward", True)
        # FSDP2 also takes an int (reshard to a smaller group); not offered until a test runs it.
        if not isinstance(value, bool):
            raise ValueError(f"strategy.reshard_after_forward={value!r} must be true or false "
                             "(free the gathered parameters after forward, or keep them for backward)")

    def setup(self, ctx: SetupContext) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.world = ctx.world
        mesh = init_device_mesh(ctx.device.type, (ctx.world.world_size,), mesh_dim_names=("dp_shard",))
        # Activation checkpointing / offload wrap the blocks first, then fully_shard: the
        # order torchtitan applies them in (the recomputed forward all-gathers again).
        module = ctx.apply_memory(ctx.model.meta())
        try:
            blocks = find_blocks(module)
        except ValueError:
            blocks = []  # no repeated blocks: the root alone is one shard group
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        self.model = ctx.model.materialize_in_place(module, ctx.device)

    @contextlib.contextmanager
    def _no_sync(self):
        """FSDP2's no_sync: each rank accumulates its full, unreduced gradients; the last
        micro-step reduce-scatters once."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        loss = accumulate(self.model, micro_batches, loss_fn, no_sync=self._no_sync,
                          autocast=precision.autocast, scale=precision.scale)
        return StepStats(loss=loss, samples=samples_of(micro_batches))

