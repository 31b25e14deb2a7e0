"""Activation checkpointing over a model's list of blocks (torch's non-reentrant checkpoint).

Blocks are found, not declared: the children of an ``nn.Sequential`` (both reference models),
or the first ``nn.ModuleList`` named ``blocks``/``layers``/``h`` (the usual transformer layout).

We replace ``forward`` on the instance instead of wrapping modules in a new class, so parameter
names stay the same: checkpoints, ``load_model_state``, pipeline splits and tensor-parallel plans
that address modules by name all keep working whether checkpointing is on or off.

* ``full``: every block is recomputed on its own in backward (each keeps only its input).
* ``every_n``: runs of ``checkpoint_every`` consecutive blocks are recomputed as one unit, so
  only every n-th block input is kept. This is what saves memory for models whose blocks keep
  little besides their input (a Linear+ReLU MLP): ``full`` cannot help there. Grouping needs us
  to own the chaining of blocks, so it is for ``nn.Sequential`` models.
"""
from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "every_n")
BLOCK_LIST_NAMES = ("blocks", "layers", "h")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, in forward order; ValueError if it has no recognisable list."""
    if isinstance(model, nn.Sequential):
        return list(model.children())
    for name in BLOCK_LIST_NAMES:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    nested = _repeated_block_list(model)
    if nested is not None:
        return nested
    raise ValueError(f"memory.activation_checkpointing needs a model with a list of blocks: an nn.Sequential, "
                     f"an nn.ModuleList attribute named one of {BLOCK_LIST_NAMES}, or a nested ModuleList of "
                     f"repeated blocks; {type(model).__name__} has none (set memory.activation_checkpointing=none).")


def _repeated_block_list(model: nn.Module) -> list[nn.Module] | None:
    """The largest nested ModuleList whose children are >= 2 blocks of one class (a transformers
    model's ``model.layers`` or ``bert.encoder.layer``), by parameter count; None if there is none."""
    best, best_size = None, 0
    for module in model.modules():
        children = list(module.children()) if isinstance(module, nn.ModuleList) else []
        if len(children) >= 2 and len({type(child) for child in children}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = children, size
    return best


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The class's forward under a non-reentrant checkpoint (works with DDP, kwargs, integer
    inputs). Bound with MethodType, so ``copy.deepcopy`` rebinds it to the copy."""
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _run_blocks(blocks: list[nn.Module], x):
    for block in blocks:
        x = block(x)
    return x


def _grouped_sequential_forward(self: nn.Sequential, x):
    """A Sequential forward that checkpoints consecutive groups of children; the children are
    read at call time, so later edits to the Sequential are honoured."""
    blocks, every = list(self.children()), self._disttrain_checkpoint_every
    for start in range(0, len(blocks), every):
        x = checkpoint(_run_blocks, blocks[start:start + every], x, use_reentrant=False)
    return x


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> nn.Module:
    """Make ``model`` recompute its blocks' activations in backward; returns the same object."""
    if mode not in MODES:
        raise ValueError(f"memory.activation_checkpointing={mode!r} must be one of {', '.join(MODES)}.")
    if mode == "none":
        return model
    if mode == "every_n" and every > 1:
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"memory.activation_checkpointing=every_n groups consecutive blocks, which needs an "
                             f"nn.Sequential model ({type(model).__name__} chains its blocks itself): "
                             f"use memory.activation_checkpointing=full.")
        model._disttrain_checkpoint_every = every
        model.forward = types.MethodType(_grouped_sequential_forward, model)
        return model
    for block in find_blocks(model):
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model
