"""What makes a checkpoint directory trustworthy: a manifest (size and sha256 of every file,
plus what wrote it), written last; a directory whose files do not match it is not used.

The files are hashed by the ranks that wrote them, in parallel (``hash_share``), and rank 0
only merges the parts: hashing a large checkpoint serially on rank 0 would keep every other
rank waiting in a collective for minutes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LATEST = "latest"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (the entry, not only the data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def files_of(directory: Path) -> list[str]:
    # rglob: a native checkpoint (DeepSpeed) writes sub-folders; DCP's files are all top-level.
    return [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST]


def hash_share(directory: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of this rank's share of the files (every world_size-th, fsynced first)."""
    share = {}
    for name in files_of(directory)[rank::world_size]:
        path = directory / name
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        share[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return share


def write_manifest(directory: Path, step: int, files: dict[str, dict[str, Any]] | None = None,
                   writer: dict[str, Any] | None = None) -> None:
    """``files``: the merged shares (None: hash everything here, for single-process callers)."""
    if files is None:
        files = hash_share(directory, 0, 1)
    body = {"step": step, "files": dict(sorted(files.items())), "writer": writer or {}}
    fsync_write(directory / MANIFEST, json.dumps(body, indent=1))


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST).read_text())


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        files = read_manifest(directory)["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def step_dirs(root: Path) -> list[Path]:
    """Committed-looking step directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")),
                  key=lambda p: p.name, reverse=True)


def find_latest_valid(root: Path) -> Path | None:
    """The newest intact checkpoint; corrupt or partial ones are skipped with a warning.

    ``latest`` (the last commit's name, for people and tools: ``cat checkpoints/latest``) is
    checked against the directories: a kill between the rename and its update leaves it one
    behind, so the verified directories stay the authority and a lagging pointer is reported."""
    root = Path(root)
    dirs = step_dirs(root)
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named and dirs and dirs[0].name != named:
        log.warning("%s names %s but %s is newer: checking the directories", pointer, named, dirs[0].name)
    for directory in dirs:
        reason = verify(directory)
        if reason is None:
            return directory
        log.warning("skipping checkpoint %s: %s", directory, reason)
    return None
