"""Per-rank extras (step, sampler position, RNG streams): written with torch.save, read with
``weights_only=True`` so that loading a checkpoint runs no code from it.

The extras hold only containers, numbers, strings and tensors (disttrain.engine.rng stores
numpy's state as a tensor for this reason), which the weights-only unpickler accepts without
any allow-list. A file that asks for anything else (a pickled callable, a class) is refused
with the reason instead of being executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file that would run code when loaded."""


def save(extra: dict[str, Any], path: Path) -> None:
    torch.save(extra, path)


def _numpy_arrays() -> list:
    """The three globals a pickled numpy array needs (data, no code): checkpoints written before
    the RNG state was stored as a tensor hold numpy's state as an array."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    # the dtype's own class too (numpy >= 1.25 builds dtype instances through it)
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_numpy_arrays()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"{path} holds more than tensors and plain values ({first}); it was not "
                               "loaded, since loading it would run code from the file. Resume only from "
                               "checkpoints you wrote; share weights as an exported safetensors file.") from None
