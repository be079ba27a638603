#!/usr/bin/env bash
# bench/peer/run_gunicorn.sh [start|stop|restart|status]: the reference app under gunicorn
# (app/gunicorn.conf.py) on unix:$PEER_RUN/gunicorn.sock, daemonized, master pid in gunicorn.pid.
#   start    returns once /healthz answers and every worker has booted (a running one is kept)
#   stop     SIGTERM (graceful, graceful_timeout 30 s), SIGKILL after 35 s
#   status   master pid and RSS/PSS of master and workers; exit 1 if not running
# env: PEER_WORKERS (default 2 x cores + 1), PEER_TIMEOUT (worker timeout, 60),
#      PEER_ACCESSLOG (off), START_WAIT (seconds for /healthz, 30)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export PEER_RUN PEER_SOCK PEER_PIDFILE PEER_ERRORLOG="$PEER_RUN/gunicorn.log"
export PEER_WORKERS="${PEER_WORKERS:-$(( $(getconf _NPROCESSORS_ONLN) * 2 + 1 ))}"

start() {
  local m end
  if m=$(live_pid "$PEER_PIDFILE"); then
    log "gunicorn already running (master $m)"
    wait_unix 10 "$PEER_SOCK" /healthz || die "gunicorn $m does not answer on $PEER_SOCK"
    return 0
  fi
  [[ -x $PEER_VENV/bin/gunicorn ]] || die "no $PEER_VENV/bin/gunicorn: run bench/peer/setup.sh first"
  mkdir -p "$PEER_RUN"; rm -f "$PEER_SOCK" "$PEER_PIDFILE"
  "$PEER_VENV/bin/gunicorn" -c "$PEER_DIR/app/gunicorn.conf.py" --chdir "$PEER_DIR/app" --daemon app:app
  end=$((SECONDS + 15))
  until m=$(live_pid "$PEER_PIDFILE"); do
    ((SECONDS < end)) || die "gunicorn wrote no pidfile (see $PEER_ERRORLOG)"
    sleep 0.2
  done
  wait_unix "${START_WAIT:-30}" "$PEER_SOCK" /healthz || die "gunicorn does not answer (see $PEER_ERRORLOG)"
  # all workers booted, so that memory and the first measurements see the full set
  end=$((SECONDS + 20))
  while (( $(children "$m" | wc -l) < PEER_WORKERS && SECONDS < end )); do sleep 0.2; done
  log "gunicorn up: master $m, $(children "$m" | wc -l) workers, unix:$PEER_SOCK"
}

stop() {
  local m
  if ! m=$(live_pid "$PEER_PIDFILE"); then log "gunicorn not running"; rm -f "$PEER_SOCK"; return 0; fi
  kill -TERM "$m"
  if ! stop_wait "$m" 35; then log "gunicorn $m still there after 35 s: SIGKILL"; kill -KILL "$m" 2>/dev/null || true; fi
  rm -f "$PEER_SOCK"
  log "gunicorn $m stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status)
    if m=$(live_pid "$PEER_PIDFILE"); then echo "gunicorn master $m, unix:$PEER_SOCK"; rss_report "$m"
    else echo "gunicorn not running"; exit 1; fi ;;
  *) die "usage: $0 [start|stop|restart|status]" ;;
esac
