"""Run a function on N local processes wired like torchrun's workers (gloo over loopback).

Used by the test suite and the benchmarks; also handy for users who want to try a strategy
function on one machine without a launcher. Results and exceptions come back per rank.
No rank outlives the call: one rank dying kills the others at once instead of leaving them
hung in a collective; a rank still running ``finish_grace`` seconds after a peer returned is
reported as stuck (ranks of one job finish together); and every exit path, an exception
raised into the caller by pytest-timeout or Ctrl-C included, kills what is left.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from disttrain.distributed import forkserver


#: imported once, by the fork server, before it forks any rank (disttrain.distributed.forkserver):
#: a rank then starts in milliseconds instead of paying ~2.5 s of CPU for its own ``import torch``.
PRELOAD = ("torch.distributed.checkpoint", "torch.distributed.pipelining", "torch.distributed.fsdp",
           "torch.distributed.tensor.parallel", "hydra", "disttrain.engine.build")


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str,
           environ: dict[str, str]) -> None:
    # The fork server's environment is the one it started with: give the rank the caller's
    # current one, as a spawned interpreter would have had.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report every failure to the parent, which raises it
        result = ("error", traceback.format_exc())
    tmp = os.path.join(out_dir, f".rank{rank}.pkl")
    with open(tmp, "wb") as handle:
        pickle.dump(result, handle)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))  # never read half a result


def _result(out_dir: str, rank: int) -> tuple[str, Any] | None:
    path = Path(out_dir) / f"rank{rank}.pkl"
    return pickle.loads(path.read_bytes()) if path.exists() else None


def _failure(procs: list, out_dir: str) -> str | None:
    """Why the job failed, as soon as one rank has: it died without a result or raised."""
    for rank, proc in enumerate(procs):
        if proc.is_alive():
            continue
        result = _result(out_dir, rank)
        if result is None:
            return f"rank {rank} died (exit code {proc.exitcode}) without a result"
        if result[0] == "error":
            return f"rank {rank} failed:\n{result[1]}"
    return None


def _wait_all(procs: list, timeout: float, out_dir: str, finish_grace: float) -> None:
    deadline = time.monotonic() + timeout
    first_done: float | None = None
    while any(p.is_alive() for p in procs):
        failure = _failure(procs, out_dir)
        if failure:
            raise RuntimeError(failure)
        if first_done is None and any(not p.is_alive() for p in procs):
            first_done = time.monotonic()
        if first_done is not None and time.monotonic() - first_done > finish_grace:
            stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            raise TimeoutError(f"rank(s) {stuck} still running {finish_grace:.0f}s after a peer returned: "
                               "stuck in a collective or in teardown")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks still running after {timeout}s")
        time.sleep(0.05)


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=10)


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 120, finish_grace: float = 60) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes with torchrun-style
    variables set (so ``disttrain.distributed.env.detect()`` and ``disttrain.distributed.process_group.init`` work unchanged);
    return each rank's result, raising any rank's exception."""
    from disttrain.distributed.process_group import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = forkserver.context(*PRELOAD)
        environ = dict(os.environ)
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_dir, environ))
                 for r in range(world_size)]
        try:
            for proc in procs:
                proc.start()
            _wait_all(procs, timeout, out_dir, finish_grace)
        finally:
            _kill(procs)
        failure = _failure(procs, out_dir)
        if failure:
            raise RuntimeError(failure)
        return [_result(out_dir, rank)[1] for rank in range(world_size)]
