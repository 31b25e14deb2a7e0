"""``disttrain plan plan.validate=true`` end to end on one rank: the prediction is made, the
strategy's overhead run at the small batch is measured and cached (plan.structure), and the
real run is set beside it. (How close they come is bench/plan_accuracy.py's job: timings are
not asserted in tests.)"""
from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import ROOT, cli_env


def test_validate_runs_the_overhead_run_once_and_prints_predicted_beside_measured(tmp_path):
    env = cli_env({"XDG_CACHE_HOME": str(tmp_path / "cache")})
    args = ["plan.validate=true", "plan.validate_nproc=1", "plan.validate_steps=3", "plan.validate_repeats=1",
            "model.hidden=16", "model.depth=2", "data.batch_size=8", "plan.micro_batches=2"]
    proc = subprocess.run([sys.executable, "-m", "disttrain", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(r"^single\s+1\s+([0-9.]+)\s+([0-9.]+)\s+[-+]\d+%\s+([0-9.]+) [KMG]?B\s+([0-9.]+) [KMG]?B",
                    proc.stdout, re.M)
    assert row, proc.stdout[-2000:]
    assert all(float(v) > 0 for v in row.groups())
    cache = json.loads((tmp_path / "cache" / "disttrain" / "plan_host.json").read_text())
    overhead_runs = [key for key in cache if "|overhead run b=" in key]
    # one run of the validated strategy on this model (not the tiny one) at 2 samples: one per micro-batch
    assert len(overhead_runs) == 1, list(cache)
    assert "|single|" in overhead_runs[0] and "|overhead run b=2 " in overhead_runs[0]
    assert overhead_runs[0].endswith("|model.hidden=16 model.depth=2")  # the run's own overrides, plan.* aside
    assert cache[overhead_runs[0]]["step_s"] > 0
