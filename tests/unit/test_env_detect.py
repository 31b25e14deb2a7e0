"""env.detect() per launcher, from crafted environments."""
import pytest

from disttrain.distributed.env import LauncherEnvError, detect, first_slurm_host, slurm_port


def test_no_launcher_is_single():
    world = detect({})
    assert (world.launcher, world.rank, world.world_size) == ("single", 0, 1)


def test_torchrun():
    world = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                    "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29411",
                    "TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "2",
                    "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert world.launcher == "torchrun"
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size, world.node_rank) == (3, 1, 4, 2, 1)
    assert (world.master_addr, world.master_port, world.restart_count) == ("node0", 29411, 2)
    assert world.run_id == "abc" and world.agent_store


def test_torchrun_wins_inside_slurm():
    world = detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert world.launcher == "torchrun" and world.rank == 1


def test_slurm_task():
    world = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                    "SLURM_NNODES": "4", "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0",
                    "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_RESTART_COUNT": "1"})
    assert world.launcher == "slurm"
    assert (world.rank, world.world_size, world.local_rank, world.node_rank) == (5, 8, 1, 2)
    assert world.local_world_size == 2
    assert world.master_addr == "gpu07" and world.master_port == slurm_port("777")
    assert world.restart_count == 1 and world.run_id == "slurm-777"


def test_slurm_missing_ntasks_names_the_variable():
    with pytest.raises(LauncherEnvError, match="SLURM_NTASKS"):
        detect({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})


def test_open_mpi():
    world = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_NAMESPACE": "prterun-x@1"})
    assert world.launcher == "mpi"
    assert (world.rank, world.world_size, world.local_rank, world.node_rank) == (2, 4, 0, 1)
    assert world.master_addr is None  # bootstrapped through mpi4py at init
    assert world.run_id == "mpi-prterun-x@1"


def test_pmi():
    world = detect({"PMI_RANK": "1", "PMI_SIZE": "3"})
    assert (world.launcher, world.rank, world.world_size) == ("mpi", 1, 3)


def test_bad_integer_is_named():
    with pytest.raises(LauncherEnvError, match="WORLD_SIZE"):
        detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "two", "MASTER_PORT": "1"})


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("gpu[03-05,7]", "gpu03"), ("a[1,3],b2", "a1"),
                                            ("node-[010-012]", "node-010")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first
