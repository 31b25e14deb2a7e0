"""Sharded data parallelism through torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each repeated block of the model and then the root are sharded over the data-parallel ranks
while the model is still on the meta device, so no rank ever holds the whole model: a rank
materializes only its shard of each parameter. Parameters are all-gathered per block for
forward and backward and gradients are reduce-scattered, so every rank ends the step with
the averaged gradient of its own shard, and the engine's optimizer steps the shards.

With ``dist.dp_replicate > 1`` the mesh is 2-D (HSDP): each group of ``dist.dp_shard`` ranks
shards the model, and the groups replicate it (gradients are all-reduced across groups after
the reduce-scatter within one). ``trainer.precision`` selects FSDP2's MixedPrecisionPolicy:
the gathered copies (what forward and backward compute with, and what travels) are bf16 or
fp16, gradients are reduced in fp32 and the sharded parameters the optimizer steps stay fp32.

With ``dist.tp > 1`` (2-D, fsdp x tp) the run has one mesh (dp_shard, tp), or (dp_replicate,
dp_shard, tp): the tensor-parallel plan (disttrain.parallel.tensor) is applied to the meta model
on ``mesh["tp"]`` first, then activation checkpointing / compile, then ``fully_shard`` on the
data-parallel sub-mesh of the same mesh (torchtitan's order), so each parameter is a DTensor
sharded on both axes. The ranks of one tp group see the same data (their dp coordinate).
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig, OmegaConf

from disttrain.memory.checkpointing import find_blocks
from disttrain.parallel import mesh as mesh_mod, tensor
from disttrain.parallel.materialize import factory_from_config
from disttrain.strategies import composed
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy, accumulate, samples_of
from disttrain.strategies.capabilities import Capabilities
from disttrain.strategies.tp_report import ReportsOncePerTPGroup

_PARAM_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(mode: str, root: bool):
    """FSDP2's policy for ``trainer.precision``: parameters gathered (and computed on) in the
    low dtype, reductions in fp32; the root also returns fp32 outputs, so the loss is fp32.
    The engine's autocast still runs around forward: it picks per-op precision (fp32 for
    the ops it keeps in fp32) and fp16 keeps the engine's loss scaler."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = _PARAM_DTYPES[mode]
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if root else None)


def check_reshard(value, shard: int):
    """``strategy.reshard_after_forward``: a bool, or the size of the smaller groups each
    parameter stays sharded over between forward and backward (FSDP2: a divisor of the
    shard group size, so the backward all-gather runs within groups of that many ranks)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and 2 <= value <= shard and shard % value == 0:
        return value
    raise ValueError(f"strategy.reshard_after_forward={value!r} must be true, false or an integer >= 2 dividing "
                     f"the shard group size dist.dp_shard={shard} (keep parameters sharded over groups of "
                     "that many ranks after forward)")


def _check_offload(cfg: DictConfig) -> None:
    """CPU offload keeps parameter and gradient shards in host memory; NCCL cannot reduce host
    tensors, so the global-norm clip and the fp16 scaler's inf check (both collectives over
    those shards) have no backend there."""
    from disttrain.distributed.process_group import resolve_backend
    from disttrain.strategies.precision import configured

    backend = resolve_backend(str(OmegaConf.select(cfg, "dist.backend", default="auto")))
    if backend != "nccl":
        return
    if OmegaConf.select(cfg, "trainer.grad_clip", default=None) is not None:
        raise ValueError("strategy.cpu_offload=true with trainer.grad_clip under dist.backend=nccl: the clip norm "
                         "is reduced over CPU-held gradient shards, which NCCL cannot; unset trainer.grad_clip")
    if configured(cfg) == "fp16":
        raise ValueError("strategy.cpu_offload=true with trainer.precision=fp16 under dist.backend=nccl: the loss "
                         "scaler's inf check is reduced over CPU-held gradients, which NCCL cannot; use bf16")


def shard_model(module, mesh, reshard: bool | int, mode: str, offload=None):
    """``fully_shard`` each block, then the root (torchtitan's layout), on ``mesh``: each block
    is one all-gather / reduce-scatter group; what is left (embeddings, heads) is the root's."""
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    offload = offload or OffloadPolicy()
    try:
        blocks = find_blocks(module)
    except ValueError:
        blocks = []  # no repeated blocks: the root alone is one shard group
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload,
                    mp_policy=mixed_precision(mode, root=False))
    return fully_shard(module, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload,
                       mp_policy=mixed_precision(mode, root=True))


class FSDP(ReportsOncePerTPGroup, Strategy):
    """``fully_shard`` per block and on the root (the layout torchtitan uses)."""

    capabilities = composed.SHARDED

    def __init__(self, reshard_after_forward: bool | int = True, cpu_offload: bool = False):
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

    @classmethod
    def layout(cls, cfg: DictConfig, world_size: int) -> mesh_mod.Layout:
        """dp_replicate x dp_shard x tp of this run; fsdp splits the world over dp."""
        layout = mesh_mod.resolve_layout(cfg, world_size, split_axis="dp")
        if layout.pp != 1:
            raise ValueError(f"dist.pp={layout.pp}: strategy=fsdp shards over data parallelism (dist.dp_replicate "
                             "x dist.dp_shard) and dist.tp only; for pipeline stages use strategy=pipeline "
                             "strategy.data_parallel=shard")
        return layout

    @classmethod
    def degrees(cls, cfg: DictConfig, world_size: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) of this run."""
        layout = cls.layout(cfg, world_size)
        return layout.dp_replicate, layout.dp_shard

    @classmethod
    def capabilities_for(cls, cfg: DictConfig) -> Capabilities:
        tp = OmegaConf.select(cfg, "dist.tp", default=None)
        if tp in (None, 1):
            return cls.capabilities
        return composed.narrow(cls.capabilities, composed.because(composed.TENSOR_PARALLEL, f"dist.tp={tp}"))

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        layout = cls.layout(cfg, world_size)
        check_reshard(cfg.strategy.get("reshard_after_forward", True), layout.dp_shard)
        offload = cfg.strategy.get("cpu_offload", False)
        if not isinstance(offload, bool):
            raise ValueError(f"strategy.cpu_offload={offload!r} must be true or false")
        if offload:
            _check_offload(cfg)
        if layout.tp > 1:
            tensor.check_divisible(factory_from_config(cfg).meta(), layout.tp)

    def setup(self, ctx: SetupContext) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        self.world = ctx.world
        self.sizes = self.layout(ctx.cfg, ctx.world.world_size)
        reshard = check_reshard(self.reshard_after_forward, self.sizes.dp_shard)
        self.mesh = mesh_mod.init_mesh(ctx.device, self.sizes.axes("dp_shard"))
        self.tp_rank = self.mesh.get_local_rank("tp") if self.sizes.tp > 1 else 0
        # Pinned host memory needs an accelerator; on a CPU-only run the shards are host memory anyway.
        offload = CPUOffloadPolicy(pin_memory=ctx.device.type != "cpu") if self.cpu_offload else OffloadPolicy()
        module = ctx.model.meta()
        if self.sizes.tp > 1:
            module = tensor.apply_tp(module, self.mesh["tp"])
        # Activation checkpointing / compile wrap the blocks first, then fully_shard: the
        # order torchtitan applies them in (the recomputed forward all-gathers again).
        module = shard_model(ctx.apply_memory(module), mesh_mod.dp_submesh(self.mesh), reshard,
                             ctx.settings.precision, offload)
        # CPU offload: FSDP2 wants the shards materialized in host memory.
        self.model = ctx.model.materialize_in_place(module, "cpu" if self.cpu_offload else ctx.device)

    def communicated_module(self):
        """The FSDP2 root: the observer times its all-gathers and reduce-scatters."""
        return self.model

    @contextlib.contextmanager
    def _no_sync(self):
        """FSDP2's no_sync: each rank accumulates its full, unreduced gradients (in fp32 under
        a low-precision policy); the last micro-step reduce-scatters once."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        loss = accumulate(self.model, micro_batches, loss_fn, no_sync=self._no_sync,
                          autocast=precision.autocast, scale=precision.scale)
        return self.once_per_tp_group(StepStats(loss=loss, samples=samples_of(micro_batches)))

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> int:
        return cls.layout(cfg, world_size).dp

    def data_shard(self) -> tuple[int, int]:
        return mesh_mod.dp_coordinate(self.mesh), self.sizes.dp
