"""Checkpoints that survive kills: one directory per step, committed atomically.

Layout of ``<run dir>/checkpoints/``::

    step_00000100/      model/optimizer/scheduler through torch.distributed.checkpoint (sharded
                        when the strategy shards), extra_rank{r}.pt per rank (RNG, sampler, step),
                        manifest.json (size and sha256 of every file: written last, by rank 0)
    latest              the name of the newest committed step directory
    .tmp-step_...       a write in progress (or killed mid-write): never read, removed on start

A directory is complete only if its manifest matches every file; an incomplete or
corrupt one is skipped with a warning and the next older one is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from disttrain.distributed import comm

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, step: int) -> None:
    # rglob: a native checkpoint (DeepSpeed) writes sub-folders; DCP's files are all top-level.
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    _fsync_write(directory / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def step_dirs(root: Path) -> list[Path]:
    """Committed-looking step directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")),
                  key=lambda p: p.name, reverse=True)


def find_latest_valid(root: Path) -> Path | None:
    """The newest intact checkpoint; corrupt or partial ones are skipped with a warning."""
    for directory in step_dirs(root):
        reason = verify(directory)
        if reason is None:
            return directory
        log.warning("skipping checkpoint %s: %s", directory, reason)
    return None


class Checkpointer:
    """Saves and restores a strategy's state plus per-rank extras, collectively."""

    def __init__(self, root: Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.root, self.keep = Path(root), keep
        self.write_delay_s = 0.0
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _barrier(self) -> None:
        comm.get().barrier()

    def clean_partial(self) -> None:
        """Remove writes that were killed midway (rank 0, before anything else runs)."""
        if self.rank == 0 and self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()

    def save(self, step: int, state: dict[str, Any], extra: dict[str, Any], native: Any = None) -> Path:
        """``native``: an object with ``save_checkpoint(dir)`` (an engine's own format) instead of DCP."""
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if native is not None:  # an engine's own format (DeepSpeed's)
            native.save_checkpoint(tmp)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=comm.get().group)  # the job's ranks
        torch.save(extra, tmp / f"extra_rank{self.rank}.pt")
        if self.write_delay_s:  # debug (fault.debug.save_delay_s): a window to kill a write midway
            time.sleep(self.write_delay_s)
        self._barrier()
        if self.rank == 0:
            write_manifest(tmp, step)
            if final.exists():  # same step saved twice (e.g. signal right after cadence save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / LATEST, name)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        for old in step_dirs(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def choose(self, resume: str) -> Path | None:
        """Which checkpoint to resume from; rank 0 decides and every rank agrees."""
        choice: list[Any] = [None]
        if self.rank == 0:
            if resume == "never":
                choice[0] = None
            elif resume == "auto":
                found = find_latest_valid(self.root)
                choice[0] = str(found) if found else None
            else:
                reason = verify(Path(resume))
                choice[0] = ("error", f"checkpoint.resume={resume}: {reason}") if reason else resume
        choice[0] = comm.get().broadcast_object(choice[0], src=0)
        if isinstance(choice[0], tuple):
            raise CheckpointError(choice[0][1])
        return Path(choice[0]) if choice[0] else None

    def load(self, directory: Path, state: dict[str, Any], native: Any = None) -> dict[str, Any]:
        """Fill ``state`` in place from ``directory`` (or ``native.load_checkpoint`` it); return
        this rank's extras."""
        if native is not None:
            native.load_checkpoint(directory)
        else:
            dcp.load(state, checkpoint_id=str(directory), process_group=comm.get().group)
        extra_path = directory / f"extra_rank{self.rank}.pt"
        if not extra_path.is_file():
            raise CheckpointError(f"{directory} has no state for rank {self.rank}: was it written "
                                  "with another world size? Resume with the same world size.")
        return torch.load(extra_path, weights_only=False)


def load_model_state(run_dir: str | os.PathLike, step: int | None = None) -> dict[str, torch.Tensor]:
    """The full (unsplit) model state dict of a run's newest intact checkpoint, or of ``step``."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        directory = find_latest_valid(root)
        if directory is None:
            raise CheckpointError(f"no intact checkpoint under {root}")
    else:
        directory = root / f"step_{step:08d}"
        reason = verify(directory)
        if reason:
            raise CheckpointError(f"{directory}: {reason}")
    if (directory / "native.json").is_file():  # a strategy's own format names its full-state reader
        from disttrain.config.validate import import_target

        reader = json.loads((directory / "native.json").read_text())["full_model_state"]
        return import_target(reader.replace(":", "."), "native.json")(directory)
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "loading in a single process" is exactly the intent here
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(checkpoint_id=str(directory))
    return _unflatten_model(loaded)


def _unflatten_model(loaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "model" in loaded and isinstance(loaded["model"], dict):
        return loaded["model"]
    prefix = "model."
    return {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
