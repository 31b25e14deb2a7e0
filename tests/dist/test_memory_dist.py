"""Activation checkpointing and offloading under DDP on 2 real gloo ranks: the all-reduced
gradients equal plain DDP's bitwise, through the real builder and through the real CLI, and disk
offload leaves no files behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import run_disttrain, spawn

VARIANTS = {
    "full": {"activation_checkpointing": "full"},
    "every_n": {"activation_checkpointing": "every_n", "checkpoint_every": 2},
    "disk": {"activation_offload": "disk", "offload_min_bytes": 0},
    "cpu": {"activation_offload": "cpu"},
    "every_n+disk": {"activation_checkpointing": "every_n", "checkpoint_every": 3,
                     "activation_offload": "disk", "offload_min_bytes": 0},
}


def _ddp_grads(rank: int, world_size: int, scratch: str):
    from omegaconf import OmegaConf
    from torch.nn.parallel import DistributedDataParallel

    from disttrain.engine import builders
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    dist_setup.init(env.detect(), "gloo", 60)
    data = torch.Generator().manual_seed(rank)
    idx, targets = torch.randint(0, 64, (4, 16), generator=data), torch.randint(0, 64, (4, 16), generator=data)
    model_cfg = {"_target_": "disttrain.models.build_gpt", "vocab_size": 64, "block_size": 16, "dim": 32,
                 "heads": 4, "layers": 3}
    results = {}
    for name, mem in [("plain", {})] + list(VARIANTS.items()):
        cfg = OmegaConf.create({"trainer": {"seed": 0}, "model": model_cfg,
                                "memory": {**mem, "offload_dir": os.path.join(scratch, name)}})
        model = DistributedDataParallel(builders.model_builder(cfg, scratch)())
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        offload = getattr(model.module, "_disttrain_offload", None)
        left = sorted(os.listdir(offload.directory)) if offload and offload.mode == "disk" else []
        offloaded = offload.stats["tensors"] if offload else 0
        results[name] = (loss.item(), {k: p.grad.clone() for k, p in model.module.named_parameters()}, left, offloaded)
    dist_setup.teardown()
    return results


def test_memory_levers_give_plain_ddp_gradients_on_two_ranks(tmp_path):
    results = spawn(_ddp_grads, 2, str(tmp_path), timeout=240)
    for rank, per_rank in enumerate(results):
        loss0, grads0, _, _ = per_rank["plain"]
        for name in VARIANTS:
            loss, grads, left, offloaded = per_rank[name]
            assert loss == loss0, (rank, name)
            for key, grad in grads.items():
                assert torch.equal(grad, grads0[key]), (rank, name, key)
            assert left == [], (rank, name)
            if "disk" in name:
                assert offloaded > 0, (rank, name)
    # all-reduced: both ranks hold the same gradient although their batches differ
    assert torch.equal(results[0]["every_n+disk"][1]["1.fc.weight"], results[1]["every_n+disk"][1]["1.fc.weight"])
    assert results[0]["plain"][0] != results[1]["plain"][0]


@pytest.mark.slow  # two 2-rank CLI runs
@pytest.mark.timeout(600)
def test_cli_ddp_with_checkpointing_and_disk_offload_trains_like_plain(tmp_path):
    common = ["dist.nproc_per_node=2", "trainer.max_steps=3", "metrics.peak_flops=1e12", "metrics.count_flops=false"]
    run_disttrain(common, tmp_path / "plain", timeout=400)
    run_disttrain(common + ["memory.activation_checkpointing=every_n", "memory.activation_offload=disk",
                            "memory.offload_min_bytes=0"], tmp_path / "mem", timeout=400)
    from disttrain.checkpoint.commit import load_model_state

    plain, mem = load_model_state(tmp_path / "plain"), load_model_state(tmp_path / "mem")
    assert plain.keys() == mem.keys()
    for key, value in plain.items():
        assert torch.equal(value, mem[key]), key
    offload_root = tmp_path / "mem" / "offload"
    assert offload_root.is_dir()  # it was used ...
    assert [p for p in offload_root.rglob("*") if p.is_file()] == []  # ... and nothing is left
