#!/usr/bin/env bash
# Stops the broker scripts/rabbitmq/start.sh started and removes its state directory (data, logs, zocalo.yaml).
# Idempotent: nothing running is not an error.
set -uo pipefail

state="${PIPELINE_RABBITMQ_DIR:-/tmp/pipeline-rabbitmq}"
ctl=/usr/lib/rabbitmq/bin/rabbitmqctl

if [ -d "$state" ]; then
    export HOME="$state" RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_CONF_ENV_FILE="$state/rabbitmq-env.conf"
    if [ -x "$ctl" ] && "$ctl" -n rabbit@localhost -q ping >/dev/null 2>&1; then
        "$ctl" -n rabbit@localhost -q stop "$state/rabbit.pid" >&2 || true  # returns once the node's process has ended
    fi
    if [ -s "$state/server.pid" ]; then  # the start script's shell around the node, if it is still there
        pid="$(cat "$state/server.pid")"
        kill "$pid" 2>/dev/null && sleep 1
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$state"
fi
# Erlang's port mapper, started with the node: ended once no node is registered with it any more
epmd=$(ls /usr/lib/erlang/erts-*/bin/epmd 2>/dev/null | head -n 1)
if [ -n "$epmd" ] && ! "$epmd" -names 2>/dev/null | grep -q "^name "; then
    "$epmd" -kill >/dev/null 2>&1 || true
fi
echo "rabbitmq/stop.sh: rabbit@localhost stopped" >&2
