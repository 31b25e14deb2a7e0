"""Memory-mapped reading of prepared token shards (see ``disttrain.data.prepare``).

Every shard is opened with ``numpy.memmap``: a rank pages in only the bytes of the samples
its sampler hands it, so a corpus far larger than memory trains the same way as the small
shipped one, and ranks (whose sampler shares are disjoint) never read each other's samples.
Maps are opened lazily and not pickled, so DataLoader workers (fork or spawn) open their
own instead of receiving a copy of the data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from disttrain.data.prepare import DOCUMENTS, FORMAT, INDEX


class ShardedTokens:
    """One flat token sequence over all shards of a prepared directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a prepared corpus (no {INDEX}): "
                                    "run `disttrain prepare-data FILES --out DIR` first")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
        self.dtype = np.dtype(index["dtype"])
        self.files = [s["file"] for s in index["shards"]]
        sizes = np.asarray([s["tokens"] for s in index["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k holds [starts[k], starts[k+1])
        self.vocab_size = int(index.get("vocab_size", 256))
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # workers reopen; never ship the mapped data

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.directory / self.files[shard], dtype=self.dtype, mode="r")
        return self._maps[shard]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a fresh array (crossing shard boundaries as needed)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[shard + 1]))
            base = int(self.starts[shard])
            parts.append(self._map(shard)[start - base:end - base])
            start, shard = end, shard + 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def documents(self) -> np.ndarray:
        """Offsets: document d (one input file) is tokens [offsets[d], offsets[d+1])."""
        return np.load(self.directory / DOCUMENTS, mmap_mode="r")


class TokenBlocks(Dataset):
    """Sample i is (tokens[s:s+T], tokens[s+1:s+T+1]) with s = i * stride, as int64 tensors."""

    def __init__(self, tokens: ShardedTokens, block_size: int, stride: int):
        if block_size < 1 or stride < 1:
            raise ValueError(f"data.block_size={block_size} and data.stride={stride} must be >= 1")
        if len(tokens) <= block_size:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than data.block_size={block_size}")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside [0, {len(self)})")
        start = i * self.stride
        chunk = torch.from_numpy(self.tokens.read(start, start + self.block_size + 1).astype(np.int64))
        return chunk[:-1], chunk[1:]
