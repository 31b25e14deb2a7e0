"""Test helpers: the real CLI as a subprocess, and functions on N real gloo processes."""
from __future__ import annotations

import os
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


def run_disttrain(overrides: list[str], run_dir: Path, timeout: float = 180, check: bool = True,
                  env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m disttrain <overrides> hydra.run.dir=<run_dir>`` (optionally under a
    launcher prefix such as torchrun) and return the finished process."""
    cmd = (launcher or [sys.executable]) + ["-m", "disttrain", *overrides, f"hydra.run.dir={run_dir}",
                                            "trainer.progress=log"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc

from disttrain.testing import spawn  # noqa: E402,F401  (re-exported for the tests)
