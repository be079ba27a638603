#!/usr/bin/env bash
# bench/axum/run.sh start|stop|restart|status: the single-process axum + sqlx peer (bench/axum/README.md).
#   start    build (cargo --release --locked, CARGO_TARGET_DIR=<repo>/target/bench-axum), start it
#            daemonized (nohup) and return once GET /healthz on its socket answers 200 (30 s at most);
#            a running one is kept
#   stop     SIGTERM (graceful), SIGKILL if it is still there after 35 s
#   status   pid, threads and RSS; exit 1 if not running
# env: AXUM_RUN (runtime directory, default /tmp/notesd-axum: axum.sock, axum.pid, axum.log),
#      AXUM_PEER_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/notesd_bench: notesd's bench
#        database, table created by `notesd migrate`), AXUM_PEER_MAX_CONNECTIONS (pool size, 16),
#      AXUM_PEER_TEST_BEFORE_ACQUIRE (1 = sqlx's default ping per pool checkout, 0 = off),
#      START_WAIT (seconds for /healthz, 30)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RUN="${AXUM_RUN:-/tmp/notesd-axum}"
SOCK="$RUN/axum.sock"
PIDFILE="$RUN/axum.pid"
LOG="$RUN/axum.log"
TARGET="$ROOT/target/bench-axum"
BIN="$TARGET/release/notesd-axum-peer"
export AXUM_PEER_SOCKET="$SOCK" AXUM_PEER_PIDFILE="$PIDFILE"

log() { printf '[axum/run %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# the pid in the pidfile, if that process is alive
live_pid() { local p; [[ -s $PIDFILE ]] && p=$(<"$PIDFILE") && [[ $p =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null && echo "$p"; }
healthy() {
  [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --unix-socket "$SOCK" http://localhost/healthz 2>/dev/null) == 200 ]]
}
# stop_wait PID SECONDS: wait until PID is gone (status 1 if it is still there)
stop_wait() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  ! kill -0 "$1" 2>/dev/null
}

build() {
  log "cargo build --release --locked (target $TARGET)"
  CARGO_TARGET_DIR="$TARGET" cargo build --release --locked -q --manifest-path "$HERE/Cargo.toml"
}

start() {
  local p end
  build
  if p=$(live_pid); then
    healthy || die "notesd-axum-peer $p is running but $SOCK does not answer"
    log "already running (pid $p)"
    return 0
  fi
  mkdir -p "$RUN"
  rm -f "$PIDFILE"   # the peer itself replaces a stale socket and refuses a live one
  nohup "$BIN" "$SOCK" >>"$LOG" 2>&1 </dev/null &
  p=$!
  end=$((SECONDS + ${START_WAIT:-30}))
  until healthy; do
    kill -0 "$p" 2>/dev/null || { tail -n 5 "$LOG" >&2; die "notesd-axum-peer exited (see $LOG)"; }
    ((SECONDS < end)) || { kill -TERM "$p" 2>/dev/null || true; die "no 200 from /healthz within ${START_WAIT:-30} s (see $LOG)"; }
    sleep 0.2
  done
  log "up: pid $p, unix:$SOCK, log $LOG"
}

stop() {
  local p
  if ! p=$(live_pid); then log "not running"; return 0; fi
  kill -TERM "$p"
  if ! stop_wait "$p" 35; then
    log "pid $p still there after 35 s: SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
    stop_wait "$p" 5 || die "pid $p survived SIGKILL"
    rm -f "$SOCK" "$PIDFILE"
  fi
  log "stopped (pid $p)"
}

status() {
  local p rss threads
  p=$(live_pid) || { echo "notesd-axum-peer not running"; exit 1; }
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
  threads=$(awk '/^Threads:/ {print $2}' "/proc/$p/status")
  awk -v p="$p" -v s="$SOCK" -v t="$threads" -v r="$rss" \
    'BEGIN {printf "notesd-axum-peer pid %s, unix:%s, %s threads, RSS %.1f MiB\n", p, s, t, r / 1024}'
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  *) die "usage: $0 start|stop|restart|status" ;;
esac
