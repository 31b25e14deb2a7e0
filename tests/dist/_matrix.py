"""The strategy x feature matrix, run on real gloo ranks: every (strategy, feature) pair is
trained for a few steps through the run's own engine (build_engine on a composed config) and
compared with strategy=single on the global batch, computed in the same process."""
from __future__ import annotations

from pathlib import Path

import torch

STEPS, BATCH, VAL = 2, 8, 13           # per-rank batch 8; a 13-sample validation set (uneven shards)
MODEL = ["model=mlp", "model.in_dim=32", "model.hidden=32", "model.depth=3", "optim.lr=0.1", "optim.momentum=0.9"]

#: feature -> overrides (a feature is compared with the reference under the same overrides)
FEATURES = {
    "fp32": [],
    "bf16": ["trainer.precision=bf16"],
    "fp16": ["trainer.precision=fp16"],
    "grad_clip": ["trainer.grad_clip=0.05"],
    "grad_accum": ["trainer.grad_accum_steps=2"],
    "ac_full": ["memory.activation_checkpointing=full"],
    "ac_every_n": ["memory.activation_checkpointing=every_n", "memory.checkpoint_every=2"],
    "offload_disk": ["memory.activation_offload=disk", "memory.offload_min_bytes=0"],
    "compile": ["trainer.compile=true"],   # CPU inductor, per block
}

#: strategy -> (overrides, how the global batch is shared: "split" over dp ranks or "whole")
STRATEGIES = {
    "ddp": (["strategy=ddp"], "split"),
    "fsdp": (["strategy=fsdp"], "split"),
    "pipeline": (["strategy=pipeline", "strategy.micro_batches=2", "strategy.schedule=1f1b"], "whole"),
    "zbv": (["strategy=pipeline", "strategy.micro_batches=2", "strategy.schedule=zbv", "strategy.stages_per_rank=2"],
            "whole"),
    "interleaved_zb": (["strategy=pipeline", "strategy.micro_batches=2", "strategy.schedule=interleaved_zb",
                        "strategy.stages_per_rank=2"], "whole"),
    "dualpipev": (["strategy=pipeline", "strategy.micro_batches=4", "strategy.schedule=dualpipev",
                   "strategy.stages_per_rank=2"], "whole"),
    "layer": (["strategy=model_parallel", "strategy.mode=layer"], "whole"),
    "tensor": (["strategy=model_parallel", "strategy.mode=tensor"], "whole"),
}


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*MODEL, f"data.batch_size={BATCH}", *overrides])


def refused(cfg) -> str | None:
    """Config validation's refusal of this combination (None when it is honoured)."""
    from disttrain.config.errors import ConfigError
    from disttrain.engine.preflight import validate

    try:
        validate(cfg, world_size=2)
    except ConfigError as exc:
        return str(exc)
    return None


def global_batches(accum: int, ranks: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(BATCH * ranks, 32, generator=g), torch.randn(BATCH * ranks, 1, generator=g))
             for _ in range(accum)] for _ in range(STEPS)]


def my_share(step_micro, share: str, rank: int, ranks: int):
    if share == "whole":
        return step_micro
    return [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in step_micro]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_or_local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank stores of a parameter (a DTensor's local shard)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def weights(strategy) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in strategy.model.named_parameters()}


def train(cfg, batches, run_dir: Path, world, device):
    """(strategy, engine, per-step extras) after STEPS steps of the run's own engine."""
    from disttrain.engine.build import build_engine

    fresh_compiler(cfg)
    strategy, engine = build_engine(cfg, world, device, run_dir)
    loss_fn, extras = torch.nn.MSELoss(), []
    for micro in batches:
        extras.append(engine.train_step(micro, loss_fn).extra)
    return strategy, engine, extras


def fresh_compiler(cfg) -> None:
    """With trainer.compile, start each engine from empty torch.compile caches and counters, as a
    run's own process does: the engines of one test process would otherwise share one cache per
    block class (e.g. nn.Linear.forward) and reach dynamo's recompile limit, then run eager."""
    if cfg.trainer.compile:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()


def compile_counts(strategy) -> dict[str, int]:
    """Evidence that compile happened: blocks compiled, frames dynamo compiled (ok/total),
    graph breaks, and inductor's generated graphs (compiled now or loaded from its cache)."""
    from torch._dynamo.utils import counters

    from disttrain.engine.compile import compiled_blocks

    inductor = counters["inductor"]
    return {"blocks": len(compiled_blocks(strategy.model)), "frames_ok": counters["frames"]["ok"],
            "frames": counters["frames"]["total"], "graph_breaks": sum(counters["graph_break"].values()),
            "inductor_graphs": sum(inductor[f"fxgraph_cache_{k}"] for k in ("miss", "hit", "bypass"))}


def val_set():
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(VAL, 32, generator=g), torch.randn(VAL, 1, generator=g))


def validation(strategy, cfg, device) -> float:
    from disttrain.engine.evaluate import evaluate
    from disttrain.strategies.precision import Precision, configured

    return evaluate(strategy, val_set(), torch.nn.MSELoss(), BATCH, Precision(configured(cfg), device), device)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumed_weights(cfg, batches, run_dir: Path, world, device) -> dict[str, torch.Tensor]:
    """Train step 1, checkpoint through DCP (the run's own state dict), build a fresh engine,
    restore, train step 2: the weights a killed-and-resumed run ends with."""
    import torch.distributed.checkpoint as dcp

    from disttrain.engine.build import build_engine

    loss_fn = torch.nn.MSELoss()
    _, first = build_engine(cfg, world, device, run_dir)
    first.train_step(batches[0], loss_fn)
    dcp.save(first.state_dict(), checkpoint_id=str(run_dir / "ckpt"))
    first.close()
    strategy, second = build_engine(cfg, world, device, run_dir)
    state = second.state_dict()
    dcp.load(state, checkpoint_id=str(run_dir / "ckpt"))
    second.load_state_dict(state)
    for micro in batches[1:]:
        second.train_step(micro, loss_fn)
    out = weights(strategy)
    second.close()
    return out
