"""Test helpers: the real CLI as a subprocess, and functions on N real gloo processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def cli_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "SLURM_", "OMPI_", "PMI"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session/process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run_process(cmd: list, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``subprocess.run`` that leaves nothing behind: the command runs in its own session and
    the whole group (launcher, elastic agent, workers) is killed on every exit path: normal
    end (stragglers), timeout, and an exception raised into the test (pytest-timeout, ^C)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_session(proc)
        raise subprocess.TimeoutExpired(cmd, timeout) from exc
    finally:
        kill_session(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_disttrain(overrides: list[str], run_dir: Path, timeout: float = 180, check: bool = True,
                  env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m disttrain <overrides> hydra.run.dir=<run_dir>`` (optionally under a
    launcher prefix such as torchrun) and return the finished process."""
    cmd = (launcher or [sys.executable]) + ["-m", "disttrain", *overrides, f"hydra.run.dir={run_dir}",
                                            "trainer.progress=log"]
    proc = run_process(cmd, timeout=timeout, env=cli_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc

from disttrain.testing import spawn  # noqa: E402,F401  (re-exported for the tests)


def spawned_once(fn, world: int, fixture: str, timeout: float = 300):
    """A module-scoped fixture named ``fixture``: ``fn(rank, world, tmp_dir)`` run once on
    ``world`` real gloo ranks; every rank's result, shared by the module's tests (one spawn
    per file instead of one per test)."""
    import pytest

    @pytest.fixture(scope="module", name=fixture)
    def _spawned(tmp_path_factory):
        return spawn(fn, world, str(tmp_path_factory.mktemp(fixture)), timeout=timeout)

    return _spawned
