"""launch/slurm.sbatch on a real one-node Slurm cluster (slurmctld + slurmd started by
tests/launch/slurm_cluster.sh, stopped by PID): a 2-task DDP sweep, and a job preempted
mid-run with the requeue signal that requeues itself and resumes bitwise; and a Hydra sweep
through the submitit launcher, each trial one 2-task job. One cluster serves the whole file."""
from __future__ import annotations

import csv
import re
import subprocess

import pytest
from helpers import run_disttrain
from launch_helpers import (MAX_STEPS, ROOT, TRAIN, assert_bitwise_equal, final_weights, launch_env,
                            logged_step, reference_weights, run, torchrun_sweep_dir, wait_for)

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLUSTER = ROOT / "tests" / "launch" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """One cluster for the module; the environment that points the Slurm clients at it."""
    installed = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=600)
    if installed.returncode == 3:
        pytest.skip(f"Slurm cannot be installed on this machine: {installed.stderr.strip()}")
    assert installed.returncode == 0, installed.stderr
    state = tmp_path_factory.mktemp("slurm")
    # Not run(): that kills the command's process group on exit, and the daemons it starts
    # must outlive it (the script stops them by PID below).
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield launch_env({"SLURM_CONF": str(state / "slurm.conf")})
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=60)


def sbatch(env: dict, out: str, overrides: list[str]) -> str:
    proc = run(["sbatch", "--parsable", f"--output={out}", str(ROOT / "launch" / "slurm.sbatch"), *overrides], env=env)
    return proc.stdout.strip().split(";")[0]


def job_fields(env: dict, job: str) -> dict[str, str]:
    text = run(["scontrol", "show", "job", "-o", job], env=env, check=False).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_done(env: dict, job: str, out: str, timeout: float = 240) -> dict[str, str]:
    """Wait for the job to end; fail with its output unless it COMPLETED."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    fields = wait_for(lambda: (f := job_fields(env, job)).get("JobState") in ended and f, timeout, f"job {job}", 1)
    assert fields["JobState"] == "COMPLETED", f"job {job}: {fields.get('JobState')}\n" + open(out).read()[-6000:]
    return fields


def test_slurm_sweep_matches_torchrun_bitwise(slurm_env, tmp_path):
    sweep, out = tmp_path / "sweep", str(tmp_path / "slurm.out")
    job = sbatch(slurm_env, out, ["-m", *TRAIN, "optim.lr=0.05,0.02", f"hydra.sweep.dir={sweep}"])
    wait_done(slurm_env, job, out)
    assert "on 2 rank(s) (slurm, " in (sweep / "0" / "train.log").read_text()
    assert_bitwise_equal(final_weights(sweep / "0"), reference_weights())
    assert_bitwise_equal(final_weights(sweep / "1"), final_weights(torchrun_sweep_dir() / "1"))


def test_preempted_job_saves_requeues_and_resumes_bitwise(slurm_env, tmp_path):
    run_dir, out = tmp_path / "run", str(tmp_path / "slurm.out")
    # Slow steps (first attempt only) leave time to preempt mid-run.
    job = sbatch(slurm_env, out, [*TRAIN, f"hydra.run.dir={run_dir}", "+fault.debug.step_delay_s=0.3"])
    wait_for(lambda: logged_step(run_dir) >= 8, 240, "step 8 of the first attempt")
    run(["scancel", "--signal=USR1", job], env=slurm_env)  # what --signal=USR1@90 sends
    fields = wait_done(slurm_env, job, out)
    assert int(fields["Restarts"]) == 1
    log = (run_dir / "train.log").read_text()
    stopped = int(re.search(r"stop requested: checkpoint saved at step (\d+)", log).group(1))
    assert 8 <= stopped < MAX_STEPS
    assert f"Slurm job {job} requeued" in log and "restart 1 of this job (launcher slurm)" in log
    assert re.search(rf"resumed from \S+step_{stopped:08d} \(step {stopped}\)", log), log[-3000:]
    assert_bitwise_equal(final_weights(run_dir), reference_weights())


# Hydra's submitit launcher on the same cluster: each sweep trial one 2-task Slurm job.
SWEEP_TINY = ["model.hidden=16", "model.depth=2", "data.size=512", "data.val_fraction=0.25",
              "trainer.eval_every=5", "trainer.log_every=5", "checkpoint.every_steps=0"]


def submitit_logs(env: dict, sweep_dir) -> str:
    """What a hung or failed submitit sweep left: the queue and each task's log tails."""
    parts = [run(["squeue", "-a", "-l"], env=env, check=False).stdout]
    for log in sorted(sweep_dir.glob(".submitit/*/*_log.*")):
        parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


@pytest.mark.world_size(2)
def test_submitit_slurm_sweep_runs_each_trial_as_a_two_task_job(tmp_path, slurm_env):
    sweep_dir = tmp_path / "sweep"
    # Without accounting (no slurmdbd here) submitit learns that a task ended only from its
    # result file: a task that dies without one would be waited for forever, so bound the
    # store and collective waits (dist.timeout_s) well inside the test's own limit.
    try:
        run_disttrain(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2",
                       "hydra.launcher.timeout_min=10", *SWEEP_TINY, "trainer.max_steps=10", "optim.lr=0.01,0.1",
                       "dist.timeout_s=120", f"hydra.sweep.dir={sweep_dir}"], tmp_path / "unused", timeout=400,
                      env={"SLURM_CONF": slurm_env["SLURM_CONF"]})
    except (subprocess.TimeoutExpired, AssertionError) as exc:
        raise AssertionError(f"{exc}\n{submitit_logs(slurm_env, sweep_dir)}") from exc
    with open(sweep_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["optim.lr"], r["status"], r["steps"]) for r in rows] == [("0.01", "ok", "10"), ("0.1", "ok", "10")]
    for num in ("0", "1"):  # each trial: one Slurm job whose two tasks are the two ranks
        assert "on 2 rank(s) (slurm, " in (sweep_dir / num / "train.log").read_text()
        assert (sweep_dir / num / "train.rank1.log").exists()
    assert sum(r["best"] == "yes" for r in rows) == 1
