"""Loss functions that the reference tasks need beyond torch.nn's."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over (batch, time, vocab) logits and (batch, time) targets."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
