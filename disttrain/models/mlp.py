"""A plain MLP: in -> [Linear+act] x depth -> out."""
from __future__ import annotations

from torch import nn


def build_mlp(in_dim: int = 32, hidden: int = 128, depth: int = 3, out_dim: int = 1,
              activation: str = "relu") -> nn.Sequential:
    """``depth`` hidden blocks, each ``Linear(hidden) + activation``; one flat Sequential."""
    if depth < 1:
        raise ValueError(f"model.depth={depth} must be >= 1")
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), act()]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)
