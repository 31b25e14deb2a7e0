"""Build the model on the meta device, then give real storage only to what a rank keeps.

Strategies cut (pipeline) and shard (tensor parallel, FSDP) the model while it is on the
meta device, where nothing is allocated, and call ``materialize`` on what is left: a rank
never holds the whole model unless its strategy keeps the whole model.

Initial weights must not depend on the split, so they cannot come from one RNG stream
consumed in construction order. Each module that owns parameters is initialised by its own
``reset_parameters()`` (what torch's layers use in ``__init__``) under an RNG seeded from
``trainer.seed`` and the module's fully qualified name in the unsplit model. A pipeline
stage, a tensor-parallel shard and the whole single-process model therefore all see the
same values for the same parameter. Sharded parameters (DTensors) are initialised full
size one module at a time and then distributed, so the transient is one layer, not the model.

A model that cannot be built this way (construction fails on meta, or a module owns
parameters or buffers without ``reset_parameters``) is built for real once on this rank
and copied by name instead ("seeded copy"): correct everywhere, but the whole model passes
through host memory. ``plan_init`` decides once, from the model alone, so every rank and
every reference run agrees.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import zlib
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("disttrain")


@dataclasses.dataclass(frozen=True)
class ModelFactory:
    """Builds the user's model (``model._target_``) on meta, materializes parts of it."""

    build: Callable[[], nn.Module]   # the user's callable, arguments bound
    seed: int
    _whole: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def seeded(self) -> bool:
        """Whether the WHOLE model is initialised module by module (decided once): a part cut
        from it (a pipeline stage without the one module lacking reset_parameters) must be
        initialised the same way as the unsplit model."""
        if "seeded" not in self._whole:
            self.meta()
        return self._whole["seeded"]

    def meta(self) -> nn.Module:
        """The whole model on the meta device (no memory), or a real one if it cannot be."""
        try:
            with torch.device("meta"):
                model = self.build()
        except Exception as exc:  # data-dependent construction, .item(), file reads...
            log.info("model cannot be built on the meta device (%s): seeded copy", str(exc).splitlines()[0][:120])
            self._whole["seeded"] = False
            return self._real()
        _check_module(model)
        self._whole.setdefault("seeded", seeded_by_module(model))
        return model

    def full(self, device: torch.device | str = "cpu") -> nn.Module:
        """The whole, initialised model (single process, DDP, references in tests)."""
        return self.materialize(self.meta(), device)

    def materialize(self, module: nn.Module, device: torch.device | str) -> nn.Module:
        """Give ``module`` (a meta model, a stage cut from one, or a sharded one) real,
        initialised storage on ``device``, in place; FQNs are those of the unsplit model.
        Parameters tied in ``module`` (an embedding and the LM head) stay one Parameter."""
        device = torch.device(device)
        if not _has_meta(module):
            return module.to(device)
        tied = _tied_groups(module)
        if not self.seeded():
            return _retie(self._copy_from_real(module, device), tied)
        held = _take_meta_nonpersistent(module)
        for fqn, sub in module.named_modules():
            values = _init_values(sub, fqn, self.seed)
            for name, value in values.items():
                _assign(sub, name, value.to(device))
        self._put_back(held, device)
        return _retie(module, tied)

    def materialize_part(self, module: nn.Module, device: torch.device | str, in_place: bool = False) -> nn.Module:
        """A pipeline stage or tensor-parallel part: ``materialize``, or ``materialize_in_place``
        when FSDP2 sharded it. Initialised as the whole model is (``seeded`` is decided on
        the whole model), so the parts put together equal the unsplit model."""
        if in_place and not self.seeded() and _has_meta(module):
            raise ValueError("strategy.data_parallel=shard cannot initialise a stage of a model whose modules "
                             "lack reset_parameters() (transformers models): use strategy.data_parallel=replicate.")
        return self.materialize_in_place(module, device) if in_place else self.materialize(module, device)

    def materialize_in_place(self, module: nn.Module, device: torch.device | str) -> nn.Module:
        """``materialize`` for a module sharded by FSDP2 on meta. FSDP2 keeps references to
        its sharded parameters, so they keep their identity: storage from ``to_empty``, then
        each module's full-size values (the same as ``materialize`` gives) are copied into
        the local shards. A model that could not be built on meta was sharded with its real
        values: kept as is."""
        if not _has_meta(module):
            return module
        source = None if self.seeded() else _real_state(self._real())
        held = _take_meta_nonpersistent(module) if source is None else []
        module.to_empty(device=torch.device(device))
        for fqn, sub in module.named_modules():
            for name, value in _module_values(sub, fqn, self.seed, source).items():
                target = getattr(sub, name)
                with torch.no_grad():
                    if _is_dtensor(target):
                        from torch.distributed.tensor import distribute_tensor

                        # Every rank computed the same full value: no communication needed.
                        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                                  src_data_rank=None).to_local()
                        target = target.to_local()
                    target.copy_(value)
        self._put_back(held, device)
        return module

    def _put_back(self, held: list[tuple[str, nn.Module, str]], device: torch.device | str) -> None:
        """Non-persistent buffers (rotary ``inv_freq``: no state dict holds them, and
        ``reset_parameters`` need not set them) from one real build: ``__init__`` computes
        them from the config, the same on every rank."""
        if not held:
            return
        with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay untouched
            real = dict(self._real().named_buffers(remove_duplicate=False))
        for fqn, sub, name in held:
            sub._buffers[name] = real[f"{fqn}.{name}" if fqn else name].to(device)

    def _real(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = self.build()
        _check_module(model)
        return model

    def _copy_from_real(self, module: nn.Module, device: torch.device) -> nn.Module:
        log.info("model %s has modules without reset_parameters(): initialised by a seeded copy of the "
                 "whole model on this rank (see README: meta-device init)", type(module).__name__)
        source = _real_state(self._real(), keep_vars=True)
        for fqn, sub in module.named_modules():
            dtypes = dict(_direct_state(sub))
            for name, value in _module_values(sub, fqn, self.seed, source).items():
                _assign(sub, name, value.detach().to(device=device, dtype=dtypes[name].dtype))
        return module


def _take_meta_nonpersistent(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Remove the meta non-persistent buffers (put back by ``ModelFactory._put_back``)."""
    held = [(fqn, sub, name) for fqn, sub in module.named_modules() for name in sorted(sub._non_persistent_buffers_set)
            if sub._buffers.get(name) is not None and sub._buffers[name].is_meta]
    for _, sub, name in held:
        del sub._buffers[name]
    return held


def _real_state(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """A real build's state dict plus its non-persistent buffers (rotary inv_freq), which no
    state dict holds but a meta model needs values for."""
    buffers = {n: (b if keep_vars else b.detach()) for n, b in model.named_buffers(remove_duplicate=False)}
    return {**buffers, **model.state_dict(keep_vars=keep_vars)}


def _tied_groups(module: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(module: nn.Module, tied: list[list[str]]) -> nn.Module:
    """Parameters that were one tensor (an embedding tied to the LM head) are one again: the
    copy gave each module its own Parameter."""
    for first, *others in tied:
        owner, _, name = first.rpartition(".")
        param = module.get_submodule(owner)._parameters[name]
        for other in others:
            owner, _, name = other.rpartition(".")
            module.get_submodule(owner)._parameters[name] = param
    return module


def _module_values(module: nn.Module, fqn: str, seed: int, source: dict | None) -> dict[str, torch.Tensor]:
    """Full-size initial values of ``module``'s own tensors: seeded per module, or taken by
    name from ``source`` (the state dict of one real, seeded build) when it is given."""
    if source is None:
        return _init_values(module, fqn, seed)
    prefix = f"{fqn}." if fqn else ""
    return {name: source[prefix + name] for name, _ in _direct_state(module)}


def seeded_by_module(model: nn.Module) -> bool:
    """True when every module that owns parameters or buffers can re-initialise them."""
    return all(callable(getattr(sub, "reset_parameters", None)) for _, sub in model.named_modules()
               if _direct_state(sub))


def module_seed(seed: int, fqn: str) -> int:
    """The RNG seed of one module: the run's seed and the module's name, nothing else."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model._target_ returned {type(model).__name__}, not an nn.Module")


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for _, sub in module.named_modules() for _, t in _direct_state(sub))


def _direct_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]


def _init_values(module: nn.Module, fqn: str, seed: int) -> dict[str, torch.Tensor]:
    """Full-size initial values of ``module``'s own parameters and buffers (CPU), computed on
    a shallow copy whose tensors are real: the module itself stays untouched until assigned."""
    state = _direct_state(module)
    if not state:
        return {}
    # A shallow copy without calling the class's __new__ (FSDP2's module classes re-run __init__ there).
    shell = object.__new__(type(module))
    object.__setattr__(shell, "__dict__", dict(module.__dict__))
    shell._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                         for n, p in module._parameters.items()}
    shell._buffers = {n: None if b is None else torch.empty(b.shape, dtype=b.dtype) for n, b in module._buffers.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, fqn))
        with torch.no_grad():
            shell.reset_parameters()
    return {n: t.detach() for n, t in [*shell._parameters.items(), *shell._buffers.items()] if t is not None}


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` by ``value``, sharded like the original if it is a DTensor."""
    old = module._parameters.get(name, module._buffers.get(name))
    if _is_dtensor(old):
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = distribute_tensor(value, old.device_mesh, old.placements, src_data_rank=None)
        # The local shard is a view of the full tensor: copy it, or the whole layer stays alive.
        value = DTensor.from_local(full.to_local().clone(), old.device_mesh, old.placements, run_check=False,
                                   shape=full.shape, stride=full.stride())
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def scratch_copy(module: nn.Module, device: torch.device | str) -> nn.Module:
    """A real copy of a (meta) module with arbitrary finite values: for measuring how long
    it takes (pipeline balance=time), never for training."""
    copy_ = copy.deepcopy(module).to_empty(device=device)
    with torch.no_grad():
        for tensor in [*copy_.parameters(), *copy_.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
            else:
                tensor.zero_()
    return copy_


def factory_from_config(cfg) -> ModelFactory:
    """The run's model (``cfg.model``, any ``_target_``) as a factory: built on the meta device,
    materialized by part, with weights that depend on ``trainer.seed`` and each parameter's
    name only (so every strategy, and every single-process reference, starts from identical
    weights). Validation calls ``.meta()`` to count layers and shapes without allocating."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.model, resolve=True)
    return ModelFactory(build=lambda: instantiate(node), seed=int(cfg.trainer.seed))
