"""Run a function on N local processes wired like torchrun's workers (gloo over loopback).

Used by the test suite and the benchmarks; also handy for users who want to try a strategy
function on one machine without a launcher. Results and exceptions come back per rank, and
one rank dying kills the others at once instead of leaving them hung in a collective.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


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


def _wait_all(procs: list, timeout: float, out_dir: str) -> None:
    """Wait for every rank; as soon as one dies without a result, kill the rest (they would
    otherwise hang in a collective until the timeout) and say which one."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        for rank, proc in enumerate(procs):
            if proc.is_alive():
                continue
            path = Path(out_dir) / f"rank{rank}.pkl"
            failure = None
            if not path.exists():
                failure = f"rank {rank} died (exit code {proc.exitcode}) without a result"
            elif pickle.loads(path.read_bytes())[0] == "error":
                failure = f"rank {rank} failed:\n{pickle.loads(path.read_bytes())[1]}"
            if failure:
                for other in procs:
                    other.kill()
                raise RuntimeError(failure)
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise TimeoutError(f"ranks still running after {timeout}s")
        time.sleep(0.05)


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
        _wait_all(procs, timeout, out_dir)
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
