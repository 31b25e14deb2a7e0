"""Materialize a meta model (or a stage cut from one) that disttrain.parallel.materialize's
seeded copy does not fully restore: it copies tensors by state-dict name, one module at a
time, so

- non-persistent buffers (Hugging Face rotary embeddings' ``inv_freq``), which no state dict
  holds, are set aside and then taken from one real build of the model (they are computed
  in ``__init__`` from the config, the same on every rank);
- it decides per module passed whether to re-initialise module by module or to copy from a
  real build: a stage without the one module lacking ``reset_parameters()`` (a BERT MLM head)
  would get different initial values from the unsplit model. The decision is the whole
  model's (``whole_seeded``);
- parameters tied in the model (input embedding == output projection) come back as separate
  copies: they are tied again to one Parameter where the module holds several of the names.
"""
from __future__ import annotations

import torch
from torch import nn

from disttrain.parallel.fqn_split import tied_parameters
from disttrain.parallel.materialize import seeded_by_module


def _meta_nonpersistent(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(fqn, sub, name) for fqn, sub in module.named_modules() for name in sorted(sub._non_persistent_buffers_set)
            if sub._buffers.get(name) is not None and sub._buffers[name].is_meta]


def materialize(factory, module: nn.Module, device: torch.device | str, in_place: bool = False,
                whole_seeded: bool | None = None) -> nn.Module:
    """``factory.materialize`` (or ``materialize_in_place`` for FSDP-sharded modules) of a
    meta ``module`` cut from a model that is (``whole_seeded``) or is not initialised module
    by module; non-persistent buffers and ties included."""
    held = _meta_nonpersistent(module)
    tied = tied_parameters(module)
    for _, sub, name in held:
        del sub._buffers[name]
    if whole_seeded is False and seeded_by_module(module) and any(t.is_meta for t in module.parameters()):
        if in_place:
            raise ValueError("strategy.data_parallel=shard cannot initialise a stage of a model whose modules "
                             "lack reset_parameters() (transformers models): use strategy.data_parallel=replicate.")
        done = factory._copy_from_real(module, torch.device(device))
    else:
        done = (factory.materialize_in_place if in_place else factory.materialize)(module, device)
    if held:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(factory.seed)
            real = dict(factory.build().named_buffers(remove_duplicate=False))
        for fqn, sub, name in held:
            sub._buffers[name] = real[f"{fqn}.{name}" if fqn else name].to(device)
    if not in_place:
        for group in tied:
            owner, _, name = group[0].rpartition(".")
            param = done.get_submodule(owner)._parameters[name]
            for other in group[1:]:
                owner, _, name = other.rpartition(".")
                done.get_submodule(owner)._parameters[name] = param
    return done
