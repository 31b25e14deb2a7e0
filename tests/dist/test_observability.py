"""Observability on real gloo processes: a rank slowed on purpose is named as a straggler
(log and TensorBoard) and equal ranks are not; DDP communication is timed by the comm hook;
throughput, FLOPs and MFU are logged and consistent with each other."""
import json
import re

import pytest

from helpers import spawn
from observe_runs import pipeline_run

from disttrain.observe.flops import mlp_train_flops
from disttrain.observe.report import read_scalars

DELAY = 0.15


def _last(tags, tag):
    return tags[tag][-1][1]


def test_slow_rank_is_named_and_the_step_is_measured(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    run_cli("strategy=ddp", "dist.nproc_per_node=3", "trainer.max_steps=12", "trainer.log_every=6",
            "checkpoint.every_steps=0", "metrics.straggler_every=6", "metrics.debug_slow_rank=2",
            f"metrics.debug_slow_s={DELAY}", run_dir=run_dir, timeout=300)
    log = (run_dir / "train.log").read_text()
    named = re.findall(r"straggler at step (\d+): (.*)", log)
    assert [step for step, _ in named] == ["6", "12"]
    assert all(text.startswith("rank 2 (") and "rank 0 (" not in text and "rank 1 (" not in text for _, text in named)
    tags = read_scalars(run_dir)
    assert _last(tags, "observe/straggler/rank2") == 1.0
    assert "observe/straggler/rank0" not in tags and "observe/straggler/rank1" not in tags
    # the fast ranks wait for rank 2 inside DDP's all-reduce: the comm hook sees it ...
    for rank in (0, 1):
        assert _last(tags, f"rank{rank}/time_comm_s") > 0.5 * DELAY
    # ... and rank 2's own time is the slow part, not communication
    assert _last(tags, "rank2/time_comm_s") < 0.5 * DELAY
    assert _last(tags, "rank2/time_compute_s") > DELAY
    # throughput, FLOPs, MFU (3 ranks x batch 32 of the default MLP)
    flops = mlp_train_flops(32, 32, 128, 3, 1) * 3
    assert _last(tags, "train/flops_per_step") == pytest.approx(flops)
    step_s = _last(tags, "train/time_step_s")
    assert _last(tags, "train/flops_per_s") == pytest.approx(flops / step_s, rel=1e-4)
    peak = list(json.loads((run_dir / "peak_flops.json").read_text()).values())[0]
    mfu = _last(tags, "train/mfu")
    assert 0 < mfu < 1 and mfu == pytest.approx(flops / step_s / (3 * peak), rel=1e-4)
    split = sum(_last(tags, f"train/time_{k}_s") for k in ("compute", "comm", "idle"))
    assert split == pytest.approx(step_s, rel=1e-3)
    for rank in range(3):
        assert _last(tags, f"rank{rank}/samples_per_s") > 0
        assert _last(tags, f"rank{rank}/peak_mem_gb") > 0.05  # resident memory of a torch process
    assert re.search(r"step 12 per rank: samples/s \[", log)


def _observe_steps(rank, world_size, slow_rank):
    """Real DDP steps driven through the Observer; returns the stragglers named at step 10
    (equal ranks) and at step 20 (``slow_rank`` sleeping 0.1 s per step)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.observe.metrics import TensorBoard
    from disttrain.models import build_mlp
    from disttrain.observe import comm_timing
    from disttrain.config.schema import MetricsConfig
    from disttrain.observe.observer import Observer
    from disttrain.strategies.base import StepStats

    world = env.detect()
    dist_setup.init(world, "gloo", 60)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_mlp(hidden=256))
    settings = MetricsConfig(straggler_every=10, straggler_ratio=2.0)
    observer = Observer(settings, world, torch.device("cpu"), TensorBoard(None, enabled=False),
                        comm_timing.attach(model), 1e10, None)
    named = []
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    for step in range(1, 21):
        if step == 11:
            settings.debug_slow_rank, settings.debug_slow_s = slow_rank, 0.1
        observer.before_step()
        torch.nn.functional.mse_loss(model(x), y).backward()
        observer.after_step(step, StepStats(loss=None, samples=64), [(x, y)])
        if step % 10 == 0:
            named.append(list(observer.stragglers))
    dist_setup.teardown()
    return named


def test_equal_ranks_are_not_named_and_a_slow_one_is():
    results = spawn(_observe_steps, 3, 1, timeout=240)
    assert results == [[[], [1]]] * 3


def test_pipeline_idle_and_mfu_are_reported():
    tags = read_scalars(pipeline_run())
    # each stage waits for the other: idle is part of the step, and the split adds up
    assert _last(tags, "train/time_idle_s") > 0
    split = sum(_last(tags, f"train/time_{k}_s") for k in ("compute", "comm", "idle"))
    assert split == pytest.approx(_last(tags, "train/time_step_s"), rel=1e-3)
    # only the last stage counts samples, so FLOPs are the whole model's on the global batch
    assert _last(tags, "train/flops_per_step") == pytest.approx(mlp_train_flops(32, 32, 128, 3, 1))
    assert 0 < _last(tags, "train/mfu") < 1
