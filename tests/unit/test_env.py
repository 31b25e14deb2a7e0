"""env.detect() for launcher environments seen on a real Slurm 22.05 and Open MPI 5 (issue 6):
the batch script body, srun tasks, mpirun inside a Slurm job, srun --mpi=pmi2."""
from disttrain.distributed.env import detect, slurm_port

# What a 2-task sbatch job printed (tests/launch/slurm_cluster.sh), trimmed to what matters.
BATCH_BODY = {"SLURM_JOB_ID": "41", "SLURM_JOBID": "41", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_NNODES": "1",
              "SLURM_JOB_NODELIST": "vm", "SLURM_TASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}
SRUN_TASK_1 = {**BATCH_BODY, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
               "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "vm"}


def test_sbatch_body_is_one_process_that_keeps_the_job_id():
    world = detect({**BATCH_BODY, "SLURM_RESTART_COUNT": "2"})
    assert (world.launcher, world.rank, world.world_size) == ("single", 0, 1)
    assert world.run_id == "slurm-41" and world.restart_count == 2


def test_srun_task_of_a_batch_job():
    world = detect(SRUN_TASK_1)
    assert (world.launcher, world.rank, world.local_rank, world.world_size) == ("slurm", 1, 1, 2)
    assert (world.master_addr, world.master_port) == ("vm", slurm_port("41"))


def test_step_with_fewer_tasks_than_the_job():
    world = detect({**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"})
    assert world.world_size == 1


def test_mpirun_inside_a_slurm_job_uses_the_mpi_ranks():
    # Multi-node: Open MPI starts its daemons with srun, whose variables the ranks inherit.
    world = detect({**SRUN_TASK_1, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "3",
                    "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (world.launcher, world.rank, world.world_size, world.local_rank) == ("mpi", 3, 4, 1)


def test_srun_pmi2_task_is_a_slurm_task():
    world = detect({**SRUN_TASK_1, "PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (world.launcher, world.rank, world.world_size) == ("slurm", 1, 2)


def test_torchrun_inside_an_sbatch_body():
    world = detect({**BATCH_BODY, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "4000",
                    "TORCHELASTIC_RUN_ID": "abc"})
    assert (world.launcher, world.rank, world.run_id) == ("torchrun", 1, "abc")
