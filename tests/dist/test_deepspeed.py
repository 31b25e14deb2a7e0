"""strategy=deepspeed: ZeRO 0-3 on 2 real gloo ranks trains to the weights of torch DDP with the
same optimizer; DeepSpeed's own checkpoints save and resume through the CLI and
``load_model_state`` still returns the full state dict; without DeepSpeed, one line says how to
install it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from helpers import run_disttrain, spawn

#: fp32 on CPU: ZeRO reduce-scatters/all-gathers where DDP all-reduces, so sums run in another
#: order; after 3 steps the weights agree to this (measured on CPU: stages 0 and 1 bitwise equal,
#: stages 2 and 3 within 1.5e-8 with SGD and 2.5e-8 with AdamW, losses within 6e-8).
ATOL = 1e-6
STEPS, ACCUM = 3, 2
OPTIMIZERS = ("sgd", "adamw")
ZERO = ["zero0", "zero1", "zero2", "zero3", "zero2_offload"]  # offload: ZeRO-Offload of optimizer states
FAST = ["metrics.peak_flops=1e12", "metrics.count_flops=false", "trainer.log_every=1"]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _full_weights(strategy) -> dict[str, torch.Tensor]:
    engine = getattr(strategy, "engine", None)
    if engine is None:  # DDP
        return {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # stage 3 shards them
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _deepspeed(name: str) -> list[str]:
    return ["strategy=deepspeed", f"strategy.zero_stage={int(name[4])}",
            f"strategy.offload_optimizer={'cpu' if name.endswith('offload') else 'none'}"]


def _train(rank: int, world_size: int, names: list[str]):
    """Per optimizer: DDP, then DeepSpeed at each ZeRO stage, on the same per-rank batches."""
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.engine.build import build_engine

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    batches = [[(torch.randn(8, 32, generator=data), torch.randn(8, 1, generator=data)) for _ in range(ACCUM)]
               for _ in range(STEPS)]
    results = {}
    for optim in OPTIMIZERS:
        for name in ["ddp", *names]:
            chosen = ["strategy=ddp"] if name == "ddp" else _deepspeed(name)
            cfg = _compose(f"optim={optim}", f"trainer.grad_accum_steps={ACCUM}", "data.batch_size=8", *chosen)
            strategy, engine = build_engine(cfg, world, device, Path("."))
            losses = [engine.train_step(micro, torch.nn.functional.mse_loss).loss.item() for micro in batches]
            results[optim, name] = (losses, _full_weights(strategy))
            engine.close()
    dist_setup.teardown()
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)  # one 2-rank spawn; minutes only on a crowded machine
def test_zero_stages_match_ddp_on_two_ranks():
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    results = spawn(_train, 2, ZERO, timeout=800)
    initial = _initial()
    for optim in OPTIMIZERS:
        ddp_losses, ddp_weights = results[0][optim, "ddp"]
        for name in ZERO:
            for rank in (0, 1):
                losses, weights = results[rank][optim, name]
                assert losses == pytest.approx(results[rank][optim, "ddp"][0], abs=ATOL), (optim, name, rank)
                assert weights.keys() == ddp_weights.keys()
                for key, value in weights.items():
                    torch.testing.assert_close(value, ddp_weights[key], atol=ATOL, rtol=0, msg=f"{optim} {name} {key}")
        moved = max((ddp_weights[k] - v).abs().max().item() for k, v in initial.items())
        assert moved > 100 * ATOL, optim  # the comparison is not between untrained models


def _initial():
    from disttrain.engine import builders

    return builders.model_builder(_compose())().state_dict()


@pytest.mark.slow
@pytest.mark.timeout(900)  # two 2-rank CLI runs; minutes only on a crowded machine
def test_deepspeed_checkpoint_resume_and_full_state(tmp_path):
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    common = ["strategy=deepspeed", "strategy.zero_stage=3", "optim=adamw", "dist.nproc_per_node=2",
              "trainer.max_steps=6", "checkpoint.every_steps=3", *FAST]
    run_disttrain(common, tmp_path / "straight", timeout=600)
    middle = tmp_path / "straight" / "checkpoints" / "step_00000003"
    assert (middle / "native.json").is_file() and (middle / "deepspeed").is_dir()  # DeepSpeed's own format
    run_disttrain(common + [f"checkpoint.resume={middle}"], tmp_path / "resumed", timeout=600)
    assert f"resumed from {middle}" in (tmp_path / "resumed" / "train.log").read_text()

    from disttrain.checkpoint.commit import load_model_state

    straight, resumed = load_model_state(tmp_path / "straight"), load_model_state(tmp_path / "resumed")
    at_three, plain = load_model_state(tmp_path / "straight", step=3), _initial()
    assert straight.keys() == plain.keys()
    for key, value in plain.items():
        assert straight[key].shape == value.shape and straight[key].dtype == torch.float32
        assert torch.equal(straight[key], resumed[key]), key  # resumed run = uninterrupted run, bitwise
        assert not torch.equal(straight[key], at_three[key]), key  # and steps 4-6 trained

    # ddp from the same DeepSpeed checkpoint: its model weights, step and data position; the
    # optimizer starts again, so step 4 is a first AdamW step: every weight moves by ~lr (+-)
    ddp = [arg for arg in common if not arg.startswith("strategy.")]
    ddp[ddp.index("strategy=deepspeed")] = "strategy=ddp"
    run_disttrain([*ddp, "trainer.max_steps=4", f"checkpoint.resume={middle}"], tmp_path / "to_ddp", timeout=600)
    log = (tmp_path / "to_ddp" / "train.log").read_text()
    assert f"resumed from {middle} (step 3)" in log and "model weights only" in log
    moved = torch.cat([(load_model_state(tmp_path / "to_ddp")[k] - at_three[k]).abs().flatten() for k in plain])
    assert 0.9e-3 < moved.median().item() < 1.1e-3, moved.median()  # optim.lr=0.001


def test_missing_deepspeed_says_how_to_install(tmp_path):
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'deepspeed'\")\n")
    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    proc = run_disttrain(["strategy=deepspeed", "trainer.max_steps=1"], tmp_path / "run", check=False,
                         env={"PYTHONPATH": path}, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "deepspeed" in line.lower()]
    assert len(lines) == 1 and "pip install -e '.[deepspeed]'" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # rejected before any work


def test_generated_config_follows_ours_and_rejects_owned_keys():
    from disttrain.config.errors import ConfigError
    from disttrain.engine.preflight import validate
    from disttrain.strategies import deepspeed_config

    cfg = _compose("strategy=deepspeed", "data.batch_size=4", "trainer.grad_accum_steps=3", "trainer.precision=bf16",
                   "+strategy.config.zero_optimization.reduce_bucket_size=1000")
    built = deepspeed_config.build(cfg, 2, 3, "cpu", {"zero_optimization": {"reduce_bucket_size": 1000}})
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"],
            built["train_batch_size"]) == (4, 3, 24)
    assert built["bf16"]["enabled"] and not built["fp16"]["enabled"]
    assert built["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                          "reduce_bucket_size": 1000}
    with pytest.raises(ValueError, match=r"strategy\.config\.train_batch_size is generated from data\.batch_size"):
        deepspeed_config.build(cfg, 2, 1, "none", {"train_batch_size": 8})
    with pytest.raises(ValueError, match=r"strategy\.config\.zero_optimization\.stage .*strategy\.zero_stage"):
        deepspeed_config.build(cfg, 2, 1, "none", {"zero_optimization": {"stage": 2}})
    if importlib.util.find_spec("deepspeed"):
        for override, key in [("strategy.zero_stage=4", "strategy.zero_stage"),
                              ("strategy.offload_optimizer=nvme", "strategy.offload_optimizer"),
                              ("+strategy.config.optimizer.type=Adam", "strategy.config.optimizer")]:
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                validate(_compose("strategy=deepspeed", override), 2)


DS_FEATURES = {"fp32": [], "grad_clip": ["trainer.grad_clip=0.05"], "ac_full": ["memory.activation_checkpointing=full"],
               "bf16": ["trainer.precision=bf16"],
               "offload_disk": ["memory.activation_offload=disk", "memory.offload_min_bytes=0"]}


def _ds_features(rank: int, world_size: int, tmp: str):
    """ZeRO-3 and DDP under the same feature settings, on the same per-rank batches; and
    the validation loss of each on its own weights."""
    import _matrix as mx

    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    batches = [mx.my_share(m, "split", rank, world_size) for m in mx.global_batches(1, world_size)]
    out = {}
    for feature, overrides in DS_FEATURES.items():
        for name, chosen in (("ddp", ["strategy=ddp"]), ("zero3", _deepspeed("zero3"))):
            cfg = mx.compose(*chosen, *overrides)
            strategy, engine, extras = mx.train(cfg, batches, Path(tmp) / f"{name}-{feature}", world, device)
            out[name, feature] = {"weights": _full_weights(strategy), "val": mx.validation(strategy, cfg, device)}
            engine.close()
    dist_setup.teardown()
    return out


@pytest.mark.timeout(900)
def test_zero3_honours_clipping_checkpointing_bf16_and_evaluation_like_ddp(tmp_path):
    """trainer.grad_clip reaches DeepSpeed (and nothing clips without it: fp32 ZeRO-3 equals
    unclipped DDP); activation checkpointing changes nothing numerically; bf16 moves the
    weights; ZeRO-3's validation (parameters gathered collectively) equals DDP's."""
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    results = spawn(_ds_features, 2, str(tmp_path), timeout=800)[0]

    def diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    for feature in ("fp32", "grad_clip", "ac_full", "offload_disk"):
        assert diff(results["zero3", feature]["weights"], results["ddp", feature]["weights"]) < ATOL, feature
        assert results["zero3", feature]["val"] == pytest.approx(results["ddp", feature]["val"], rel=1e-5)
    assert diff(results["ddp", "grad_clip"]["weights"], results["ddp", "fp32"]["weights"]) > 1e-4  # clipping acted
    assert diff(results["zero3", "bf16"]["weights"], results["zero3", "fp32"]["weights"]) > 1e-5  # bf16 honoured
