"""Functions run on real gloo ranks by the pipeline / model-parallel tests: build a
strategy directly (no CLI) and compare with the unsplit model computed in the same process."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf


def context(factory, dist_degrees: dict, batch_size: int = 32):
    """A SetupContext around ``factory`` (a ModelFactory) for strategies built directly."""
    from disttrain.distributed import env
    from disttrain.strategies.base import SetupContext

    cfg = OmegaConf.create({"dist": {"dp": None, "pp": None, "tp": None, **dist_degrees},
                            "data": {"_target_": "disttrain.data.synthetic_regression", "size": 256,
                                     "in_dim": 32, "out_dim": 1, "batch_size": batch_size}})
    from disttrain.engine import builders

    return SetupContext(world=env.detect(), device=torch.device("cpu"), model=factory, cfg=cfg, run_dir=None,
                        build_dataset=lambda: builders.build_dataset(cfg))


def mlp(depth: int = 3):
    """The reference MLP as a ModelFactory (meta build, seeded per-module init)."""
    from disttrain.parallel.materialize import ModelFactory
    from disttrain.models import build_mlp

    return ModelFactory(build=lambda: build_mlp(in_dim=32, hidden=64, depth=depth, out_dim=1), seed=0)


def engine_for(strategy, lr: float = 0.1, grad_clip=None, precision="32"):
    """The run's one optimizer step around a strategy built directly (SGD, constant lr)."""
    from disttrain.engine.step import Engine
    from disttrain.strategies.precision import Precision

    optimizer = torch.optim.SGD(strategy.model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Engine(strategy, optimizer, scheduler, Precision(precision), grad_clip)


def batches(k: int, batch: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 32, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(k)]


def reference_grads(factory, micro):
    """Gradients and loss of the unsplit model on the concatenated (global) batch."""
    model = factory.full()
    x = torch.cat([b[0] for b in micro])
    y = torch.cat([b[1] for b in micro])
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compare(strategy, factory, micro_global, my_micro) -> dict:
    """Run one forward/backward of ``strategy`` on this rank's micro-batches; return the loss
    and the largest gradient difference to the unsplit model on the global batch."""
    from disttrain.strategies.precision import Precision

    stats = strategy.forward_backward(my_micro, torch.nn.MSELoss(), Precision(32))
    ref_loss, ref = reference_grads(factory, micro_global)
    diffs = {n: (p.grad - ref[n]).abs().max().item() for n, p in strategy.model.named_parameters()}
    return {"loss": None if stats.loss is None else stats.loss.item(), "ref_loss": ref_loss,
            "max_grad_diff": max(diffs.values()), "names": sorted(diffs), "samples": stats.samples,
            "extra": stats.extra}


#: the CLI settings every pipeline / model-parallel run and its single-process reference share
CLI_COMMON = ["trainer.max_steps=4", "trainer.log_every=2", "checkpoint.every_steps=2", "data.size=512",
              "optim.lr=0.05"]


def single_reference(tmp_path_factory) -> dict:
    """strategy=single on the global batch of 32 (run once per test session, shared by the
    pipeline and model-parallel tests): the weights every split layout must reproduce."""
    from helpers import run_disttrain

    from disttrain.checkpoint.commit import load_model_state

    run_dir = tmp_path_factory.getbasetemp() / "single-reference-b32"
    if not (run_dir / "checkpoints" / "latest").exists():
        run_disttrain(["strategy=single", "data.batch_size=32", *CLI_COMMON], run_dir, timeout=240)
    return load_model_state(run_dir)
