#!/bin/bash
# start/stop the daemon under test: daemon.sh start WATCHDIR LOG [extra yaml line]; daemon.sh stop
D=/tmp/audit-broken
case $1 in
start)
  cat > $D/dcfg.yaml <<EOC
models: {tlm: {enabled: false}, sslm: {enabled: false}}
workers: {local: 1}
follow: {idle_timeout_s: 5.0, end_grace_s: 2.0, settle_s: 0.3, link_timeout_s: 3.0, open_timeout_s: 5.0}
daemon: {control: "ipc://$D/control", max_active_scans: ${MAX_ACTIVE:-4}}
watch: {rescan_interval_s: 2.0}
EOC
  mkdir -p $2
  timeout ${DAEMON_TIMEOUT:-300} /work/main/.venv/bin/pipeline run --config $D/dcfg.yaml --watch $2 --workers 1 > $3 2>&1 &
  echo $! > $D/daemon.pid ;;
stop)
  kill -TERM $(cat $D/daemon.pid) 2>/dev/null; for i in $(seq 40); do kill -0 $(cat $D/daemon.pid) 2>/dev/null || break; sleep 0.5; done ;;
esac
