"""Process-group set-up and teardown: backend choice, device, and a rendezvous that
survives elastic restarts and repeated initialisation in one process (Hydra multirun)."""
from __future__ import annotations

import atexit
import dataclasses
import gc
import datetime
import itertools
import logging
import os
import socket
import threading

import torch
import torch.distributed as dist

from disttrain.distributed import comm
from disttrain.distributed.env import LauncherEnvError, World

log = logging.getLogger(__name__)
_INIT_COUNTER = itertools.count()


def resolve_backend(backend: str) -> str:
    """``auto`` means NCCL when CUDA is usable, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("dist.backend=nccl needs CUDA GPUs; none is visible. Use dist.backend=gloo or auto.")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"dist.backend={backend!r} is not one of auto, gloo, nccl.")
    return backend


def device_for(world: World, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mpi_bootstrap(world: World) -> World:
    """Without MASTER_ADDR, rank 0 of the MPI job picks its address and a free port and
    broadcasts them through mpi4py; MPI only bootstraps, gloo/NCCL carry the tensors."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LauncherEnvError(
            "mpirun launch without MASTER_ADDR needs mpi4py: pip install -e '.[mpi]' "
            "(or export MASTER_ADDR and MASTER_PORT)."
        ) from exc
    comm = MPI.COMM_WORLD
    addr = port = None
    if comm.Get_rank() == 0:
        addr = world.master_addr or socket.gethostbyname(socket.gethostname())
        port = world.master_port or free_port()
    addr, port = comm.bcast((addr, port), root=0)
    return dataclasses.replace(world, master_addr=addr, master_port=port)


#: One TCP store per (address, port, rank) for the life of the process. A Hydra multirun runs
#: job after job in one process on the same master port (Slurm derives it from the job id):
#: re-creating the store per job raced, as rank 1 of the next job could connect to rank 0's old
#: store just before rank 0 freed it (a hang), or rank 0 could not bind while the old one lived
#: (EADDRINUSE). Reused, like torchrun's agent store, with a fresh key prefix per init.
_STORES: dict[tuple, dist.Store] = {}
#: How long past the store's own timeout a client waits for an answer before giving up.
STORE_GRACE_S = 10.0


def _store(world: World, timeout: datetime.timedelta) -> dist.Store:
    if world.launcher == "single":
        return dist.HashStore()
    if world.master_addr is None or world.master_port is None:
        if world.launcher != "mpi":
            raise LauncherEnvError(f"{world.launcher} launch without MASTER_ADDR/MASTER_PORT.")
        world = _mpi_bootstrap(world)
    is_master = world.rank == 0 and not world.agent_store
    key = (world.master_addr, world.master_port, world.rank, world.world_size, is_master)
    if key not in _STORES:
        _STORES[key] = _connect_store(world, is_master, timeout)
    _STORES[key].set_timeout(timeout)
    return _STORES[key]


def _connect_store(world: World, is_master: bool, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store, failing clearly instead of hanging. The master's port may be taken
    (EADDRINUSE: name the port and the fix). A client whose port is held by some other
    program's listener connects to it and waits for a reply forever, ignoring the store's
    own timeout (checked: torch 2.13, a socket that accepts and never answers). Python cannot
    interrupt that C++ wait, so the client connects in a daemon thread and the caller stops
    waiting after the timeout: an exception, so launchers that wait for a result (submitit)
    see the rank fail instead of waiting for it forever."""
    where = f"{world.master_addr}:{world.master_port}"
    fix = ("another program uses that port on the master host; export MASTER_PORT=<a free port> "
           f"for every rank ({world.launcher} launch)")
    if is_master:
        try:
            return dist.TCPStore(world.master_addr, world.master_port, world.world_size, True,
                                 timeout=timeout, wait_for_workers=False)
        except dist.DistNetworkError as exc:
            if "EADDRINUSE" not in str(exc):
                raise
            raise LauncherEnvError(f"rank 0 cannot open the rendezvous store on {where}: {fix}.") from exc
    outcome: list = []

    def connect() -> None:
        try:
            outcome.append(dist.TCPStore(world.master_addr, world.master_port, world.world_size, False,
                                         timeout=timeout, wait_for_workers=False))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=connect, name="disttrain-store-connect", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds() + STORE_GRACE_S)
    if not outcome:
        raise LauncherEnvError(f"rank {world.rank}: no answer from the rendezvous store at {where} within "
                               f"dist.timeout_s={timeout.total_seconds():.0f} s: {fix}.")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def init(world: World, backend: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Create the default process group and return this rank's device.

    Every init uses a fresh key prefix (restart count + a per-process counter): after an
    elastic restart, or a second init in one process, the store still holds the previous
    round's addresses and gloo would try to connect to dead peers.
    """
    backend = resolve_backend(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    # A previous job in this process (Hydra multirun) retired its groups at teardown; free them
    # now, long after their threads went idle (the TCP store itself is kept: see _STORES).
    _release_retired()
    store = _store(world, timeout)
    prefix = f"disttrain/attempt{world.restart_count}/init{next(_INIT_COUNTER)}"
    device = device_for(world, backend)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, store=dist.PrefixStore(prefix, store), rank=world.rank,
        world_size=world.world_size, timeout=timeout, **kwargs,
    )
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    comm.install(device)  # the one owner of disttrain's own collectives (devices, host group)
    log.debug("process group up: rank %d/%d backend %s", world.rank, world.world_size, backend)
    return device


#: Process groups already destroyed, kept referenced until the next init or exit (see teardown).
_RETIRED: list = []


@atexit.register
def _release_retired() -> None:
    """Free the retired groups while the interpreter is still whole (atexit runs first in
    shutdown); left to finalization, a group's worker threads can outlive it (abort). The
    collection frees groups (and their stores' ports) held in reference cycles too."""
    if _RETIRED:
        _RETIRED.clear()
        gc.collect()


def teardown(clean: bool = True) -> None:
    """Destroy the process group (after a clean finish, meet every rank at a barrier first).

    The cause of a teardown deadlock this avoids (seen in 1 of 6 two-rank DDP runs; py-spy:
    the main thread in ``std::thread::join`` inside ``~ProcessGroupGloo``, a gloo thread in
    ``gil_scoped_acquire`` inside ``~AsyncAllreduceWork``): torch stashes a Python object (a
    ``contextvars.Context``) in the thread-local state of every backward, and each collective
    launched during backward (DDP's bucket all-reduces) captures that state. The gloo worker
    thread drops the finished work a moment after completing it, and that decref needs the
    GIL. The ProcessGroupGloo destructor joins its worker threads while holding the GIL; when
    the last reference to the group goes right after the last backward (DDP's Reducer, freed
    as the training function returns), both wait for each other forever and the peer that
    already left never comes back.

    So: (1) the barrier waits with the GIL released, after every rank's last collective,
    giving the worker threads the GIL to drop their finished work; (2) the destroyed groups
    stay referenced here, so no later dealloc on the training path (Reducer, strategy) runs
    the destructor; it runs at the next ``init`` in this process (a multirun's next job) or in
    an atexit hook, long after the threads went idle.
    After a failure the barrier is skipped (a dead peer would hold it for the whole timeout).
    """
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    comm.uninstall()
    _RETIRED.extend(dist.distributed_c10d._world.pg_map.keys())
    dist.destroy_process_group()
