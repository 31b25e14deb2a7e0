"""Shared by tests/launch and tests/fault: one training config, its uninterrupted reference
(run once per session through the real launch/torchrun.sh), and process helpers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers import ROOT, cli_env, run_process

#: 2 ranks of DDP on the MLP, a checkpoint every 4 steps: small enough to run many times.
MAX_STEPS = 24
TRAIN = ["strategy=ddp", "model=mlp", "data=synthetic", "optim=sgd", f"trainer.max_steps={MAX_STEPS}",
         "checkpoint.every_steps=4", "trainer.log_every=4", "trainer.progress=log", "checkpoint.keep=10"]
BIN = Path(sys.executable).parent
_REFERENCE: dict[str, Path] = {}


def launch_env(extra: dict | None = None) -> dict:
    """The test's environment minus any launcher variables, with the venv's tools first on PATH."""
    env = cli_env({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
                   "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def run(cmd: list[str], timeout: float = 240, check: bool = True, env: dict | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = run_process(cmd, timeout=timeout, env=env or launch_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def torchrun_sweep_dir() -> Path:
    """A torchrun multirun of two jobs: job 0 is THE reference run (TRAIN, uninterrupted),
    job 1 differs only in its learning rate. Run once per test session."""
    if "sweep" not in _REFERENCE:
        sweep = Path(tempfile.mkdtemp(prefix="disttrain-ref-")) / "sweep"
        run([str(ROOT / "launch" / "torchrun.sh"), "-m", *TRAIN, "optim.lr=0.05,0.02",
             f"hydra.sweep.dir={sweep}"], env=launch_env({"NPROC_PER_NODE": "2"}))
        _REFERENCE["sweep"] = sweep
    return _REFERENCE["sweep"]


def reference_weights() -> dict[str, torch.Tensor]:
    from disttrain.checkpoint.commit import load_model_state

    return load_model_state(torchrun_sweep_dir() / "0", step=MAX_STEPS)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from disttrain.checkpoint.commit import load_model_state

    return load_model_state(run_dir, step=MAX_STEPS)


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs: max |diff| {(got[name] - want[name]).abs().max()}"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll until ``predicate()`` is truthy; return its value or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logged_step(run_dir: Path) -> int:
    """The last step rank 0 logged (train.log lines 'step N ...')."""
    log = run_dir / "train.log"
    text = log.read_text() if log.exists() else ""
    return max((int(n) for n in re.findall(r"disttrain: step (\d+)/", text)), default=0)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for pid in children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
