"""A real character-level corpus shipped inside the package (no download).

The text is the docstrings of a few dozen Python standard-library modules (PSF licence),
byte-encoded: vocabulary 256, so no tokenizer file is needed. It is read through the same
memory-mapped shard format as a large corpus: on first use the text file is prepared into
a cache directory (atomically, so concurrent ranks are safe), later runs map it directly.
"""
from __future__ import annotations

from pathlib import Path

from disttrain.data import prepare
from disttrain.data.shards import ShardedTokens, TokenBlocks

CORPUS = Path(__file__).with_name("corpus.txt")


def char_corpus(block_size: int = 64, stride: int = 32, path: str | None = None,
                cache_dir: str | None = None) -> TokenBlocks:
    """Byte-level blocks of ``path``: a directory made by ``disttrain prepare-data``, or a
    text file (the shipped corpus by default) whose shards are cached under ``cache_dir``
    (default $DISTTRAIN_CACHE or ~/.cache/disttrain/shards)."""
    source = Path(path or CORPUS)
    if not source.exists():
        raise FileNotFoundError(f"data.path={source} does not exist: give a text file or a prepared shard directory")
    directory = source if source.is_dir() else prepare.cached(source, cache_dir)
    return TokenBlocks(ShardedTokens(directory), block_size, stride)
