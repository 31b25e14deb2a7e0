"""Zero-bubble schedules (interleaved ZB, ZBV, DualPipeV: torch's classes) equal the unsplit
model: loss and every gradient on the same global batch, with accumulation, on 2 and 4
ranks, V-shaped placement for ZBV / DualPipeV; dp x pp replicas through the run's engine end
a few SGD steps with the weights of one process on the global batch; bad combinations are
refused before any worker starts, naming the key."""
from __future__ import annotations

import pytest
import torch

from helpers import spawn

from disttrain.strategies.pipeline_schedules import SCHEDULES

TOL = 1e-5
ZB = [s for s in ("interleaved_zb", "zbv", "dualpipev") if s in SCHEDULES]


def _grad_cases(rank, world_size, cases):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.strategies.pipeline import Pipeline

    import _pipeline_checks as chk

    dist_setup.init(env.detect(), "gloo", 60)
    out = []
    for schedule, m, k, depth in cases:
        build = chk.mlp(depth)
        strategy = Pipeline(micro_batches=m, schedule=schedule, stages_per_rank=2)
        strategy.setup(chk.context(build, {}, batch_size=4 * m))
        micro = chk.batches(k, 4 * m)
        row = chk.compare(strategy, build, micro, micro) | {"stages": strategy.stage_ids}
        with torch.no_grad():  # evaluation: forward only through the same schedule, a short last batch
            x = micro[0][0][:4 * m - 1]
            got = strategy.eval_outputs(x, chk_precision())
            row["eval_diff"] = None if got is None else (got - build.full()(x)).abs().max().item()
        out.append(row)
    dist_setup.teardown()
    return out


def chk_precision():
    from disttrain.strategies.precision import Precision

    return Precision(32)


def _check(results, cases, world):
    for i, (schedule, m, k, _) in enumerate(cases):
        rows = [r[i] for r in results]
        # looped placement: the last stage is on the last rank; V: on rank 0 (with stage 0)
        owner = 0 if SCHEDULES[schedule].v_shape else world - 1
        loss = rows[owner]
        assert loss["loss"] is not None and abs(loss["loss"] - loss["ref_loss"]) < TOL, (schedule, m, k, loss)
        assert all(r["loss"] is None and r["eval_diff"] is None for j, r in enumerate(rows) if j != owner)
        assert loss["eval_diff"] is not None and loss["eval_diff"] < TOL, (schedule, m, loss["eval_diff"])
        assert max(r["max_grad_diff"] for r in rows) < TOL, (schedule, m, k, [r["max_grad_diff"] for r in rows])
        names = [n for r in rows for n in r["names"]]
        assert len(names) == len(set(names)), schedule  # each parameter on one stage only
        expected = ([[r, 2 * world - 1 - r] for r in range(world)] if SCHEDULES[schedule].v_shape
                    else [[r, r + world] for r in range(world)])
        assert [r["stages"] for r in rows] == expected, schedule
        assert 0.0 <= loss["extra"]["pipeline/bubble_theory"] < 1.0


CASES_2 = [(s, m, k, 3) for s in ZB for m, k in ((4, 1), (8, 2))] + [("zbv", 2, 1, 3), ("interleaved_zb", 2, 1, 3)]


def test_zero_bubble_schedules_on_two_ranks_equal_unsplit_model():
    _check(spawn(_grad_cases, 2, CASES_2, timeout=300), CASES_2, 2)


CASES_4 = [(s, 8, 1, 7) for s in ZB]  # 15 layers -> 8 stages on 4 ranks


def test_zero_bubble_schedules_on_four_ranks_equal_unsplit_model():
    _check(spawn(_grad_cases, 4, CASES_4, timeout=300), CASES_4, 4)


def _sgd_runs(rank, world_size, names):
    return {name: _sgd_steps(name) for name in names}


def _sgd_steps(schedule):
    """dp=2 x pp=2, 2 accumulation steps of 2 micro-batches, clipping, 3 SGD steps through the
    run's engine; the reference is one process on the global batch (both replicas' data)."""
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.strategies.pipeline import Pipeline

    import _pipeline_checks as chk

    dist_setup.init(env.detect(), "gloo", 60)  # one process group per schedule: fresh p2p state
    build = chk.mlp(3)
    strategy = Pipeline(micro_batches=4, schedule=schedule, stages_per_rank=2)
    strategy.setup(chk.context(build, {"dp": 2, "pp": 2}, batch_size=8))
    engine = chk.engine_for(strategy, grad_clip=0.1)
    ref = build.full()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses, dp = [], strategy.dp_rank
    for step in range(3):
        glob = chk.batches(2, 16, seed=step)  # 2 accumulation steps of the global batch 16
        mine = [(x[dp * 8:(dp + 1) * 8], y[dp * 8:(dp + 1) * 8]) for x, y in glob]
        stats = engine.train_step(mine, torch.nn.MSELoss())
        ref_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ref(torch.cat([x for x, _ in glob])), torch.cat([y for _, y in glob]))
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        losses.append((None if stats.loss is None else stats.loss.item(), loss.item(),
                       stats.extra["grad_norm"], ref_norm.item()))
    ref_w = dict(ref.named_parameters())
    diff = max((p - ref_w[n]).abs().max().item() for n, p in strategy.model.named_parameters())
    moved = max((p - build.full().state_dict()[n]).abs().max().item() for n, p in strategy.model.named_parameters())
    dist_setup.teardown()
    return {"diff": diff, "moved": moved, "losses": losses}


SGD_SCHEDULES = ["zbv", "interleaved_zb"]


@pytest.fixture(scope="module")
def sgd_runs():
    return spawn(_sgd_runs, 4, SGD_SCHEDULES, timeout=300)  # one 4-rank spawn for both


@pytest.mark.parametrize("schedule", SGD_SCHEDULES)
def test_dp2_x_pp2_sgd_steps_with_accumulation_and_clipping_equal_one_process(sgd_runs, schedule):
    results = [r[schedule] for r in sgd_runs]
    assert max(r["diff"] for r in results) < TOL, [r["diff"] for r in results]
    assert min(r["moved"] for r in results) > 1e-3  # the weights did train
    reporting = [r["losses"] for r in results if r["losses"][0][0] is not None]
    assert len(reporting) == 2  # one loss-holding stage per replica
    for step in range(3):
        replica_mean = sum(rows[step][0] for rows in reporting) / 2  # equal replica batches
        got_norm, ref_norm = reporting[0][step][2:]
        assert abs(replica_mean - reporting[0][step][1]) < TOL, (schedule, step)
        assert got_norm == pytest.approx(ref_norm, rel=1e-5) and ref_norm > 0.1  # clipping acted


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides,world,key", [
    (["strategy.schedule=zbv"], 2, "strategy.schedule=zbv needs strategy.stages_per_rank=2"),
    (["strategy.schedule=zbv", "strategy.stages_per_rank=3", "model.depth=7"], 2, "strategy.stages_per_rank=2"),
    (["strategy.schedule=interleaved_zb"], 2, "strategy.stages_per_rank>=2"),
    (["strategy.schedule=interleaved_zb", "strategy.stages_per_rank=2", "strategy.micro_batches=9",
      "data.batch_size=36", "model.depth=7"], 4, "strategy.micro_batches=9 must be a multiple of dist.pp=4"),
    (["strategy.schedule=dualpipev", "strategy.stages_per_rank=2", "strategy.micro_batches=2"], 2,
     "strategy.micro_batches=2 < 4 stages"),
    (["strategy.schedule=zbv", "strategy.stages_per_rank=2", "trainer.compile=true"], 2, "trainer.compile"),
])
def test_bad_zero_bubble_settings_are_rejected_before_training(overrides, world, key):
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    if "dualpipev" in overrides[0] and "dualpipev" not in SCHEDULES:
        pytest.skip("this torch has no ScheduleDualPipeV")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=pipeline", *overrides])
        fixed = compose(config_name="config", overrides=["strategy=pipeline", "strategy.schedule=zbv",
                                                         "strategy.stages_per_rank=2"])
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        validate(cfg, world_size=world)
    validate(fixed, world_size=2)  # the fix the message names is accepted
