"""The ``disttrain`` command as users run it: a dev run with local workers, the console
script, TensorBoard output, resume on re-run, and config errors before any worker starts."""
import sys

from helpers import ROOT, cli_env, run_disttrain, run_process


def test_dev_run_writes_one_run_dir_with_checkpoints_and_tensorboard(tmp_path):
    run_dir = tmp_path / "dev"
    proc = run_disttrain(["dist.nproc_per_node=2", "trainer.max_steps=8", "trainer.log_every=4",
                          "checkpoint.every_steps=4"], run_dir)
    assert "starting 2 local workers" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    assert (run_dir / "train.log").exists() and (run_dir / "train.rank1.log").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/time_step_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8]

    # Same command again with more steps: resumes at 8 instead of starting over.
    run_disttrain(["dist.nproc_per_node=2", "trainer.max_steps=12", "trainer.log_every=4",
                   "checkpoint.every_steps=4"], run_dir)
    assert "(step 8)" in (run_dir / "train.log").read_text()


def test_console_script_and_config_error_before_any_worker(tmp_path):
    exe = str(ROOT / ".venv" / "bin" / "disttrain") if (ROOT / ".venv" / "bin" / "disttrain").exists() else "disttrain"
    proc = run_process([exe, "data.batch_size=0", "dist.nproc_per_node=2", f"hydra.run.dir={tmp_path}"],
                       timeout=120, env=cli_env())
    assert proc.returncode == 2
    assert "data.batch_size=0 must be an integer >= 1" in proc.stderr
    assert "starting 2 local workers" not in proc.stdout + proc.stderr


def test_unknown_strategy_is_rejected(tmp_path):
    proc = run_process([sys.executable, "-m", "disttrain", "strategy=warp_drive", f"hydra.run.dir={tmp_path}"],
                       timeout=120, env=cli_env())
    assert proc.returncode != 0 and "warp_drive" in proc.stderr and "strategy" in proc.stderr
