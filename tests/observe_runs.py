"""Real runs shared by the observability tests (issue 7), made once per test session:
a 2-rank GPipe pipeline run (timeline, idle, MFU) is what both the report and the
observability tests read."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from helpers import run_disttrain

PIPELINE = ["strategy=pipeline", "strategy.schedule=gpipe", "strategy.micro_batches=4", "dist.nproc_per_node=2",
            "trainer.max_steps=12", "trainer.log_every=4", "checkpoint.every_steps=0", "metrics.timeline_step=6",
            "metrics.straggler_every=0"]


@functools.lru_cache(maxsize=None)
def pipeline_run() -> Path:
    root = Path(tempfile.mkdtemp(prefix="disttrain-observe-"))
    atexit.register(shutil.rmtree, root, True)
    run_dir = root / "pipeline"
    run_disttrain(PIPELINE, run_dir, timeout=300)
    return run_dir
