"""A distributed batch sampler whose position is part of the checkpoint.

torch's DistributedSampler can shuffle per epoch but cannot start mid-epoch; a resumed run
must see exactly the samples the uninterrupted run would have seen, so this one can.
The position counts batches *consumed by the loop*, not batches produced, so prefetching
data-loader workers that run ahead do not shift it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of indices, forever, epoch after epoch.

    Epoch e uses permutation(seed + e) of the dataset; rank r takes every world-th index
    starting at r (so ranks are disjoint and together cover the global batch of a
    single process with batch world * batch_size).
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        per_rank = dataset_len // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"dataset of {dataset_len} samples gives {per_rank} per rank on {world_size} ranks, "
                f"fewer than data.batch_size={batch_size}: lower the batch size or grow the dataset."
            )
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.consumed = 0, 0

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.dataset_len)
        mine = order[self.rank::self.world_size].tolist()
        return [mine[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.consumed
        while True:
            yield from self._epoch_batches(epoch)[start:]
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def advance(self, batches: int = 1) -> None:
        """Record that the loop consumed ``batches`` more batches."""
        total = self.consumed + batches
        self.epoch += total // self.batches_per_epoch
        self.consumed = total % self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint was written with {state['world_size']} data-parallel ranks, this run has "
                f"{self.world_size}: resume with the same world size (or checkpoint.resume=never)."
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]
