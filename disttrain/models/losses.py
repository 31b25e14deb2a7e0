"""Loss functions that the reference tasks need beyond torch.nn's."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def select_output(output: Any, key: str = "logits") -> torch.Tensor:
    """The tensor a loss reads from a model's output: the output itself, or field ``key`` of
    a dict / dataclass output (Hugging Face ``ModelOutput``: ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
    if not isinstance(value, torch.Tensor):
        fields = list(output.keys()) if isinstance(output, Mapping) else type(output).__name__
        raise KeyError(f"loss.output_key={key!r}: the model's output has no tensor field {key!r} ({fields}); "
                       "set loss.output_key to the field that holds the predictions.")
    return value


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over (batch, time, vocab) logits and (batch, time) targets; a model output
    that is a dict or dataclass (``ModelOutput``) gives its ``output_key`` field."""

    def __init__(self, output_key: str = "logits"):
        super().__init__()
        self.output_key = output_key

    def forward(self, logits: Any, targets: torch.Tensor) -> torch.Tensor:
        logits = select_output(logits, self.output_key)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
