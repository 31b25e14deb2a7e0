"""Activation checkpointing and offloading: same loss and gradients as the plain model (bitwise),
fewer saved activations, no offload files left behind, clear errors, lower peak memory."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from disttrain import memory
from disttrain.config.schema import section
from disttrain.memory import offload as offload_mod
from disttrain.models import build_gpt, build_mlp

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"mlp": (lambda: build_mlp(16, 32, 6, 4), lambda: (torch.randn(8, 16), torch.randn(8, 4))),
          "gpt": (lambda: build_gpt(64, 16, 32, 4, 3), lambda: (torch.randint(0, 64, (4, 16)),
                                                                 torch.randint(0, 64, (4, 16))))}
VARIANTS = {"full": {"activation_checkpointing": "full"},
            "every_n": {"activation_checkpointing": "every_n", "checkpoint_every": 3},
            "disk": {"activation_offload": "disk", "offload_min_bytes": 0},
            "cpu": {"activation_offload": "cpu"},
            "every_n+disk": {"activation_checkpointing": "every_n", "checkpoint_every": 2,
                             "activation_offload": "disk", "offload_min_bytes": 0}}


def _loss(model, name, inputs, targets):
    out = model(inputs)
    if name == "gpt":
        return nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
    return nn.functional.mse_loss(out, targets)


def _grads(name: str, mem: dict, tmp_path: Path, saved: list | None = None):
    build, data = MODELS[name]
    torch.manual_seed(0)
    inputs, targets = data()
    torch.manual_seed(1)
    cfg = OmegaConf.create({"memory": {**mem, "offload_dir": str(tmp_path / "offload")}})
    model = memory.apply(build(), section(cfg, "memory"))
    saved = [] if saved is None else saved
    count = lambda t: (saved.append(t.numel()), t)[1]  # noqa: E731  outermost hooks: what stays saved
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss = _loss(model, name, inputs, targets)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_loss_and_gradients_as_plain(name, variant, tmp_path):
    loss0, grads0, _ = _grads(name, {}, tmp_path)
    loss, grads, model = _grads(name, VARIANTS[variant], tmp_path)
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys()  # parameter names unchanged by checkpointing
    for key, grad in grads.items():
        assert torch.equal(grad, grads0[key]), key
    offload = getattr(model, "_disttrain_offload", None)
    if "disk" in variant:
        assert offload.stats["tensors"] > 0  # activations really went through files
        assert list(offload.directory.iterdir()) == []  # each file removed once read back
        offload.close()
        assert not offload.directory.exists()


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_keeps_fewer_activations(name, tmp_path):
    counts = {}
    for variant in ("none", "full", "every_n"):
        saved: list = []
        _grads(name, VARIANTS.get(variant, {}), tmp_path, saved)
        counts[variant] = sum(saved)
    assert counts["every_n"] < 0.6 * counts["none"], counts
    if name == "gpt":  # a transformer block keeps far more than its input
        assert counts["full"] < 0.5 * counts["none"], counts


def test_module_list_models_and_bad_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    plain, x = Net(), torch.randn(4, 8)
    checkpointed = Net()
    checkpointed.load_state_dict(plain.state_dict())
    memory.apply_activation_checkpointing(checkpointed, "full")
    plain(x).sum().backward()
    checkpointed(x).sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="every_n groups consecutive blocks"):
        memory.apply_activation_checkpointing(Net(), "every_n", 2)
    with pytest.raises(ValueError, match="list of blocks"):
        memory.apply_activation_checkpointing(nn.Linear(2, 2), "full")


def test_cpu_offload_on_a_cpu_host_is_a_logged_noop(tmp_path, caplog):
    offload_mod._said_cpu_noop = False
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        for _ in range(2):
            _, _, model = _grads("mlp", VARIANTS["cpu"], tmp_path)
    assert model._disttrain_offload.stats["tensors"] == 0
    assert sum("activation_offload=cpu does nothing" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
def test_cpu_offload_on_gpu_matches(tmp_path):
    torch.manual_seed(0)
    model, x = build_mlp(16, 64, 4, 4).cuda(), torch.randn(32, 16, device="cuda")
    model(x).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    memory.apply_activation_offload(model, "cpu", min_bytes=0)
    model(x).square().mean().backward()
    assert model._disttrain_offload.stats["tensors"] > 0
    for p, ref in zip(model.parameters(), reference):
        assert torch.equal(p.grad, ref)


def test_disk_offload_cleans_up_unused_graphs_and_crashed_runs(tmp_path):
    root = tmp_path / "offload" / "rank0"
    stale = root / "999999-0"  # what a killed run of this rank left behind
    stale.mkdir(parents=True)
    (stale / "3.bin").write_bytes(b"x" * 100)
    model = memory.apply_activation_offload(build_mlp(16, 32, 4, 4), "disk", root, min_bytes=0)
    assert not stale.exists()
    loss = model(torch.randn(8, 16)).sum()  # forward only: the graph is dropped without backward
    del loss
    model._disttrain_offload.pool.shutdown(wait=True)  # let pending writes (and their removal) finish
    assert list(model._disttrain_offload.directory.iterdir()) == []


def test_builder_applies_the_memory_section(tmp_path):
    from disttrain.engine import builders

    cfg = OmegaConf.create({"trainer": {"seed": 0}, "model": {"_target_": "disttrain.models.build_mlp"},
                            "memory": {"activation_checkpointing": "every_n", "checkpoint_every": 2,
                                       "activation_offload": "disk"}})
    model = builders.model_builder(cfg, tmp_path)()
    assert model._disttrain_checkpoint_every == 2
    assert model._disttrain_offload.directory.parent == tmp_path / "offload" / "rank0"


@pytest.mark.parametrize("override, key", [
    ("memory.activation_checkpointing=some", "memory.activation_checkpointing"),
    ("memory.checkpoint_every=0", "memory.checkpoint_every"),
    ("memory.activation_offload=gpu", "memory.activation_offload"),
    ("memory.offload_min_bytes=-1", "memory.offload_min_bytes"),
])
def test_bad_memory_settings_name_the_key(override, key):
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        memory.validate(cfg)


@pytest.mark.slow  # five fresh interpreters
def test_peak_memory_is_lower_with_checkpointing_and_disk_offload():
    """24-block models, each variant in a fresh process (bench/memory.py --quick)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory as bench  # bench/memory.py

    peak = {(m, v): bench.measure(m, v, quick=True, steps=1)
            for m, v in [("mlp", "none"), ("mlp", "every_4"), ("mlp", "disk"), ("gpt", "none"), ("gpt", "full")]}
    mlp, gpt = peak["mlp", "none"]["peak_mb"], peak["gpt", "none"]["peak_mb"]
    assert mlp > 40 and gpt > 40, peak  # there is activation memory to save
    assert peak["mlp", "every_4"]["peak_mb"] < 0.8 * mlp, peak  # measured 0.59x
    assert peak["mlp", "disk"]["peak_mb"] < 0.5 * mlp, peak  # measured 0.18x
    assert peak["gpt", "full"]["peak_mb"] < 0.5 * gpt, peak  # measured 0.27x
    assert peak["mlp", "disk"]["left_files"] == 0


def _fsdp_held(rank: int, world: int):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from disttrain.observe.memory import TrainingMemory, held_bytes

    dist.init_process_group("gloo")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    full = sum(p.numel() * 4 for p in model.parameters())
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    reported = TrainingMemory(torch.device("cpu"), model).param_bytes
    dist.destroy_process_group()
    return full, held_bytes(model), reported


def test_training_memory_counts_the_local_shards_of_fsdp_parameters():
    """The read-back counted every DTensor at its full size: fsdp on 2 ranks reported a whole
    model per rank. Each rank holds half of each weight and bias (64 rows split 32 / 32)."""
    from helpers import spawn

    for full, held, reported in spawn(_fsdp_held, 2, timeout=120):
        assert full == 2 * (64 * 64 + 64) * 4
        assert held == reported == full // 2


class _Engine(nn.Module):
    """DeepSpeed's shape: ZeRO-3 parameters are empty placeholders with the partition in
    ``ds_tensor``; the optimizer (a ZeRO wrapper around a torch one) holds fp32 masters."""

    def __init__(self, partitions: list[torch.Tensor], masters: list[torch.Tensor]):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(0, dtype=torch.bfloat16)) for _ in partitions)
        for param, part in zip(self.weights, partitions):
            param.ds_tensor = part
        inner = torch.optim.SGD(masters, lr=0.1)
        self.optimizer = type("ZeroOptimizer", (), {"param_groups": inner.param_groups, "optimizer": inner})()


def test_held_bytes_counts_deepspeed_partitions_and_fp32_masters_once():
    from disttrain.observe.memory import held_bytes

    partitions = [torch.zeros(500, dtype=torch.bfloat16), torch.zeros(300, dtype=torch.bfloat16)]
    masters = [torch.zeros(800)]
    # 2-byte partitions (1,600 B) + one fp32 master of 800 (3,200 B), seen by both optimizer levels
    assert held_bytes(_Engine(partitions, masters)) == 1600 + 3200
    plain = nn.Linear(10, 10)
    assert held_bytes(plain) == (100 + 10) * 4
