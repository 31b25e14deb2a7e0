"""launch/torchrun.sh runs a Hydra multirun sweep: one job after another in the same worker
processes, each with its own run dir (the sweep's job 0 is also the reference run the other
launch and fault tests compare against)."""
import pytest
import torch
from launch_helpers import MAX_STEPS, final_weights, torchrun_sweep_dir

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_torchrun_multirun_runs_job_after_job():
    sweep = torchrun_sweep_dir()
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        assert "on 2 rank(s) (torchrun" in log and f"done at step {MAX_STEPS}" in log
        assert (sweep / job / "train.rank1.log").exists()
    first, second = final_weights(sweep / "0"), final_weights(sweep / "1")
    # Each job trained with its own learning rate (0.05, 0.02): different weights.
    assert any(not torch.equal(first[name], second[name]) for name in first)
