"""SIGTERM reaching ONE rank stops EVERY rank after the same step with one consistent
checkpoint (the flag is all-reduced each step); running the command again resumes and ends
bitwise equal to an uninterrupted run. (Slurm's USR1 + requeue: tests/launch/test_slurm.py.)"""
import re
import subprocess
import sys

import pytest
from launch_helpers import (MAX_STEPS, ROOT, TRAIN, assert_bitwise_equal, final_weights, kill_group, launch_env,
                            logged_step, reference_weights, run, wait_for, worker_pid)

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def torchrun(run_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "disttrain", *TRAIN, f"hydra.run.dir={run_dir}", *extra]


def test_sigterm_on_one_rank_stops_all_at_one_step_then_resume_is_bitwise(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(run_dir, "+fault.debug.step_delay_s=0.3"), cwd=ROOT, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: logged_step(run_dir) >= 8, 240, "step 8")
        rank1 = wait_for(lambda: worker_pid(proc.pid, 1), 10, "rank 1's pid")
        subprocess.run(["kill", "-TERM", str(rank1)], check=True)
        output, _ = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, output[-5000:]
    rank0, rank1_log = (run_dir / "train.log").read_text(), (run_dir / "train.rank1.log").read_text()
    assert "SIGTERM received" in rank1_log
    steps = [int(re.search(r"checkpoint saved at step (\d+), leaving", text).group(1)) for text in (rank0, rank1_log)]
    assert steps[0] == steps[1] and 8 <= steps[0] < MAX_STEPS, steps
    run(torchrun(run_dir))  # the same command again: resumes from the signal's checkpoint
    assert re.search(rf"resumed from \S+step_{steps[0]:08d}", (run_dir / "train.log").read_text())
    assert_bitwise_equal(final_weights(run_dir), reference_weights())
