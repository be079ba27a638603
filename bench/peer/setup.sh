#!/usr/bin/env bash
# bench/peer/setup.sh: make the reference stack ready. Idempotent: it does only what is missing.
#   1. packages: nginx, wrk, curl, PostgreSQL (apt-get; `apt-get update` only if something is missing)
#   2. PostgreSQL answering at 127.0.0.1:5432 as user postgres with trust auth. If it already does,
#      nothing is touched; otherwise the newest Debian cluster is created/started and a line
#      `host all postgres 127.0.0.1/32 trust` goes to the top of its pg_hba.conf.
#   3. the database $PEER_DB (notesd_peer)
#   4. the venv $PEER_VENV (/tmp/notesd-peer/venv) from app/requirements.txt (python3-venv if needed)
#   5. the notes table and SEED (1000) notes; RESET=1 empties the table first
# env: SEED=1000 RESET=0 PEER_PYTHON=python3 PEER_RUN=/tmp/notesd-peer
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SEED="${SEED:-1000}"
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null || die "needs $* and there is no apt-get here: install them, then run again"
  log "apt-get install $*"
  if ((!apt_updated)); then timeout 600 apt-get update -q >&2; apt_updated=1; fi
  timeout 900 apt-get install -y -q "$@" >&2
}
pg_up() { "${PEER_PSQL[@]}" -d postgres -c 'select 1' >/dev/null 2>&1; }

# ---- 1. packages -----------------------------------------------------------------------------
need=()
for tool in nginx wrk curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ! command -v psql >/dev/null || { ! pg_up && ! command -v pg_ctlcluster >/dev/null; }; then
  need+=(postgresql)
fi
if ((${#need[@]})); then apt_install "${need[@]}"; else log "nginx, wrk, curl, psql present"; fi

# ---- 2. PostgreSQL at 127.0.0.1:5432 -----------------------------------------------------------
if pg_up; then
  log "PostgreSQL answers at 127.0.0.1:5432 (user postgres)"
else
  ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
  [[ -n $ver ]] || die "no PostgreSQL server in /usr/lib/postgresql"
  cluster() { pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main"'; }
  if [[ -z $(cluster) ]]; then log "creating cluster $ver/main"; pg_createcluster "$ver" main >&2; fi
  port=$(cluster | awk '{print $3}')
  [[ $port == 5432 ]] || die "cluster $ver/main listens on port $port, the bench needs 5432"
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -q '^# notesd bench/peer/setup.sh' "$hba"; then
    # the first matching line wins: put ours before Debian's scram-sha-256 ones
    log "trust for postgres from 127.0.0.1 at the top of $hba"
    { echo "# notesd bench/peer/setup.sh: user postgres from 127.0.0.1 without a password"
      echo "host    all    postgres    127.0.0.1/32    trust"
      cat "$hba"; } > "$hba.new"
    chown --reference="$hba" "$hba.new"; chmod --reference="$hba" "$hba.new"; mv "$hba.new" "$hba"
  fi
  if cluster | grep -q online; then
    log "reloading PostgreSQL $ver/main"; pg_ctlcluster "$ver" main reload
  else
    log "starting PostgreSQL $ver/main"; pg_ctlcluster "$ver" main start
  fi
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || die "PostgreSQL $ver/main does not answer at 127.0.0.1:5432 as postgres (listen_addresses? pg_hba.conf?)"
fi

# ---- 3. the database -----------------------------------------------------------------------------
if [[ $("${PEER_PSQL[@]}" -d postgres -c "select 1 from pg_database where datname = '$PEER_DB'") != 1 ]]; then
  log "creating database $PEER_DB"
  "${PEER_PSQL[@]}" -d postgres -c "CREATE DATABASE $PEER_DB"
fi

# ---- 4. the venv ---------------------------------------------------------------------------------
mkdir -p "$PEER_RUN"
req="$PEER_DIR/app/requirements.txt"
if [[ ! -x $PEER_VENV/bin/python ]]; then
  log "creating venv $PEER_VENV"
  rm -rf "$PEER_VENV"
  if ! "${PEER_PYTHON:-python3}" -m venv "$PEER_VENV" >&2; then
    # Debian's python3 makes venvs only with python3-venv
    rm -rf "$PEER_VENV"
    apt_install python3-venv
    /usr/bin/python3 -m venv "$PEER_VENV" >&2
  fi
fi
stamp="$PEER_VENV/.requirements.sha256"
if [[ $(sha256sum < "$req") != "$(cat "$stamp" 2>/dev/null)" ]]; then
  log "pip install -r app/requirements.txt"
  timeout 900 "$PEER_VENV/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  sha256sum < "$req" > "$stamp"
else
  log "venv up to date"
fi

# ---- 5. table and notes --------------------------------------------------------------------------
args=("$SEED"); [[ ${RESET:-0} == 1 ]] && args+=(--reset)
"$PEER_VENV/bin/python" "$PEER_DIR/app/manage.py" "${args[@]}" >&2
log "ready: PostgreSQL $("${PEER_PSQL[@]}" -d "$PEER_DB" -c 'show server_version'), database $PEER_DB, venv $PEER_VENV ($("$PEER_VENV/bin/python" -V 2>&1)), $(nginx -v 2>&1 | sed 's/.*: //'), wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}')"
