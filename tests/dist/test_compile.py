"""trainer.compile on the reference GPT, on 2 real gloo ranks: compiled ddp and fsdp, with and
without full activation checkpointing, train to the losses and weights of eager single on the
global batch; the counters show every block was compiled by inductor. (The MLP row of every
strategy is the feature matrix's ``compile`` feature; compiled single is its reference.)

One spawn for every case, all on the same per-rank shapes so inductor compiles two sets of
graphs (plain and recomputed), not one per case: CPU inductor compiles are slow here.
"""
from __future__ import annotations

import pytest
import torch

from helpers import spawned_once

import _matrix as mx

STEPS, BATCH, VOCAB, T = 2, 4, 32, 8
GPT = ["model=gpt_tiny", f"model.vocab_size={VOCAB}", f"model.block_size={T}", "model.dim=16", "model.heads=2",
       "model.layers=2", "loss=cross_entropy", "optim=sgd", "optim.lr=0.5", "optim.momentum=0.9"]
#: each case is compiled and compared with eager single on the global batch (2 x BATCH)
CASES = {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"],
         "ddp_ac_full": ["strategy=ddp", "memory.activation_checkpointing=full"],
         "fsdp_ac_full": ["strategy=fsdp", "memory.activation_checkpointing=full"]}
BLOCKS = 4            # embedding, 2 transformer blocks, head
TOL = 1e-5            # fp32, another kernel's summation order (measured ≤ 1e-7)


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=[*GPT, f"data.batch_size={BATCH}", *overrides])


def _batches():
    g = torch.Generator().manual_seed(3)
    draw = lambda: torch.randint(0, VOCAB, (2 * BATCH, T), generator=g)  # noqa: E731
    return [[(draw(), draw())] for _ in range(STEPS)]


def _train(cfg, batches, run_dir, world, device, split: bool):
    """(weights, global mean loss per step, compile counters) after STEPS steps."""
    import torch.distributed as dist

    from disttrain.engine.build import build_engine
    from disttrain.models.losses import SequenceCrossEntropy

    mx.fresh_compiler(cfg)
    strategy, engine = build_engine(cfg, world, device, run_dir)
    losses = []
    for micro in batches:
        loss = engine.train_step(micro, SequenceCrossEntropy()).loss.detach().clone()
        if split:  # equal shards: the mean of the ranks' means is the global batch's mean
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    out = mx.weights(strategy), losses, mx.compile_counts(strategy) if cfg.trainer.compile else None
    engine.close()
    return out


def _run(rank, world_size, tmp):
    from pathlib import Path

    from disttrain.distributed import env, process_group as dist_setup

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    batches = _batches()
    ref_w, ref_losses, _ = _train(_compose("strategy=single", f"data.batch_size={2 * BATCH}"), batches,
                                  Path(tmp) / f"eager-{rank}", env.detect({}), device, split=False)
    out = {}
    for case, overrides in CASES.items():
        mine = [[(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in micro]
                for micro in batches]
        got, losses, counts = _train(_compose(*overrides, "trainer.compile=true"), mine, Path(tmp) / case, world,
                                     device, split=True)
        out[case] = {"weights": mx.max_diff(got, {k: ref_w[k] for k in got}), "counts": counts,
                     "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)), "losses": losses,
                     "names": sorted(got)}
    out["eager"] = {"losses": ref_losses, "names": sorted(ref_w)}
    dist_setup.teardown()
    return out


runs = spawned_once(_run, 2, "runs", timeout=900)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_gpt_trains_like_eager(runs, case):
    for rank in range(2):
        row = runs[rank][case]
        assert row["loss"] < TOL and row["weights"] < TOL, (case, rank, row["loss"], row["weights"])
    assert runs[0]["eager"]["losses"][1] < runs[0]["eager"]["losses"][0]  # it did train
    if case.startswith("fsdp"):  # the two ranks' shards together are the whole model, same names
        assert set(runs[0][case]["names"]) | set(runs[1][case]["names"]) == set(runs[0]["eager"]["names"])


@pytest.mark.parametrize("case", list(CASES))
def test_every_block_was_compiled_by_inductor(runs, case):
    """Equal numbers alone would also hold if compile did nothing: the counters show it ran.
    Three block classes (embedding, Block, head) give three graphs; the two Blocks share one."""
    for rank in range(2):
        counts = runs[rank][case]["counts"]
        assert counts["blocks"] == BLOCKS and counts["frames_ok"] == counts["frames"] == 3, (case, rank, counts)
        assert counts["graph_breaks"] == 0 and counts["inductor_graphs"] >= 6, (case, rank, counts)  # fwd + bwd
