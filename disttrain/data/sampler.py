"""A distributed batch sampler whose position is part of the checkpoint, defined globally.

torch's DistributedSampler can shuffle per epoch but cannot start mid-epoch, and its order
depends on the number of ranks. Here the order is the job's, not the rank's: optimizer step
``i`` of epoch ``e`` trains on samples ``[i*G, (i+1)*G)`` of the epoch's permutation, where
``G = data-parallel ranks x data.batch_size x micro-batches per step`` is the global batch.
Each data-parallel rank takes every world-th sample of that slice and cuts it into its
micro-batches. So a run resumed on another number of ranks with the same global batch
trains on exactly the samples, step for step, that the uninterrupted run would have used:
the checkpointed position is counted in samples of the epoch, not in this rank's batches.

The position counts batches *consumed by the loop*, not batches produced, so prefetching
data-loader workers that run ahead do not shift it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of indices, forever, epoch after epoch."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, micro_per_step: int = 1):
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if micro_per_step < 1:
            raise ValueError(f"trainer.grad_accum_steps={micro_per_step} must be >= 1")
        self.global_batch = world_size * batch_size * micro_per_step
        self.steps_per_epoch = dataset_len // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"dataset of {dataset_len} samples is smaller than one global batch of {self.global_batch} "
                f"({world_size} data-parallel ranks x data.batch_size={batch_size} x {micro_per_step} "
                "micro-batches per step): lower the batch size or grow the dataset."
            )
        self.dataset_len, self.batch_size, self.micro_per_step = dataset_len, batch_size, micro_per_step
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = self.steps_per_epoch * micro_per_step
        self.epoch, self.consumed = 0, 0  # consumed: this rank's micro-batches of the epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))
        return torch.arange(self.dataset_len)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order, g, b = self._order(epoch), self.global_batch, self.batch_size
        batches = []
        for step in range(self.steps_per_epoch):
            mine = order[step * g:(step + 1) * g][self.rank::self.world_size].tolist()
            batches.extend(mine[j * b:(j + 1) * b] for j in range(self.micro_per_step))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.consumed
        while True:
            yield from self._epoch_batches(epoch)[start:]
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def advance(self, batches: int = 1) -> None:
        """Record that the loop consumed ``batches`` more micro-batches."""
        total = self.consumed + batches
        self.epoch += total // self.batches_per_epoch
        self.consumed = total % self.batches_per_epoch

    def state_dict(self) -> dict:
        """The job's position (epoch, samples of the epoch consumed) plus the shape that wrote
        it; every data-parallel rank holds the same position."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "micro_per_step": self.micro_per_step, "global_batch": self.global_batch,
                "samples": self.consumed * self.world_size * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint's data order was drawn with trainer.seed={state['seed']}, this run has "
                             f"{self.seed}: resume with the same trainer.seed.")
        if "samples" not in state:  # written before the order was global: only the same shape continues it
            if state["world_size"] != self.world_size:
                raise ValueError(f"checkpoint was written with {state['world_size']} data-parallel ranks by an "
                                 f"older disttrain, this run has {self.world_size}: resume with the same world size.")
            self.epoch, self.consumed = state["epoch"], state["consumed"]
            return
        samples = int(state["samples"])
        if samples % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped {samples} samples into epoch {state['epoch']} with a global batch of "
                f"{state['global_batch']}; this run's global batch is {self.global_batch}, which does not continue "
                f"from there: keep the global batch (trainer.global_batch_size={state['global_batch']}).")
        self.epoch, self.consumed = int(state["epoch"]), samples // self.global_batch * self.micro_per_step
