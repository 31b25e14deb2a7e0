"""The data-loader settings of the ``data`` group, checked up front and turned into
DataLoader arguments, plus the debug delay that makes a loader slow on purpose.

Keys: ``num_workers`` (worker processes; 0 = load in the training process),
``prefetch_factor`` (batches each worker keeps ready), ``persistent_workers``,
``pin_memory`` (page-locked host batches so the copy to a GPU runs asynchronously; ignored
without CUDA), ``debug_delay_s`` (seconds of sleep per sample: simulates slow storage or
transforms, e.g. to see data-wait and the input-bound warning).

Mid-epoch resume stays exact with workers because ResumableBatchSampler's checkpointed
position counts batches the *loop consumed* (``advance``), not the indices workers were
handed; a resumed loader restarts from that position and the prefetched-but-unused batches
are simply produced again.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset


def _get(cfg: DictConfig, key: str, default: Any) -> Any:
    return OmegaConf.select(cfg, f"data.{key}", default=default)


def validate(cfg: DictConfig) -> None:
    """Raise ValueError naming the bad ``data.*`` loader key and the fix."""
    workers = _get(cfg, "num_workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.num_workers={workers!r} must be an integer >= 0 (0 loads in the training process).")
    prefetch = _get(cfg, "prefetch_factor", 2)
    if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 1):
        raise ValueError(f"data.prefetch_factor={prefetch!r} must be an integer >= 1 (batches kept ready per worker).")
    delay = _get(cfg, "debug_delay_s", 0.0)
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError(f"data.debug_delay_s={delay!r} must be a number of seconds >= 0 (0 disables the delay).")
    for key in ("pin_memory", "persistent_workers"):
        value = _get(cfg, key, False)
        if not isinstance(value, bool):
            raise ValueError(f"data.{key}={value!r} must be true or false.")


def loader_options(cfg: DictConfig, rank: int) -> dict[str, Any]:
    """Keyword arguments for torch's DataLoader (besides dataset and batch_sampler)."""
    workers = int(_get(cfg, "num_workers", 0))
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(_get(cfg, "pin_memory", False)) and torch.cuda.is_available(),
        # Its own generator: creating an iterator then draws the workers' base seed from it,
        # not from the global RNG that the checkpoint restores (a resumed run would drift).
        "generator": torch.Generator().manual_seed(int(cfg.trainer.seed) * 1000 + rank),
    }
    if workers > 0:
        options["prefetch_factor"] = int(_get(cfg, "prefetch_factor", 2) or 2)
        options["persistent_workers"] = bool(_get(cfg, "persistent_workers", True))
        if sys.platform == "linux":
            # Ranks started by the local elastic agent (or any spawn-started process) would
            # otherwise spawn their loader workers too: each re-imports torch, which took
            # 20+ s per worker on a loaded 2-core machine. Fork is what torchrun/Slurm ranks get
            # anyway; workers never touch CUDA or the process group, so forking is safe.
            options["multiprocessing_context"] = "fork"
    return options


class DelayedDataset(Dataset):
    """Wraps a dataset and sleeps ``delay_s`` per sample (a sleep, not busy work, so it
    models I/O latency without stealing CPU from the other processes)."""

    def __init__(self, dataset: Dataset, delay_s: float):
        self.dataset, self.delay_s = dataset, float(delay_s)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delay_s)
        return self.dataset[index]


def with_debug_delay(dataset: Dataset, cfg: DictConfig) -> Dataset:
    delay = float(_get(cfg, "debug_delay_s", 0.0) or 0.0)
    return DelayedDataset(dataset, delay) if delay > 0 else dataset


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor or a tuple/list of them) on ``device``, copied asynchronously;
    None (a rank that reads no data) stays None."""
    if batch is None:
        return None
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(item, device) for item in batch)
