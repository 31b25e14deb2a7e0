"""Test helpers: the real CLI as a subprocess, and functions on N real gloo processes."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

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


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report every failure to the parent, which raises it
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump(result, handle)


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes with torchrun-style
    variables set (so ``disttrain.env.detect()`` and ``disttrain.dist.init`` work unchanged);
    return each rank's result, raising any rank's exception."""
    from disttrain.dist import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_dir)) for r in range(world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                raise TimeoutError(f"rank {procs.index(proc)} still running after {timeout}s")
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died (exit code {procs[rank].exitcode}) without a result")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
