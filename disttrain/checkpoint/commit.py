"""Checkpoints that survive kills: one directory per step, committed atomically.

Layout of ``<run dir>/checkpoints/``::

    step_00000100/      model/optimizer/scheduler through torch.distributed.checkpoint (sharded
                        when the strategy shards), extra_rank{r}.pt per rank (RNG, sampler, step),
                        manifest.json (size and sha256 of every file and what wrote the
                        checkpoint: written last, by rank 0, from the ranks' hashes)
    latest              the name of the newest committed step directory
    .tmp-step_...       a write in progress (or killed mid-write): never read, removed on start

A directory is complete only if its manifest matches every file; an incomplete or corrupt one
is skipped with a warning and the next older one is used. With ``checkpoint.async=true`` the
loop blocks only while the state is copied to host memory (``disttrain.checkpoint.background``);
the same commit then runs on a background thread over a process group of its own.
"""
from __future__ import annotations

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

from disttrain.checkpoint import extras
from disttrain.checkpoint.manifest import (LATEST, MANIFEST, find_latest_valid, fsync_dir, fsync_write,  # noqa: F401
                                           hash_share, read_manifest, step_dirs, verify, write_manifest)
from disttrain.distributed import comm

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


class Checkpointer:
    """Saves and restores a strategy's state plus per-rank extras, collectively.

    ``writer``: what the manifest records about this run (``origin.describe``);
    ``background``: a ``background.BackgroundSaver`` for ``checkpoint.async=true``."""

    def __init__(self, root: Path, keep: int = 3, writer: dict[str, Any] | None = None, background=None):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.root, self.keep, self.writer, self.background = Path(root), keep, writer or {}, background
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
        if self.background is not None:
            self.background.wait()  # one save in flight at a time: the previous one commits first
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        delay = self.write_delay_s  # read now: the guard resets it when save returns
        if self.background is not None:  # blocks while the state is staged, then returns
            self.background.submit(state, lambda staged, group: self._write_and_commit(
                step, tmp, final, staged, extra, None, _GroupOps(group), delay))
            return final
        self._write_and_commit(step, tmp, final, state, extra, native, _GroupOps(None), delay)
        return final

    def wait(self) -> None:
        """Until the save in flight (if any) is committed; re-raises its error."""
        if self.background is not None:
            self.background.wait()

    def _write_and_commit(self, step: int, tmp: Path, final: Path, state, extra, native, ops: "_GroupOps",
                          delay: float = 0.0) -> None:
        if native is not None:  # an engine's own format (DeepSpeed's)
            native.save_checkpoint(tmp)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=ops.group or comm.get().group)
        extras.save(extra, tmp / f"extra_rank{self.rank}.pt")
        if delay:  # debug (fault.debug.save_delay_s): a window to kill a write midway
            time.sleep(delay)
        ops.barrier()
        shares = ops.gather(hash_share(tmp, ops.rank(), ops.size()))  # each rank hashes its share
        if self.rank == 0:
            write_manifest(tmp, step, {k: v for share in shares for k, v in share.items()}, self.writer)
            if final.exists():  # same step saved twice (e.g. signal right after cadence save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            fsync_write(self.root / LATEST, final.name)
            self._prune()
            if ops.group is not None:
                log.info("checkpoint committed: %s", final)
        ops.barrier()

    def _prune(self) -> None:
        for old in step_dirs(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def choose(self, resume: str) -> Path | None:
        """Which checkpoint to resume from; rank 0 decides and every rank agrees. An explicit
        path is used only while this run dir has no checkpoint of its own: a restarted or
        requeued job continues from its own newest checkpoint instead of rewinding."""
        choice: list[Any] = [None]
        if self.rank == 0:
            if resume == "never":
                choice[0] = None
            elif resume == "auto":
                found = find_latest_valid(self.root)
                choice[0] = str(found) if found else None
            else:
                own = find_latest_valid(self.root)
                if own is not None:
                    log.info("checkpoint.resume=%s not used: this run dir has its own checkpoint %s (a restart "
                             "continues from it)", resume, own)
                    choice[0] = str(own)
                else:
                    reason = verify(Path(resume))
                    choice[0] = ("error", f"checkpoint.resume={resume}: {reason}") if reason else resume
        choice[0] = comm.get().broadcast_object(choice[0], src=0)
        if isinstance(choice[0], tuple):
            raise CheckpointError(choice[0][1])
        return Path(choice[0]) if choice[0] else None

    def check_origin(self, directory: Path) -> tuple[bool, bool]:
        """Refuse a checkpoint of another model (one line); report a resharding. Returns (same
        world size: its per-rank extras are this rank's, model weights only: DeepSpeed's format
        read by another strategy)."""
        from disttrain.checkpoint import origin  # lazily: `import disttrain` stays free of omegaconf

        written = read_manifest(directory).get("writer", {})
        reshard, refusal = origin.compare(written, self.writer, directory) if self.writer else (None, None)
        if refusal:
            raise CheckpointError(refusal)
        if reshard and self.rank == 0:
            log.warning("%s", reshard)
        same = not written or written.get("world_size") == self.writer.get("world_size", written.get("world_size"))
        return same, bool(reshard and reshard.startswith(origin.WEIGHTS_ONLY))

    def load(self, directory: Path, state: dict[str, Any], native: Any = None) -> dict[str, Any]:
        """Fill ``state`` in place from ``directory`` (or ``native.load_checkpoint`` it); return
        this rank's extras. Written by another world size: rank 0's extras without its RNG
        streams (the sampler position is the job's; the caller re-seeds the RNGs)."""
        same_world, weights_only = self.check_origin(directory)
        if weights_only:  # state is left alone; the caller loads these weights instead
            return {**extras.load(directory / "extra_rank0.pt"), "rng": None, "weights": full_model_state(directory)}
        if native is not None:
            native.load_checkpoint(directory)
        else:
            dcp.load(state, checkpoint_id=str(directory), process_group=comm.get().group)
        if not same_world:
            extra = extras.load(directory / "extra_rank0.pt")
            extra.pop("rng", None)
            return extra
        extra_path = directory / f"extra_rank{self.rank}.pt"
        if not extra_path.is_file():
            raise CheckpointError(f"{directory} has no state for rank {self.rank} and its manifest does not say "
                                  "which world size wrote it: resume with the same world size.")
        return extras.load(extra_path)


class _GroupOps:
    """The commit's collectives over ``group`` (the background saver's own) or the job's."""

    def __init__(self, group):
        self.group = group
        self._ranks = group if group is not None else comm.get().group  # None: the world

    def rank(self) -> int:
        return dist.get_rank(self._ranks) if dist.is_initialized() else 0

    def size(self) -> int:
        return dist.get_world_size(self._ranks) if dist.is_initialized() else 1

    def barrier(self) -> None:
        if self.group is None:
            comm.get().barrier()
        elif self.size() > 1:
            dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return comm.get().gather_objects(obj)
        out: list[Any] = [None] * self.size()
        dist.all_gather_object(out, obj, group=self.group)
        return out


def load_model_state(run_dir: str | os.PathLike, step: int | None = None) -> dict[str, torch.Tensor]:
    """The full (unsplit) model state dict of a run's newest intact checkpoint, or of ``step``."""
    return full_model_state(checkpoint_dir(run_dir, step))


def full_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict held by one checkpoint directory, whatever wrote it."""
    if (directory / "native.json").is_file():  # a strategy's own format names its full-state reader
        from disttrain.config.validate import import_target

        reader = json.loads((directory / "native.json").read_text())["full_model_state"]
        return import_target(reader.replace(":", "."), "native.json")(directory)
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "loading in a single process" is exactly the intent here
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(checkpoint_id=str(directory))
    return _unflatten_model(loaded)


def checkpoint_dir(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The newest intact checkpoint directory of a run, or that of ``step`` (verified)."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        directory = find_latest_valid(root)
        if directory is None:
            raise CheckpointError(f"no intact checkpoint under {root}")
        return directory
    directory = root / f"step_{step:08d}"
    reason = verify(directory)
    if reason:
        raise CheckpointError(f"{directory}: {reason}")
    return directory


def _unflatten_model(loaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "model" in loaded and isinstance(loaded["model"], dict):
        return loaded["model"]
    prefix = "model."
    return {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
