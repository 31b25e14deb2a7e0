"""The shard writer round-trips a corpus exactly; the memmap reader crosses shard
boundaries; the cache is written atomically once; the shipped text dataset uses it."""
import os
import pickle

import numpy as np
import pytest
import torch

from disttrain import __main__ as cli
from disttrain.data import prepare, text
from disttrain.data.shards import ShardedTokens, TokenBlocks


@pytest.fixture
def corpus(tmp_path):
    """Four files: random bytes (all 256 values), an empty one, utf-8 text, one byte."""
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), b"",
             "naïve café — ünïcode\n".encode() * 40, b"\x00"]
    paths = []
    for i, blob in enumerate(blobs):
        path = tmp_path / f"doc{i}.txt"
        path.write_bytes(blob)
        paths.append(path)
    return paths, blobs


def test_round_trip_is_exact_across_shard_boundaries(corpus, tmp_path, monkeypatch):
    paths, blobs = corpus
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 777)  # stream in small chunks: never a whole file
    out = prepare.prepare(paths, tmp_path / "shards", shard_tokens=1000)
    tokens = ShardedTokens(out)
    total = sum(map(len, blobs))
    assert len(tokens) == total and len(tokens.files) == -(-total // 1000)
    assert tokens.read(0, total).tobytes() == b"".join(blobs)
    offsets = tokens.documents()
    for d, blob in enumerate(blobs):
        assert tokens.read(int(offsets[d]), int(offsets[d + 1])).tobytes() == blob
    assert tokens.read(990, 2010).tobytes() == b"".join(blobs)[990:2010]  # spans three shards
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory is gone


def test_blocks_match_the_byte_slices_and_pickle_without_data(corpus, tmp_path):
    paths, blobs = corpus
    raw = b"".join(blobs)
    blocks = TokenBlocks(ShardedTokens(prepare.prepare(paths, tmp_path / "s", shard_tokens=512)), 64, 32)
    assert len(blocks) == (len(raw) - 65) // 32 + 1
    for i in (0, 7, len(blocks) - 1):
        x, y = blocks[i]
        assert x.dtype == torch.int64 and bytes(x.tolist()) == raw[32 * i:32 * i + 64]
        assert bytes(y.tolist()) == raw[32 * i + 1:32 * i + 65]
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    assert len(pickle.dumps(blocks)) < 4096  # workers reopen the maps; the data is not copied


def test_existing_output_is_kept_unless_overwrite(corpus, tmp_path):
    paths, _ = corpus
    out = prepare.prepare(paths[:1], tmp_path / "o")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare(paths, out)
    prepare.prepare(paths, out, overwrite=True)
    assert len(ShardedTokens(out)) == sum(p.stat().st_size for p in paths)


def test_losing_a_concurrent_commit_keeps_the_winner(corpus, tmp_path):
    paths, _ = corpus
    winner = prepare.prepare(paths[:1], tmp_path / "w")
    loser = tmp_path / ".tmp-loser"
    loser.mkdir()
    (loser / "x").write_text("partial")
    prepare._commit(loser, winner, overwrite=False)  # rename fails: the complete one stays
    assert len(ShardedTokens(winner)) == paths[0].stat().st_size


def test_text_dataset_prepares_the_shipped_corpus_once(tmp_path):
    first = text.char_corpus(64, 32, cache_dir=str(tmp_path))
    (cache,) = tmp_path.iterdir()
    stamp = os.stat(cache / prepare.INDEX).st_mtime_ns
    second = text.char_corpus(64, 32, cache_dir=str(tmp_path))
    assert os.stat(cache / prepare.INDEX).st_mtime_ns == stamp  # reused, not rewritten
    raw = text.CORPUS.read_bytes()
    assert len(first) == len(second) == (len(raw) - 65) // 32 + 1
    assert bytes(second[3][0].tolist()) == raw[96:160]
    direct = text.char_corpus(64, 32, path=str(cache))  # a prepared directory works as data.path
    assert torch.equal(direct[5][1], first[5][1])


def test_cli_subcommand(corpus, tmp_path, capsys):
    paths, blobs = corpus
    module, func = cli.SUBCOMMANDS["prepare-data"].split(":")
    assert (module, func) == ("disttrain.data.prepare", "main")
    assert prepare.main([*map(str, paths), "--out", str(tmp_path / "c"), "--shard-tokens", "4096"]) == 0
    assert f"{sum(map(len, blobs))} tokens in 2 shard(s) from 4 file(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare.main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")])


@pytest.mark.parametrize("key,value,message", [
    ("num_workers", -1, "data.num_workers=-1 must be an integer >= 0"),
    ("prefetch_factor", 0, "data.prefetch_factor=0 must be an integer >= 1"),
    ("debug_delay_s", -0.5, "data.debug_delay_s=-0.5 must be a number of seconds >= 0"),
    ("pin_memory", "yes", "data.pin_memory='yes' must be true or false"),
])
def test_loader_settings_are_validated_up_front(key, value, message):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=single"])
    OmegaConf.update(cfg, f"data.{key}", value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(cfg, world_size=1)
