"""One validated description of the parallel dimensions and the one DeviceMesh built from it,
plus the data-parallel gradient average that sits on top of a split model.

The degrees come from ``dist.dp``, ``dist.pp`` and ``dist.tp`` (null = derive); their product
must equal the world size, and that is checked before any worker starts. Sharded data
parallelism (FSDP2) splits the data-parallel degree once more, ``dist.dp_replicate x
dist.dp_shard`` (HSDP). Every composition (fsdp x tp, pp x fsdp x tp) is one mesh whose named
axes, outermost first, are (dp_replicate, dp_shard, pp, tp): torch slices the sub-meshes
(``mesh["tp"]``, ``mesh["dp_shard"]``) out of it, so FSDP and the tensor plan agree on ranks.
"""
from __future__ import annotations

import dataclasses
import math

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
    """Fill unset degrees: one unset axis takes what the set ones leave (``split_axis``, the one
    the strategy splits the model along, when it is unset; else dp), the other unset ones are 1."""
    given = {axis: OmegaConf.select(cfg, f"dist.{axis}", default=None) for axis in AXES}
    for axis, value in given.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"dist.{axis}={value!r} must be an integer >= 1 (or null to derive it).")
    unset = [axis for axis in AXES if given[axis] is None]
    derive = split_axis if split_axis in unset else next(iter(unset), None)
    fixed = 1
    for axis in AXES:
        if axis != derive:
            given[axis] = given[axis] or 1
            fixed *= given[axis]
    if derive is not None:
        if world_size % fixed:
            others = " x ".join(f"dist.{a}={given[a]}" for a in AXES if a != derive)
            raise ValueError(f"world size {world_size} is not a multiple of {others}: "
                             f"choose degrees whose product is {world_size}.")
        given[derive] = world_size // fixed
    degrees = Degrees(**given)
    if degrees.dp * degrees.pp * degrees.tp != world_size:
        raise ValueError(f"dist.dp={degrees.dp} x dist.pp={degrees.pp} x dist.tp={degrees.tp} = "
                         f"{degrees.dp * degrees.pp * degrees.tp} but the world size is {world_size}: "
                         "make the product equal the number of processes (or leave one degree null).")
    return degrees


def build_mesh(degrees: Degrees, device: torch.device, axes: tuple[str, ...]):
    """A DeviceMesh over the named axes (rank = dp-major, so the ranks of one pipeline or
    one tensor-parallel group are neighbours, as on a real node)."""
    return init_mesh(device, {axis: getattr(degrees, axis) for axis in axes})


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


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes of the named mesh axes of a sharded run (dp = dp_replicate x dp_shard)."""

    dp_replicate: int
    dp_shard: int
    pp: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def axes(self, *always: str) -> dict[str, int]:
        """Mesh axes in rank order: dp_replicate outermost, tp innermost, so the ranks of a tp
        group, then of a shard group, are neighbours (one node on a real cluster: the chattiest
        collectives stay within it). An axis of size 1 is left out unless named in ``always``."""
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "pp": self.pp, "tp": self.tp}
        return {name: size for name, size in sizes.items() if size > 1 or name in always}


def resolve_layout(cfg: DictConfig, world_size: int, split_axis: str) -> Layout:
    """Degrees of a sharded run. Under a pipeline with ``dist.dp`` and ``dist.pp`` unset, dp is
    the product of the HSDP degrees given (1 when none is) and the stages take what is left."""
    unset = [OmegaConf.select(cfg, f"dist.{axis}", default=None) is None for axis in ("dp", "pp")]
    if split_axis == "pp" and all(unset):
        given = [OmegaConf.select(cfg, f"dist.{key}", default=None) for key in ("dp_replicate", "dp_shard")]
        # bad values are named by resolve_dp_split below
        cfg = OmegaConf.merge(cfg, {"dist": {"dp": math.prod(v for v in given if isinstance(v, int) and v >= 1)}})
    degrees = resolve_degrees(cfg, world_size, split_axis)
    replicate, shard = resolve_dp_split(cfg, degrees.dp)
    return Layout(replicate, shard, degrees.pp, degrees.tp)


def init_mesh(device: torch.device, axes: dict[str, int]):
    """A DeviceMesh over ``axes`` (name -> size, outermost first)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, tuple(axes.values()), mesh_dim_names=tuple(axes))


def dp_submesh(mesh):
    """FSDP's mesh out of the run's one mesh: dp_shard, or (dp_replicate, dp_shard) for HSDP,
    where ``fully_shard`` shards along dp_shard and replicates along dp_replicate."""
    names = tuple(name for name in ("dp_replicate", "dp_shard") if name in mesh.mesh_dim_names)
    return mesh[names] if len(names) > 1 else mesh[names[0]]


def dp_coordinate(mesh) -> int:
    """This rank's data-parallel index (its data shard): replicate-major, like the rank order.
    Ranks that differ only in pp or tp share it: they must see the same batch."""
    names = mesh.mesh_dim_names
    shard = mesh.get_local_rank("dp_shard") if "dp_shard" in names else 0
    if "dp_replicate" not in names:
        return shard
    return mesh.get_local_rank("dp_replicate") * mesh.size(names.index("dp_shard")) + shard
