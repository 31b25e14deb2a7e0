"""Dev runs of a job that outlives some of its ranks (the parameter server's workers).

torch's elastic agent (behind torchrun and ``disttrain.distributed.local``) treats any failed
rank as the job's failure: it stops every rank, then restarts the whole group or gives up.
That is right for synchronous training, where every rank holds part of each step, but an
asynchronous parameter-server job is complete without any one worker: the servers hold the
state and simply go on with the others. No launcher in torch or elsewhere offers "these ranks
may die", so this small supervisor does, for launcher-free dev runs: it starts one process per
rank with torchrun's variables, and when an expendable rank dies it says so and keeps waiting;
any other rank's failure stops the job (and restarts it up to ``dist.max_restarts`` times, with
the restart count a torchrun restart would give).
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from disttrain.distributed import forkserver
from disttrain.distributed.process_group import free_port

log = logging.getLogger("disttrain")


class RankFailed(RuntimeError):
    """A rank the job cannot do without exited with an error."""


def _child(entry: Callable[[DictConfig, Path], dict], container: dict, run_dir: str, env: dict[str, str],
           results) -> None:
    """One rank (module level: it must pickle)."""
    os.environ.update(env)
    result = entry(OmegaConf.create(container), Path(run_dir))
    if env["RANK"] == "0":
        results.put(result)


def _env(rank: int, nproc: int, port: int, attempt: int, run_id: str) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": str(attempt), "TORCHELASTIC_RUN_ID": run_id}


def launch_tolerant(cfg: DictConfig, run_dir: Path, entry: Callable[[DictConfig, Path], dict],
                    expendable: frozenset[int]) -> dict[str, Any]:
    """Run ``entry`` on ``dist.nproc_per_node`` local ranks; return rank 0's summary. The ranks
    in ``expendable`` may die without stopping the others."""
    nproc = int(cfg.dist.nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    container = OmegaConf.to_container(cfg, resolve=True)
    restarts = int(cfg.dist.get("max_restarts", 0))
    context = forkserver.context(entry.__module__)
    log.info("starting %d local ranks (dev run; ranks %s may fail without stopping the job); run dir %s",
             nproc, sorted(expendable), run_dir)
    for attempt in range(restarts + 1):
        results = context.SimpleQueue()
        port = free_port()
        procs = [context.Process(target=_child, name=f"rank{rank}",
                                 args=(entry, container, str(run_dir), _env(rank, nproc, port, attempt,
                                                                            f"dev-{run_dir.name}"), results))
                 for rank in range(nproc)]
        failed = _supervise(procs, expendable)
        if failed is None:
            return results.get() if not results.empty() else {}
        if attempt < restarts:
            log.warning("restarting the job (%d of %d restarts)", attempt + 1, restarts)
    raise RankFailed(f"rank {failed[0]} exited with code {failed[1]}; see its log in {run_dir}")


def _supervise(procs: list, expendable: frozenset[int]) -> tuple[int, int] | None:
    """Start ``procs``, wait for all; None if every essential rank succeeded, else (rank, code)
    of the first essential failure (the others are then stopped)."""
    forward = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def relay(signum, frame):  # noqa: ARG001 - a preemption signal is for the ranks
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    for sig in forward:
        signal.signal(sig, relay)
    try:
        for proc in procs:
            proc.start()
        alive = dict(enumerate(procs))
        while alive:
            multiprocessing.connection.wait([proc.sentinel for proc in alive.values()])
            for rank in [r for r, proc in alive.items() if not proc.is_alive()]:
                code = alive.pop(rank).exitcode
                if code == 0:
                    continue
                if rank not in expendable:
                    return rank, code
                log.warning("rank %d exited with code %s; the job goes on without it", rank, code)
        return None
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)
        _stop_all(procs)


def _stop_all(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
