"""What the planner measures about the model (parameters, FLOPs, activation bytes) and the
timing of its real step here (``StepTimer``; run by ``plan.concurrent`` in as many processes
at once as the plan has ranks, next to the collective curves).

Model facts come from one forward/backward on the meta device (no memory, any size), or
on the CPU when the model is small enough: the CPU's fused attention saves less than the
meta device's decomposed attention, and real is what the plan must predict; there the
activation figure is the peak of all tensors forward + backward hold (``plan.live``), not
only those saved for backward.
"""
from __future__ import annotations

import copy
import time

import torch
from omegaconf import DictConfig
from torch import nn

from disttrain.engine import builders
from disttrain.memory.checkpointing import find_blocks
from disttrain.observe.flops import count_train_flops
from disttrain.plan import live
from disttrain.plan.model import ModelFacts
from disttrain.plan.tp_share import sharded_time_share
from disttrain.strategies.precision import configured

SMALL_MODEL_BYTES = 256 << 20  # measure activations on CPU below this, on meta above


def example_batch(cfg: DictConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch shaped like the run's (the dataset's first item, repeated)."""
    item = builders.build_dataset(cfg)[0]
    return tuple(torch.as_tensor(t).unsqueeze(0).repeat_interleave(batch, 0) for t in item[:2])


def _saved_bytes(model: nn.Module, inputs, targets, loss_fn) -> int:
    """Bytes of distinct non-parameter tensors autograd saves for backward."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(inputs), targets)
    return sum(seen.values())


def _blocks_and_boundary(model: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """(number of repeated blocks, bytes per sample of a block's output)."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    kinds = [type(c).__name__ for c in children]
    blocks = max(kinds.count(k) for k in set(kinds))
    x, widest = inputs[:1], 0
    with torch.no_grad():
        for child in children[:-1]:  # the last output is the model's, not a boundary
            x = child(x)
            widest = max(widest, x.numel() * x.element_size())
    return max(blocks // 2 if kinds.count("Linear") == blocks else blocks, 1), widest


def model_facts(cfg: DictConfig, batch: int) -> ModelFacts:
    build, loss_fn = builders.model_builder(cfg), builders.build_loss(cfg)
    inputs, targets = example_batch(cfg, batch)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        meta = build()
    params = sum(p.numel() for p in meta.parameters())
    sharded = _tp_sharded(meta)
    linear = _linear_params(meta, sharded)
    device = "cpu" if 4 * params < SMALL_MODEL_BYTES else "meta"
    with torch.random.fork_rng(devices=[]):
        model = build().to(device) if device == "cpu" else meta
    x, y = inputs[:1].to(device), targets[:1].to(device)  # one sample: activations scale with the batch
    saved = _saved_bytes(model, x, y, loss_fn) * batch
    if device == "cpu":  # real tensors: the peak of everything forward + backward holds, at the run's batch
        saved = max(saved, live.peak_bytes(model, inputs, targets, loss_fn))
    blocks, boundary = _blocks_and_boundary(model, x)
    flops = count_train_flops(build, (inputs, targets), loss_fn)
    low = configured(cfg)
    lowp = _lowp_saved_bytes(model, x, y, loss_fn, low) if low != "32" else 0
    # timed at the run's batch where the model runs here; a large one (meta) is taken to spend
    # its time in the sharded layers, as a large transformer's matmuls nearly all are
    share = sharded_time_share(model, inputs) if device == "cpu" else 1.0
    return ModelFacts(params=params, linear_params=linear, flops_per_sample=flops / batch,
                      act_bytes_per_sample=saved / batch, boundary_bytes_per_sample=boundary, blocks=blocks,
                      tp_replicated_act=_tp_replicated(cfg), units=fsdp_units(meta, sharded), act_lowp_per_sample=lowp,
                      tp_share=share)


def _tp_sharded(model: nn.Module) -> set[int]:
    """ids of the Linear layers tensor parallelism splits: the reference models' plan (an odd
    last Linear, embeddings and the LM head stay replicated); other models: every Linear."""
    from disttrain.parallel.tensor import plan_for

    try:
        return {id(model.get_submodule(name)) for name in plan_for(model)}
    except ValueError:
        return {id(m) for m in model.modules() if isinstance(m, nn.Linear)}


def _linear_params(module: nn.Module, sharded: set[int]) -> int:
    return sum(m.weight.numel() for m in module.modules() if id(m) in sharded)


def fsdp_units(model: nn.Module, sharded: set[int]) -> tuple[tuple[int, int], ...]:
    """(params, tp-sharded Linear weights) of each module strategy=fsdp wraps on its own: the
    blocks ``find_blocks`` returns (the root holds the rest); none found, the root is one."""
    try:
        blocks = find_blocks(model)
    except ValueError:
        blocks = [model]
    sizes = [(sum(p.numel() for p in b.parameters()), _linear_params(b, sharded)) for b in blocks]
    return tuple(size for size in sizes if size[0])


class _Fp32Output(nn.Module):
    """The root's ``output_dtype=float32``: the loss sees fp32 outputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).float()


def _lowp_saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, mode: str) -> float:
    """Saved bytes of one sample as FSDP2's MixedPrecisionPolicy runs the model: parameters
    and floating inputs in bf16/fp16, outputs cast back to fp32 for the loss."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    low = copy.deepcopy(model).to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    return float(_saved_bytes(_Fp32Output(low), x, y, loss_fn))


def _tp_replicated(cfg: DictConfig) -> float:
    """Activation share TP leaves replicated: Megatron's 10/(34+5as/h) per transformer
    layer (Korthikanti et al. 2022); half for plain Linear stacks (inputs of column layers)."""
    model = cfg.model
    if "heads" in model and "block_size" in model:
        extra = 5 * model.heads * model.block_size / model.dim
        return 10 / (34 + extra)
    return 0.5


class StepTimer:
    """The real model, optimizer and loss built once and stepped at several batch sizes in
    turn (``plan.concurrent`` alternates them round by round). On this 2-core VM the same work
    runs at two speeds 1.45x apart, switching every 5-60 s; batches timed one after another
    can land on different speeds, and the plan subtracts the small batch's figure from the
    full one's (``plan.structure``), so a difference taken across a switch is off by a third.
    Alternated, both medians come from the same seconds."""

    def __init__(self, cfg: DictConfig, threads: int, batches: tuple[int, ...]):
        torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            self.model = builders.model_builder(cfg)()
        self.optimizer = builders.optimizer_builder(cfg)(self.model.parameters())
        self.loss_fn = builders.build_loss(cfg)
        self.inputs = {batch: example_batch(cfg, batch) for batch in set(batches) if batch}

    def step(self, batch: int) -> tuple[float, float]:
        """Seconds of (forward + backward, optimizer update) of one step at ``batch``. They
        scale differently: forward/backward with the samples, the update with the parameters a
        rank holds (once per step)."""
        x, y = self.inputs[batch]
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
        middle = time.perf_counter()
        self.optimizer.step()
        return middle - start, time.perf_counter() - middle
