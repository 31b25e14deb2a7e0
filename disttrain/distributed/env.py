"""Where am I? Rank and world size read from whatever launched this process.

Detection order matters: torchrun first (it can run inside a Slurm allocation or an
MPI job and then its variables are the truth for this process), then Open MPI's mpirun
(which can run inside a Slurm job), then a Slurm task, then other MPIs (PMI), then the body
of a Slurm batch script (one process that keeps the job's id), then a plain single process.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Mapping

from disttrain.distributed.errors import LauncherEnvError
from disttrain.distributed.hostlist import first_host

# LauncherEnvError lives in errors.py (hostlist raises it too) and is re-exported here.

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single"
    restart_count: int = 0
    run_id: str | None = None
    #: torchrun's agent already serves a TCP store on master_addr:master_port.
    agent_store: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LauncherEnvError(
            f"{launcher} launch detected but ${name} is not set; "
            f"launch through {launcher} itself or export {name}."
        )
    try:
        return int(value)
    except ValueError:
        raise LauncherEnvError(f"${name}={value!r} is not an integer ({launcher} launch).") from None


def _torchrun(environ: Mapping[str, str]) -> World:
    name = "torchrun"
    return World(
        rank=_int(environ, "RANK", name),
        local_rank=_int(environ, "LOCAL_RANK", name),
        world_size=_int(environ, "WORLD_SIZE", name),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
        node_rank=int(environ.get("GROUP_RANK", environ.get("NODE_RANK", "0"))),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", name),
        launcher=name,
        restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        run_id=environ.get("TORCHELASTIC_RUN_ID"),
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
    )


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``rack[1-2]-gpu[03-05,7],cpu1`` -> ``rack1-gpu03``.

    Parsed here (not with ``scontrol show hostnames``) because compute nodes do not
    always have the Slurm client tools on PATH inside containers.
    """

    return first_host(nodelist)


#: Slurm master ports lie below Linux's default ephemeral range (32768-60999), where every
#: ``bind(port 0)`` and outgoing connection on the node takes its ports: a derived port inside
#: it can be held by another job's gloo listener, and rank 1's store client then connects to
#: that listener and waits forever (seen once in CI: a submitit trial that never ended).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000


def slurm_port(job_id: str) -> int:
    """A port derived from the job id, so every task agrees without talking first."""
    return SLURM_PORT_BASE + zlib.crc32(job_id.encode()) % SLURM_PORT_SPAN


def _slurm(environ: Mapping[str, str]) -> World:
    name = "slurm"
    job_id = environ.get("SLURM_JOB_ID", "0")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    # The step's task count: a step may use fewer tasks than the job (srun -n1 in a 4-task job).
    step_tasks = environ.get("SLURM_STEP_NUM_TASKS")
    world_size = int(step_tasks) if step_tasks else _int(environ, "SLURM_NTASKS", name)
    return World(
        rank=_int(environ, "SLURM_PROCID", name),
        local_rank=int(environ.get("SLURM_LOCALID", "0")),
        world_size=world_size,
        local_world_size=int(environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0)
        or world_size // max(1, int(environ.get("SLURM_NNODES", "1"))),
        node_rank=int(environ.get("SLURM_NODEID", "0")),
        master_addr=environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
        master_port=int(environ.get("MASTER_PORT") or slurm_port(job_id)),
        launcher=name,
        restart_count=int(environ.get("SLURM_RESTART_COUNT", "0")),
        run_id=f"slurm-{job_id}",
    )


def _slurm_batch(environ: Mapping[str, str]) -> World:
    """A process started by the batch script itself (no srun): one process, a dev run that may
    start local workers, but it keeps the job's identity so that a requeued job (same id,
    SLURM_RESTART_COUNT + 1) finds its run dir and resumes."""
    return World(run_id=f"slurm-{environ['SLURM_JOB_ID']}",
                 restart_count=int(environ.get("SLURM_RESTART_COUNT", "0")))


def _mpi(environ: Mapping[str, str]) -> World:
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank_var, size_var = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
        local_var, local_size_var = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"
        node_rank = int(environ.get("OMPI_COMM_WORLD_NODE_RANK", "0"))
    else:  # MPICH / Intel MPI / any PMI process manager
        rank_var, size_var = "PMI_RANK", "PMI_SIZE"
        local_var, local_size_var = "MPI_LOCALRANKID", "MPI_LOCALNRANKS"
        node_rank = 0
    world_size = _int(environ, size_var, "mpi")
    run_id = environ.get("PMIX_NAMESPACE") or environ.get("OMPI_MCA_orte_ess_jobid")
    port = environ.get("MASTER_PORT")
    return World(
        rank=_int(environ, rank_var, "mpi"),
        local_rank=int(environ.get(local_var, "0")),
        world_size=world_size,
        local_world_size=int(environ.get(local_size_var, str(world_size))),
        node_rank=node_rank,
        # No address given: dist.py bootstraps one through mpi4py (rank 0 broadcasts).
        master_addr=environ.get("MASTER_ADDR"),
        master_port=int(port) if port else None,
        launcher="mpi",
        run_id=f"mpi-{run_id}" if run_id else None,
    )


def detect(environ: Mapping[str, str] | None = None) -> World:
    """Read the launcher's variables; pure apart from reading ``os.environ`` by default."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "LOCAL_RANK" in environ):
        return _torchrun(environ)
    # A Slurm allocation alone (the body of an sbatch script, salloc) is not a task: only a
    # task of an srun step (SLURM_STEP_ID) is one rank of the job. Checked on a real Slurm
    # 22.05: the batch script sees SLURM_PROCID=0 and SLURM_NTASKS (of the job) but no
    # SLURM_STEP_ID; srun tasks see both plus SLURM_STEP_NUM_TASKS.
    # Open MPI's mpirun inside a Slurm job starts its daemons with srun, so its ranks also
    # carry the daemons' SLURM_PROCID/SLURM_STEP_ID: OMPI_COMM_WORLD_RANK (set only by mpirun
    # before the program starts) is the truth then. PMI_RANK is also set for srun --mpi=pmi2
    # tasks, where Slurm's own variables agree and need no mpi4py: it goes after Slurm.
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _mpi(environ)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _slurm(environ)
    if "PMI_RANK" in environ:
        return _mpi(environ)
    if "SLURM_JOB_ID" in environ:
        return _slurm_batch(environ)
    return World()
