#!/usr/bin/env bash
# A RabbitMQ broker on localhost for Zocalo (the pipeline's Zocalo service and its tests), and a zocalo configuration
# file that points at it. Idempotent: a broker already running here is kept, its exchanges and queues declared again.
#
#   scripts/rabbitmq/start.sh            # prints the path of the zocalo configuration file (export it as ZOCALO_CONFIG)
#   scripts/rabbitmq/stop.sh             # stops the broker and removes its state
#
# Installs Debian's rabbitmq-server if it is missing (needs root). The broker runs as the caller, by hand (no systemd),
# under RABBITMQ_NODENAME=rabbit@localhost, listening on 127.0.0.1 only, with its data, logs, pid file and Erlang cookie
# in one directory it owns. Settings (environment):
#   PIPELINE_RABBITMQ_DIR   state directory (default /tmp/pipeline-rabbitmq)
#   PIPELINE_RABBITMQ_PORT  AMQP port (default 5672; the Erlang distribution port is this + 20000)
#   PIPELINE_ZOCALO_RECIPES directory of zocalo recipes the Dispatcher loads (default: deploy/zocalo of this repository)
#   PYTHON                  a Python with pika (default: the repository's .venv, else python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${PIPELINE_RABBITMQ_DIR:-/tmp/pipeline-rabbitmq}"
port="${PIPELINE_RABBITMQ_PORT:-5672}"
recipes="${PIPELINE_ZOCALO_RECIPES:-$repo/deploy/zocalo}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
server=/usr/lib/rabbitmq/bin/rabbitmq-server
ctl=/usr/lib/rabbitmq/bin/rabbitmqctl

say() { echo "rabbitmq/start.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# -- install -----------------------------------------------------------------------------------
if [ ! -x "$server" ]; then
    [ "$(id -u)" = 0 ] || die "rabbitmq-server is not installed and this is not root: apt-get install rabbitmq-server"
    say "installing Debian's rabbitmq-server"
    # no init script may start a system-wide broker (it would take the port): policy-rc.d says no, for this install only
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >&2 || {
        [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install rabbitmq-server failed"; }
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    [ -x "$server" ] || die "rabbitmq-server installed, but $server is not there"
fi

# -- the broker's environment: everything under $state ----------------------------------------
mkdir -p "$state/mnesia" "$state/log"
chmod 700 "$state"
export HOME="$state"  # the Erlang cookie: the server and rabbitmqctl must share it
export RABBITMQ_NODENAME=rabbit@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$port"
export RABBITMQ_DIST_PORT=$((port + 20000))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"  # its distribution port: localhost only
export RABBITMQ_MNESIA_BASE="$state/mnesia"
export RABBITMQ_LOG_BASE="$state/log"
export RABBITMQ_PID_FILE="$state/rabbit.pid"
export RABBITMQ_ENABLED_PLUGINS_FILE="$state/enabled_plugins"
export RABBITMQ_CONF_ENV_FILE="$state/rabbitmq-env.conf"  # not /etc/rabbitmq's: this broker is the caller's own
export RABBITMQ_CONFIG_FILE="$state/rabbitmq"             # rabbitmq.conf (sysctl format), below
[ -e "$RABBITMQ_ENABLED_PLUGINS_FILE" ] || echo '[].' > "$RABBITMQ_ENABLED_PLUGINS_FILE"
: > "$RABBITMQ_CONF_ENV_FILE"
cat > "$state/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
loopback_users.guest = true
log.file.level = info
CONF

running() { "$ctl" -n rabbit@localhost -q ping >/dev/null 2>&1; }

# -- start, unless it runs already ---------------------------------------------------------------
if running; then
    say "a broker already answers as rabbit@localhost: kept"
else
    if command -v ss >/dev/null && ss -ltn "( sport = :$port )" | grep -q LISTEN; then
        die "port $port is taken by another process (a system rabbitmq-server?); stop it or set PIPELINE_RABBITMQ_PORT"
    fi
    say "starting rabbit@localhost on 127.0.0.1:$port (state in $state)"
    rm -f "$RABBITMQ_PID_FILE"
    setsid "$server" > "$state/log/server.out" 2>&1 < /dev/null &
    echo $! > "$state/server.pid"
    # `wait` returns once the node has booted (or says why not); the pid file appears as the node starts
    for _ in $(seq 1 100); do [ -s "$RABBITMQ_PID_FILE" ] && break; sleep 0.1; done
    if ! "$ctl" -n rabbit@localhost -q wait "$RABBITMQ_PID_FILE" --timeout 90 >&2; then
        tail -n 30 "$state/log/server.out" >&2 || true
        die "rabbit@localhost did not start within 90 s (logs in $state/log)"
    fi
    say "rabbit@localhost is ready"
fi

# -- what zocalo needs: the Dispatcher's exchanges and the queues of the recipe ----------------
"$python" - "$port" <<'PY' || die "could not declare the exchanges and queues (is pika installed in $python?)"
import sys

import pika

connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1]), "/",
                                                               pika.PlainCredentials("guest", "guest")))
channel = connection.channel()
for exchange in ("command", "transient.status"):  # workflows' frontends listen on `command` and report on `transient.status`
    channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
for queue in ("processing_recipe", "pipeline.follow", "pipeline.followed", "pipeline.refused"):
    channel.queue_declare(queue, durable=True)
connection.close()
PY

# -- the zocalo configuration file -----------------------------------------------------------------
config="$state/zocalo.yaml"
cat > "$config.part" <<YAML
# written by scripts/rabbitmq/start.sh: zocalo's configuration (ZOCALO_CONFIG) for the broker it started
version: 1
rabbitmq:
  plugin: pika
  host: 127.0.0.1
  port: $port
  username: guest
  password: guest
  vhost: /
transport:
  plugin: transport
  default: PikaTransport
storage:
  plugin: storage
  zocalo.recipe_directory: $recipes
environments:
  default:
    plugins:
      - rabbitmq
      - transport
      - storage
YAML
mv "$config.part" "$config"
echo "$config"
