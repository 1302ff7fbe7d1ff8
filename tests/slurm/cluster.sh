#!/usr/bin/env bash
# A private one-host SLURM cluster for the tier (tests/slurm/conftest.py drives it).
#   cluster.sh install     install slurm-wlm and munge from Debian's packages when missing (root)
#   cluster.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd in the
#                          foreground under nohup, their pids in DIR/*.pid.mine; wait until idle
# Ports come from SLURMCTLD_PORT and SLURMD_PORT (the conftest picks free ones). Stop the cluster
# by the recorded pids, never by name. Exits non-zero with one line saying why it cannot start.
set -euo pipefail

need() { command -v "$1" > /dev/null 2>&1; }
have_all() { need slurmctld && need slurmd && need srun && need munged && need munge; }

case "${1:-}" in
install)
    have_all && exit 0
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-wlm/munge are not installed and this is not root: cannot apt-get install them" >&2
        exit 3
    fi
    if ! need apt-get; then
        echo "slurm-wlm/munge are not installed and there is no apt-get here" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge > /dev/null 2>&1 || {
        apt-get update -q > /dev/null 2>&1 &&
        apt-get install -y -q --no-install-recommends slurm-wlm munge > /dev/null 2>&1
    } || { echo "apt-get install slurm-wlm munge failed" >&2; exit 3; }
    have_all || { echo "slurm-wlm installed but its commands are missing" >&2; exit 3; }
    ;;
start)
    d="$2"
    [ "$(id -u)" = 0 ] || { echo "the cluster's daemons need root (SlurmUser=root)" >&2; exit 3; }
    have_all || { echo "slurm-wlm/munge are not installed (cluster.sh install)" >&2; exit 3; }
    mkdir -p "$d/state" "$d/spool" "$d/munge"
    chmod 700 "$d/munge"
    # A key of our own: the tier never depends on (or touches) /etc/munge/munge.key.
    head -c 1024 /dev/urandom > "$d/munge/munge.key"
    chmod 600 "$d/munge/munge.key"
    host="$(hostname)"
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
    cat > "$d/slurm.conf" <<CONF
ClusterName=oomtier
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.socket.2
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/slurmctld.log
SlurmdLogFile=$d/slurmd.log
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
# No cgroup plugin (hybrid v1/v2 hosts, containers): the step's processes are found by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# Short kill grace and quick cleanup: the tier must stay short.
KillWait=5
MinJobAge=30
# 4 CPUs whatever the host has (config_overrides): tests ask for 2 tasks, a batch job 2 more.
SlurmdParameters=config_overrides
NodeName=$host CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=${mem:-4000} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF="$d/slurm.conf"
    nohup munged --foreground --force --socket="$d/munge/munge.socket.2" \
        --key-file="$d/munge/munge.key" --pid-file="$d/munge/munged.pid" \
        --log-file="$d/munge/munged.log" --seed-file="$d/munge/munged.seed" \
        > "$d/munged.out" 2>&1 < /dev/null &
    echo $! > "$d/munged.pid.mine"
    for _ in $(seq 50); do [ -S "$d/munge/munge.socket.2" ] && break; sleep 0.1; done
    munge -S "$d/munge/munge.socket.2" -n | unmunge -S "$d/munge/munge.socket.2" > /dev/null || {
        echo "munged did not start: $(tail -3 "$d/munged.out" "$d/munge/munged.log" 2>/dev/null)" >&2
        exit 4
    }
    nohup slurmctld -D -i > "$d/slurmctld.out" 2>&1 < /dev/null &
    echo $! > "$d/slurmctld.pid.mine"
    for _ in $(seq 100); do scontrol ping > /dev/null 2>&1 && break; sleep 0.2; done
    nohup slurmd -D > "$d/slurmd.out" 2>&1 < /dev/null &
    echo $! > "$d/slurmd.pid.mine"
    for _ in $(seq 150); do
        state="$(sinfo -h -o %t 2>/dev/null || true)"
        [ "$state" = idle ] && exit 0
        sleep 0.2
    done
    echo "the node did not become idle within 30 s (state: ${state:-none}); see $d/slurmd.log" >&2
    exit 4
    ;;
*)
    echo "usage: cluster.sh install | start DIR" >&2
    exit 2
    ;;
esac
