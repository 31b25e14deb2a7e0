"""Strategy x feature matrix: every combination either trains to the numbers of
strategy=single on the global batch (and differs where it must: bf16/fp16 change the
arithmetic, clipping changes the update), or is refused before any worker starts.

One 2-rank spawn runs every (strategy, feature) pair through the run's own engine; the
single-process references are computed on each rank in the same process.
"""
from __future__ import annotations

import pytest
import torch

from helpers import spawned_once

import _matrix as mx

TOL = 2e-6          # fp32: same arithmetic in another summation order
LOW_TOL = 2e-3      # bf16/fp16: the reduced-precision forward differs in rounding only
CHANGED = 5e-5      # a feature that changes the arithmetic moves some weight at least this much
#                     (measured: bf16 1.5e-4, fp16 2.3e-4, clip 1e-2 away from fp32 after 2 steps)


def _run_matrix(rank, world_size, tmp):
    from pathlib import Path

    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    out = {}
    for feature, feature_overrides in mx.FEATURES.items():
        accum = 2 if feature == "grad_accum" else 1
        batches = mx.global_batches(accum, world_size)
        ref_cfg = mx.compose("strategy=single", f"data.batch_size={mx.BATCH * world_size}", *feature_overrides)
        ref, _, ref_extras = mx.train(ref_cfg, batches, Path(tmp) / f"ref-{feature}-{rank}", env.detect({}), device)
        ref_w = mx.weights(ref)
        for name, (overrides, share) in mx.STRATEGIES.items():
            cfg = mx.compose(*overrides, *feature_overrides)
            if mx.refused(cfg):
                out[name, feature] = {"refused": mx.refused(cfg)}
                continue
            mine = [mx.my_share(micro, share, rank, world_size) for micro in batches]
            strategy, engine, extras = mx.train(cfg, mine, Path(tmp) / f"{name}-{feature}", world, device)
            got = mx.weights(strategy)
            fp32_w = out["single", "fp32"]["weights"] if feature != "fp32" else ref_w
            row = {"diff": mx.max_diff(got, {k: ref_w[k] for k in got}), "names": sorted(got),
                   "diff_fp32": mx.max_diff(got, {k: fp32_w[k] for k in got}),
                   "extra": extras[-1], "ref_extra": ref_extras[-1]}
            if feature == "compile":
                row["compiled"] = mx.compile_counts(strategy)
            if feature == "fp32":
                row["local"] = sum(mx.full_or_local(p).numel() for p in strategy.model.parameters())
                row["val"], row["ref_val"] = mx.validation(strategy, cfg, device), mx.validation(ref, ref_cfg, device)
            if feature in ("fp32", "fp16"):  # fp16: the loss scaler's state rides along
                resumed = mx.resumed_weights(cfg, mine, Path(tmp) / f"resume-{name}-{feature}", world, device)
                row["resume_equal"] = all(torch.equal(resumed[k], got[k]) for k in got)
            out[name, feature] = row
            engine.close()
        out["single", feature] = {"weights": ref_w}
    dist_setup.teardown()
    return out


matrix = spawned_once(_run_matrix, 2, "matrix", timeout=600)


@pytest.mark.parametrize("strategy", list(mx.STRATEGIES))
@pytest.mark.parametrize("feature", list(mx.FEATURES))
def test_feature_equals_single_on_the_global_batch(matrix, strategy, feature):
    """Either equal to single, or refused by config validation with both keys named."""
    if "refused" in matrix[0][strategy, feature]:
        message = matrix[0][strategy, feature]["refused"]
        key = mx.FEATURES[feature][0].split("=")[0]
        assert key in message and "strategy=" in message, message
        return  # refused before any worker starts: that is this combination's contract
    tol = LOW_TOL if feature in ("bf16", "fp16") else TOL
    names = set()
    for rank in range(2):
        row = matrix[rank][strategy, feature]
        assert row["diff"] < tol, (strategy, feature, rank, row["diff"])
        names |= set(row["names"])
    assert names == set(matrix[0]["single", feature]["weights"])  # the ranks together hold the whole model


@pytest.mark.parametrize("strategy", ["single", *mx.STRATEGIES])
@pytest.mark.parametrize("feature", ["bf16", "fp16", "grad_clip", "grad_accum"])
def test_features_that_change_the_arithmetic_do_change_it(matrix, strategy, feature):
    """Not silently ignored: each strategy's weights move away from its fp32 / unclipped /
    one-batch numbers (bf16 used to leave pipeline and tensor parallel bitwise at fp32)."""
    if strategy == "single":
        base, changed = matrix[0]["single", "fp32"]["weights"], matrix[0]["single", feature]["weights"]
        assert max((base[k] - changed[k]).abs().max().item() for k in base) > CHANGED
        return
    assert max(matrix[rank][strategy, feature]["diff_fp32"] for rank in range(2)) > CHANGED, (strategy, feature)


@pytest.mark.parametrize("strategy", list(mx.STRATEGIES))
def test_clip_norm_and_loss_scale_are_the_unsplit_models(matrix, strategy):
    clip = matrix[0][strategy, "grad_clip"]
    assert clip["extra"]["grad_norm"] == pytest.approx(clip["ref_extra"]["grad_norm"], rel=1e-5)
    assert clip["extra"]["grad_norm"] > 0.05  # the norm exceeded the bound: clipping did act
    fp16 = matrix[0][strategy, "fp16"]
    assert fp16["extra"]["loss_scale"] == fp16["ref_extra"]["loss_scale"] == 2.0**16


def test_fsdp_rank_stores_only_its_shard(matrix):
    """FSDP2 keeps 1/world of each parameter per rank (the MLP's 3,201 parameters; dim 0
    sharded, so a rank holds at most one row more than half), DDP the whole model."""
    total = sum(w.numel() for w in matrix[0]["single", "fp32"]["weights"].values())
    local = [matrix[rank]["fsdp", "fp32"]["local"] for rank in range(2)]
    assert sum(local) == total and max(local) < 0.55 * total, (local, total)
    assert matrix[0]["ddp", "fp32"]["local"] == total


@pytest.mark.parametrize("strategy", list(mx.STRATEGIES))
def test_validation_loss_equals_single_on_the_same_weights(matrix, strategy):
    for rank in range(2):
        row = matrix[rank][strategy, "fp32"]
        assert row["val"] == pytest.approx(row["ref_val"], rel=1e-6, abs=1e-7), (strategy, rank)


@pytest.mark.parametrize("strategy", list(mx.STRATEGIES))
@pytest.mark.parametrize("feature", ["fp32", "fp16"])
def test_checkpoint_resume_is_bitwise_equal_to_an_uninterrupted_run(matrix, strategy, feature):
    assert all(matrix[rank][strategy, feature]["resume_equal"] for rank in range(2)), (strategy, feature)


@pytest.mark.parametrize("strategy", list(mx.STRATEGIES))
def test_compile_really_compiles_and_equals_eager(matrix, strategy):
    """trainer.compile=true: the blocks this rank keeps were compiled by inductor (dynamo
    compiled frames, inductor produced graphs, no graph breaks), and the weights equal eager
    single on the global batch (equality alone would also hold if compile did nothing)."""
    if "refused" in matrix[0][strategy, "compile"]:
        return
    for rank in range(2):
        row = matrix[rank][strategy, "compile"]
        counts = row["compiled"]
        assert counts["blocks"] > 0 and counts["frames_ok"] == counts["frames"] > 0, (strategy, rank, counts)
        assert counts["graph_breaks"] == 0 and counts["inductor_graphs"] >= 2, (strategy, rank, counts)
        assert row["diff_fp32"] < TOL, (strategy, rank, row["diff_fp32"])


def test_compiled_single_reference_equals_eager_single(matrix):
    compiled, eager = matrix[0]["single", "compile"]["weights"], matrix[0]["single", "fp32"]["weights"]
    assert max((compiled[k] - eager[k]).abs().max().item() for k in eager) < TOL
