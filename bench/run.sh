#!/usr/bin/env bash
# notesd against the gunicorn peer: same machine, same nginx, same PostgreSQL, one invocation.
# The peer (the tutorial's Flask notes app under gunicorn) and the harness are in bench/peer/.
#
#   bench/run.sh [SECONDS]          wrk duration per cell (default 10)
#
# Runs, in order (each step bounded, every server stopped on exit):
#   1. release build; bench/peer/setup.sh (idempotent: apt packages, PostgreSQL, venv, 1000 notes)
#   2. a fresh PostgreSQL database for notesd (1000 notes), notesd started on a unix socket
#   3. bench/peer/bench.sh against gunicorn            (tutorial nginx: no upstream keepalive)
#   4. bench/peer/bench.sh against notesd              (the very same nginx config)
#   5. bench/peer/bench.sh against notesd, with nginx upstream keepalive (conf/nginx/notesd.conf style)
#   5b. the same nginx in front of bench/floor.c (the cheapest HTTP upstream there can be: one
#       canned response per request head, no parsing): the proxy hop's own ceiling for GET /healthz
#   6. oha --unix-socket straight at notesd (no nginx)
#   6b. GET /api/notes again with the list cache off (http.list_cache_ms = 0), both ways
#   7. HUPS reloads 1 s apart under load, against a same-length baseline
#   8. idle master CPU over 20 s (schedstat)
#   9. bench/limits.sh: performance at the limit (the accept path at 1, 2 and the default number
#      of workers against the hop's ceiling, the axum peer, pgbench, 4,000 connections)
# and prints one table of ratios (notesd / peer) with the targets of issue 5, then limits.sh's.
#
# env: CONNS=64  REPEAT=1  HUPS=20
#      WORKERS=1 (notesd workers. Each is an event loop, so it needs no more for concurrency, and
#        here nginx, wrk and PostgreSQL need more than one of the two cores. Measured on 2 cores
#        through nginx, 1 vs 2 workers: healthz 64-72k vs 42-48k, POST 9.1k vs 7.4k req/s; one
#        worker finds several requests per wake-up (0.14 context switches per request), two
#        ping-pong with nginx (1.5 per request). On a machine of its own: one per core.)
#      MAX_CONNECTIONS=16 (per worker: enough concurrent INSERTs for PostgreSQL's group commit)
#      LIST_CACHE_MS=250 (http.list_cache_ms of the main runs)
#      SKIP_PEER=1 (reuse nothing, just skip the peer rows)  OUT=dir (default target/bench/<time>)
#      ONLY_LIMITS=1 (steps 1, 2 and 9 only)  SKIP_LIMITS=1 (no step 9); limits.sh's own knobs pass through
# Needs the machine quiet: a concurrent cargo build halves every number (bench/peer/bench.sh
# waits for an idle machine and prints other% so a noisy run shows).
# Outside the repository it needs: root (apt-get, PostgreSQL), Debian/Ubuntu packages (setup.sh
# installs nginx, wrk, curl, postgresql, python3-venv if missing), PyPI for the peer's venv,
# crates.io for oha (optional), a C compiler for floor.c. Runtime files: /tmp/notesd-bench
# (notesd), /tmp/notesd-peer (gunicorn, venv, nginx prefix).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PEER="$HERE/peer"
export PEER_RUN="${PEER_RUN:-/tmp/notesd-peer}"   # bench/peer/lib.sh: gunicorn socket, venv, nginx prefix
DUR="${1:-10}"
CONNS="${CONNS:-64}"
REPEAT="${REPEAT:-1}"
WORKERS="${WORKERS:-1}"
MAX_CONNECTIONS="${MAX_CONNECTIONS:-16}"
HUPS="${HUPS:-20}"
OUT="${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}"
RUN=/tmp/notesd-bench
SOCK="$RUN/notesd.sock"
DB="notesd_bench"
PSQL=(psql -h 127.0.0.1 -U postgres -d postgres -qAt -v ON_ERROR_STOP=1)
NOTESD="$ROOT/target/release/notesd"
mkdir -p "$OUT" "$RUN"

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cleanup() {
  [[ -n ${WRK_PID:-} ]] && kill "$WRK_PID" 2>/dev/null || true
  [[ -n ${FLOOR_PID:-} ]] && kill "$FLOOR_PID" 2>/dev/null || true
  if [[ -s $RUN/notesd.pid ]]; then kill -TERM "$(cat "$RUN/notesd.pid")" 2>/dev/null || true; fi
  "$PEER/run_gunicorn.sh" stop >/dev/null 2>&1 || true
  (source "$PEER/lib.sh" && nginx_stop) >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ---- 1. build + peer setup ---------------------------------------------------------------
log "release build"
(cd "$ROOT" && cargo build --release --locked -q)
"$PEER/setup.sh" >&2
command -v wrk >/dev/null || die "wrk missing (bench/peer/setup.sh should have installed it)"
if ! command -v oha >/dev/null; then
  log "installing oha (cargo install, once)"
  cargo install oha --locked -q || log "WARNING: no oha; direct rows skipped"
fi

# ---- 2. notesd on a fresh database ----------------------------------------------------------
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
cat > "$OUT/notesd.toml" <<EOF
[server]
bind = ["unix:$SOCK"]
# nginx workers run as nobody here (bench/peer/nginx.conf.in has no user directive)
socket_mode = "0666"
workers = $WORKERS
pidfile = "$RUN/notesd.pid"
control_socket = "$RUN/control.sock"
timeout = 30
[database]
url = "postgres://postgres@127.0.0.1:5432/$DB"
max_connections = $MAX_CONNECTIONS
[http]
list_cache_ms = ${LIST_CACHE_MS:-250}
[log]
# the peer logs no access lines either (PEER_ACCESSLOG off): same work on both sides
access_log = false
EOF
"$NOTESD" migrate -c "$OUT/notesd.toml" >&2
"$NOTESD" seed -c "$OUT/notesd.toml" --count 1000 >&2
start_notesd() {  # [CONFIG]
  rm -f "$RUN/notesd.pid"
  "$NOTESD" serve -c "${1:-$OUT/notesd.toml}" >> "$OUT/notesd.log" 2>&1 &
  for _ in $(seq 1 100); do
    "$NOTESD" healthcheck --socket "$SOCK" >/dev/null 2>&1 && [[ -s $RUN/notesd.pid ]] && return 0
    sleep 0.1
  done
  die "notesd did not come up (see $OUT/notesd.log)"
}

if [[ ${ONLY_LIMITS:-0} != 1 ]]; then
# ---- 3. peer ------------------------------------------------------------------------------
if [[ ${SKIP_PEER:-0} != 1 ]]; then
  log "peer: gunicorn + Flask"
  "$PEER/run_gunicorn.sh" restart >&2
  OUT_DIR="$OUT/peer" CONNS="$CONNS" REPEAT="$REPEAT" LABEL=gunicorn-peer "$PEER/bench.sh" "$PEER_RUN/gunicorn.sock" "$DUR" >&2
  "$PEER/run_gunicorn.sh" stop >&2
fi

# ---- 4. notesd through the same nginx -------------------------------------------------------
start_notesd
M=$(cat "$RUN/notesd.pid")
log "notesd master $M: $("$NOTESD" status -c "$OUT/notesd.toml" --json | grep -c '"pid"') processes"
OUT_DIR="$OUT/notesd" CONNS="$CONNS" REPEAT="$REPEAT" RESET_DB=0 TARGET_PIDFILE="$RUN/notesd.pid" \
  LABEL="notesd (tutorial nginx)" "$PEER/bench.sh" "$SOCK" "$DUR" >&2

# ---- 5. notesd through nginx with upstream keepalive ------------------------------------------
# The same template with UPSTREAM_KEEPALIVE=1: an upstream block with keepalive 64, HTTP/1.1 and
# Connection "" (as conf/nginx/notesd.conf). Steps 5b, 6b and 7 use this nginx too.
UPSTREAM_KEEPALIVE=1   # read by lib.sh:nginx_start in the ( source "$PEER/lib.sh" ... ) subshells below
OUT_DIR="$OUT/notesd-keepalive" CONNS="$CONNS" REPEAT="$REPEAT" RESET_DB=0 TARGET_PIDFILE="$RUN/notesd.pid" \
  UPSTREAM_KEEPALIVE=1 LABEL="notesd (nginx upstream keepalive)" "$PEER/bench.sh" "$SOCK" "$DUR" >&2

# ---- 5b. the proxy hop with the cheapest possible upstream ---------------------------------------
log "proxy ceiling: the same nginx in front of bench/floor.c"
UP="$OUT/floor"; mkdir -p "$UP"
cc -O2 -o "$UP/floor" "$HERE/floor.c"
"$UP/floor" "$UP/floor.sock" > "$UP/floor.log" 2>&1 &
FLOOR_PID=$!
(
  source "$PEER/lib.sh"
  nginx_start "$UP/floor.sock" >&2
  run_wrk "$CONNS" "$DUR" "http://127.0.0.1:$NGINX_PROXY_PORT/healthz" > "$OUT/ceiling.proxy.txt" 2>&1 || true
  run_wrk "$CONNS" "$DUR" "http://127.0.0.1:$NGINX_STATIC_PORT/healthz" > "$OUT/ceiling.static.txt" 2>&1 || true
  nginx_stop >&2
)
kill "$FLOOR_PID" 2>/dev/null || true

# ---- 6. oha straight at the socket ------------------------------------------------------------
oha_row() {  # name method path [body]
  local name=$1 method=$2 path=$3 body=${4:-} json
  local args=(--no-tui -z "${DUR}s" -c "$CONNS" --unix-socket "$SOCK" -m "$method" --output-format json)
  [[ -n $body ]] && args+=(-H 'Content-Type: application/json' -d "$body")
  json=$(timeout $((DUR + 30)) oha "${args[@]}" "http://localhost$path" 2>/dev/null) || { echo "$name - - -"; return; }
  python3 -c 'import json,sys; d=json.load(sys.stdin); s=d["summary"]; p=d["latencyPercentiles"]
codes=d.get("statusCodeDistribution",{}); bad=sum(v for k,v in codes.items() if not k.startswith("2"))
print(sys.argv[1], round(s["requestsPerSec"]), round(p["p99"]*1000,2), bad)' "$name" <<<"$json"
}
if command -v oha >/dev/null; then
  log "oha direct (no nginx)"
  {
    echo "# oha --unix-socket $SOCK -c $CONNS -z ${DUR}s: endpoint req/s p99_ms non2xx"
    oha_row "GET_/healthz" GET /healthz
    oha_row "GET_/api/notes" GET /api/notes
    oha_row "POST_/api/notes" POST /api/notes '{"title":"bench note","body":"posted by oha"}'
  } | tee "$OUT/oha.txt" >&2
fi

# ---- 6b. the list with the cache off -----------------------------------------------------------
log "GET /api/notes with http.list_cache_ms = 0"
stop_notesd() {
  kill -TERM "$M"
  for _ in $(seq 1 100); do kill -0 "$M" 2>/dev/null || return 0; sleep 0.1; done
  die "notesd $M did not stop"
}
sed 's/^list_cache_ms = .*/list_cache_ms = 0/' "$OUT/notesd.toml" > "$OUT/notesd-nocache.toml"
stop_notesd; start_notesd "$OUT/notesd-nocache.toml"; M=$(cat "$RUN/notesd.pid")
(
  source "$PEER/lib.sh"
  nginx_start "$SOCK" >&2
  run_wrk "$CONNS" "$DUR" "http://127.0.0.1:$NGINX_PROXY_PORT/api/notes" > "$OUT/nocache.wrk.txt" 2>&1 || true
  nginx_stop >&2
)
if command -v oha >/dev/null; then
  oha_row "GET_/api/notes_cache_off" GET /api/notes | tee -a "$OUT/oha.txt" >&2
fi
stop_notesd; start_notesd; M=$(cat "$RUN/notesd.pid")

# ---- 7. HUPs under load ---------------------------------------------------------------------
log "reload test: $HUPS x HUP 1 s apart under load (nginx keepalive)"
(
  source "$PEER/lib.sh"
  nginx_start "$SOCK" >&2
  URL="http://127.0.0.1:$NGINX_PROXY_PORT/api/notes"
  d=$((HUPS + 3))
  run_wrk 16 "$d" "$URL" > "$OUT/hup.baseline.txt" 2>&1 || true
  : > "$NGINX_PREFIX/logs/access.log"
  run_wrk 16 "$d" "$URL" > "$OUT/hup.wrk.txt" 2>&1 &
  W=$!
  sleep 2
  for i in $(seq 1 "$HUPS"); do kill -HUP "$M"; sleep 1; done
  wait "$W" || true
  b=$(grep '^PEERSTATS' "$OUT/hup.baseline.txt"); h=$(grep '^PEERSTATS' "$OUT/hup.wrk.txt")
  sockerr=$(( $(field connect "$h") + $(field read "$h") + $(field write "$h") + $(field timeout "$h") ))
  echo "baseline_rps=$(field rps "$b") hup_rps=$(field rps "$h") non2xx=$(field non2xx "$h") sockerr=$sockerr nginx_abnormal=$(status_counts "$NGINX_PREFIX/logs/access.log") generation=$("$NOTESD" status -c "$OUT/notesd.toml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')" > "$OUT/hup.txt"
  nginx_stop >&2
)
cat "$OUT/hup.txt" >&2

# ---- 8. idle master CPU ----------------------------------------------------------------------
# After the reload test's old workers are gone; on-CPU time from schedstat (ns), not
# the tick-sampled utime/stime, whose 10 ms granularity is 0.1 % of 10 s by itself.
sleep 5
t0=$(awk '{print $1}' "/proc/$M/schedstat"); sleep 20; t1=$(awk '{print $1}' "/proc/$M/schedstat")
idle_pct=$(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.3f", 100 * d / 20e9}')

# ---- the table --------------------------------------------------------------------------------
python3 "$HERE/report.py" "$OUT" "$CONNS" "$idle_pct" | tee "$OUT/summary.txt"
stop_notesd
fi

# ---- 9. performance at the limit ------------------------------------------------------------------
if [[ ${SKIP_LIMITS:-0} != 1 ]]; then
  log "performance at the limit: bench/limits.sh"
  CONNS="$CONNS" "$HERE/limits.sh" "$OUT" "$DUR" >&2
  cat "$OUT/limits/summary.txt"
fi
log "everything in $OUT"
