"""Model FLOPs per sample: counted once with torch's FlopCounterMode, plus the analytic
formulas of the reference models (which the tests hold the counter to).

The count runs on a *meta-device copy* of the model built by the run's own builder: no
compute, no memory, no effect on the real model's gradients. It is also more complete:
on CPU the fused ``scaled_dot_product_attention`` kernel has no FLOP formula, while on the
meta device attention decomposes into matmuls that the counter sees.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("disttrain")


def _to_meta(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.empty_like(batch, device="meta")
    return type(batch)(_to_meta(item) for item in batch)


def count_train_flops(build_model: Callable[[], nn.Module], micro_batch: Any, loss_fn: nn.Module) -> int:
    """Forward + backward FLOPs of one micro-batch (matmul-class ops, as torch counts them)."""
    with torch.random.fork_rng(devices=[]):  # the builder reseeds; keep the run's RNG untouched
        with torch.device("meta"):
            model = build_model()
    inputs, targets = _to_meta(micro_batch)[:2]
    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
    return int(counter.get_total_flops())


def flops_per_sample(build_model: Callable[[], nn.Module], micro_batch: Any, loss_fn: nn.Module) -> float | None:
    """FLOPs of forward + backward per sample, or None (with a warning) if the model cannot
    run on the meta device."""
    try:
        return count_train_flops(build_model, micro_batch, loss_fn) / len(micro_batch[0])
    except Exception as exc:  # a user model with data-dependent Python control flow, say
        log.warning("cannot count model FLOPs on the meta device (%s); MFU is not reported", exc)
        return None


def mlp_train_flops(batch: int, in_dim: int, hidden: int, depth: int, out_dim: int) -> int:
    """Analytic count for ``build_mlp``: forward 2·B·Σ in·out; backward twice that, minus
    the input gradient of the first layer (the data needs none, so autograd skips it)."""
    dims = [in_dim] + [hidden] * depth + [out_dim]
    forward = sum(2 * batch * a * b for a, b in zip(dims[:-1], dims[1:]))
    return 3 * forward - 2 * batch * in_dim * hidden


def gpt_train_flops(batch: int, seq: int, vocab_size: int, dim: int, layers: int, **_: Any) -> int:
    """Analytic count for ``build_gpt``: per block 24·B·T·d² (q, k, v, proj, 4d MLP) plus
    4·B·T²·d for attention (scores and weighted sum, full square as torch counts it); the
    head 2·B·T·d·V; backward twice forward (the embedding is a gather: no FLOPs)."""
    block = 24 * batch * seq * dim * dim + 4 * batch * seq * seq * dim
    return 3 * (layers * block + 2 * batch * seq * dim * vocab_size)
