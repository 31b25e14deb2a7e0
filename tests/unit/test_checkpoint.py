"""Checkpoint commit, keep-last-k, corrupt/partial fallback, load_model_state (one process)."""
import json

import pytest
import torch

from disttrain.checkpoint.commit import Checkpointer, CheckpointError, find_latest_valid, load_model_state, verify


def _state(value: float):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model.state_dict()}


def _save(tmp_path, steps, keep=5):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=keep)
    for step in steps:
        ckpt.save(step, _state(float(step)), {"step": step})
    return ckpt


def test_round_trip_and_latest_pointer(tmp_path):
    ckpt = _save(tmp_path, [1, 2])
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    target = _state(0.0)
    extra = ckpt.load(find_latest_valid(ckpt.root), target)
    assert extra["step"] == 2 and torch.all(target["model"]["weight"] == 2.0)
    assert torch.all(load_model_state(tmp_path)["weight"] == 2.0)
    assert torch.all(load_model_state(tmp_path, step=1)["weight"] == 1.0)


def test_keep_last_k(tmp_path):
    _save(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]


def test_truncated_file_is_skipped_for_the_previous_one(tmp_path, caplog):
    ckpt = _save(tmp_path, [1, 2])
    newest = ckpt.root / "step_00000002"
    victim = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "bytes" in verify(newest)
    assert find_latest_valid(ckpt.root).name == "step_00000001"
    assert "skipping checkpoint" in caplog.text and "step_00000002" in caplog.text
    assert torch.all(load_model_state(tmp_path)["weight"] == 1.0)


def test_same_size_corruption_is_caught_by_checksum(tmp_path):
    ckpt = _save(tmp_path, [1])
    victim = ckpt.root / "step_00000001" / "extra_rank0.pt"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "checksum" in verify(victim.parent)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_model_state(tmp_path)


def test_missing_manifest_means_unfinished(tmp_path):
    ckpt = _save(tmp_path, [1, 2])
    (ckpt.root / "step_00000002" / "manifest.json").unlink()
    assert find_latest_valid(ckpt.root).name == "step_00000001"


def test_partial_write_is_removed_and_never_read(tmp_path):
    ckpt = _save(tmp_path, [1])
    partial = ckpt.root / ".tmp-step_00000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert find_latest_valid(ckpt.root).name == "step_00000001"
    ckpt.clean_partial()
    assert not partial.exists()


def test_explicit_resume_path_must_be_intact(tmp_path):
    ckpt = _save(tmp_path, [1])
    manifest = ckpt.root / "step_00000001" / "manifest.json"
    manifest.write_text(json.dumps({"files": {"ghost.bin": {"bytes": 1, "sha256": "0"}}}))
    with pytest.raises(CheckpointError, match="ghost.bin is missing"):
        ckpt.choose(str(ckpt.root / "step_00000001"))
