"""A rank stalled on purpose in its data loader (its peer then waits in DDP's all-reduce) is
reported within dist.timeout_s: the job exits non-zero naming rank 1 and the operation, and
both ranks' Python stacks are in <run dir>/hang/."""
import datetime
import re

import pytest
from launch_helpers import TRAIN

from helpers import run_disttrain

TIMEOUT_S = 10

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_stalled_rank_is_named_and_stacks_are_dumped(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_disttrain([*TRAIN, "dist.nproc_per_node=2", f"dist.timeout_s={TIMEOUT_S}",
                          "+fault.debug.stall_rank=1", "+fault.debug.stall_step=5"], run_dir, check=False, timeout=240)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "hang detected: rank 1 made no progress" in output
    report = (run_dir / "hang" / "report.txt").read_text()
    assert "rank 1 made no progress for 9s in data loader at step 5" in report
    assert "rank 0 in train_step (forward/backward/collectives) at step 5" in report
    stacks = {rank: (run_dir / "hang" / f"stacks.rank{rank}.txt").read_text() for rank in (0, 1)}
    assert "_maybe_stall" in stacks[1]  # where rank 1 is stuck
    assert "train_step" in stacks[0]    # rank 0 waits inside the step's all-reduce
    # Detected within dist.timeout_s of the stall (log times have 1 s resolution).
    stalled_at = _time(run_dir / "train.rank1.log", "stalls in the data loader")
    reported_at = _time(run_dir / "train.log", "hang detected")
    assert (reported_at - stalled_at).total_seconds() <= TIMEOUT_S + 1


def _time(log, needle):
    line = next(line for line in log.read_text().splitlines() if needle in line)
    return datetime.datetime.strptime(re.match(r"(\d\d:\d\d:\d\d)", line).group(1), "%H:%M:%S")
