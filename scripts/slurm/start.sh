#!/usr/bin/env bash
# A single-node SLURM on localhost for the tests of SLURM worker jobs (tests/test_slurm_workers.py) and for trying
# `workers.slurm` by hand: installs Debian's `slurm-wlm munge` if missing, writes a config for this one machine, starts
# munged, slurmctld and slurmd (no systemd needed), and waits until `sinfo` shows the node ready. Run as root.
#
# Two partitions: `pipeline` (default, PriorityTier 1) and `urgent` (PriorityTier 10); a job in `urgent` preempts
# jobs of `pipeline`, which are requeued (PreemptMode=REQUEUE). No accounting, no cgroups (proctrack/linuxproc).
# Everything lives under $PIPELINE_SLURM_DIR (default /tmp/pipeline-slurm); /etc/slurm/slurm.conf is a link to the
# config there (so plain `sbatch`, `squeue` find it), and a slurm.conf this script did not write is never replaced.
# Idempotent: with everything up it returns at once. scripts/slurm/stop.sh tears it down.
set -euo pipefail

STATE=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
NODE=localhost
CONF_LINK=/etc/slurm/slurm.conf
MARK="# written by the pipeline repository's scripts/slurm/start.sh"

say() { echo "slurm/start.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts munged, slurmctld, slurmd)"

node_ready() {
    local state
    state=$(timeout 5 sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -1) || return 1
    case "$state" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if command -v sinfo >/dev/null && running "$STATE/run/slurmctld.pid" && running "$STATE/run/slurmd.pid" && node_ready; then
    exit 0  # already up
fi

# -- packages ---------------------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    say "installing slurm-wlm munge (apt-get)"
    mkdir -p "$STATE"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$STATE/apt.log" 2>&1 \
        || die "apt-get install slurm-wlm munge failed (see $STATE/apt.log)"
fi

# -- munge --------------------------------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not answer (see /var/log/munge/munged.log)"
fi

# -- the config ----------------------------------------------------------------------------------------------------------
mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/run" "$STATE/log" /etc/slurm
CPUS=$(nproc)
cat >"$STATE/slurm.conf" <<EOF
$MARK
ClusterName=pipeline
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=pipeline Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10
EOF
if [ -e "$CONF_LINK" ] || [ -L "$CONF_LINK" ]; then
    if [ "$(readlink -f "$CONF_LINK")" != "$(readlink -f "$STATE/slurm.conf")" ] && ! head -1 "$CONF_LINK" 2>/dev/null | grep -qxF "$MARK"; then
        die "$CONF_LINK exists and was not written by this script: not replacing it (move it away, or use a machine without SLURM)"
    fi
fi
ln -sfn "$STATE/slurm.conf" "$CONF_LINK"
export SLURM_CONF="$STATE/slurm.conf"

# -- the daemons ---------------------------------------------------------------------------------------------------------
if ! running "$STATE/run/slurmctld.pid"; then
    slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start: $(tail -5 "$STATE/log/slurmctld.log" 2>/dev/null)"
fi
if ! running "$STATE/run/slurmd.pid"; then
    slurmd -N "$NODE" -f "$SLURM_CONF" || die "slurmd did not start: $(tail -5 "$STATE/log/slurmd.log" 2>/dev/null)"
fi
for _ in $(seq 300); do
    node_ready && break
    sleep 0.1
done
if ! node_ready; then
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true  # a node left down by an earlier run
    sleep 1
fi
node_ready || die "node $NODE not ready: $(sinfo --noheader --nodes="$NODE" 2>&1 | head -1); logs: $(tail -3 "$STATE/log/slurmctld.log" 2>/dev/null) $(tail -3 "$STATE/log/slurmd.log" 2>/dev/null)"
say "up: $(sinfo --noheader --format='%P %a %D %T %C' | tr '\n' ';')"
