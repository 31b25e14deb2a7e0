"""torchrun --max-restarts=2: rank 1 is SIGKILLed at a random step; the agent restarts the
group, which resumes from the newest complete checkpoint and ends bitwise equal to an
uninterrupted run; the restart count is in the log and in TensorBoard."""
import random
import sys

import pytest
from launch_helpers import TRAIN, assert_bitwise_equal, final_weights, reference_weights, run

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def restart_counts(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars("fault/restart_count")]


def test_killed_worker_restarts_and_resumes_bitwise(tmp_path):
    kill_step = random.randint(5, 20)
    print(f"killing rank 1 at step {kill_step}")
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=2",
         "-m", "disttrain", *TRAIN, f"hydra.run.dir={run_dir}",
         "+fault.debug.kill_rank=1", f"+fault.debug.kill_step={kill_step}"])
    log = (run_dir / "train.log").read_text()
    assert f"SIGKILL to rank 1 at step {kill_step}" in (run_dir / "train.rank1.log").read_text()
    assert "restart 1 of this job (launcher torchrun)" in log and "resumed from" in log
    assert restart_counts(run_dir) == [0.0, 1.0]
    assert_bitwise_equal(final_weights(run_dir), reference_weights())
