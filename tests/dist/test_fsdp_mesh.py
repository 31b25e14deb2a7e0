"""Composition on one DeviceMesh, on real gloo ranks: fsdp x tp (2-D, strategy=fsdp dist.tp=2)
and pp x fsdp x tp (3-D, strategy=pipeline strategy.data_parallel=shard dist.pp=2 dist.tp=2),
each trained through the run's own engine and compared with strategy=single on the global
batch (computed on every rank in the same process).

One 4-rank spawn runs the 2-D cases, one 8-rank spawn the 3-D ones and HSDP x tp (2 x 2 x 2).
"""
from __future__ import annotations

import pytest
import torch

from helpers import spawned_once

import _matrix as mx

STEPS = 3
TOL = 1e-5                 # fp32: another summation order only
#: bf16/fp16 vs single under the same precision: rounding only, but more of it than in the 2-rank
#: matrix: a row-parallel Linear's partial outputs are summed across tp ranks in the gathered
#: dtype (two roundings where single rounds once), over 3 steps (measured bf16 2.5e-3, fp16 <2e-3)
LOW_TOL = 5e-3
CHANGED = 5e-5             # a low precision moves some weight at least this far from fp32
MLP = [o for o in mx.MODEL if not o.startswith("optim.")]          # 32 -> 32 x 3 -> 1: 7 layers
DEEP = [o.replace("model.depth=3", "model.depth=7") for o in MLP]   # 15 layers: 4 stages of >= 2 Linears
GPT = ["model=gpt_tiny", "model.vocab_size=32", "model.block_size=8", "model.dim=16", "model.heads=2",
       "model.layers=2", "loss=cross_entropy"]
OPTIMS = {"sgd": ["optim=sgd", "optim.lr=0.1", "optim.momentum=0.9"], "adamw": ["optim=adamw", "optim.lr=0.01"]}
FSDP_TP = ["strategy=fsdp", "dist.tp=2"]
PP_FSDP_TP = ["strategy=pipeline", "strategy.data_parallel=shard", "dist.pp=2", "dist.tp=2", "strategy.micro_batches=2"]
CLIP = "trainer.grad_clip=0.05"

#: case -> (model, optimizer, the case's overrides, overrides shared with its single fp32 reference)
CASES = {
    4: {"fsdp_tp_sgd": (MLP, "sgd", FSDP_TP, []),
        "fsdp_tp_adamw_clip": (MLP, "adamw", FSDP_TP, [CLIP]),
        # GPT: tp-sharded blocks live on (dp_shard, tp), embeddings and norms on dp_shard alone.
        # SGD: AdamW turns the float noise of gradients that are exactly 0 in theory (attention's
        # key bias) into lr-sized steps, so it differs by 1e-3 under plain tp as well.
        "fsdp_tp_gpt_clip": (GPT, "sgd", FSDP_TP, ["trainer.grad_clip=0.2"]),
        # the rest of the strategy x feature matrix for the 2-D composition
        "fsdp_tp_bf16": (MLP, "sgd", FSDP_TP, ["trainer.precision=bf16"]),
        "fsdp_tp_fp16": (MLP, "sgd", FSDP_TP, ["trainer.precision=fp16"]),
        "fsdp_tp_accum": (MLP, "sgd", FSDP_TP, ["trainer.grad_accum_steps=2"]),
        "fsdp_tp_ac_full": (MLP, "sgd", FSDP_TP, ["memory.activation_checkpointing=full"]),
        # shards, gradients and AdamW's state in host memory (CPUOffloadPolicy) on both axes
        "fsdp_tp_offload": (MLP, "adamw", [*FSDP_TP, "strategy.cpu_offload=true"], [CLIP])},
    8: {"pp_fsdp_tp_sgd_clip": (MLP, "sgd", [*PP_FSDP_TP, "strategy.schedule=1f1b"], [CLIP]),
        # zero-bubble: split backward (I then W passes), two stages per rank in a V
        "pp_fsdp_tp_zbv_adamw_accum": (DEEP, "adamw", [*PP_FSDP_TP, "strategy.schedule=zbv",
                                                       "strategy.stages_per_rank=2"], ["trainer.grad_accum_steps=2"]),
        "hsdp_tp": (MLP, "adamw", [*FSDP_TP, "dist.dp_replicate=2"], []),
        # the GPT cut in two stages (embedding + block, block + head), each tp-split and sharded
        "pp_fsdp_tp_gpt": (GPT, "sgd", [*PP_FSDP_TP, "strategy.schedule=1f1b"], ["trainer.grad_clip=0.2"]),
        "pp_fsdp_tp_bf16": (MLP, "sgd", [*PP_FSDP_TP, "strategy.schedule=1f1b"], ["trainer.precision=bf16"]),
        "pp_fsdp_tp_ac_full": (MLP, "sgd", [*PP_FSDP_TP, "strategy.schedule=1f1b"],
                               ["memory.activation_checkpointing=full"])},
}
EVALUATED = ("fsdp_tp_sgd", "pp_fsdp_tp_sgd_clip")
RESUMED = ("fsdp_tp_sgd", "pp_fsdp_tp_sgd_clip")   # killed after step 1, resumed through DCP
LOW = ("fsdp_tp_bf16", "fsdp_tp_fp16", "pp_fsdp_tp_bf16")


def compose(model, optim: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*model, *OPTIMS[optim], *overrides])


def global_batches(model, accum: int, dp: int):
    """STEPS x accum micro-batches of the global batch (mx.BATCH per data-parallel rank)."""
    g = torch.Generator().manual_seed(11)
    n = mx.BATCH * dp
    if model is GPT:
        def one():
            return torch.randint(0, 32, (n, 8), generator=g), torch.randint(0, 32, (n, 8), generator=g)
    else:
        def one():
            return torch.randn(n, 32, generator=g), torch.randn(n, 1, generator=g)
    return [[one() for _ in range(accum)] for _ in range(STEPS)]


def train(cfg, steps, run_dir, world, device, share: bool):
    """(strategy, per-step StepStats); with ``share`` this rank trains on its data shard only."""
    from disttrain.engine.build import build_engine
    from hydra.utils import instantiate

    strategy, engine = build_engine(cfg, world, device, run_dir)
    loss_fn = instantiate(cfg.loss)
    stats = [engine.train_step(mine, loss_fn) for mine in _shares(steps, *(strategy.data_shard() if share else (0, 1)))]
    return strategy, engine, stats


def _reference(model, optim, dp: int, shared, steps, refs: dict, tmp, world, device):
    """strategy=single on the global batch under ``shared`` (computed once per key, on every rank):
    (strategy, cfg, weights, grad norms)."""
    from pathlib import Path

    from disttrain.distributed import env

    key = (*model, optim, dp, *shared)
    if key not in refs:
        cfg = compose(model, optim, "strategy=single", f"data.batch_size={mx.BATCH * dp}", *shared)
        ref, _, ref_stats = train(cfg, steps, Path(tmp) / f"ref-{len(refs)}-{world.rank}", env.detect({}), device,
                                  False)
        refs[key] = (ref, cfg, mx.weights(ref), [s.extra.get("grad_norm") for s in ref_stats])
    return refs[key]


def _case(case, spec, world_size, tmp, refs, world, device) -> dict:
    from pathlib import Path

    from disttrain.engine.preflight import validate

    model, optim, overrides, shared = spec
    accum = 2 if "trainer.grad_accum_steps=2" in shared else 1
    dp = world_size // (2 if "dist.pp=2" in overrides else 1) // (2 if "dist.tp=2" in overrides else 1)
    steps = global_batches(model, accum, dp)
    ref, ref_cfg, ref_weights, ref_norms = _reference(model, optim, dp, shared, steps, refs, tmp, world, device)
    fp32 = [o for o in shared if not o.startswith("trainer.precision=")]
    cfg = compose(model, optim, f"data.batch_size={mx.BATCH}", *overrides, *shared)
    validate(cfg, world_size)  # the run's own pre-flight accepts every case
    strategy, engine, stats = train(cfg, steps, Path(tmp) / case, world, device, True)
    params = list(strategy.model.parameters())
    out = {"diff": mx.max_diff(mx.weights(strategy), ref_weights), "total": sum(w.numel() for w in ref_weights.values()),
           "part": sum(p.numel() for p in params), "local": sum(mx.full_or_local(p).numel() for p in params),
           "norms": [s.extra.get("grad_norm") for s in stats], "ref_norms": ref_norms,
           "samples": [s.samples for s in stats], "reports": [s.loss is not None for s in stats],
           "meshes": sorted({str(p.device_mesh.mesh_dim_names) for p in params if hasattr(p, "device_mesh")}), "dp": dp, "accum": accum}
    if case in EVALUATED:
        out["val"], out["ref_val"] = mx.validation(strategy, cfg, device), mx.validation(ref, ref_cfg, device)
    if fp32 != list(shared):  # a low precision must move the weights away from fp32 single's
        out["diff_fp32"] = mx.max_diff(mx.weights(strategy),
                                       _reference(model, optim, dp, fp32, steps, refs, tmp, world, device)[2])
    if case in RESUMED:
        mine = _shares(steps, *strategy.data_shard())
        resumed = mx.resumed_weights(cfg, mine, Path(tmp) / f"resume-{case}", world, device)
        out["resume_equal"] = all(torch.equal(resumed[k], w) for k, w in mx.weights(strategy).items())
    engine.close()
    return out


def _shares(steps, index: int, count: int):
    """This data-parallel rank's slice of every micro-batch of ``steps``."""
    size = len(steps[0][0][0]) // count
    return [[(x[index * size:(index + 1) * size], y[index * size:(index + 1) * size]) for x, y in micro]
            for micro in steps]


def _run_cases(rank, world_size, tmp):
    from disttrain.distributed import env
    from disttrain.distributed import process_group as dist_setup

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    refs: dict = {}
    out = {case: _case(case, spec, world_size, tmp, refs, world, device) for case, spec in CASES[world_size].items()}
    dist_setup.teardown()
    return out


four = spawned_once(_run_cases, 4, "four")
eight = spawned_once(_run_cases, 8, "eight")


def _rows(results, case):
    return [results[rank][case] for rank in range(len(results))]


def _check_equal(rows, case):
    """fp32 features within TOL of single; bf16/fp16 within LOW_TOL of single under the same
    precision and visibly away from fp32 (the precision really was applied)."""
    for rank, row in enumerate(rows):
        assert row["diff"] < (LOW_TOL if case in LOW else TOL), (case, rank, row["diff"])
        if case in LOW:
            assert row["diff_fp32"] > CHANGED, (case, rank, row["diff_fp32"])


@pytest.mark.parametrize("case", list(CASES[4]))
def test_fsdp_x_tp_2x2_equals_single_on_the_global_batch(four, case):
    _check_equal(_rows(four, case), case)


@pytest.mark.parametrize("case", list(CASES[8]))
def test_pp_x_fsdp_x_tp_2x2x2_and_hsdp_x_tp_equal_single_on_the_global_batch(eight, case):
    _check_equal(_rows(eight, case), case)


@pytest.mark.parametrize("results,case", [("four", "fsdp_tp_sgd"), ("eight", "pp_fsdp_tp_sgd_clip")])
def test_a_run_killed_after_step_one_resumes_bitwise(request, results, case):
    """Checkpoint (DCP, the run's own state dict) after step 1, a fresh engine restores it and
    trains the rest: the weights equal the uninterrupted run's to the bit."""
    assert all(row["resume_equal"] for row in _rows(request.getfixturevalue(results), case))


def test_fsdp_x_tp_shards_every_layer_on_both_axes(four):
    """A rank holds about 1/(dp_shard x tp) = 1/4 of the model (1/2 if either axis were
    missing); the tensor-parallel Linears are DTensors on the 2-D mesh (dp_shard, tp)."""
    for row in _rows(four, "fsdp_tp_sgd"):
        assert row["part"] == row["total"]
        assert 0.95 < row["local"] / (row["total"] / 4) < 1.05, (row["local"], row["total"])
        assert row["meshes"] == ["('dp_shard', 'tp')"], row["meshes"]
    gpt = _rows(four, "fsdp_tp_gpt_clip")[0]
    assert gpt["meshes"] == ["('dp_shard', 'tp')", "('dp_shard',)"], gpt["meshes"]


def test_pp_x_fsdp_x_tp_holds_a_quarter_of_one_stage(eight):
    """Ranks 0-1 (pp 0) and 2-3 (pp 1) of each dp half hold the two stages; within a stage a
    rank keeps about 1/(dp_shard x tp) of it; the two stages together are the whole model."""
    rows = _rows(eight, "pp_fsdp_tp_sgd_clip")
    parts = sorted({row["part"] for row in rows})
    assert len(parts) == 2 and sum(parts) == rows[0]["total"], (parts, rows[0]["total"])
    for row in rows:
        assert 0.9 < row["local"] / (row["part"] / 4) < 1.1, (row["local"], row["part"])
    hsdp = _rows(eight, "hsdp_tp")
    assert {row["meshes"][0] for row in hsdp} == {"('dp_replicate', 'dp_shard', 'tp')"}
    assert all(0.95 < row["local"] / (row["total"] / 4) < 1.05 for row in hsdp), [r["local"] for r in hsdp]


@pytest.mark.parametrize("results,case", [("four", "fsdp_tp_adamw_clip"), ("four", "fsdp_tp_gpt_clip"),
                                          ("eight", "pp_fsdp_tp_sgd_clip")])
def test_clipping_uses_the_global_norm_across_shards_stages_and_tp(request, results, case):
    """The norm each rank clips with is the unsplit model's (and large enough that clipping acts)."""
    for row in _rows(request.getfixturevalue(results), case):
        assert row["norms"] == pytest.approx(row["ref_norms"], rel=1e-5), (row["norms"], row["ref_norms"])
        assert min(row["norms"]) > 0.05


@pytest.mark.parametrize("results,case", [("four", "fsdp_tp_sgd"), ("eight", "pp_fsdp_tp_zbv_adamw_accum")])
def test_each_batch_is_reported_once_per_tp_group(request, results, case):
    """Loss and samples come from one rank per data shard (the last stage's first tp rank)."""
    rows = _rows(request.getfixturevalue(results), case)
    dp, accum = rows[0]["dp"], rows[0]["accum"]
    for step in range(STEPS):
        assert sum(row["samples"][step] for row in rows) == mx.BATCH * dp * accum
        assert sum(row["reports"][step] for row in rows) == dp


@pytest.mark.parametrize("results,case", [("four", "fsdp_tp_sgd"), ("eight", "pp_fsdp_tp_sgd_clip")])
def test_validation_loss_equals_single(request, results, case):
    for row in _rows(request.getfixturevalue(results), case):
        assert row["val"] == pytest.approx(row["ref_val"], rel=1e-5), (row["val"], row["ref_val"])
