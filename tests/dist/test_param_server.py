"""strategy=param_server on real gloo processes (the real CLI, 3-4 ranks): synchronous
equivalence, the staleness bound under a straggler, exact resume, free-running workers that
the servers stop at ``trainer.max_steps``, a killed worker the job goes on without, and
convergence."""
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from disttrain.engine import builders
from disttrain.checkpoint.commit import load_model_state
from disttrain.data.sampler import ResumableBatchSampler
from helpers import run_disttrain

PS = ["strategy=param_server", "optim=sgd", "trainer.progress=log"]
LOSS_THRESHOLD = 0.1  # MSE on the whole regression set; it starts near 0.3, ~0.04 after 150 steps
SYNC = PS + ["dist.nproc_per_node=3", "strategy.max_staleness=0", "trainer.max_steps=12",
             "checkpoint.every_steps=6", "trainer.log_every=6"]


def counters(run_dir: Path, step: int, server: int = 0) -> dict:
    with warnings.catch_warnings():  # "no process group: loading in a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(checkpoint_id=str(run_dir / "checkpoints" / f"step_{step:08d}"))
    return {k: v.clone() for k, v in loaded[f"ps_server{server}"]["counters"].items()}


def synchronous_sgd_reference(run_dir: Path, steps: int, workers: int, clip: float | None = None,
                              accum: int = 1) -> dict:
    """One process: each step, the gradients of every worker's batch (same samplers as
    the workers) averaged, clipped by their global norm (when ``clip``), then the run's
    optimizer and scheduler: what DDP does."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "resolved.yaml")
    model = builders.model_builder(cfg)()
    optimizer = builders.optimizer_builder(cfg)(model.parameters())
    scheduler = builders.scheduler_builder(cfg)(optimizer)
    from disttrain.engine.evaluate import split_from_config

    dataset, _ = split_from_config(cfg, builders.build_dataset(cfg))  # the training split
    loss_fn = builders.build_loss(cfg)
    samplers = [iter(ResumableBatchSampler(len(dataset), cfg.data.batch_size, rank=w, world_size=workers,
                                           seed=cfg.trainer.seed, shuffle=cfg.data.get("shuffle", True)))
                for w in range(workers)]
    for _ in range(steps):
        grads = []
        for sampler in samplers:
            model.zero_grad()
            for _ in range(accum):  # k micro-batches of b = one batch of k*b
                inputs, targets = dataset[next(sampler)]
                (loss_fn(model(inputs), targets) / accum).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for param, *per_worker in zip(model.parameters(), *grads):
            total = per_worker[0].clone()
            for grad in per_worker[1:]:
                total += grad
            param.grad = total.div_(workers)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ps_sync") / "run"
    run_disttrain(SYNC, run_dir, timeout=300)
    return run_dir


def test_staleness_zero_equals_synchronous_sgd(sync_run):
    reference = synchronous_sgd_reference(sync_run, steps=12, workers=2)
    trained = load_model_state(sync_run)
    assert trained.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], atol=1e-6, rtol=1e-6, msg=name)
    count = counters(sync_run, 12)
    assert int(count["version"]) == 12 and count["applied"].tolist() == [12, 12]
    assert int(count["staleness_max"]) == 0 and int(count["staleness_hist"][0]) == 24


def test_tcp_path_equals_the_shared_memory_path(sync_run, tmp_path):
    """Workers and server on one host exchange through /dev/shm by default (disttrain.ps.shm);
    strategy.shared_memory=false sends the same bytes over gloo: bitwise the same run. The
    shared files are gone once both sides mapped them."""
    logs = _logs(sync_run)
    token = re.search(r"exchange through shared memory \(same host; \S+/disttrain-ps-(\w+)-\*", logs)
    assert token and "2 of 2 worker/server pairs" in logs, logs[-2000:]
    assert not list(Path("/dev/shm").glob(f"disttrain-ps-{token.group(1)}-*"))
    # the workers (outside the loop's per-rank table) wrote their training memory for the plan
    import json

    worker_mem = [json.loads((sync_run / "memory" / f"rank{r}.json").read_text())["train_mem_b"] for r in (1, 2)]
    assert all(m > 1e5 for m in worker_mem), worker_mem
    run_disttrain(SYNC + ["strategy.shared_memory=false"], tmp_path / "tcp", timeout=300)
    assert "shared memory" not in _logs(tmp_path / "tcp")
    got, want = load_model_state(tmp_path / "tcp"), load_model_state(sync_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_from_checkpoint_equals_uninterrupted_run(sync_run, tmp_path):
    """Kill-and-resume of the whole job: a new job started on a run dir holding only the
    step-6 checkpoint ends bitwise equal to the uninterrupted run (s=0 is deterministic)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(sync_run / "checkpoints" / "step_00000006", resumed / "checkpoints" / "step_00000006")
    proc = run_disttrain(SYNC, resumed, timeout=300)
    assert "resumed at version 6" in proc.stdout + proc.stderr + _logs(resumed)
    final, uninterrupted = load_model_state(resumed), load_model_state(sync_run)
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    assert int(counters(resumed, 12)["version"]) == 12 and int(counters(resumed, 12)["steps"]) == 12


def test_clipping_and_evaluation_on_the_servers_equal_synchronous_sgd(tmp_path):
    """s=0 with trainer.grad_clip and 2 micro-batches per step: the servers clip the round's
    averaged gradient by its global norm, as DDP does; validation runs on the servers' current weights (no
    mismatched collectives between servers and workers) and equals one process evaluating
    those weights. bf16 on the workers is honoured (the weights move off the fp32 run's)."""
    from disttrain.engine.evaluate import split_from_config

    run_dir = tmp_path / "clip"
    run_disttrain(SYNC + ["trainer.grad_clip=0.05", "data.val_fraction=0.25", "trainer.eval_every=6",
                          "trainer.grad_accum_steps=2"], run_dir, timeout=300)
    trained = load_model_state(run_dir)
    reference = synchronous_sgd_reference(run_dir, steps=12, workers=2, clip=0.05, accum=2)
    unclipped = synchronous_sgd_reference(run_dir, steps=12, workers=2, accum=2)
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], atol=1e-6, rtol=1e-6, msg=name)
    assert max((reference[k] - unclipped[k]).abs().max().item() for k in reference) > 1e-4  # clipping acted
    cfg = OmegaConf.load(run_dir / ".hydra" / "resolved.yaml")
    model, loss_fn = builders.model_builder(cfg)(), builders.build_loss(cfg)
    model.load_state_dict(trained)
    _, val_set = split_from_config(cfg, builders.build_dataset(cfg))
    inputs, targets = (torch.stack(column) for column in zip(*[val_set[i] for i in range(len(val_set))]))
    with torch.no_grad():
        expected = loss_fn(model(inputs), targets).item()
    logged = [float(v) for v in re.findall(r"step 12  val_loss (\S+)", _logs(run_dir))]
    assert logged and logged[0] == pytest.approx(expected, rel=1e-5), (logged, expected)


def test_memory_levers_on_workers_leave_synchronous_sgd_unchanged(sync_run, tmp_path):
    """Activation checkpointing (every_n) and disk offload on the workers: same numbers."""
    run_disttrain(SYNC + ["memory.activation_checkpointing=every_n", "memory.activation_offload=disk",
                          "memory.offload_min_bytes=0"], tmp_path / "mem", timeout=300)
    got, want = load_model_state(tmp_path / "mem"), load_model_state(sync_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_on_workers_is_honoured_and_fp16_refused(sync_run, tmp_path):
    run_disttrain(SYNC + ["trainer.precision=bf16"], tmp_path / "bf16", timeout=300)
    bf16, fp32 = load_model_state(tmp_path / "bf16"), load_model_state(sync_run)
    moved = max((bf16[k] - fp32[k]).abs().max().item() for k in fp32)
    assert 1e-5 < moved < 1e-2, moved  # bf16 rounding, not a different training
    proc = run_disttrain(SYNC + ["trainer.precision=fp16"], tmp_path / "fp16", check=False, timeout=120)
    assert proc.returncode == 2 and "strategy=param_server does not support trainer.precision=fp16" in proc.stderr


def test_straggler_never_makes_a_gradient_older_than_the_bound(tmp_path):
    """1 server, 3 workers; worker 0 is a straggler by construction, not by timing: the
    server applies its pushes only once the two fast workers cannot move (each waits on a
    pull the gate refuses), so run-ahead does not depend on how the OS schedules 4 processes
    on 2 cores. Checked from the server's own counters (in the checkpoint)."""
    bound, steps = 3, 30
    run_disttrain(PS + ["dist.nproc_per_node=4", f"strategy.max_staleness={bound}", "strategy.debug_slow_workers=[0]",
                        "strategy.debug_hold_slow_pushes=true", f"trainer.max_steps={steps}",
                        f"trainer.log_every={steps}", "checkpoint.every_steps=0"], tmp_path / "run", timeout=300)
    count = counters(tmp_path / "run", steps)
    hist = count["staleness_hist"]
    assert int(count["staleness_max"]) <= bound and int(count["violations"]) == 0
    assert int(hist[bound + 1:].sum()) == 0
    # The bound was reached: every held push is released only when the gate stops both fast
    # workers, i.e. at exactly `bound` versions.
    assert int(hist[bound]) > 0, hist.tolist()
    # The servers stop at max_steps steps of 3 gradients received each, whoever sent them (the
    # last optimizer step may still be forming: not applied): the held worker sent fewer than
    # the free ones (workers run free, none waits for a step's end).
    applied = count["applied"].tolist()
    assert int(count["steps"]) == steps and int(count["pushes"].sum()) >= 3 * steps > sum(applied) - 3, applied
    assert applied[0] < min(applied[1:]), applied
    logs = _logs(tmp_path / "run")
    assert f"ps server 0 step {steps}: version " in logs
    assert "held push released after" not in logs  # every release was decided by the gate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "ps_server0"))
    board.Reload()
    assert "ps/staleness" in board.Tags()["histograms"]
    assert {"ps/staleness_max", "ps/worker_loss", "ps/pushes_per_s/worker0"} <= set(board.Tags()["scalars"])


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run_dir.rglob("*.log"))


def test_async_two_servers_go_on_without_a_killed_worker_and_converge(tmp_path):
    """Fully asynchronous, lr scaled by staleness, parameters sharded over 2 servers, worker 1
    slowed. SIGKILL to worker 1 (rank 3) at its 15th gradient: both servers notice and say so,
    and the job finishes without a restart (the servers hold the whole state; worker 0 does
    the rest of the steps). The regression loss of the final weights is well below its
    starting value (~0.3), and both servers' checkpoint cuts agree."""
    run_dir, steps = tmp_path / "run", 150
    proc = run_disttrain(PS + ["dist.nproc_per_node=4", "strategy.num_servers=2", "strategy.max_staleness=null",
                               "strategy.staleness_lr=inverse", f"trainer.max_steps={steps}", "trainer.log_every=10",
                               "checkpoint.every_steps=50", "strategy.debug_slow_workers=[1]",
                               "strategy.debug_delay_s=0.005", "+fault.debug.kill_rank=3",
                               "+fault.debug.kill_step=15"], run_dir, timeout=400)
    logs = _logs(run_dir) + proc.stdout + proc.stderr
    assert "ps server 0: worker 1 (rank 3) is gone" in logs and "ps server 1: worker 1 (rank 3) is gone" in logs
    assert "rank 3 exited with code -9; the job goes on without it" in logs
    assert "resumed" not in logs and "restart 1 of this job" not in logs
    cuts = [counters(run_dir, steps, server)["applied"].tolist() for server in (0, 1)]
    assert cuts[0] == cuts[1], cuts  # one model: the same gradients in every shard
    for server in (0, 1):
        count = counters(run_dir, steps, server)
        assert int(count["steps"]) == steps
    applied = cuts[0]
    assert applied[1] == 14 and applied[0] > steps, applied  # killed before its 15th push; worker 0 did the rest
    cfg = OmegaConf.load(run_dir / ".hydra" / "resolved.yaml")
    model, dataset = builders.model_builder(cfg)(), builders.build_dataset(cfg)
    inputs, targets = dataset.tensors
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(inputs), targets).item()
        model.load_state_dict(load_model_state(run_dir))
        final = torch.nn.functional.mse_loss(model(inputs), targets).item()
    assert final < LOSS_THRESHOLD < initial, (initial, final)
