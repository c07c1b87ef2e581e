#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py (CI runs it as root).
#
#   bash .ci/slurm-setup.sh start    # install slurm-wlm + munge (apt) if missing, write the config, start daemons
#   bash .ci/slurm-setup.sh stop     # stop the daemons this script started
#   bash .ci/slurm-setup.sh status   # sinfo + the GPU GRES of the node
#
# The node is this host (`hostname -s`), with one GPU declared as a generic resource (GRES) backed
# by a fake device file, in partitions `cpu` (default) and `gpu`, the names that
# workflow/profiles/slurm uses. No systemd, no cgroups (containers), no slurmdbd: every finished
# job is written to the job-completion log /var/log/slurm/jobcomp.log, finished jobs stay in
# `scontrol show job` for MinJobAge=600 s (TresPerJob shows each job's GPU request), and a node
# prolog writes the GPU the scheduler allocated to each job (SLURM_JOB_GPUS) to
# /var/log/slurm/prolog.log. tests/test_slurm.py reads these to prove the GPU requests.
# The node is declared larger than the container (CPUs/RealMemory, SlurmdParameters=config_overrides)
# so that the site-sized requests of workflow/profiles/slurm are schedulable; nothing is enforced.
set -euo pipefail

SLURM_ETC=/etc/slurm
RUN_DIR=/run/slurm-ci
LOG_DIR=/var/log/slurm
FAKE_GPU=/dev/fake_gpu0
NODE_CPUS=${SLURM_CI_CPUS:-16}
NODE_MEM_MB=${SLURM_CI_MEM_MB:-64000}

log() { echo "slurm-setup: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "slurm-wlm/munge are missing and installing them needs root"; exit 1
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$SLURM_ETC" "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    # The GPU: a character device (a copy of /dev/null) stands in for /dev/nvidia0; slurmd then
    # hands it out as a GPU (SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES). Where mknod is not allowed,
    # the GPU is a count-only GRES (still requested and scheduled, without a device index).
    local gres_line="NodeName=$host Name=gpu File=$FAKE_GPU"
    if [ ! -c "$FAKE_GPU" ]; then
        rm -f "$FAKE_GPU"
        mknod -m 0666 "$FAKE_GPU" c 1 3 2>/dev/null || gres_line="NodeName=$host Name=gpu Count=1"
    fi
    cat >"$SLURM_ETC/slurm.conf" <<EOF
# Written by .ci/slurm-setup.sh: a one-node test cluster, not for production.
ClusterName=peftbench-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# containers: no cgroups, no task affinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# the node may be declared bigger than the container (see the header of .ci/slurm-setup.sh)
SlurmdParameters=config_overrides
ReturnToService=2
# no slurmdbd: status through squeue (jobs stay visible MinJobAge seconds after they end),
# and a job-completion log with every job's TRES
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=600
# a root prolog on the node logs which GPU the scheduler handed each job (SLURM_JOB_GPUS)
Prolog=$SLURM_ETC/prolog-ci.sh
PrologFlags=Alloc
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
    cat >"$SLURM_ETC/prolog-ci.sh" <<'PROLOG'
#!/bin/sh
echo "JobId=$SLURM_JOB_ID JobGpus=${SLURM_JOB_GPUS:-none}" >>/var/log/slurm/prolog.log
exit 0
PROLOG
    chmod 0755 "$SLURM_ETC/prolog-ci.sh"
    echo "$gres_line" >"$SLURM_ETC/gres.conf"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"; exit 1
}

running() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

start() {
    install_packages
    write_config
    start_munge
    running slurmctld || slurmctld
    running slurmd || slurmd
    local host
    host=$(hostname -s)
    for _ in $(seq 60); do
        if ! running slurmctld || ! running slurmd; then
            sleep 1
            running slurmctld && running slurmd && continue
            log "a daemon exited:"; tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
            exit 1
        fi
        if timeout 5 sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
            log "cluster up: $(timeout 5 sinfo -h -o '%P %a %D %t %G' | tr '\n' ';')"
            return
        fi
        # a node left DOWN by an earlier run comes back here
        timeout 5 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    log "node did not become idle:"; sinfo -N -l >&2 || true
    tail -n 30 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

stop() {
    local name
    for name in slurmd slurmctld; do
        if [ -f "$RUN_DIR/$name.pid" ]; then
            kill "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null || true
        fi
    done
    for name in slurmd slurmctld; do
        for _ in $(seq 50); do
            [ -f "$RUN_DIR/$name.pid" ] && kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$RUN_DIR/$name.pid"
    done
    if [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    log "stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N -o '%N %P %t %c %m %G' ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
