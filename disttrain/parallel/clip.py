"""Gradient clipping by the global norm of the whole model, whatever holds which part.

The norm must equal the unsplit model's: a tensor-parallel or FSDP shard contributes its
share (DTensor reductions sum over the shards), a replicated parameter counts once, and each
pipeline stage adds the squares of its own parameters (summed over the pipeline group).
Data-parallel replicas hold identical averaged gradients, so they add nothing.

Under fsdp x tp the gradients live on different meshes (a tensor-parallel Linear on
(dp_shard, tp), a replicated norm or embedding on dp_shard alone) and DTensor refuses one
reduction across meshes, so the squares are summed per mesh.
"""
from __future__ import annotations

import torch
from torch import nn

from disttrain.distributed import comm


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Parameters with a gradient, grouped by the mesh their gradient lives on (None: plain)."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if _is_dtensor(p.grad) else None, []).append(p)
    return list(groups.values())


#: set (True) on the copies of a tied parameter held by a second pipeline stage (an input
#: embedding tied to the LM head, disttrain.parallel.cut_pipeline): the unsplit model has one
#: tensor, so the norm counts it once; clipping still scales every copy alike.
TIED_DUPLICATE = "_disttrain_tied_duplicate"


def global_grad_norm(params: list[nn.Parameter], stage_group=None) -> torch.Tensor:
    """The 2-norm of all gradients of the model (a collective over ``stage_group``)."""
    groups = _by_mesh([p for p in params if not getattr(p, TIED_DUPLICATE, False)])
    device = groups[0][0].grad.device if groups else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        squares = squares + (norm.full_tensor() if _is_dtensor(norm) else norm).float() ** 2
    if stage_group is not None:
        comm.get().sum_(squares, group=stage_group)
    return squares.sqrt()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, stage_group=None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; return the norm before.
    Scaled per mesh too: one foreach multiply may not mix DTensors of different meshes."""
    norm = global_grad_norm(params, stage_group)
    for group in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
