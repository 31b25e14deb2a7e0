"""Seeded synthetic tasks: the same seed gives the same samples on every rank and run."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def _inputs(size: int, in_dim: int, seed: int) -> tuple[torch.Generator, torch.Tensor]:
    if size < 1 or in_dim < 1:
        raise ValueError(f"data.size={size} and data.in_dim={in_dim} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    return gen, torch.randn(size, in_dim, generator=gen)


def synthetic_regression(size: int = 4096, in_dim: int = 32, out_dim: int = 1, noise: float = 0.01,
                         seed: int = 1234) -> TensorDataset:
    """y = tanh(x @ W1) @ W2 + noise: learnable by an MLP, not by a linear model alone."""
    gen, x = _inputs(size, in_dim, seed)
    w1 = torch.randn(in_dim, 2 * in_dim, generator=gen) / in_dim**0.5
    w2 = torch.randn(2 * in_dim, out_dim, generator=gen) / (2 * in_dim) ** 0.5
    y = torch.tanh(x @ w1) @ w2 + noise * torch.randn(size, out_dim, generator=gen)
    return TensorDataset(x, y)


def synthetic_classification(size: int = 4096, in_dim: int = 32, classes: int = 10,
                             seed: int = 1234) -> TensorDataset:
    """Labels from the argmax of a random linear map: separable, so accuracy can reach 1."""
    gen, x = _inputs(size, in_dim, seed)
    w = torch.randn(in_dim, classes, generator=gen)
    return TensorDataset(x, (x @ w).argmax(dim=1))
