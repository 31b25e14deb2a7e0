#!/usr/bin/env bash
# A real one-node Slurm cluster for the tests: slurmctld + slurmd with a generated
# slurm.conf in a temp dir, no munge (auth/none), stopped by PID.
#
#   tests/launch/slurm_cluster.sh install        # apt-get install the daemons if missing (root)
#   tests/launch/slurm_cluster.sh start DIR      # write DIR/slurm.conf, start both daemons
#   tests/launch/slurm_cluster.sh stop DIR       # kill the daemons whose pids are in DIR
#
# Clients then need SLURM_CONF=DIR/slurm.conf. Exit code 3 from `install` means "Slurm cannot
# be installed here" (no apt, not root): the tests skip with that reason.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client)

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "slurm_cluster: no apt-get on this machine; install slurmctld, slurmd, slurm-client yourself" >&2
        exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "slurm_cluster: installing Slurm needs root (apt-get install ${PACKAGES[*]})" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The packages' own services are not wanted: the tests start the daemons themselves.
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null || {
            echo "slurm_cluster: apt-get install ${PACKAGES[*]} failed" >&2; exit 3; }
    }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 host cpus mem
    host=$(hostname -s)
    # --all: plain nproc obeys OMP_NUM_THREADS. At least 2 CPUs so a 2-task job fits even on a
    # 1-core machine (config_overrides lets slurmd accept more CPUs than it counts).
    cpus=$(nproc --all)
    [ "$cpus" -ge 2 ] || cpus=2
    # RealMemory must not exceed what slurmd sees, or the node is drained.
    mem=$(awk '/MemTotal/ {print int($2/1024/2)}' /proc/meminfo)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat > "$dir/slurm.conf" <<EOF
ClusterName=disttrain-test
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
# Requeued jobs may start again at once (the default holds them for ~2 minutes).
AuthInfo=cred_expire=5
KillWait=10
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start() {
    local dir=$1
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -c -f "$SLURM_CONF"     # -c: clean start, no state from an earlier cluster
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm_cluster: node did not become idle; logs in $dir/log" >&2
    sinfo -N -l >&2 || true
    exit 1
}

stop() {
    local dir=$1 pid
    # Cancel what still runs first: slurmstepd (one per job step) outlives its slurmd, and a
    # step left behind keeps its processes alive after the test.
    if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then
        SLURM_CONF=$dir/slurm.conf scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 40); do
            [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    for name in slurmd slurmctld; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    # Steps orphaned anyway (their slurmd is gone now): reparented to init, nobody else's.
    for pid in $(pgrep -f '^slurmstepd: \[' || true); do
        [ "$(ps -o ppid= -p "$pid" | tr -d ' ')" = "1" ] && kill -9 "$pid" 2>/dev/null || true
    done
}

case "${1:-}" in
    install) install ;;
    start) install; start "${2:?usage: start DIR}" ;;
    stop) stop "${2:?usage: stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
