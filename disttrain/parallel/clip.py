"""Gradient clipping by the global norm of the whole model, whatever holds which part.

The norm must equal the unsplit model's: a tensor-parallel shard contributes its share
(DTensor reductions sum over the shards), a replicated parameter counts once, and each
pipeline stage adds the squares of its own parameters (summed over the pipeline group).
Data-parallel replicas hold identical averaged gradients, so they add nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from disttrain.distributed import comm


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def global_grad_norm(params: list[nn.Parameter], stage_group=None) -> torch.Tensor:
    """The 2-norm of all gradients of the model (a collective over ``stage_group``)."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain).float() ** 2
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares = squares + (norm.full_tensor() if _is_dtensor(norm) else norm).float() ** 2
    if stage_group is not None:
        comm.get().sum_(squares, group=stage_group)
    return squares.sqrt()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, stage_group=None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; return the norm before."""
    norm = global_grad_norm(params, stage_group)
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm
