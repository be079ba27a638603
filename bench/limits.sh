#!/usr/bin/env bash
# bench/limits.sh OUT DUR: the rows of "performance at the limit", run by bench/run.sh (step 9)
# after it has built notesd and seeded the database notesd_bench; results in OUT/limits/.
#
#   A. the accept path: connection-per-request GET /healthz through the tutorial nginx (and
#      with upstream keepalive) at 1, 2 and the default number of workers, against the same
#      nginx in front of bench/floor.c (the hop's ceiling), measured before and after the
#      sweep; the connections each worker accepted (`notesd status --json`, .accepted).
#   B. the same rows against bench/axum (one axum process, tokio multi-thread, sqlx pool), in
#      ROUNDS interleaved rounds with notesd at its defaults.
#   C. the database path: pgbench -M prepared with notesd's own list and insert statements,
#      and notesd (default workers, list cache off) straight over TCP with wrk, in interleaved
#      rounds, each run on a vacuumed and checkpointed table.
#   D. POST /api/notes under 4,000 connections, straight over TCP: req/s, p99, errors; in C's
#      POST rounds, against the 64-connection POST.
#
# env: CONNS=64 (A-C)  ROUNDS=3 (A, C, D)  PGBENCH_CLIENTS=16  BIG_CONNS=4000  SKIP_AXUM=1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PEER="$HERE/peer"
source "$PEER/lib.sh"
OUT="$1/limits"; DUR="$2"
CONNS="${CONNS:-64}"
PGBENCH_CLIENTS="${PGBENCH_CLIENTS:-16}"
ROUNDS="${ROUNDS:-3}"
BIG_CONNS="${BIG_CONNS:-4000}"
NOTESD="$ROOT/target/release/notesd"
RUN=/tmp/notesd-bench-limits
SOCK="$RUN/notesd.sock"
TCP="127.0.0.1:18095"
DB=notesd_bench
DB_URL="postgres://postgres@127.0.0.1:5432/$DB"
mkdir -p "$OUT" "$RUN"
# 4,000 client sockets for wrk, as many again inside notesd: raise the soft limit to the hard one
ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) > BIG_CONNS + 256 )) || die "open files limit $(ulimit -n) is too low for BIG_CONNS=$BIG_CONNS"

stop_all() {
  [[ -n ${FLOOR_PID:-} ]] && kill "$FLOOR_PID" 2>/dev/null || true
  stop_notesd
  nginx_stop >/dev/null 2>&1 || true
  [[ ${SKIP_AXUM:-0} == 1 ]] || "$HERE/axum/run.sh" stop >/dev/null 2>&1 || true
}
trap stop_all EXIT

# config NAME WORKERS CACHE_MS: a notesd config on the unix socket and TCP (no `workers` line
# for WORKERS=default: the built-in default is what is measured)
config() {
  local f="$OUT/$1.toml" w=""
  [[ $2 == default ]] || w="workers = $2"
  cat > "$f" <<EOF
[server]
bind = ["unix:$SOCK", "$TCP"]
socket_mode = "0666"
$w
pidfile = "$RUN/notesd.pid"
control_socket = "$RUN/control.sock"
timeout = 30
[database]
url = "$DB_URL"
[http]
list_cache_ms = $3
[log]
access_log = false
EOF
  echo "$f"
}

start_notesd() {  # CONFIG
  rm -f "$RUN/notesd.pid"
  "$NOTESD" serve -c "$1" >> "$OUT/notesd.log" 2>&1 &
  for _ in $(seq 1 100); do
    [[ -s $RUN/notesd.pid ]] && "$NOTESD" status -c "$1" --json 2>/dev/null \
      | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if sum(w["state"]=="ready" for w in s["workers"])==s["target_workers"] else 1)' \
      && { CONFIG=$1; return 0; }
    sleep 0.1
  done
  die "notesd did not come up (see $OUT/notesd.log)"
}
stop_notesd() {
  local m; m=$(live_pid "$RUN/notesd.pid") || return 0
  kill -TERM "$m"; stop_wait "$m" 10 || die "notesd $m did not stop"
}
# accepted: the workers' accepted counts, one line "pid=n ..."
accepted() {
  "$NOTESD" status -c "$CONFIG" --json | python3 -c 'import json,sys
print(" ".join("%d=%d" % (w["pid"], w.get("accepted", 0)) for w in json.load(sys.stdin)["workers"]))'
}
# cell FILE CONNS URL [get|post]: an unrecorded 2 s warm-up, then one recorded wrk run
cell() {
  run_wrk "$2" 2 "$3" "${4:-get}" >/dev/null 2>&1 || true
  run_wrk "$2" "$DUR" "$3" "${4:-get}" > "$OUT/$1" 2>&1 || true
  log "$1: $(grep '^PEERSTATS' "$OUT/$1" || echo 'no result')"
}
# through FILE URL_PATH [get|post] [KEEPALIVE]: wrk through our nginx to $TARGET_SOCK
through() {
  UPSTREAM_KEEPALIVE=${4:-0} nginx_start "$TARGET_SOCK" >/dev/null 2>&1
  cell "$1" "$CONNS" "http://127.0.0.1:$NGINX_PROXY_PORT$2" "${3:-get}"
  nginx_stop >/dev/null 2>&1
}

# ---- A. the accept path -------------------------------------------------------------------------
ceiling() {  # SUFFIX [tutorial]; env FLOOR_PROCS (1), FLOOR_NAME (floor)
  rm -f "$RUN/floor.sock"
  "$RUN/floor" "$RUN/floor.sock" "${FLOOR_PROCS:-1}" >> "$OUT/floor.log" 2>&1 &
  FLOOR_PID=$!
  for _ in $(seq 1 50); do [[ -S $RUN/floor.sock ]] && break; sleep 0.1; done
  chmod 0666 "$RUN/floor.sock"
  TARGET_SOCK="$RUN/floor.sock"
  local name=${FLOOR_NAME:-floor}
  through "$name.tutorial.$1.txt" /healthz get 0
  [[ ${2:-} == tutorial ]] || through "$name.keepalive.$1.txt" /healthz get 1
  kill -0 "$FLOOR_PID" 2>/dev/null || die "floor.c died during the run (see $OUT/floor.log)"
  kill "$FLOOR_PID"; FLOOR_PID=
}
# The connection-per-request rows in ROUNDS (3) interleaved rounds (ceiling, 1, 2, default, ...;
# the report takes each row's best round: on a shared machine interference only slows a run);
# the keepalive rows once, with the ceiling before and after.
log "A. accept path: the hop's ceiling (floor.c), then notesd at 1, 2 and default workers"
cc -O2 -o "$RUN/floor" "$HERE/floor.c"
ceiling before
# The same ceiling from 2 prefork floor.c processes (listener exclusive in each one's epoll):
# what 2 upstream processes cost nginx and the client here, whatever the server. Reported
# beside the ceiling, not a target's reference.
prefork_ceiling() { FLOOR_PROCS=2 FLOOR_NAME=floor2 ceiling "$@"; }
prefork_ceiling before
for r in $(seq 1 "$ROUNDS"); do
  if ((r > 1)); then ceiling "r$r" tutorial; prefork_ceiling "r$r" tutorial; fi
  TARGET_SOCK="$SOCK"
  for w in 1 2 default; do
    start_notesd "$(config "workers-$w" "$w" 250)"
    accepted > "$OUT/accepted.$w.r$r.before"
    through "notesd.$w.tutorial.r$r.txt" /healthz get 0
    accepted > "$OUT/accepted.$w.r$r.after"
    if ((r == 1)); then through "notesd.$w.keepalive.txt" /healthz get 1; fi
    "$NOTESD" status -c "$CONFIG" --json > "$OUT/status.$w.json"
    stop_notesd
  done
done
ceiling after

# ---- B. one axum process --------------------------------------------------------------------------
if [[ ${SKIP_AXUM:-0} != 1 ]]; then
  log "B. bench/axum: the same rows, and the database routes, one axum process ($ROUNDS interleaved rounds)"
  # axum and notesd (default workers, its default list cache) take turns, a round each, so that
  # both see the same machine; the report takes each row's best round, as everywhere.
  for r in $(seq 1 "$ROUNDS"); do
    AXUM_PEER_DATABASE_URL="$DB_URL" "$HERE/axum/run.sh" start >&2
    TARGET_SOCK=/tmp/notesd-axum/axum.sock
    through "axum.healthz.tutorial.r$r.txt" /healthz get 0
    through "axum.healthz.keepalive.r$r.txt" /healthz get 1
    through "axum.list.keepalive.r$r.txt" /api/notes get 1
    through "axum.post.keepalive.r$r.txt" /api/notes post 1
    "$HERE/axum/run.sh" stop >&2
    TARGET_SOCK="$SOCK"
    start_notesd "$(config db-default default 250)"
    through "notesd.healthz.tutorial.r$r.txt" /healthz get 0
    through "notesd.healthz.keepalive.r$r.txt" /healthz get 1
    through "notesd.list.keepalive.r$r.txt" /api/notes get 1
    through "notesd.post.keepalive.r$r.txt" /api/notes post 1
    stop_notesd
  done
fi

# ---- C. the database path against pgbench -------------------------------------------------------
log "C. database path: pgbench with notesd's statements, then notesd uncached over TCP"
# notesd's statements (src/store/notes.rs), parameterised as notesd sends them: the list takes
# one more row than it returns (51: is there a next page?)
printf '%s\n' '\set lim 51' \
  'SELECT id, title, body, created_at, updated_at FROM notes ORDER BY created_at DESC, id DESC LIMIT :lim;' \
  > "$RUN/list.sql"
echo "INSERT INTO notes (title, body) VALUES ('bench note', 'posted by pgbench') RETURNING id;" > "$RUN/insert.sql"
pgb() {  # NAME SQLFILE
  timeout $((DUR + 30)) pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$PGBENCH_CLIENTS" -j 2 \
    -T "$DUR" -f "$2" "$DB" > "$OUT/pgbench.$1.txt" 2>&1 || true
  log "pgbench $1: $(grep -E '^tps' "$OUT/pgbench.$1.txt" | head -1)"
}
# Both sides of a pair see the same table: every write before (steps B, the previous round) is
# vacuumed and checkpointed first, or the side that runs second pays for setting hint bits and
# for autovacuum and checkpoint work triggered by the other's inserts. Rounds interleave.
settle() {
  psql -q -h 127.0.0.1 -U postgres -d "$DB" -c 'VACUUM ANALYZE notes' -c 'CHECKPOINT' >/dev/null
}
start_notesd "$(config db-nocache default 0)"
for r in $(seq 1 "$ROUNDS"); do
  settle; pgb "list.r$r" "$RUN/list.sql"
  settle; cell "notesd.list.tcp.r$r.txt" "$CONNS" "http://$TCP/api/notes"
done
# D. POST under 4,000 connections rides in the same rounds: "held flat" compares it with the
# 64-connection POST best round against best round, as every other row.
log "   (and D. POST /api/notes with $BIG_CONNS connections in each round)"
for r in $(seq 1 "$ROUNDS"); do
  settle; pgb "insert.r$r" "$RUN/insert.sql"
  settle; cell "notesd.post.tcp.r$r.txt" "$CONNS" "http://$TCP/api/notes" post
  settle; cell "notesd.post.big.r$r.txt" "$BIG_CONNS" "http://$TCP/api/notes" post
done
stop_notesd
echo "cores=$(nproc) conns=$CONNS pgbench_clients=$PGBENCH_CLIENTS big_conns=$BIG_CONNS" > "$OUT/params"
python3 "$HERE/limits_report.py" "$OUT" | tee "$OUT/summary.txt"
