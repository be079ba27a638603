#!/usr/bin/env bash
# bench/peer/bench.sh [SOCKET] [SECONDS]: one table of wrk measurements of the HTTP server on unix
# SOCKET (default: the peer's gunicorn), every request through our nginx (lib.sh:nginx_start).
#
# Rows, for each connection count: nginx-static GET /healthz (nginx answering by itself: the upper
# bound of the path), then through nginx to SOCKET: GET /healthz, GET /api/notes, POST /api/notes.
# Columns: req/s, latency p50/p90/p99 (ms), non2xx, sockerr (connect+read+write+timeout), tgtCPU%
# (the target's master + workers), other% (everything that is neither the target, nginx, the
# PostgreSQL cluster nor wrk), steal%: CPU in % of one core; spread = (max - min) / median req/s of
# the REPEAT runs, of which the median is shown. Then RSS/PSS of the target's processes.
#
# env: CONNS="16 64"  REPEAT=1  WARMUP=2 (s per endpoint, unrecorded; 0 = none)
#      ENDPOINTS="static healthz notes_get notes_post"
#      TARGET_PIDFILE  the target's master, for tgtCPU% and memory (default: the peer's pidfile)
#      RESET_DB        1 = truncate the peer's table and seed 1000 notes first (default 1 for the peer,
#                      0 for any other socket)
#      OUT_DIR         where table.txt and the raw wrk output go (default $PEER_RUN/results/<time>)
#      LABEL           the name in the header (default unix:SOCKET)
#      UPSTREAM_KEEPALIVE=1  nginx keeps its upstream connections (see nginx.conf.in)
#      IDLE_WAIT=180   seconds to wait for a quiet machine first
#      NOISE_MAX=15 NOISE_RETRIES=2 CELL_IDLE_WAIT=120: a run in which other% > NOISE_MAX is done
#                      again (after waiting for quiet) up to NOISE_RETRIES times; the quietest is kept
#      WRK_THREADS=2 WRK_TIMEOUT=5s NGINX_PROXY_PORT=18080 NGINX_STATIC_PORT=18081
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOCK="${1:-$PEER_SOCK}"
DUR="${2:-10}"
CONNS="${CONNS:-16 64}"
REPEAT="${REPEAT:-1}"
WARMUP="${WARMUP:-2}"
NOISE_MAX="${NOISE_MAX:-15}"
NOISE_RETRIES="${NOISE_RETRIES:-2}"
CELL_IDLE_WAIT="${CELL_IDLE_WAIT:-120}"
if [[ $SOCK == "$PEER_SOCK" ]]; then
  TARGET_PIDFILE="${TARGET_PIDFILE:-$PEER_PIDFILE}"; RESET_DB="${RESET_DB:-1}"
else
  TARGET_PIDFILE="${TARGET_PIDFILE:-}"; RESET_DB="${RESET_DB:-0}"
fi
OUT_DIR="${OUT_DIR:-$PEER_RUN/results/$(date +%Y%m%d-%H%M%S)}"
LABEL="${LABEL:-unix:$SOCK}"
[[ $DUR =~ ^[0-9]+$ ]] && ((DUR >= 1 && DUR <= 600)) || die "SECONDS must be 1..600"
[[ $REPEAT =~ ^[0-9]+$ ]] && ((REPEAT >= 1)) || die "REPEAT must be >= 1"

[[ -S $SOCK ]] || die "no socket $SOCK: start the target first (bench/peer/run_gunicorn.sh start for the peer)"
wait_unix 10 "$SOCK" /healthz || die "$SOCK does not answer GET /healthz"
mkdir -p "$PEER_RUN" "$OUT_DIR"
if [[ $RESET_DB == 1 ]]; then
  "$PEER_VENV/bin/python" "$PEER_DIR/app/manage.py" 1000 --reset >&2
fi

wait_idle "${IDLE_WAIT:-180}" || true
WRKCPU="$PEER_RUN/.wrk-cpu.$$"
trap 'nginx_stop; rm -f "$WRKCPU"' EXIT
nginx_start "$SOCK"
PROXY="http://127.0.0.1:$NGINX_PROXY_PORT"
wait_http 10 "$PROXY/healthz" || die "nginx -> $SOCK does not answer"
TPID=""
[[ -n $TARGET_PIDFILE ]] && TPID=$(live_pid "$TARGET_PIDFILE" || true)
PG_PID=$(postmaster_pid)

declare -A NAME=([static]="nginx-static GET /healthz" [healthz]="GET /healthz" [notes_get]="GET /api/notes" [notes_post]="POST /api/notes")
declare -A URL=([static]="http://127.0.0.1:$NGINX_STATIC_PORT/healthz" [healthz]="$PROXY/healthz"
                [notes_get]="$PROXY/api/notes" [notes_post]="$PROXY/api/notes")
declare -A METHOD=([static]=get [healthz]=get [notes_get]=get [notes_post]=post)

TABLE="$OUT_DIR/table.txt"
row_format='%-26s %5s %10s %9s %9s %9s %8s %8s %7s %7s %6s %7s\n'
{
  echo "# bench: $LABEL  duration=${DUR}s x $REPEAT  conns=[$CONNS]  wrk -t$WRK_THREADS --timeout $WRK_TIMEOUT  upstream_keepalive=${UPSTREAM_KEEPALIVE:-0}  $(nproc) cores  $(date -u +%FT%TZ)"
  # shellcheck disable=SC2059
  printf "$row_format" endpoint conns req/s p50_ms p90_ms p99_ms non2xx sockerr tgtCPU% other% steal% spread
} | tee "$TABLE"

# one_run EP CONNS RAW: one wrk run into RAW; prints
#   "rps p50 p90 p99 non2xx sockerr tgtCPU other steal"   (nothing if wrk gave no PEERSTATS line)
# wrk's CPU comes from bash's `time` (the rusage of the children it waited for).
one_run() {
  local ep=$1 c=$2 raw=$3 b0 s0 k0 g0 t0 b1 s1 k1 g1 t1 w stats TIMEFORMAT='%3U %3S'
  read -r b0 s0 < <(busy_steal); k0=$(stack_ticks); g0=$(tree_ticks "$TPID"); t0=$(date +%s.%N)
  { time run_wrk "$c" "$DUR" "${URL[$ep]}" "${METHOD[$ep]}" > "$raw" 2>&1; } 2> "$WRKCPU" \
    || log "wrk failed for $ep c=$c (see $raw)"
  read -r b1 s1 < <(busy_steal); k1=$(stack_ticks); g1=$(tree_ticks "$TPID"); t1=$(date +%s.%N)
  w=$(awk -v hz="$HZ" 'NR == 1 {printf "%d", ($1 + $2) * hz}' "$WRKCPU")
  stats=$(grep '^PEERSTATS' "$raw" || true)
  [[ -n $stats ]] || { log "no PEERSTATS line in $raw"; cat "$raw" >&2; return 0; }
  local tgt other steal
  read -r tgt other steal < <(awk -v b=$((b1 - b0)) -v s=$((s1 - s0)) -v k=$((k1 - k0)) -v g=$((g1 - g0)) \
    -v w="${w:-0}" -v hz="$HZ" -v t0="$t0" -v t1="$t1" 'BEGIN {
      span = (t1 - t0) * hz; if (span <= 0) span = 1
      o = b - w - k - g; if (o < 0) o = 0
      printf "%.0f %.0f %.0f\n", 100 * g / span, 100 * o / span, 100 * s / span }')
  [[ $ep == static || -z $TPID ]] && tgt="-"
  echo "$(field rps "$stats") $(field p50_ms "$stats") $(field p90_ms "$stats") $(field p99_ms "$stats")" \
       "$(field non2xx "$stats") $(( $(field connect "$stats") + $(field read "$stats") + $(field write "$stats") + $(field timeout "$stats") ))" \
       "$tgt $other $steal"
}

# quiet_run EP CONNS RAW: one_run, done again while other% > NOISE_MAX (at most NOISE_RETRIES more
# times, each after waiting for quiet); the quietest run is kept
quiet_run() {
  local best="" row other try
  for ((try = 0; ; try++)); do
    row=$(one_run "$@")
    if [[ -n $row ]]; then
      other=$(awk '{print $8}' <<<"$row")
      if [[ -z $best ]] || ((other < $(awk '{print $8}' <<<"$best"))); then best=$row; fi
      ((other <= NOISE_MAX)) && break
    fi
    ((try < NOISE_RETRIES)) || break
    if [[ -n $row ]]; then
      log "$1 c=$2: other processes used ${other}% of a core (> $NOISE_MAX): again, after waiting for quiet"
      wait_idle "$CELL_IDLE_WAIT" || true
    fi
  done
  echo "$best"
}

noisy=0
most=$(tr ' ' '\n' <<<"$CONNS" | sort -n | tail -1)
for ep in ${ENDPOINTS:-static healthz notes_get notes_post}; do
  [[ -n ${NAME[$ep]:-} ]] || die "unknown endpoint $ep (static healthz notes_get notes_post)"
  if ((WARMUP > 0)); then run_wrk "$most" "$WARMUP" "${URL[$ep]}" "${METHOD[$ep]}" > "$OUT_DIR/$ep.warmup.txt" 2>&1 || true; fi
  for c in $CONNS; do
    runs=()
    for ((r = 1; r <= REPEAT; r++)); do
      sfx=""; ((REPEAT > 1)) && sfx=".r$r"
      row=$(quiet_run "$ep" "$c" "$OUT_DIR/$ep.c$c$sfx.txt")
      [[ -n $row ]] && runs+=("$row")
    done
    ((${#runs[@]})) || continue
    sorted=$(printf '%s\n' "${runs[@]}" | sort -g -k1,1)
    median=$(awk '{l[NR] = $0} END {print l[int((NR + 1) / 2)]}' <<<"$sorted")
    spread=$(awk -v m="${median%% *}" '{v[NR] = $1} END {if (NR < 2 || m == 0) print "-"; else printf "%.0f%%", 100 * (v[NR] - v[1]) / m}' <<<"$sorted")
    awk -v max="$NOISE_MAX" '$8 > max {bad = 1} END {exit !bad}' <<<"$sorted" && noisy=1
    read -r rps p50 p90 p99 non2xx sockerr tgt other steal <<<"$median"
    # shellcheck disable=SC2059
    printf "$row_format" "${NAME[$ep]}" "$c" "$rps" "$p50" "$p90" "$p99" "$non2xx" "$sockerr" "$tgt" "$other" "$steal" "$spread" | tee -a "$TABLE"
  done
done

{
  echo "# tgtCPU% = the target's master + workers, other% = everything but the target, nginx, PostgreSQL and wrk,"
  echo "# steal% = taken by the hypervisor: % of ONE core over the run ($(nproc) cores here). other% > $NOISE_MAX: run redone (up to $NOISE_RETRIES times)."
  ((noisy)) && echo "# WARNING: something else used the CPU during some runs: measure again on a quiet machine"
  echo
  if [[ -n $TPID ]] && kill -0 "$TPID" 2>/dev/null; then
    echo "# memory after the runs, master $TPID (RSS = VmRSS of /proc/PID/status, PSS = /proc/PID/smaps_rollup):"
    rss_report "$TPID"
  else
    echo "# memory: no TARGET_PIDFILE / target not running"
  fi
  echo "# nginx answers that were not 2xx/3xx: $(status_counts "$NGINX_PREFIX/logs/access.log") (499 = wrk closing requests in flight at the end of a run, not a server error); error.log lines: $(wc -l < "$NGINX_PREFIX/logs/error.log")"
  if [[ $RESET_DB == 1 ]]; then
    echo "# notes in $PEER_DB after the runs: $("${PEER_PSQL[@]}" -d "$PEER_DB" -c 'select count(*) from notes' 2>/dev/null || echo '?')"
  fi
} | tee -a "$TABLE"
cp "$NGINX_PREFIX/logs/access.log" "$OUT_DIR/nginx.access.log"
cp "$NGINX_PREFIX/logs/error.log" "$OUT_DIR/nginx.error.log"
log "table and raw wrk output in $OUT_DIR"
