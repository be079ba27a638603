# shellcheck shell=bash
# bench/peer/lib.sh: what the peer scripts and bench/run.sh share. Source it, do not run it.
#
# Everything the reference stack writes at run time lives under $PEER_RUN (default /tmp/notesd-peer):
#   venv/            the Python virtualenv (setup.sh)
#   gunicorn.sock    gunicorn's unix socket      gunicorn.pid / gunicorn.log   its pidfile and error log
#   nginx/           the prefix of our own nginx (conf/, logs/, tmp/, nginx.pid)
# PostgreSQL is the machine's cluster at 127.0.0.1:5432, user postgres, trust (setup.sh sees to it).
PEER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER_RUN="${PEER_RUN:-/tmp/notesd-peer}"
PEER_VENV="${PEER_VENV:-$PEER_RUN/venv}"
PEER_SOCK="$PEER_RUN/gunicorn.sock"
PEER_PIDFILE="$PEER_RUN/gunicorn.pid"
PEER_DB="${PEER_DB:-notesd_peer}"
PEER_PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -qAt -v ON_ERROR_STOP=1)
# the app's database (app/app.py reads it); not DATABASE_URL, so nothing else picks it up
export PEER_DATABASE_URL="${PEER_DATABASE_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/$PEER_DB}"
NGINX_PREFIX="$PEER_RUN/nginx"
NGINX_PROXY_PORT="${NGINX_PROXY_PORT:-18080}"     # nginx -> the target's unix socket
NGINX_STATIC_PORT="${NGINX_STATIC_PORT:-18081}"   # nginx answering by itself
WRK_THREADS="${WRK_THREADS:-2}"
WRK_TIMEOUT="${WRK_TIMEOUT:-5s}"
HZ="$(getconf CLK_TCK)"
export PYTHONDONTWRITEBYTECODE=1                  # no __pycache__ in the source tree

log() { printf '[peer/%s %s] %s\n' "$(basename "$0" .sh)" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# the pid in pidfile $1, if that process is alive
live_pid() { local p; [[ -s $1 ]] && p=$(<"$1") && [[ $p =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null && echo "$p"; }

# http_ok URL [curl args...]: does URL answer 200 (within 2 s)?
http_ok() {
  local url=$1; shift
  [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" 2>/dev/null) == 200 ]]
}
# wait_http SECONDS URL [curl args...]: wait until URL answers 200, at most SECONDS
wait_http() {
  local end=$((SECONDS + $1)) url=$2; shift 2
  until http_ok "$url" "$@"; do
    ((SECONDS < end)) || { log "no 200 from $url $* within the time allowed"; return 1; }
    sleep 0.2
  done
}
# wait_unix SECONDS SOCKET PATH
wait_unix() { wait_http "$1" "http://localhost$3" --unix-socket "$2"; }

# ---- nginx ---------------------------------------------------------------------------------
# nginx_start SOCKET: our own nginx (prefix $NGINX_PREFIX) from nginx.conf.in, proxying
# 127.0.0.1:$NGINX_PROXY_PORT to unix:SOCKET and answering 127.0.0.1:$NGINX_STATIC_PORT itself.
# UPSTREAM_KEEPALIVE=1: keep upstream connections open (HTTP/1.1, as conf/nginx/notesd.conf does);
# otherwise the tutorial's plain proxy_pass (HTTP/1.0, one upstream connection per request).
nginx_start() {
  local sock=$1 upstream="" pass
  nginx_stop
  if [[ ${UPSTREAM_KEEPALIVE:-0} == 1 ]]; then
    upstream="upstream target { server unix:$sock; keepalive 64; keepalive_timeout 4s; }"
    pass='proxy_pass http://target; proxy_http_version 1.1; proxy_set_header Connection "";'
  else
    pass="proxy_pass http://unix:$sock;"
  fi
  mkdir -p "$NGINX_PREFIX/conf" "$NGINX_PREFIX/logs" "$NGINX_PREFIX/tmp"
  sed -e "s#@PREFIX@#$NGINX_PREFIX#g" -e "s#@PROXY_PORT@#$NGINX_PROXY_PORT#g" \
      -e "s#@STATIC_PORT@#$NGINX_STATIC_PORT#g" -e "s#@UPSTREAM@#$upstream#" -e "s#@PROXY_PASS@#$pass#" \
      "$PEER_DIR/nginx.conf.in" > "$NGINX_PREFIX/conf/nginx.conf"
  : > "$NGINX_PREFIX/logs/access.log"; : > "$NGINX_PREFIX/logs/error.log"
  nginx -q -t -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/conf/nginx.conf" || die "nginx rejects $NGINX_PREFIX/conf/nginx.conf"
  nginx -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/conf/nginx.conf"
  wait_http 15 "http://127.0.0.1:$NGINX_STATIC_PORT/healthz" || die "nginx did not come up"
  log "nginx $(<"$NGINX_PREFIX/nginx.pid"): :$NGINX_PROXY_PORT -> unix:$sock (upstream keepalive ${UPSTREAM_KEEPALIVE:-0}), :$NGINX_STATIC_PORT static"
}

nginx_stop() {
  local p
  p=$(live_pid "$NGINX_PREFIX/nginx.pid") || return 0
  kill -QUIT "$p" 2>/dev/null || true
  stop_wait "$p" 5 || { kill -TERM "$p" 2>/dev/null || true; stop_wait "$p" 2 || kill -KILL "$p" 2>/dev/null || true; }
  log "nginx $p stopped"
}

# stop_wait PID SECONDS: wait until PID is gone (status 1 if it is still there)
stop_wait() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  ! kill -0 "$1" 2>/dev/null
}

# ---- wrk -------------------------------------------------------------------------------------
# run_wrk CONNS SECONDS URL [get|post]: one wrk run (bounded: killed SECONDS + 30 s later at the
# latest); the raw output ends with wrk.lua's PEERSTATS line. post = POST a JSON note each request.
run_wrk() {
  local c=$1 d=$2 url=$3 t=$WRK_THREADS post=0
  [[ ${4:-get} == post ]] && post=1
  ((c < t)) && t=$c
  WRK_POST=$post timeout --kill-after=5 $((d + 30)) \
    wrk -t"$t" -c"$c" -d"${d}s" --timeout "$WRK_TIMEOUT" --latency -s "$PEER_DIR/wrk.lua" "$url"
}

# field NAME LINE: the value of NAME=... in a PEERSTATS line
field() { local kv; for kv in $2; do [[ $kv == "$1="* ]] && { echo "${kv#*=}"; return; }; done; }

# status_counts ACCESS_LOG: "499=3 502=1" from our nginx's log of non-2xx/3xx answers, or "none"
status_counts() {
  local s
  s=$(awk '{n[$2]++} END {for (k in n) printf "%s=%d ", k, n[k]}' "$1" 2>/dev/null)
  s=${s% }; echo "${s:-none}"
}

# ---- processes, memory ---------------------------------------------------------------------------
children() { cat /proc/"$1"/task/*/children 2>/dev/null | tr -s ' ' '\n' | grep -E '^[0-9]+$' | sort -n || true; }

# rss_report MASTER: RSS (VmRSS) and PSS (smaps_rollup) of MASTER and of each child, in MiB
rss_report() {
  local role=master p rss pss
  printf '  %-8s %-8s %9s %9s\n' role pid RSS_MiB PSS_MiB
  for p in "$1" $(children "$1"); do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null); pss=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null)
    printf '%s %s %s %s\n' "$role" "$p" "${rss:-0}" "${pss:-0}"
    role=worker
  done | awk '{printf "  %-8s %-8s %9.1f %9.1f\n", $1, $2, $3 / 1024, $4 / 1024; r += $3; s += $4}
              END {printf "  %-8s %-8s %9.1f %9.1f\n", "total", "", r / 1024, s / 1024}'
}

# ---- who used the CPU during a run ---------------------------------------------------------------
# The machine may be shared (2 cores, a build in another session): bench.sh measures, per run, the CPU
# of the target, of the stack around it (our nginx, the PostgreSQL cluster), of wrk, and calls the rest
# "other". All counts in clock ticks.
busy_steal() { awk '/^cpu / {print $2 + $3 + $4, $9}' /proc/stat; }   # user+nice+system, steal
# tree_ticks PID: CPU of PID, of its live children and of the children it has reaped (cutime+cstime),
# so workers or backends that exit during a run still count
tree_ticks() {
  local m=${1:-} t c v
  [[ -n $m && -r /proc/$m/stat ]] || { echo 0; return; }
  t=$(sed 's/.*) //' "/proc/$m/stat" | awk '{print $12 + $13 + $14 + $15}')
  for c in $(children "$m"); do
    v=$(sed 's/.*) //' "/proc/$c/stat" 2>/dev/null | awk '{print $12 + $13}')
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
# the postmaster of the cluster at 127.0.0.1:5432 (its data directory's postmaster.pid)
postmaster_pid() {
  local d p
  d=$("${PEER_PSQL[@]}" -d postgres -c 'show data_directory' 2>/dev/null) || return 0
  p=$(head -1 "$d/postmaster.pid" 2>/dev/null) && [[ $p =~ ^[0-9]+$ ]] && echo "$p"
  return 0
}
# stack_ticks: our nginx's tree + the postmaster's tree (PG_PID, set once by the caller)
stack_ticks() {
  local n; n=$(live_pid "$NGINX_PREFIX/nginx.pid" || true)
  echo $(( $(tree_ticks "$n") + $(tree_ticks "${PG_PID:-}") ))
}

# wait_idle SECONDS: wait, at most SECONDS, until the machine uses < 15 % of a core (over 2 s)
wait_idle() {
  local end=$((SECONDS + $1)) b0 b1 pct
  while :; do
    read -r b0 _ < <(busy_steal); sleep 2; read -r b1 _ < <(busy_steal)
    pct=$(( (b1 - b0) * 100 / (2 * HZ) ))
    ((pct < 15)) && return 0
    ((SECONDS < end)) || { log "WARNING: the machine is still busy (${pct}% of a core) after $1 s: the numbers will be noisy"; return 1; }
    log "machine busy (${pct}% of a core): waiting"
  done
}
