"""Megatron-style tensor-parallel plans for the reference models, applied with
torch.distributed.tensor.parallel.

MLP: the Linear layers pair up as column-parallel (output features split) then
row-parallel (input features split, outputs summed by one all-reduce), so the activation
between them never leaves its rank. GPT blocks: q/k/v column-parallel (each rank owns
heads/tp attention heads), the attention projection row-parallel; the MLP's fc
column-parallel and out row-parallel. Embeddings, norms and the LM head stay replicated.

The plan is found per module it is applied to: a pipeline stage (a Sequential of the
unsplit model's layers under their own names) pairs its own Linear layers, so a stage
boundary never cuts a column/row pair (whose activation is a local shard).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from disttrain.models.gpt import Block


def plan_for(model: nn.Module) -> dict:
    """A parallelize_module plan for a reference model (GPT blocks or a Sequential MLP)."""
    blocks = [name for name, child in model.named_children() if isinstance(child, Block)]
    if blocks:
        plan = {}
        for name in blocks:
            for proj in ("q", "k", "v"):
                plan[f"{name}.attn.{proj}"] = ColwiseParallel()
            plan[f"{name}.attn.proj"] = RowwiseParallel()
            plan[f"{name}.fc"], plan[f"{name}.out"] = ColwiseParallel(), RowwiseParallel()
        return plan
    linears = [name for name, child in model.named_children() if isinstance(child, nn.Linear)]
    if len(linears) < 2:
        raise ValueError("tensor parallelism (dist.tp > 1) needs a GPT (model=gpt_tiny) or a Sequential with at "
                         "least two Linear layers (model=mlp) in every part it splits")
    plan = {}
    for first, second in zip(linears[0::2], linears[1::2]):  # an odd last Linear stays replicated
        plan[first], plan[second] = ColwiseParallel(), RowwiseParallel()
    return plan


def sharded_sizes(model: nn.Module) -> dict[str, int]:
    """The dimension each planned layer splits, to check divisibility by dist.tp up front."""
    sizes = {}
    for name, style in plan_for(model).items():
        layer = model.get_submodule(name)
        sizes[name] = layer.out_features if isinstance(style, ColwiseParallel) else layer.in_features
    return sizes


def check_divisible(model: nn.Module, tp: int) -> None:
    for name, size in sharded_sizes(model).items():
        if size % tp:
            raise ValueError(f"dist.tp={tp} does not divide layer {name} ({size} features): choose a "
                             "tensor-parallel degree that divides the model's widths.")
    heads = [child.attn.heads for child in model.children() if isinstance(child, Block)]
    if heads and heads[0] % tp:
        raise ValueError(f"dist.tp={tp} does not divide model.heads={heads[0]}: attention heads are "
                         "split across tensor-parallel ranks.")


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard ``model`` in place over ``tp_mesh``; parameters become DTensors."""
    return parallelize_module(model, tp_mesh, plan_for(model))
