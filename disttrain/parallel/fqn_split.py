"""Cut a model that is not an ``nn.Sequential`` into pipeline stages by module name (FQN).

The repeated blocks are the children of one ``nn.ModuleList`` (Hugging Face decoder / encoder
layers, ``model.layers``, ``bert.encoder.layer``). A stage is a copy of the meta-device model
with the blocks of other stages deleted, the modules that run before the blocks (embeddings)
kept only by the first stage and those that run after them (final norm, head) only by the
last. Every kept parameter keeps its FQN, so a stage's state dict is a slice of the unsplit
model's and the union of the stages loads into the original model with ``strict=True``.

Which side of the blocks a module runs on is found by running the model once on the meta
device (free) and recording the order of module calls. Where that cannot work, the model
declares its split itself (the protocol, torchtitan's convention for its own models):

    class MyModel(nn.Module):
        pipeline_blocks = "layers"                  # FQN of the ModuleList (or ModuleDict) of blocks
        pipeline_first = ("tok_embeddings",)        # modules only the first stage keeps
        pipeline_last = ("norm", "output")          # modules only the last stage keeps
        # forward(x) runs every block it holds and skips a module that is None, so a
        # middle stage maps hidden states to hidden states

Anything the cut cannot honour is refused with ``CutError`` (one line: the reason and this
protocol), before any worker starts.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

PROTOCOL = ("declare pipeline_blocks / pipeline_first / pipeline_last on the model "
            "(README: Your own models), or use an nn.Sequential")


class CutError(ValueError):
    """The model cannot be cut into pipeline stages automatically."""


@dataclasses.dataclass(frozen=True)
class CutPlan:
    """Where the blocks are and which modules go with the first and the last stage."""

    blocks: str                         # FQN of the ModuleList / ModuleDict holding the blocks
    names: tuple[str, ...]              # the blocks' keys in forward order
    first: tuple[str, ...]              # FQNs of modules only the first stage keeps
    last: tuple[str, ...]               # FQNs of modules only the last stage keeps
    tied: tuple[tuple[str, ...], ...]   # parameter FQNs that are one tensor in the unsplit model
    declared: bool = False              # the model follows the protocol (its forward skips None)

    def block_fqn(self, index: int) -> str:
        return f"{self.blocks}.{self.names[index]}"


def block_list(model: nn.Module) -> str:
    """FQN of the container of repeated blocks: the ModuleList whose children all have one
    class (at least two of them, with parameters), the largest by parameters."""
    best, best_size = None, 0
    for fqn, module in model.named_modules():
        children = list(module.children())
        if not isinstance(module, nn.ModuleList) or len(children) < 2:
            continue
        if len({type(c) for c in children}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = fqn, size
    if best is None:
        raise CutError(f"pipeline: {type(model).__name__} has no nn.ModuleList of repeated blocks to cut "
                       f"between; {PROTOCOL}.")
    return best


def tied_parameters(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Groups of parameter FQNs that share one tensor (input embedding == output projection)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return tuple(tuple(names) for names in by_id.values() if len(names) > 1)


def plan_cut(model: nn.Module, sample: Any) -> CutPlan:
    """The cut plan of a meta-device ``model``; ``sample`` is one input batch (any device:
    it is moved to meta, only its shape matters)."""
    if getattr(model, "pipeline_blocks", None):
        return _declared(model)
    blocks = block_list(model)
    container = model.get_submodule(blocks)
    names = tuple(name for name, _ in container.named_children())
    calls = _call_order(model, blocks, sample)
    block_calls = [calls.get(f"{blocks}.{name}", []) for name in names]
    for name, seen in zip(names, block_calls):
        if len(seen) != 1:
            raise CutError(f"pipeline: block {blocks}.{name} runs {len(seen)} times in one forward of "
                           f"{type(model).__name__} (blocks must run once each, in order); {PROTOCOL}.")
    order = [seen[0] for seen in block_calls]
    if order != sorted(order):
        raise CutError(f"pipeline: the blocks of {blocks} do not run in their list order in "
                       f"{type(model).__name__}; {PROTOCOL}.")
    start, end = order[0], order[-1]
    side: dict[str, str] = {}
    for fqn, module in model.named_modules():
        if within(fqn, blocks) or not module._parameters:
            continue
        seen = calls.get(fqn, [])
        if not seen:
            side[fqn] = "last"  # never called (unused head): the last stage keeps it
        elif max(seen) < start:
            side[fqn] = "first"
        elif min(seen) > end:
            side[fqn] = "last"
        else:
            raise CutError(f"pipeline: module {fqn} of {type(model).__name__} runs between its blocks, so "
                           f"no stage boundary can be placed around it; {PROTOCOL}.")
    first, last = _maximal(model, blocks, side, "first"), _maximal(model, blocks, side, "last")
    return CutPlan(blocks, names, first, last, tied_parameters(model))


def _declared(model: nn.Module) -> CutPlan:
    blocks = model.pipeline_blocks
    try:
        container = model.get_submodule(blocks)
    except AttributeError:
        raise CutError(f"pipeline: {type(model).__name__}.pipeline_blocks={blocks!r} names no submodule.") from None
    if not isinstance(container, (nn.ModuleList, nn.ModuleDict)):
        raise CutError(f"pipeline: {type(model).__name__}.pipeline_blocks={blocks!r} must name an nn.ModuleList "
                       f"or nn.ModuleDict, not a {type(container).__name__}.")
    names = tuple(name for name, _ in container.named_children())
    first, last = tuple(getattr(model, "pipeline_first", ())), tuple(getattr(model, "pipeline_last", ()))
    for fqn in (*first, *last):
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise CutError(f"pipeline: {type(model).__name__} lists {fqn!r} in pipeline_first/pipeline_last "
                           "but has no such submodule.") from None
    return CutPlan(blocks, names, first, last, tied_parameters(model), declared=True)


def within(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


def _maximal(model: nn.Module, blocks: str, side: dict[str, str], which: str) -> tuple[str, ...]:
    """The largest subtrees whose parameter-owning modules are all on side ``which`` and that
    hold no block: deleting them whole deletes the fewest modules."""
    chosen: list[str] = []
    for fqn, module in model.named_modules():
        if any(within(fqn, c) for c in chosen) or not fqn or within(blocks, fqn):
            continue
        owners = [f"{fqn}.{n}" if n else fqn for n, m in module.named_modules() if m._parameters]
        if owners and all(side.get(o) == which for o in owners):
            chosen.append(fqn)
    return tuple(chosen)


class _Counter:
    def __init__(self):
        self.n, self.calls = 0, {}

    def hook(self, fqn: str):
        def pre(module, args, kwargs):
            self.calls.setdefault(fqn, []).append(self.n)
            self.n += 1
        return pre


def _call_order(model: nn.Module, blocks: str, sample: Any) -> dict[str, list[int]]:
    """For every parameter-owning module and every block: the indices of its calls in one
    meta-device forward."""
    counter, handles = _Counter(), []
    container = model.get_submodule(blocks)
    watched = {f"{blocks}.{n}": m for n, m in container.named_children()}
    watched.update({fqn: m for fqn, m in model.named_modules() if m._parameters and not within(fqn, blocks)})
    for fqn, module in watched.items():
        handles.append(module.register_forward_pre_hook(counter.hook(fqn), with_kwargs=True))
    try:
        run_abstract(model, (sample,), {})
    except CutError:
        raise
    except Exception as exc:  # data-dependent control flow: .item(), Python branches on values...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CutError(f"pipeline: {type(model).__name__} cannot run on the meta device to find its stage "
                       f"boundaries ({reason}); {PROTOCOL}.") from None
    finally:
        for handle in handles:
            handle.remove()
    return counter.calls


def run_abstract(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` on shapes only: meta parameters, fake inputs (torch's
    FakeTensorMode). Fake rather than plain meta tensors because libraries skip their
    data-dependent checks on them (transformers' packed-sequence test calls ``.item()``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fake = tree_map(lambda t: mode.from_tensor(t.to("meta")) if isinstance(t, torch.Tensor) else t,
                        (args, kwargs))
        return module(*fake[0], **fake[1])


# ---------------------------------------------------------------------------- weights
def block_weights(model: nn.Module, plan: CutPlan) -> list[float]:
    """Parameters per block, the first block carrying what the first stage keeps besides
    blocks and the last block what the last stage keeps (+1 each: never zero)."""
    container = model.get_submodule(plan.blocks)
    weights = [1.0 + sum(p.numel() for p in container.get_submodule(n).parameters()) for n in plan.names]
    weights[0] += _params(model, plan.first)
    weights[-1] += _params(model, plan.last)
    return weights


def _params(model: nn.Module, fqns: tuple[str, ...]) -> int:
    return sum(p.numel() for fqn in fqns for p in model.get_submodule(fqn).parameters())


def counts_from_split_points(plan: CutPlan, split_points: list[str], stages: int) -> list[int]:
    """Blocks per stage from ``strategy.split_points``: the FQNs of the blocks that begin
    stages 1..n-1, in order."""
    fqns = [plan.block_fqn(i) for i in range(len(plan.names))]
    if len(split_points) != stages - 1:
        raise ValueError(f"strategy.split_points={list(split_points)} must list {stages - 1} block names (one per "
                         f"stage after the first) for {stages} stages, e.g. {fqns[len(fqns) // 2]}.")
    starts = [0]
    for point in split_points:
        if point not in fqns:
            raise ValueError(f"strategy.split_points: {point!r} is not a block of the model; choose from "
                             f"{fqns[1]} ... {fqns[-1]}.")
        starts.append(fqns.index(point))
    if starts != sorted(set(starts)) or len(set(starts)) != len(starts):
        raise ValueError(f"strategy.split_points={list(split_points)} must name distinct blocks after the first, "
                         "in forward order.")
    bounds = [*starts, len(fqns)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------------------- cutting
class Removed(nn.Module):
    """Stands in for a module another stage holds. The model's own forward may still call
    it before the blocks (a middle stage runs the model's preamble: masks, positions): it
    answers with zeros of the right shape, found by running the original on meta. Those
    zeros never reach a block: the stage's first block receives the previous stage's output."""

    def __init__(self, original: nn.Module, fqn: str):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: no parameters, no state
        self.fqn = fqn

    def forward(self, *args, **kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        out = run_abstract(self._original, args, kwargs)
        return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)
                        if isinstance(t, torch.Tensor) else t, out)

    def extra_repr(self) -> str:
        return f"held by another stage: {self.fqn}"


def cut(model: nn.Module, plan: CutPlan, start: int, stop: int) -> nn.Module:
    """A copy of the meta ``model`` holding blocks ``start:stop`` (original keys) and the
    first / last modules if it is the first / last stage; the rest deleted."""
    stage = copy.deepcopy(model)
    container = stage.get_submodule(plan.blocks)
    keep = set(plan.names[start:stop])
    container._modules = OrderedDict((k, m) for k, m in container._modules.items() if k in keep)
    removed = ([] if start == 0 else list(plan.first)) + ([] if stop == len(plan.names) else list(plan.last))
    for fqn in removed:
        parent_fqn, _, name = fqn.rpartition(".")
        parent = stage.get_submodule(parent_fqn)
        setattr(parent, name, None if plan.declared else Removed(parent.get_submodule(name), fqn))
    return stage


def tied_here(stage: nn.Module, plan: CutPlan) -> list[tuple[str, ...]]:
    """For each tied group: the FQNs of the group this stage holds (possibly none)."""
    names = {n for n, _ in stage.named_parameters(remove_duplicate=False)}
    return [tuple(n for n in group if n in names) for group in plan.tied]
