"""SIGKILL while a checkpoint is being written (fault.debug slows that one write) leaves the
previous checkpoint intact, pointed to by `latest` and loadable; the next run's start-up
(Checkpointer.clean_partial + choose, as in disttrain/engine/run.py) removes the partial write and
picks the previous checkpoint. (Resuming bitwise after a kill: tests/fault/test_kill_resume.py.)

With checkpoint.async_save=true the slowed write runs in the background: training goes on past
it (steps 9-12 are logged while step 8 is uncommitted), the step-12 save waits for it (never
staged), and the kill leaves the same intact step 4."""
import re
import subprocess
import sys
import time

import pytest
from launch_helpers import ROOT, TRAIN, kill_group, launch_env, wait_for

from disttrain.checkpoint.commit import Checkpointer, load_model_state, verify

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, mode):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    partial = ckpt / ".tmp-step_00000008"
    cmd = [sys.executable, "-m", "disttrain", *TRAIN, "dist.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    extra = ["checkpoint.async_save=true"] if mode == "async" else []
    proc = subprocess.Popen([*cmd, *extra, "+fault.debug.slow_save_step=8", "+fault.debug.save_delay_s=300"], cwd=ROOT,
                            env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:  # both ranks have written their files for step 8; the commit has not happened
        wait_for(lambda: all((partial / f"extra_rank{r}.pt").exists() for r in (0, 1)), 240, "the step-8 write")
        if mode == "async":  # the loop went on while step 8 was being written
            log = run_dir / "train.log"
            wait_for(lambda: "step 12/" in log.read_text(), 120, "training past the background write")
            time.sleep(1.0)
    finally:
        kill_group(proc)  # SIGKILL to the launcher and both workers
    if mode == "async":
        text = (run_dir / "train.log").read_text()
        assert re.search(r"checkpoint staged: \S+step_00000008 \(the loop blocked", text), text[-2000:]
        assert "step_00000012" not in text  # the next save waits for the one in flight
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert verify(ckpt / "step_00000004") is None and verify(partial) is not None
    assert not (ckpt / "step_00000008").exists()
    newest = load_model_state(run_dir)
    assert all((newest[k] == v).all() for k, v in load_model_state(run_dir, step=4).items())
    checkpointer = Checkpointer(ckpt)  # what the next run does first (rank 0, no process group)
    checkpointer.clean_partial()
    assert not partial.exists()
    assert checkpointer.choose("auto") == ckpt / "step_00000004"
