"""A small decoder-only transformer (GPT), written as a Sequential of blocks.

Uses torch's scaled_dot_product_attention (flash/memory-efficient kernels on GPUs).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Embedding(nn.Module):
    """Token + learned position embedding."""

    def __init__(self, vocab_size: int, block_size: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)


class Attention(nn.Module):
    """Causal multi-head self-attention; q/k/v kept as separate Linear layers so that
    tensor parallelism can shard them column-wise and ``proj`` row-wise."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 rather than dim // heads: under tensor parallelism each rank holds a head subset.
        q, k, v = (lin(x).view(b, t, -1, x.shape[-1] // self.heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    """Final norm and projection to vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.lm = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.ln(x))


def build_gpt(vocab_size: int = 256, block_size: int = 64, dim: int = 64, heads: int = 4,
              layers: int = 2) -> nn.Sequential:
    """Embedding, ``layers`` blocks, head: logits of shape (batch, time, vocab)."""
    if layers < 1:
        raise ValueError(f"model.layers={layers} must be >= 1")
    blocks = [Block(dim, heads) for _ in range(layers)]
    return nn.Sequential(Embedding(vocab_size, block_size, dim), *blocks, Head(dim, vocab_size))
