"""A real character-level corpus shipped inside the package (no download).

The text is the docstrings of a few dozen Python standard-library modules (PSF licence),
byte-encoded: vocabulary 256, so no tokenizer file is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

CORPUS = Path(__file__).with_name("corpus.txt")


class CharBlocks(Dataset):
    """Sample i is (tokens[s:s+T], tokens[s+1:s+T+1]) with s = i * stride."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int):
        if block_size < 1 or stride < 1:
            raise ValueError("data.block_size and data.stride must be >= 1")
        if len(tokens) <= block_size:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than data.block_size={block_size}")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        chunk = self.tokens[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def char_corpus(block_size: int = 64, stride: int = 32, path: str | None = None) -> CharBlocks:
    """Byte-level blocks of a text file (the shipped corpus by default)."""
    raw = Path(path or CORPUS).read_bytes()
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return CharBlocks(tokens, block_size, stride)
