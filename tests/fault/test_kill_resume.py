"""A dev run killed with SIGKILL mid-run and re-run ends bitwise equal to an uninterrupted
run; a checkpoint truncated on disk is skipped for the previous one."""
import os
import signal
import subprocess
import sys
import time

import torch

from disttrain import load_model_state
from helpers import ROOT, cli_env, run_disttrain

ARGS = ["strategy=ddp", "dist.nproc_per_node=2", "trainer.max_steps=60", "checkpoint.every_steps=10",
        "trainer.log_every=10", "model.hidden=256", "model.depth=4", "data.batch_size=16",
        "optim=adamw", "checkpoint.keep=10"]


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def _kill_when(run_dir, checkpoint_name, timeout=240):
    """Start the dev run in its own process group; SIGKILL the whole group once the given
    checkpoint is committed (the run is then mid-way, later steps not yet saved)."""
    cmd = [sys.executable, "-m", "disttrain", *ARGS, f"hydra.run.dir={run_dir}", "trainer.progress=log",
           "data.debug_delay_s=0.003"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    target = run_dir / "checkpoints" / checkpoint_name
    while not (target / "manifest.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_sigkill_mid_run_then_rerun_is_bitwise_equal(tmp_path):
    run_disttrain(ARGS, tmp_path / "straight")
    reference = load_model_state(tmp_path / "straight")

    killed = tmp_path / "killed"
    _kill_when(killed, "step_00000020")
    committed = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert "step_00000060" not in committed, "the kill came too late to test anything"
    proc = run_disttrain(ARGS, killed)
    assert "resumed from" in (killed / "train.log").read_text()
    _assert_bitwise_equal(load_model_state(killed), reference)
    assert proc.returncode == 0


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    args = ["strategy=single", "trainer.max_steps=20", "checkpoint.every_steps=10", "trainer.log_every=10"]
    run_disttrain(args, tmp_path / "ref")
    reference = load_model_state(tmp_path / "ref")

    run_dir = tmp_path / "run"
    run_disttrain(args, run_dir)
    newest = run_dir / "checkpoints" / "step_00000020"
    victim = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    # Re-run the same command: step 20 is corrupt, so it resumes from 10 and retrains 10..20.
    run_disttrain(args, run_dir)
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint" in log and "step_00000020" in log and "(step 10)" in log
    _assert_bitwise_equal(load_model_state(run_dir), reference)
