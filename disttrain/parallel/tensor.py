"""Tensor-parallel plans, applied with torch.distributed.tensor.parallel.

Where the plan comes from, first match wins:

1. ``strategy.tp_plan`` in the config: module-name pattern -> colwise | rowwise | replicate |
   sequence (``*`` matches one name component: ``model.layers.*.self_attn.q_proj``);
2. the model's own plan: transformers models carry ``config.base_model_tp_plan`` (patterns
   relative to the base model, e.g. ``model.`` in LlamaForCausalLM), used as given;
3. the reference models: Megatron-style. MLP: the Linear layers pair up as column-parallel
   (output features split) then row-parallel (input features split, outputs summed by one
   all-reduce), so the activation between them never leaves its rank. GPT blocks: q/k/v
   column-parallel (each rank owns heads/tp attention heads), the attention projection
   row-parallel; the MLP's fc column-parallel and out row-parallel. Embeddings, norms and
   the LM head stay replicated.

The plan is found per module it is applied to: a pipeline stage (a Sequential of the unsplit
model's layers, or a cut transformers model) plans only the layers it holds, under their
unsplit names, so a stage boundary never cuts a column/row pair in a reference model.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Mapping

from torch import nn
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from disttrain.models.gpt import Block

#: plan words (ours and transformers' names for the same styles) -> torch style (None: replicated)
STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "sequence": SequenceParallel,
          "sequence_parallel": SequenceParallel, "replicate": None}


def plan_for(model: nn.Module, tp_plan: Mapping[str, str] | None = None) -> dict:
    """A parallelize_module plan: module FQN -> torch ParallelStyle."""
    patterns = dict(tp_plan) if tp_plan else model_plan(model)
    if patterns:
        return _from_patterns(model, patterns, "strategy.tp_plan" if tp_plan else "the model's base_model_tp_plan")
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
        raise ValueError("tensor parallelism (dist.tp > 1) needs a GPT (model=gpt_tiny), a Sequential with at "
                         "least two Linear layers (model=mlp) in every part it splits, a model with a "
                         "config.base_model_tp_plan (transformers), or strategy.tp_plan={pattern: colwise|rowwise}")
    plan = {}
    for first, second in zip(linears[0::2], linears[1::2]):  # an odd last Linear stays replicated
        plan[first], plan[second] = ColwiseParallel(), RowwiseParallel()
    return plan


def model_plan(model: nn.Module) -> dict[str, str]:
    """A transformers model's own plan (``config.base_model_tp_plan``), prefixed with where its
    base model sits (``model.`` in LlamaForCausalLM, ``bert.`` in BertForMaskedLM)."""
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None) if config is not None else None
    if not plan:
        return {}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return {f"{prefix}.{pattern}": style for pattern, style in plan.items()}
    return dict(plan)


def _match(pattern: str, fqn: str) -> bool:
    parts, names = pattern.split("."), fqn.split(".")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names))


def _from_patterns(model: nn.Module, patterns: Mapping[str, str], source: str) -> dict:
    for pattern, style in patterns.items():
        if style not in STYLES:
            raise ValueError(f"{source}: {pattern}={style!r} is not one of {', '.join(STYLES)}: set "
                             "strategy.tp_plan with those styles for this model.")
    plan = {}
    for fqn, module in model.named_modules():
        for pattern, style in patterns.items():
            if fqn and _match(pattern, fqn):
                if STYLES[style] is not None:
                    plan[fqn] = STYLES[style]()
                break
    return plan


def sharded_sizes(model: nn.Module, tp_plan: Mapping[str, str] | None = None) -> dict[str, int]:
    """The dimension each planned Linear splits, to check divisibility by dist.tp up front."""
    sizes = {}
    for name, style in plan_for(model, tp_plan).items():
        layer = model.get_submodule(name)
        if isinstance(style, ColwiseParallel) and hasattr(layer, "out_features"):
            sizes[name] = layer.out_features
        elif isinstance(style, RowwiseParallel) and hasattr(layer, "in_features"):
            sizes[name] = layer.in_features
    return sizes


def head_counts(model: nn.Module) -> dict[str, int]:
    """Attention head counts that a column-parallel q/k/v split divides: the reference GPT's
    ``model.heads``; a transformers config's query and key/value heads."""
    heads = {"model.heads": child.attn.heads for child in model.children() if isinstance(child, Block)}
    config: Any = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            heads[f"model.config.{key}"] = value
    return heads


def check_divisible(model: nn.Module, tp: int, tp_plan: Mapping[str, str] | None = None) -> None:
    for name, size in sharded_sizes(model, tp_plan).items():
        if size % tp:
            raise ValueError(f"dist.tp={tp} does not divide layer {name} ({size} features): choose a "
                             "tensor-parallel degree that divides the model's widths.")
    for key, heads in head_counts(model).items():
        if heads % tp:
            raise ValueError(f"dist.tp={tp} does not divide {key}={heads}: attention heads are "
                             "split across tensor-parallel ranks.")


def apply_tp(model: nn.Module, tp_mesh, tp_plan: Mapping[str, str] | None = None) -> nn.Module:
    """Shard ``model`` in place over ``tp_mesh``; parameters become DTensors."""
    return parallelize_module(model, tp_mesh, plan_for(model, tp_plan))
