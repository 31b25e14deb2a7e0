"""Memory levers applied to a built model, independent of the strategy: activation
checkpointing (recompute in backward) and activation offloading (saved tensors leave the device).

``apply(model, section(cfg, "memory"), run_dir)`` is called on what each strategy keeps (the
whole model, a pipeline stage: ``SetupContext.apply_memory``), so every strategy gets the same
behaviour from the ``memory`` config section::

    memory.activation_checkpointing: none | full | every_n   (memory.checkpoint_every: k)
    memory.activation_offload: none | cpu | disk             (memory.offload_dir, memory.offload_min_bytes)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from omegaconf import DictConfig
from torch import nn

from disttrain.config.errors import ConfigError
from disttrain.config.schema import MemoryConfig, section

from disttrain.memory.checkpointing import MODES as CHECKPOINT_MODES, apply_activation_checkpointing, find_blocks
from disttrain.memory.offload import MODES as OFFLOAD_MODES, ActivationOffload, attach_offload

__all__ = ["apply", "apply_activation_checkpointing", "apply_activation_offload", "find_blocks",
           "ActivationOffload", "validate"]

def validate(cfg: DictConfig) -> None:
    """Reject bad ``memory.*`` values before any worker starts (ConfigError naming the key)."""
    mem = section(cfg, "memory")
    if mem.activation_checkpointing not in CHECKPOINT_MODES:
        raise ConfigError(f"memory.activation_checkpointing={mem.activation_checkpointing!r} must be one of "
                          f"{', '.join(CHECKPOINT_MODES)}.")
    if mem.checkpoint_every < 1:
        raise ConfigError(f"memory.checkpoint_every={mem.checkpoint_every!r} must be an integer >= 1 "
                          "(blocks recomputed together with activation_checkpointing=every_n).")
    if mem.activation_offload not in OFFLOAD_MODES:
        raise ConfigError(f"memory.activation_offload={mem.activation_offload!r} must be one of "
                          f"{', '.join(OFFLOAD_MODES)}.")
    if mem.offload_min_bytes < 0:
        raise ConfigError(f"memory.offload_min_bytes={mem.offload_min_bytes!r} must be an integer >= 0.")


def offload_directory(mem: MemoryConfig, run_dir: str | os.PathLike | None, rank: int) -> Path:
    """One folder per rank: ``memory.offload_dir`` or ``<run dir>/offload``."""
    base = mem.offload_dir or (Path(run_dir) / "offload" if run_dir else Path(tempfile.gettempdir()) /
                               f"disttrain-offload-{os.getpid()}")
    return Path(base) / f"rank{rank}"


def apply_activation_offload(model: nn.Module, mode: str, directory: str | os.PathLike | None = None,
                             min_bytes: int = 1024) -> nn.Module:
    """Offload what ``model``'s forward saves for backward; returns the same object."""
    if mode == "none":
        return model
    return attach_offload(model, ActivationOffload(mode, directory, min_bytes))


def apply(model: nn.Module, mem: MemoryConfig, run_dir: str | os.PathLike | None = None) -> nn.Module:
    """Apply the ``memory`` section (``section(cfg, "memory")``) to a freshly built model or
    stage (a no-op with the defaults)."""
    apply_activation_checkpointing(model, mem.activation_checkpointing, mem.checkpoint_every)
    directory = offload_directory(mem, run_dir, _rank()) if mem.activation_offload == "disk" else None
    return apply_activation_offload(model, mem.activation_offload, directory, mem.offload_min_bytes)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
