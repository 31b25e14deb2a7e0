"""``disttrain prepare-data`` / ``python -m disttrain.data.prepare``: text files -> token shards.

Output directory layout (read by ``disttrain.data.shards``)::

    index.json        format, dtype, tokenizer, total tokens, the shard files with their token
                      counts, the source names
    documents.npy     int64 offsets: document d is tokens [offsets[d], offsets[d+1])
    shard_00000.bin   raw tokens (uint8: byte-level, vocabulary 256), at most --shard-tokens each

Files are streamed in chunks, so no input is ever held whole in memory, and the directory
appears atomically (written under a temporary name, then renamed): an interrupted run leaves
nothing a reader could mistake for a complete corpus, and concurrent writers (every rank
preparing the same cache on first use) cannot corrupt each other — the first rename wins.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

FORMAT = "disttrain-shards/1"
INDEX, DOCUMENTS = "index.json", "documents.npy"
CHUNK_BYTES = 1 << 20


class ShardWriter:
    """Appends tokens to numbered shard files, starting a new one every ``shard_tokens``."""

    def __init__(self, directory: Path, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
        self.directory, self.shard_tokens = directory, shard_tokens
        self.shards: list[dict] = []
        self.handle: BinaryIO | None = None
        self.total = 0

    def _room(self) -> int:
        if self.handle is None or self.shards[-1]["tokens"] == self.shard_tokens:
            self._next_shard()
        return self.shard_tokens - self.shards[-1]["tokens"]

    def _next_shard(self) -> None:
        self.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self.handle = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def write(self, tokens: bytes) -> None:
        view = memoryview(tokens)
        while len(view):
            room = self._room()
            assert self.handle is not None
            self.handle.write(view[:room])
            self.shards[-1]["tokens"] += min(room, len(view))
            self.total += min(room, len(view))
            view = view[room:]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None


def _stream(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _write_all(inputs: list[Path], directory: Path, shard_tokens: int) -> None:
    writer = ShardWriter(directory, shard_tokens)
    offsets = [0]
    for path in inputs:
        for chunk in _stream(path):
            writer.write(chunk)
        offsets.append(writer.total)
    writer.close()
    np.save(directory / DOCUMENTS, np.asarray(offsets, dtype=np.int64))
    index = {"format": FORMAT, "dtype": "uint8", "tokenizer": "bytes", "vocab_size": 256,
             "total_tokens": writer.total, "shards": writer.shards, "sources": [str(p) for p in inputs]}
    (directory / INDEX).write_text(json.dumps(index, indent=1))


def prepare(inputs: list[str | os.PathLike], out: str | os.PathLike, shard_tokens: int = 1 << 26,
            overwrite: bool = False) -> Path:
    """Write the shards of ``inputs`` (byte-level tokens) to ``out``; return ``out``.
    Raises FileExistsError if ``out`` exists and ``overwrite`` is false."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"no such input file(s): {missing or 'none given'}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_all(paths, tmp, shard_tokens)
        _commit(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is kept (another writer won) unless
    ``overwrite``, in which case it is moved aside first and then deleted."""
    old = None
    if overwrite and out.exists():
        old = out.with_name(f".old-{out.name}-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if not is_prepared(out):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_prepared(directory: str | os.PathLike) -> bool:
    return (Path(directory) / INDEX).is_file()


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where shards of raw text files are cached: ``explicit``, else $DISTTRAIN_CACHE, else
    ~/.cache/disttrain/shards."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DISTTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "disttrain" / "shards"


def cached(source: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """The prepared shards of one text file, written on first use. The key is the file's
    path, size and modification time (hashing the content would read a large file whole)."""
    source = Path(source).resolve()
    stat = source.stat()
    key = hashlib.sha1(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{FORMAT}".encode()).hexdigest()[:16]
    out = cache_dir(directory) / f"{source.stem}-{key}"
    if not is_prepared(out):
        try:
            prepare([source], out)
        except FileExistsError:  # another rank committed it first: use theirs
            pass
    if not is_prepared(out):  # never made by us (we only ever rename complete directories in)
        raise RuntimeError(f"{out} exists but holds no {INDEX}: delete it and run again")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text files (each becomes one document)")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file (default 64 Mi)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.inputs, args.out, args.shard_tokens, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    index = json.loads((out / INDEX).read_text())
    print(f"{out}: {index['total_tokens']} tokens in {len(index['shards'])} shard(s) from {len(args.inputs)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
