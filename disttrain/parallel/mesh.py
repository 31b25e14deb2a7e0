"""One validated description of the parallel dimensions (dp x pp x tp) and the DeviceMesh
built from it, plus the data-parallel gradient average that sits on top of a split model.

The degrees come from ``dist.dp``, ``dist.pp`` and ``dist.tp`` (null = derive); their product
must equal the world size, and that is checked before any worker starts. Under FSDP the
data-parallel degree splits once more, ``dist.dp_replicate x dist.dp_shard`` (HSDP).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

AXES = ("dp", "pp", "tp")


@dataclasses.dataclass(frozen=True)
class Degrees:
    dp: int
    pp: int
    tp: int


def resolve_degrees(cfg: DictConfig, world_size: int, split_axis: str) -> Degrees:
    """Fill unset degrees: unset axes other than ``split_axis`` default to 1, then
    ``split_axis`` (the one the strategy splits the model along) takes what is left."""
    given = {axis: OmegaConf.select(cfg, f"dist.{axis}", default=None) for axis in AXES}
    for axis, value in given.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"dist.{axis}={value!r} must be an integer >= 1 (or null to derive it).")
    fixed = 1
    for axis in AXES:
        if axis != split_axis:
            given[axis] = given[axis] or 1
            fixed *= given[axis]
    if given[split_axis] is None:
        if world_size % fixed:
            others = " x ".join(f"dist.{a}={given[a]}" for a in AXES if a != split_axis)
            raise ValueError(f"world size {world_size} is not a multiple of {others}: "
                             f"choose degrees whose product is {world_size}.")
        given[split_axis] = world_size // fixed
    degrees = Degrees(**given)
    if degrees.dp * degrees.pp * degrees.tp != world_size:
        raise ValueError(f"dist.dp={degrees.dp} x dist.pp={degrees.pp} x dist.tp={degrees.tp} = "
                         f"{degrees.dp * degrees.pp * degrees.tp} but the world size is {world_size}: "
                         "make the product equal the number of processes (or leave one degree null).")
    return degrees


def build_mesh(degrees: Degrees, device: torch.device, axes: tuple[str, ...]):
    """A DeviceMesh over the named axes (rank = dp-major, so the ranks of one pipeline or
    one tensor-parallel group are neighbours, as on a real node)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(degrees, axis) for axis in axes)
    return init_device_mesh(device.type, shape, mesh_dim_names=axes)


def average_gradients(params: list[nn.Parameter], group, size: int) -> None:
    """Average gradients over the data-parallel group in one flat all-reduce.

    Hand-written rather than DDP because a pipeline schedule runs many backward passes per
    optimizer step (micro-batches x accumulation steps); syncing once after all of them
    costs one all-reduce per step. DTensor gradients (tensor parallel) are averaged through
    their local shards: each dp replica holds the same shard layout.
    """
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    locals_ = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not locals_:
        return
    flat = torch.cat([g.reshape(-1) for g in locals_])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in locals_:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def resolve_dp_split(cfg: DictConfig, dp: int) -> tuple[int, int]:
    """(replicate, shard) with ``dist.dp_replicate x dist.dp_shard == dp`` (HSDP): one unset
    degree takes what the other leaves; both unset shard over all ``dp`` ranks (plain FSDP)."""
    keys = ("dp_replicate", "dp_shard")
    given = {key: OmegaConf.select(cfg, f"dist.{key}", default=None) for key in keys}
    for key, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"dist.{key}={value!r} must be an integer >= 1 (or null to derive it).")
    replicate, shard = given["dp_replicate"], given["dp_shard"]
    if replicate is None and shard is None:
        return 1, dp
    known, other = ("dp_shard", "dp_replicate") if replicate is None else ("dp_replicate", "dp_shard")
    if given[other] is None:
        if dp % given[known]:
            raise ValueError(f"dist.{known}={given[known]} does not divide the data-parallel degree {dp} "
                             f"(dist.dp, the world size without pp/tp): choose a divisor of {dp}.")
        given[other] = dp // given[known]
    replicate, shard = given["dp_replicate"], given["dp_shard"]
    if replicate * shard != dp:
        raise ValueError(f"dist.dp_replicate={replicate} x dist.dp_shard={shard} = {replicate * shard} but the "
                         f"data-parallel degree (dist.dp) is {dp}: make the product {dp} (or leave one null).")
    return replicate, shard


def build_dp_mesh(device: torch.device, replicate: int, shard: int):
    """FSDP2's mesh: 1-D over the shard ranks, or 2-D (dp_replicate, dp_shard) for HSDP, where
    ``fully_shard`` shards along dp_shard and replicates along dp_replicate. Ranks of one shard
    group are neighbours (a node, on a real cluster), so the all-gathers stay within it."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicate == 1:
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
