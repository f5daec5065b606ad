#!/usr/bin/env bash
# Tears down what scripts/slurm/start.sh started: cancels every job, stops slurmd, slurmctld and munged, and removes
# the state directory and the /etc/slurm/slurm.conf link it made. Run as root; does nothing harmful when nothing runs.
set -uo pipefail

STATE=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
CONF_LINK=/etc/slurm/slurm.conf

say() { echo "slurm/stop.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }

if [ -f "$STATE/slurm.conf" ] && command -v squeue >/dev/null; then
    export SLURM_CONF="$STATE/slurm.conf"
    jobs=$(timeout 10 squeue --noheader --format=%i 2>/dev/null)
    if [ -n "$jobs" ]; then
        timeout 10 scancel $jobs >/dev/null 2>&1
        for _ in $(seq 150); do [ -z "$(timeout 5 squeue --noheader --format=%i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
fi

stop_pid_file() {  # TERM, up to 5 s, then KILL: only the process the pid file names
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
}

stop_pid_file "$STATE/run/slurmd.pid"
stop_pid_file "$STATE/run/slurmctld.pid"
stop_pid_file /run/munge/munged.pid

if [ -L "$CONF_LINK" ] && [ "$(readlink "$CONF_LINK")" = "$STATE/slurm.conf" ]; then
    rm -f "$CONF_LINK"
fi
case "$STATE" in
    /|"") say "refusing to remove $STATE" ;;
    *) rm -rf "$STATE" ;;
esac
say "stopped"
