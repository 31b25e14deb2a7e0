"""ZeRO-3 without the whole model on any rank: the model is built under DeepSpeed's
``zero.Init``, which partitions each module's parameters as soon as that module is
constructed, then every module gets disttrain's seeded initial values (the same a single
process would get, ``parallel.materialize``) one module at a time: its parameters are gathered,
rank 0 writes them, DeepSpeed re-partitions them from rank 0 on leaving the block. The peak
is one module's full parameters on top of this rank's partition.

A model whose modules lack ``reset_parameters`` is built under ``zero.Init`` after seeding the
RNG with ``trainer.seed``, which gives the same values as the seeded copy the other
strategies make (construction order is the same).
"""
from __future__ import annotations

import torch
from torch import nn

from disttrain.parallel.materialize import ModelFactory, _direct_state, _init_values, seeded_by_module


def build_partitioned(factory: ModelFactory, deepspeed, config: dict, rank: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(factory.seed)
        with deepspeed.zero.Init(config_dict_or_path=config):
            module = factory.build()
    if not seeded_by_module(module):
        return module  # the seeded construction above is the reference's seeded copy
    for fqn, sub in module.named_modules():
        if not _direct_state(sub):
            continue
        values = _init_values(_full_shape_view(sub), fqn, factory.seed)
        params = [p for p in sub._parameters.values() if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, p in sub._parameters.items():
                        if p is not None:
                            p.data.copy_(values[name])
        for name, buffer in sub._buffers.items():  # buffers are not partitioned: every rank sets them
            if buffer is not None:
                buffer.copy_(values[name])
    return module


class _Shape:
    """A stand-in tensor with a partitioned parameter's full shape (``ds_shape``)."""

    def __init__(self, tensor: torch.Tensor):
        self.shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        self.dtype, self.requires_grad = tensor.dtype, tensor.requires_grad


def _full_shape_view(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose own tensors carry their full shapes, for _init_values."""
    import copy

    view = copy.copy(module)
    view._parameters = {n: None if p is None else _Shape(p) for n, p in module._parameters.items()}
    view._buffers = {n: None if b is None else _Shape(b) for n, b in module._buffers.items()}
    return view
