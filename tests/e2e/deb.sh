#!/usr/bin/env bash
# End-to-end test of the Debian package, on this machine, for real.
#
#   build the .deb (packaging/build-deb: cargo deb, then md5sums) → its
#   contents, md5sums, changelog → lintian (no errors, no warnings) → dpkg -i →
#   package layout, dpkg --verify, conffiles, permissions, user →
#   systemd-analyze verify + security (≤ 2.0) on the installed units → run the
#   installed unit's own ExecStartPre/ExecStart/ExecReload lines (parsed from
#   it) as its User= with its Environment=, UMask=, RuntimeDirectory=,
#   against a fresh PostgreSQL database the installed config is edited to use →
#   Debian's nginx with the installed site (listen address and log paths moved
#   into a temp prefix) → through nginx: notes, gzip, headers, limits, a reload
#   under load with zero failed requests → dpkg -i again (upgrade keeps the
#   conffile edits) → reload onto the new binary under load → healthcheck → TERM
#   → socket activation (as notesd.socket would do it) → dpkg -r keeps data and
#   config → dpkg --purge removes everything.
#
# Needs root on a throwaway machine (CI), as .ci/run provides: dpkg, nginx,
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust), psql, curl, jq, setpriv,
# systemd-analyze (systemd as PID 1 is not needed), lintian; wrk is used when
# present.
# It refuses to run when notesd is already installed or its paths exist, and it
# only ever touches what it creates: the package, /run/notesd, one database, an
# nginx instance in a temp prefix. Everything is undone on exit, even on failure.
#
# Environment: NOTESD_E2E_DEB=path (skip the build, test this .deb),
# NOTESD_E2E_PORT (nginx port, default 18480), NOTESD_E2E_KEEP=1 (keep the temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT=${NOTESD_E2E_PORT:-18480}
BASE="http://127.0.0.1:$PORT"
START_NS=$(date +%s%N)

say() { printf '[e2e %6.1fs] %s\n' "$(( ($(date +%s%N) - START_NS) / 1000000 ))e-3" "$*"; }
measured() { printf '    %-34s %s\n' "$1" "$2"; }
fail() {
    printf '[e2e] FAIL: %s\n' "$*" >&2
    exit 1
}
check() { # check DESCRIPTION COMMAND...: run it, fail with the description if it fails
    local what=$1
    shift
    "$@" || fail "$what"
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# ---------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || fail "must run as root (it installs the package for real); CI does"
for cmd in dpkg dpkg-deb dpkg-query dpkg-statoverride systemd-analyze nginx psql pg_isready curl jq setpriv timeout ss gzip md5sum lintian; do
    command -v "$cmd" >/dev/null || fail "missing command: $cmd (.ci/run installs what is needed)"
done
if [[ $(dpkg-query -W -f='${db:Status-Status}' notesd 2>/dev/null || true) =~ ^(installed|config-files|half-installed|half-configured|unpacked|triggers-awaited|triggers-pending)$ ]]; then
    fail "a notesd package is already on this machine; this test installs and purges its own and will not touch that one"
fi
getent passwd notesd >/dev/null && fail "a user notesd already exists; refusing to run (the purge at the end would delete it)"
for p in /etc/notesd /var/lib/notesd /var/log/notesd /run/notesd /etc/nginx/sites-available/notesd; do
    [[ -e $p ]] && fail "$p already exists; refusing to run (it is not this test's to remove)"
done
[[ -z $(ss -Hltn "sport = :$PORT") ]] || fail "port $PORT is in use; set NOTESD_E2E_PORT"
timeout 10 pg_isready -h 127.0.0.1 -p 5432 -q || fail "PostgreSQL is not reachable on 127.0.0.1:5432"

T=$(mktemp -d /tmp/notesd-e2e.XXXXXX)
chmod 0755 "$T" # nginx's workers (www-data) use temp dirs below it
DB="notesd_e2e_$$_$RANDOM"
INSTALLED=0 MADE_DB=0 MADE_RUNDIR=0 MADE_LOGSDIR=0
MASTER="" NGINX_PID="" LOAD_PIDS=()
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt)

stop_pid() { # stop_pid PID SIGNAL SECONDS: signal, wait up to SECONDS, then SIGKILL
    local pid=$1 sig=$2 secs=$3 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    say "cleanup (exit $rc)"
    local p
    for p in "${LOAD_PIDS[@]}"; do stop_pid "$p" TERM 2; done
    if [[ -n $MASTER ]]; then
        # Workers die with their master (PR_SET_PDEATHSIG); kill stragglers by pid.
        local workers
        workers=$(pgrep -P "$MASTER" 2>/dev/null)
        stop_pid "$MASTER" TERM 40
        for p in $workers; do stop_pid "$p" KILL 2; done
    fi
    [[ -n $NGINX_PID ]] && stop_pid "$NGINX_PID" QUIT 10
    if ((rc != 0)); then
        for f in "$T"/notesd*.log "$T"/nginx/logs/error.log "$T"/nginx/logs/notesd.error.log "$T"/dpkg-*.log; do
            [[ -s $f ]] || continue
            echo "----- last lines of $f"
            tail -n 40 "$f"
        done
    fi
    if ((INSTALLED)); then
        timeout 120 dpkg --purge notesd </dev/null >"$T/dpkg-purge-cleanup.log" 2>&1 ||
            echo "cleanup: dpkg --purge notesd failed (see $T/dpkg-purge-cleanup.log)" >&2
    fi
    ((MADE_RUNDIR)) && rm -rf /run/notesd
    ((MADE_LOGSDIR)) && rm -rf /var/log/notesd
    if ((MADE_DB)); then
        timeout 30 "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" ||
            echo "cleanup: could not drop database $DB" >&2
    fi
    if [[ ${NOTESD_E2E_KEEP:-0} == 1 ]]; then echo "kept $T"; else rm -rf "$T"; fi
    if ((rc == 0)); then say "PASS"; else say "FAILED"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- build
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh
DEB=$(e2e_deb)
say "package $DEB"
measured ".deb size" "$(stat -c %s "$DEB") bytes ($(du -h "$DEB" | cut -f1))"
[[ $(dpkg-deb -f "$DEB" Package) == notesd ]] || fail "not the notesd package"

# ---------------------------------------------------------------- package contents
say "package contents (dpkg-deb -c)"
# Owners as numbers: dpkg-deb -b (packaging/build-deb) also writes the names.
dpkg-deb --fsys-tarfile "$DEB" | tar --numeric-owner -tvf - | awk '{print $1, $2, $6}' | sed 's#\./#/#' >"$T/contents"
expected_files=(
    /usr/bin/notesd
    /etc/notesd/notesd.toml
    /etc/nginx/sites-available/notesd
    /usr/lib/systemd/system/notesd.service
    /usr/lib/systemd/system/notesd.socket
    /usr/lib/sysusers.d/notesd.conf
    /usr/lib/tmpfiles.d/notesd.conf
    /usr/share/man/man1/notesd.1.gz
    /usr/share/man/man1/notesd-serve.1.gz
    /usr/share/man/man1/notesd-migrate.1.gz
    /usr/share/bash-completion/completions/notesd
    /usr/share/zsh/vendor-completions/_notesd
    /usr/share/fish/vendor_completions.d/notesd.fish
    /usr/share/doc/notesd/README.md
    /usr/share/doc/notesd/copyright
    /usr/share/doc/notesd/changelog.Debian.gz
    /usr/share/lintian/overrides/notesd
)
for f in "${expected_files[@]}"; do
    grep -q " $f\$" "$T/contents" || fail "$f is not in the package"
done
grep -q '^-rwxr-xr-x 0/0 /usr/bin/notesd$' "$T/contents" || fail "/usr/bin/notesd is not 0755 root:root"
grep -q '^-rw-r----- 0/0 /etc/notesd/notesd.toml$' "$T/contents" || fail "notesd.toml is not shipped 0640"
unexpected=$(awk '$1 !~ /^d/ {print $3}' "$T/contents" | grep -Ev '^/(usr/bin/notesd|etc/notesd/notesd\.toml|etc/nginx/sites-available/notesd|usr/lib/systemd/system/notesd\.(service|socket)|usr/lib/(sysusers|tmpfiles)\.d/notesd\.conf|usr/share/man/man1/notesd[a-z-]*\.1\.gz|usr/share/(bash-completion|zsh|fish)/.*notesd.*|usr/share/doc/notesd/.*|usr/share/lintian/overrides/notesd)$' || true)
[[ -z $unexpected ]] || fail "unexpected files in the package: $unexpected"
measured "files in the package" "$(awk '$1 !~ /^d/' "$T/contents" | wc -l)"
measured "/usr/bin/notesd in the package" "$(dpkg-deb -c "$DEB" | awk '$6 == "./usr/bin/notesd" {print $3}') bytes (stripped; debug info in the -dbgsym .ddeb)"
dpkg-deb -e "$DEB" "$T/control"
for script in preinst postinst prerm postrm; do
    [[ ! -e $T/control/$script ]] || sh -n "$T/control/$script" || fail "$script: syntax error"
done
check "conffiles of the .deb" diff <(sort "$T/control/conffiles") <(printf '%s\n' /etc/nginx/sites-available/notesd /etc/notesd/notesd.toml)
# md5sums (packaging/build-deb): every file but the conffiles, as dh_md5sums
# writes it, and right.
[[ -s $T/control/md5sums ]] || fail "no md5sums control file (packaging/build-deb adds it to what cargo deb makes)"
mkdir "$T/data"
dpkg-deb -x "$DEB" "$T/data"
check "md5sums lists every file but the conffiles" diff <(awk '{print $2}' "$T/control/md5sums" | sort) \
    <(cd "$T/data" && find . -type f ! -path ./etc/notesd/notesd.toml ! -path ./etc/nginx/sites-available/notesd -printf '%P\n' | sort)
(cd "$T/data" && md5sum --quiet -c "$T/control/md5sums") || fail "md5sums does not match the files"
# Debian's changelog: its latest entry is this package's version.
changelog_version=$(zcat "$T/data/usr/share/doc/notesd/changelog.Debian.gz" | sed -n '1s/^notesd (\([^)]*\)).*/\1/p')
[[ $changelog_version == "$(dpkg-deb -f "$DEB" Version)" ]] ||
    fail "changelog.Debian.gz's latest entry is '$changelog_version', the package $(dpkg-deb -f "$DEB" Version): add an entry to packaging/debian/changelog"
measured "md5sums, changelog" "$(wc -l <"$T/control/md5sums") files summed; changelog at $changelog_version"

# ---------------------------------------------------------------- lintian
say "lintian"
# Errors and warnings (E:, W:) fail the test: fix the cause, or override the
# tag in packaging/debian/notesd.lintian-overrides with a comment that says why
# (shown below, before its O: line). `lintian -i` explains each tag. Lintian's
# own --fail-on would count the overridden tags it shows, hence the grep; a
# nonzero exit is lintian itself failing.
lintian_rc=0
timeout 600 lintian --tag-display-limit 0 --display-info --show-overrides --fail-on none "$DEB" >"$T/lintian" 2>&1 || lintian_rc=$?
sed 's/^/    /' "$T/lintian"
((lintian_rc == 0)) || fail "lintian exited $lintian_rc"
if grep -Eq '^[EW]: ' "$T/lintian"; then
    fail "lintian: $(grep -c '^E: ' "$T/lintian" || true) errors, $(grep -c '^W: ' "$T/lintian" || true) warnings"
fi
measured "lintian" "no errors or warnings; $(grep -c '^O: ' "$T/lintian" || true) overridden, $(grep -c '^I: ' "$T/lintian" || true) info"

# ---------------------------------------------------------------- install
say "dpkg -i (first install)"
INSTALLED=1
timeout 180 dpkg -i "$DEB" </dev/null >"$T/dpkg-install.log" 2>&1 || fail "dpkg -i failed: $(tail -n 20 "$T/dpkg-install.log")"
[[ $(dpkg-query -W -f='${db:Status-Abbrev}' notesd) == "ii " ]] || fail "notesd is not installed and configured"
measured "installed version" "$(dpkg-query -W -f='${Version}' notesd)"

say "installed layout (dpkg -L), conffiles, permissions, user"
# Minimal images tell dpkg not to install docs and man pages (path-exclude in
# /etc/dpkg/dpkg.cfg.d/); such files are listed but legitimately absent.
dpkg_excluded() { # dpkg_excluded PATH: true if dpkg's path-exclude (not path-include) filters it
    local kind glob excluded=1
    while read -r kind glob; do
        # shellcheck disable=SC2053 # glob match on purpose
        [[ $1 == $glob ]] || continue
        if [[ $kind == path-exclude ]]; then excluded=0; else excluded=1; fi
    done < <(cat /etc/dpkg/dpkg.cfg /etc/dpkg/dpkg.cfg.d/* 2>/dev/null | sed -n 's/^[[:space:]]*\(path-\(exclude\|include\)\)[[:space:]=]\+\(.*\)$/\1 \3/p')
    return $excluded
}
dpkg -L notesd >"$T/listed"
excluded=()
for f in "${expected_files[@]}"; do
    grep -qx "$f" "$T/listed" || fail "dpkg -L does not list $f"
    if dpkg_excluded "$f"; then excluded+=("$f"); continue; fi
    [[ -e $f ]] || fail "$f is listed but missing"
done
((${#excluded[@]} == 0)) || measured "not installed (dpkg path-exclude)" "${excluded[*]}"
# The installed files against the package's md5sums (and the conffiles' sums):
# nothing differs, and nothing is missing but what path-exclude kept out.
dpkg --verify notesd >"$T/verify" 2>&1 || true
while read -r line; do
    dpkg_excluded "${line##* }" || fail "dpkg --verify notesd: $line"
done <"$T/verify"
measured "dpkg --verify notesd" "$(dpkg-query --control-show notesd md5sums | wc -l) files and the conffiles as packaged"
MAN_OK=1
dpkg_excluded /usr/share/man/man1/notesd.1.gz && MAN_OK=0
dpkg-query -W -f='${Conffiles}\n' notesd | awk 'NF {print $1, ($3 == "obsolete" ? "obsolete" : "ok")}' | sort >"$T/conffiles"
check "conffiles registered: $(tr '\n' ' ' <"$T/conffiles")" \
    diff "$T/conffiles" <(printf '%s ok\n' /etc/nginx/sites-available/notesd /etc/notesd/notesd.toml)
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd notesd) || fail "no user notesd"
((uid < 1000)) || fail "notesd is not a system user (uid $uid)"
[[ $home == /var/lib/notesd && $shell == /usr/sbin/nologin ]] || fail "notesd: home $home, shell $shell"
[[ $(getent group notesd | cut -d: -f3) == "$gid" ]] || fail "notesd's primary group is not notesd"
getent group www-data >/dev/null || fail "no group www-data (nginx's); is nginx installed?"
measured "user" "$(id notesd), home $home, shell $shell"
stat_is() { [[ $(stat -c '%a %U:%G' "$1") == "$2" ]] || fail "$1 is $(stat -c '%a %U:%G' "$1"), expected $2"; }
stat_is /etc/notesd "750 root:notesd"
stat_is /etc/notesd/notesd.toml "640 root:notesd"
stat_is /var/lib/notesd "750 notesd:notesd"
stat_is /usr/bin/notesd "755 root:root"
stat_is /etc/nginx/sites-available/notesd "644 root:root"
setpriv --reuid=www-data --regid=www-data --clear-groups cat /etc/notesd/notesd.toml >/dev/null 2>&1 &&
    fail "www-data can read /etc/notesd/notesd.toml"
setpriv --reuid=notesd --regid=notesd --init-groups cat /etc/notesd/notesd.toml >/dev/null ||
    fail "notesd cannot read /etc/notesd/notesd.toml"
measured "/etc/notesd/notesd.toml" "$(stat -c '%a %U:%G' /etc/notesd/notesd.toml) (dpkg-statoverride: $(dpkg-statoverride --list /etc/notesd/notesd.toml))"
[[ -L /etc/systemd/system/multi-user.target.wants/notesd.service ]] || fail "notesd.service not enabled"
[[ -L /etc/systemd/system/sockets.target.wants/notesd.socket ]] || fail "notesd.socket not enabled"
((MAN_OK == 0)) || check "man notesd finds the page" man -w notesd >/dev/null
/usr/bin/notesd --version >/dev/null || fail "notesd --version"

SERVICE=$(grep -E '/systemd/system/notesd\.service$' "$T/listed")
SOCKET=$(grep -E '/systemd/system/notesd\.socket$' "$T/listed")

# ---------------------------------------------------------------- systemd-analyze
say "systemd-analyze verify + security on the installed units"
verify_man=yes
((MAN_OK)) || verify_man=no # Documentation=man:notesd(1) cannot resolve without man pages
timeout 60 systemd-analyze verify --man="$verify_man" "$SERVICE" "$SOCKET" >"$T/verify.log" 2>&1 || fail "systemd-analyze verify: $(cat "$T/verify.log")"
[[ ! -s $T/verify.log ]] || fail "systemd-analyze verify is not clean: $(cat "$T/verify.log")"
measured "systemd-analyze verify" "clean"
timeout 60 systemd-analyze security --offline=yes "$SERVICE" >"$T/security.log" 2>&1 || true
score=$(sed -n 's/.*Overall exposure level for notesd.service: \([0-9.]*\).*/\1/p' "$T/security.log")
[[ -n $score ]] || fail "no exposure level from systemd-analyze security: $(tail -n 5 "$T/security.log")"
measured "systemd-analyze security" "$score ($(grep -c '^✗' "$T/security.log") findings; ≤ 2.0 required)"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || {
    grep '^✗' "$T/security.log"
    fail "exposure $score > 2.0"
}

# ---------------------------------------------------------------- the unit, parsed
# Values of KEY= in the [Service] (or other) section of a unit file, one per line.
unit_values() { # unit_values FILE SECTION KEY
    awk -v sect="[$2]" -v key="$3" '
        /^[ \t]*[#;]/ || /^[ \t]*$/ { next }
        /^\[/ { cur = $0; next }
        cur == sect {
            if ($0 ~ /\\$/) { print "continuation lines are not supported: " $0 > "/dev/stderr"; exit 1 }
            i = index($0, "="); k = substr($0, 1, i - 1); gsub(/[ \t]/, "", k)
            if (k == key) { v = substr($0, i + 1); sub(/^[ \t]+/, "", v); print v }
        }' "$1"
}
unit_one() { # unit_one KEY [DEFAULT]: the value of a key that may appear once in [Service]
    local v
    v=$(unit_values "$SERVICE" Service "$1")
    [[ $(grep -c . <<<"$v") -le 1 ]] || fail "$1= appears more than once in $SERVICE"
    echo "${v:-${2:-}}"
}
# Split like systemd does for Exec*/Environment= (whitespace, quotes, backslashes).
split_words() { xargs -r printf '%s\n' <<<"$1"; }

U_USER=$(unit_one User)
U_GROUP=$(unit_one Group "$U_USER")
U_SUPP=$(unit_values "$SERVICE" Service SupplementaryGroups | tr ' ' '\n' | grep . | paste -sd, || true)
U_UMASK=$(unit_one UMask 0022)
U_WORKDIR=$(unit_one WorkingDirectory /)
U_SCHED=$(unit_one CPUSchedulingPolicy other)
U_RUNDIR=$(unit_one RuntimeDirectory)
U_RUNMODE=$(unit_one RuntimeDirectoryMode 0755)
U_STATEDIR=$(unit_one StateDirectory)
U_STATEMODE=$(unit_one StateDirectoryMode 0755)
U_LOGSDIR=$(unit_one LogsDirectory)
U_LOGSMODE=$(unit_one LogsDirectoryMode 0755)
U_TYPE=$(unit_one Type simple)
U_ENV=()
while read -r line; do
    [[ -n $line ]] || continue
    while read -r assignment; do U_ENV+=("$assignment"); done < <(split_words "$line")
done < <(unit_values "$SERVICE" Service Environment)
[[ $U_USER == notesd && -n $U_RUNDIR && $U_TYPE == notify ]] || fail "unexpected unit: User=$U_USER RuntimeDirectory=$U_RUNDIR Type=$U_TYPE"
[[ $(unit_one NoNewPrivileges) == yes ]] || fail "NoNewPrivileges= is not yes"

# An Exec*= line as an argv (one word per line): strip the "-" prefix (refuse
# the privileged ones, +!@:), substitute $MAINPID and the unit's Environment=.
exec_argv() { # exec_argv KEY [MAINPID [N]]: the only KEY= line, or the N-th (1-based)
    local lines line
    lines=$(unit_values "$SERVICE" Service "$1")
    if [[ -n ${3:-} ]]; then
        lines=$(sed -n "${3}p" <<<"$lines")
        [[ -n $lines ]] || fail "no $1= line number $3 in $SERVICE"
    fi
    [[ $(grep -c . <<<"$lines") == 1 ]] || fail "expected exactly one $1= in $SERVICE, got: $lines"
    line=${lines#-}
    [[ $line =~ ^[@:+!] ]] && fail "$1=$lines: prefix not supported by this test"
    line=${line//'${MAINPID}'/${2:-}}
    line=${line//'$MAINPID'/${2:-}}
    local kv
    for kv in "${U_ENV[@]}"; do
        line=${line//"\${${kv%%=*}}"/${kv#*=}}
        line=${line//"\$${kv%%=*}"/${kv#*=}}
    done
    [[ $line == *'$'* ]] && fail "$1=$lines: unresolved variable"
    split_words "$line"
}
mapfile -t EXEC_PRE < <(exec_argv ExecStartPre)
mapfile -t EXEC_START < <(exec_argv ExecStart)
measured "unit" "User=$U_USER Group=$U_GROUP SupplementaryGroups=$U_SUPP UMask=$U_UMASK"
measured "" "RuntimeDirectory=$U_RUNDIR ($U_RUNMODE) StateDirectory=$U_STATEDIR Environment=${U_ENV[*]}"
measured "" "ExecStartPre=${EXEC_PRE[*]} | ExecStart=${EXEC_START[*]} | ExecReload=$(unit_values "$SERVICE" Service ExecReload | paste -sd";")"

# Run a command as the unit runs its Exec lines: its user, groups, umask, working
# directory and environment, no new privileges, no capabilities. Call it in a
# subshell (it execs, so a backgrounded call's $! is the command's pid).
unit_exec() {
    umask "$U_UMASK"
    cd "$U_WORKDIR"
    local groups=(--clear-groups)
    [[ -n $U_SUPP ]] && groups=(--groups "$U_SUPP")
    # CPUSchedulingPolicy= (other, batch, idle), set by systemd before the exec.
    exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME="$home" USER="$U_USER" LOGNAME="$U_USER" SHELL="$shell" "${U_ENV[@]}" \
        chrt "--$U_SCHED" 0 \
        setpriv --reuid="$U_USER" --regid="$U_GROUP" "${groups[@]}" \
        --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
}
as_unit() { (unit_exec "$@"); }

# What systemd creates before ExecStartPre: RuntimeDirectory, StateDirectory, LogsDirectory.
install -d -o "$U_USER" -g "$U_GROUP" -m "$U_RUNMODE" "/run/$U_RUNDIR" && MADE_RUNDIR=1
[[ -n $U_LOGSDIR ]] && install -d -o "$U_USER" -g "$U_GROUP" -m "$U_LOGSMODE" "/var/log/$U_LOGSDIR" && MADE_LOGSDIR=1
[[ -z $U_STATEDIR ]] || stat_is "/var/lib/$U_STATEDIR" "${U_STATEMODE#0} $U_USER:$U_GROUP"

# ---------------------------------------------------------------- database + the documented edits
say "fresh database $DB; the documented edits (database.url, server_name)"
timeout 30 "${PSQL[@]}" -c "CREATE DATABASE \"$DB\"" && MADE_DB=1
URL="postgres://postgres@127.0.0.1:5432/$DB"
CONF=/etc/notesd/notesd.toml
SITE=/etc/nginx/sites-available/notesd
[[ $(grep -c '^url = ' "$CONF") == 1 ]] || fail "expected one 'url = ' line in $CONF"
[[ $(grep -c '^    server_name notes.example.com;$' "$SITE") == 1 ]] || fail "expected one server_name line in $SITE"
edit_in_place() { # edit_in_place FILE SED-SCRIPT: keep the inode, owner and mode, as an editor would
    local tmp
    tmp=$(sed "$2" "$1")
    printf '%s\n' "$tmp" >"$1"
}
edit_in_place "$CONF" "s|^url = .*|url = \"$URL\"|"
edit_in_place "$SITE" 's|^    server_name notes.example.com;$|    server_name notes.e2e.invalid;|'
stat_is "$CONF" "640 root:notesd"
as_unit /usr/bin/notesd check >"$T/check.log" 2>&1 || fail "notesd check (as $U_USER): $(cat "$T/check.log")"

# ---------------------------------------------------------------- ExecStartPre + ExecStart
say "ExecStartPre: ${EXEC_PRE[*]}"
as_unit "${EXEC_PRE[@]}" >>"$T/notesd.log" 2>&1 || fail "ExecStartPre failed"
grep -q 'applied migrations' "$T/notesd.log" || fail "ExecStartPre applied no migration on a fresh database"
as_unit "${EXEC_PRE[@]}" >"$T/migrate-again.log" 2>&1 || fail "ExecStartPre (again) failed"
grep -q 'schema is up to date' "$T/migrate-again.log" || fail "ExecStartPre is not idempotent: $(cat "$T/migrate-again.log")"
as_unit /usr/bin/notesd migrate --status >"$T/migrate-status.log" 2>&1 || fail "notesd migrate --status"
if grep -Eq ' (pending|FAILED) ' "$T/migrate-status.log"; then
    fail "migrations not applied after ExecStartPre: $(cat "$T/migrate-status.log")"
fi
measured "ExecStartPre (notesd migrate)" "$(grep -c ' applied ' "$T/migrate-status.log") migrations applied; a second run: up to date"

status_json() { timeout 5 env -i PATH=/usr/bin:/bin "${U_ENV[@]}" /usr/bin/notesd status --json 2>/dev/null; }
# Wait until generation GEN (or any, if empty) is fully ready and alone: prints ms waited.
wait_generation() { # wait_generation GEN TIMEOUT_S
    local gen=$1 deadline=$(($(now_ms) + $2 * 1000)) t0 s
    t0=$(now_ms)
    while (($(now_ms) < deadline)); do
        if s=$(status_json) && jq -e --arg g "$gen" '
            .phase == "running" and (.workers | length) == .target_workers and .target_workers > 0
            and all(.workers[]; .state == "ready" and ($g == "" or .generation == ($g | tonumber)))' \
            >/dev/null <<<"$s"; then
            echo $(($(now_ms) - t0))
            return 0
        fi
        sleep 0.05
    done
    echo "status at timeout: $(status_json || echo none)" >&2
    return 1
}

say "ExecStart: ${EXEC_START[*]} (as $U_USER, in the background)"
t0=$(now_ms)
(unit_exec "${EXEC_START[@]}") >>"$T/notesd.log" 2>&1 &
MASTER=$!
boot_ms=$(wait_generation "" 30) || fail "notesd did not get ready in 30 s"
measured "start -> all workers ready" "$(($(now_ms) - t0)) ms"
STATUS=$(status_json)
[[ $(jq .master_pid <<<"$STATUS") == "$MASTER" ]] || fail "status reports master $(jq .master_pid <<<"$STATUS"), we started $MASTER"
PIDFILE=$(sed -n 's/^pidfile = "\(.*\)"/\1/p' "$CONF")
[[ -z $PIDFILE || $(cat "$PIDFILE") == "$MASTER" ]] || fail "pidfile $PIDFILE does not hold $MASTER"
measured "master" "pid $MASTER, uid $(stat -c %U "/proc/$MASTER"), generation $(jq .generation <<<"$STATUS"), $(jq .target_workers <<<"$STATUS") workers"
[[ $(stat -c %U "/proc/$MASTER") == "$U_USER" ]] || fail "master does not run as $U_USER"
SOCK=/run/notesd/notesd.sock
[[ -S $SOCK ]] || fail "no socket at $SOCK"
stat_is "$SOCK" "660 notesd:www-data"
measured "socket" "$SOCK $(stat -c '%a %U:%G' "$SOCK")"
as_unit /usr/bin/notesd healthcheck >/dev/null || fail "notesd healthcheck"

# ---------------------------------------------------------------- nginx with the installed site
say "nginx (Debian's) with the installed site, on 127.0.0.1:$PORT"
NG=$T/nginx
mkdir -p "$NG/logs" "$NG/sites" "$NG/tmp"
# Debian's stock /etc/nginx/nginx.conf (nginx-common), with the pid, logs, temp
# paths and the site include moved into the temp prefix.
cat >"$NG/nginx.conf" <<EOF
user www-data;
worker_processes auto;
pid $NG/nginx.pid;
error_log $NG/logs/error.log;
include /etc/nginx/modules-enabled/*.conf;

events {
	worker_connections 768;
}

http {
	sendfile on;
	tcp_nopush on;
	types_hash_max_size 2048;

	include /etc/nginx/mime.types;
	default_type application/octet-stream;

	ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
	ssl_prefer_server_ciphers on;

	access_log $NG/logs/access.log;

	gzip on;

	client_body_temp_path $NG/tmp/body;
	proxy_temp_path $NG/tmp/proxy;
	fastcgi_temp_path $NG/tmp/fastcgi;
	uwsgi_temp_path $NG/tmp/uwsgi;
	scgi_temp_path $NG/tmp/scgi;

	include $NG/sites/*;
}
EOF
# The installed site (with the server_name edit); only the listen addresses (a
# high port on loopback) and the log paths (into the temp prefix) change.
v6_listen="listen [::1]:$PORT;"
[[ -e /proc/net/if_inet6 ]] || v6_listen="# (no IPv6 here)"
sed -e "s|^    listen 80;|    listen 127.0.0.1:$PORT;|" \
    -e "s|^    listen \[::\]:80;|    $v6_listen|" \
    -e "s|/var/log/nginx/|$NG/logs/|" "$SITE" >"$NG/sites/notesd"
echo "    changes to the installed site for this test:"
diff -u "$SITE" "$NG/sites/notesd" | grep '^[-+][^-+]' | sed 's/^/      /' || true
grep -q 'server_name notes.e2e.invalid;' "$NG/sites/notesd" || fail "the site copy lacks the server_name edit"
timeout 20 nginx -t -q -e "$NG/logs/error.log" -p "$NG/" -c "$NG/nginx.conf" 2>"$T/nginx-t.log" ||
    fail "nginx -t: $(cat "$T/nginx-t.log")"
timeout 20 nginx -e "$NG/logs/error.log" -p "$NG/" -c "$NG/nginx.conf" || fail "nginx did not start"
for _ in $(seq 50); do [[ -s $NG/nginx.pid ]] && break; sleep 0.1; done
NGINX_PID=$(cat "$NG/nginx.pid")
for _ in $(seq 50); do curl -s -o /dev/null --max-time 1 "$BASE/healthz" && break; sleep 0.1; done

# ---------------------------------------------------------------- through nginx
CURL=(curl -sS --max-time 10)
say "through nginx: notes, gzip, headers, request ids, limits"
body=$("${CURL[@]}" "$BASE/")
[[ $(jq -r .message <<<"$body") == "Hello, production!" ]] || fail "GET / answered: $body"
"${CURL[@]}" -D "$T/h.post" -o "$T/b.post" -X POST "$BASE/api/notes" \
    -H 'Content-Type: application/json' -d '{"title": "from e2e", "body": "through nginx"}'
code=$(awk 'NR == 1 {print $2}' "$T/h.post")
loc=$(awk 'tolower($1) == "location:" {print $2}' "$T/h.post" | tr -d '\r')
id=$(jq .id "$T/b.post")
[[ $code == 201 && -n $loc && $id =~ ^[0-9]+$ ]] || fail "POST /api/notes: $code, Location '$loc', body $(cat "$T/b.post")"
[[ $loc == http* ]] || loc="$BASE$loc"
got=$("${CURL[@]}" "$loc")
[[ $(jq -r .title <<<"$got") == "from e2e" && $(jq .id <<<"$got") == "$id" ]] || fail "GET $loc: $got"
measured "POST /api/notes" "201, Location $loc; GET it back: title \"from e2e\""

as_unit /usr/bin/notesd seed --count 500 >>"$T/notesd.log" 2>&1 || fail "notesd seed --count 500"
"${CURL[@]}" -D "$T/h.gz" -o "$T/b.gz" -H 'Accept-Encoding: gzip' "$BASE/api/notes?limit=200"
grep -qi '^content-encoding: gzip' "$T/h.gz" || fail "no Content-Encoding: gzip on a 200-note list: $(cat "$T/h.gz")"
grep -qi '^vary: accept-encoding' "$T/h.gz" || fail "no Vary: Accept-Encoding"
n=$(gzip -dc "$T/b.gz" | jq length)
[[ $n == 200 ]] || fail "the gzipped list has $n notes, expected 200"
plain=$("${CURL[@]}" "$BASE/api/notes?limit=200" | wc -c)
measured "gzip" "200 notes: $(stat -c %s "$T/b.gz") bytes gzipped, $plain plain"

hdrs() { "${CURL[@]}" -o /dev/null -D - "$@" | tr -d '\r'; }
for target in "$BASE/healthz" "$BASE/api/notes/999999999"; do
    h=$(hdrs "$target")
    for want in 'X-Content-Type-Options: nosniff' 'X-Frame-Options: DENY' 'Referrer-Policy: no-referrer'; do
        grep -qi "^$want\$" <<<"$h" || fail "$target: missing '$want' in: $h"
    done
done
measured "security headers" "on 200 and 404: nosniff, DENY, no-referrer"
[[ $(hdrs -H 'X-Request-Id: e2e-trace-1' "$BASE/healthz" | sed -n 's/^[Xx]-[Rr]equest-[Ii]d: //p') == e2e-trace-1 ]] ||
    fail "the client's X-Request-Id is not passed through"
rid=$(hdrs "$BASE/healthz" | sed -n 's/^[Xx]-[Rr]equest-[Ii]d: //p')
[[ $rid =~ ^[0-9a-f]{32}$ ]] || fail "no nginx request id in X-Request-Id: '$rid'"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$BASE/metrics")
[[ $code == 200 ]] || fail "/metrics from 127.0.0.1: $code"
code=$(head -c 1100000 /dev/zero | tr '\0' x | "${CURL[@]}" -o /dev/null -w '%{http_code}' -X POST \
    -H 'Content-Type: application/json' --data-binary @- "$BASE/api/notes")
[[ $code == 413 ]] || fail "a 1.1 MB body: $code, expected 413 from nginx"
sleep 0.3
grep -q " rid=$rid" "$NG/logs/notesd.access.log" || fail "the access log lacks rid=$rid"
grep -q 'uct=0' "$NG/logs/notesd.access.log" || fail "the access log lacks upstream timings"
measured "request id, limits" "X-Request-Id kept/added ($rid), /metrics 200 locally, 1.1 MB → 413, access log: uct/urt/rid"

# ---------------------------------------------------------------- reload under load
# A reload (the unit's ExecReload) while wrk (or curl loops) read notes and a
# curl loop writes them (10/s, under the write rate limit) through nginx.
# Every request must succeed; prints requests, failures, time to new generation.
reload_under_load() { # reload_under_load LABEL
    local label=$1 gen0 gen1 pids0 reload_ms t0 w i n_reload
    local -a reload
    STATUS=$(status_json) || fail "status"
    gen0=$(jq .generation <<<"$STATUS")
    pids0=$(jq -r '[.workers[].pid] | sort | join(" ")' <<<"$STATUS")
    n_reload=$(unit_values "$SERVICE" Service ExecReload | grep -c .)
    rm -f "$T"/load.*
    touch "$T/load.on"
    LOAD_PIDS=()
    if command -v wrk >/dev/null; then
        timeout 60 wrk -t2 -c16 -d12s --timeout 5s "$BASE/api/notes?limit=20" >"$T/load.wrk" 2>&1 &
        LOAD_PIDS+=($!)
    else
        for w in 1 2 3 4; do
            (for _ in $(seq 3000); do
                [[ -e $T/load.on ]] || break
                curl -s -o /dev/null --max-time 5 -w '%{http_code}\n' "$BASE/api/notes?limit=20" || echo "000"
            done >"$T/load.get.$w") &
            LOAD_PIDS+=($!)
        done
    fi
    (for i in $(seq 600); do
        [[ -e $T/load.on ]] || break
        curl -s -o /dev/null --max-time 5 -w '%{http_code}\n' -X POST -H 'Content-Type: application/json' \
            -d "{\"title\": \"load $label $i\"}" "$BASE/api/notes" || echo "000"
        sleep 0.1
    done >"$T/load.post") &
    LOAD_PIDS+=($!)
    sleep 2
    t0=$(now_ms)
    # Every ExecReload= line in order, as systemd runs them (each must succeed).
    for ((i = 1; i <= n_reload; i++)); do
        mapfile -t reload < <(exec_argv ExecReload "$MASTER" "$i")
        as_unit "${reload[@]}" || fail "ExecReload (${reload[*]}) failed"
    done
    # Serving: the new generation's workers are all ready. Done: the old ones
    # have drained and exited (idle keep-alive connections end when nginx's
    # upstream keepalive_timeout closes them, so this takes a few seconds).
    local serving_ms="" deadline=$(($(now_ms) + 40000)) st
    while (($(now_ms) < deadline)); do
        st=$(status_json) || st='{}'
        if [[ -z $serving_ms ]] && jq -e --argjson g $((gen0 + 1)) \
            '.target_workers as $t | [.workers[]? | select(.generation == $g and .state == "ready")] | length == $t' \
            >/dev/null 2>&1 <<<"$st"; then
            serving_ms=$(($(now_ms) - t0))
        fi
        if jq -e --argjson g $((gen0 + 1)) '.phase == "running" and (.workers | length) == .target_workers
            and all(.workers[]; .generation == $g and .state == "ready")' >/dev/null 2>&1 <<<"$st"; then
            break
        fi
        sleep 0.05
    done
    reload_ms=$(($(now_ms) - t0))
    ((reload_ms < 40000)) || fail "$label: the reload did not complete in 40 s: $st"
    sleep 1 # keep the load on the new generation for a while
    rm -f "$T/load.on"
    for w in "${LOAD_PIDS[@]}"; do wait "$w" || true; done
    LOAD_PIDS=()
    STATUS=$(status_json)
    gen1=$(jq .generation <<<"$STATUS")
    local pids1 left
    pids1=$(jq -r '[.workers[].pid] | sort | join(" ")' <<<"$STATUS")
    left=$(comm -12 <(tr ' ' '\n' <<<"$pids0" | sort) <(tr ' ' '\n' <<<"$pids1" | sort) | paste -sd' ')
    [[ -z $left ]] || fail "$label: old workers still in the new generation: $left"
    local gets=0 get_fail=0 posts post_fail
    if [[ -f $T/load.wrk ]]; then
        gets=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$T/load.wrk")
        local non2xx sockerr
        non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$T/load.wrk")
        sockerr=$(sed -n 's/^ *Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1+\2+\3+\4/p' "$T/load.wrk")
        [[ -n $gets ]] || fail "$label: cannot read wrk's output: $(cat "$T/load.wrk")"
        get_fail=$((${non2xx:-0} + ${sockerr:-0}))
    else
        gets=$(cat "$T"/load.get.* | wc -l)
        get_fail=$(cat "$T"/load.get.* | grep -vc '^200$' || true)
    fi
    posts=$(wc -l <"$T/load.post")
    post_fail=$(grep -vc '^201$' "$T/load.post" || true)
    measured "$label: ExecReload -> new gen. serving" "${serving_ms:-?} ms (generation $gen0 → $gen1, workers [$pids0] → [$pids1])"
    measured "$label: ExecReload -> old gen. gone" "$reload_ms ms (the old workers drained and exited)"
    measured "$label: GET during the reload" "$gets requests, $get_fail failed (non-2xx or connection errors)$([[ -f $T/load.wrk ]] && echo ", wrk: $(sed -n 's/^Requests\/sec: *//p' "$T/load.wrk") req/s")"
    measured "$label: POST during the reload" "$posts requests, $post_fail failed"
    ((gets > 0 && posts > 0)) || fail "$label: no load was generated"
    ((get_fail == 0 && post_fail == 0)) || {
        [[ -f $T/load.wrk ]] && cat "$T/load.wrk"
        sort "$T/load.post" | uniq -c
        fail "$label: $get_fail GET and $post_fail POST requests failed during the reload"
    }
}
say "reload (ExecReload) under load"
reload_under_load "reload"

say "write rate limit (limit_req on POST/PUT/PATCH/DELETE only)"
# 150 requests at once from one curl (parallel transfers): rate 20 r/s with a
# burst of 40 lets roughly the first 40 writes through, and limits the rest.
burst() { # burst METHOD: print one status code per request
    local args=() i
    for i in $(seq 150); do args+=(-o /dev/null "$BASE/api/notes?limit=5&i=$i"); done
    if [[ $1 == POST ]]; then
        curl -s --max-time 20 -Z --parallel-immediate --parallel-max 150 -w '%{http_code}\n' \
            -X POST -H 'Content-Type: application/json' -d '{"title": "burst"}' "${args[@]}" || true
    else
        curl -s --max-time 20 -Z --parallel-immediate --parallel-max 150 -w '%{http_code}\n' "${args[@]}" || true
    fi
}
burst POST >"$T/burst"
ok=$(grep -c '^201$' "$T/burst" || true)
limited=$(grep -c '^429$' "$T/burst" || true)
((ok >= 20 && limited >= 1 && ok + limited == 150)) || fail "150 parallel POSTs: $(sort "$T/burst" | uniq -c | tr '\n' ' ')"
burst GET >"$T/burst.get"
[[ $(grep -c '^200$' "$T/burst.get" || true) == 150 ]] || fail "150 parallel GETs were limited: $(sort "$T/burst.get" | uniq -c | tr '\n' ' ')"
measured "150 parallel POSTs / GETs" "$ok x 201 + $limited x 429 / 150 x 200"

# ---------------------------------------------------------------- upgrade path
say "dpkg -i again (upgrade path, notesd running)"
master_exe0=$(readlink "/proc/$MASTER/exe")
timeout 180 dpkg -i "$DEB" </dev/null >"$T/dpkg-upgrade.log" 2>&1 || fail "dpkg -i (upgrade) failed: $(tail -n 20 "$T/dpkg-upgrade.log")"
[[ $(dpkg-query -W -f='${db:Status-Abbrev}' notesd) == "ii " ]] || fail "notesd not installed after the upgrade"
grep -qx "url = \"$URL\"" "$CONF" || fail "the upgrade lost the database.url edit: $(grep '^url' "$CONF")"
grep -q '^    server_name notes.e2e.invalid;$' "$SITE" || fail "the upgrade lost the server_name edit"
[[ ! -e $CONF.dpkg-dist && ! -e $SITE.dpkg-dist ]] || fail "dpkg left .dpkg-dist files"
stat_is "$CONF" "640 root:notesd"
stat_is /etc/notesd "750 root:notesd"
measured "upgrade" "conffile edits kept (database.url, server_name); $CONF $(stat -c '%a %U:%G' "$CONF")"
measured "master binary after upgrade" "$(readlink "/proc/$MASTER/exe") (was $master_exe0)"
reload_under_load "reload after upgrade"
for p in $(jq -r '.workers[].pid' <<<"$STATUS"); do
    exe=$(readlink "/proc/$p/exe")
    [[ $exe == /usr/bin/notesd ]] || fail "worker $p runs $exe, not the upgraded /usr/bin/notesd"
done
measured "workers after the reload" "exec the upgraded /usr/bin/notesd (not the deleted old inode)"

# ---------------------------------------------------------------- healthcheck + TERM
say "notesd healthcheck, then TERM the master"
as_unit /usr/bin/notesd healthcheck >/dev/null || fail "notesd healthcheck after the upgrade"
workers=$(jq -r '.workers[].pid' <<<"$STATUS")
t0=$(now_ms)
kill -TERM "$MASTER"
for _ in $(seq 450); do kill -0 "$MASTER" 2>/dev/null || break; sleep 0.1; done
kill -0 "$MASTER" 2>/dev/null && fail "master still running 45 s after TERM"
rc=0
wait "$MASTER" || rc=$?
MASTER=""
measured "TERM -> master exit" "$(($(now_ms) - t0)) ms, exit $rc"
((rc == 0)) || fail "master exited $rc after TERM"
for p in $workers; do kill -0 "$p" 2>/dev/null && fail "worker $p outlived its master"; done
[[ ! -e $SOCK ]] || fail "$SOCK still exists after a clean exit"
[[ ! -e /run/notesd/control.sock ]] || fail "control.sock still exists after a clean exit"
grep -Eq '(ERROR|panicked)' "$T/notesd.log" && fail "errors in notesd's log: $(grep -E '(ERROR|panicked)' "$T/notesd.log" | head -5)"

# ---------------------------------------------------------------- the sandbox vs. what notesd does
# Without systemd as PID 1 the unit's seccomp filter and address-family list are
# not applied here, so check them the other way round: trace the unit's
# ExecStartPre and ExecStart (start, requests, a reload, TERM) and require every
# system call and socket family they use to be allowed by the installed unit.
syscall_names() { # syscall_names NAME|@GROUP...: expand into system call names
    local x
    for x in "$@"; do
        if [[ $x == @* ]]; then
            systemd-analyze syscall-filter "$x" | awk 'NR > 1 && $1 !~ /^#/ && NF {print $1}' |
                while read -r y; do syscall_names "$y"; done
        else
            echo "$x"
        fi
    done
}
if command -v strace >/dev/null; then
    say "system calls and socket families used vs. the unit's SystemCallFilter=/RestrictAddressFamilies="
    # The filter, evaluated as systemd does: the first line sets the mode
    # (allow-list, or deny-list with ~); later lines add to or remove from it.
    mode=""
    : >"$T/filter"
    while read -r line; do
        [[ -n $line ]] || continue
        neg=0
        [[ $line == '~'* ]] && neg=1 && line=${line#'~'}
        [[ -n $mode ]] || mode=$([[ $neg == 1 ]] && echo deny || echo allow)
        read -ra words <<<"$line"
        syscall_names "${words[@]}" | sort -u >"$T/filter.part"
        if [[ ($mode == allow && $neg == 0) || ($mode == deny && $neg == 1) ]]; then
            sort -u "$T/filter" "$T/filter.part" -o "$T/filter"
        else
            comm -23 "$T/filter" "$T/filter.part" >"$T/filter.tmp" && mv "$T/filter.tmp" "$T/filter"
        fi
    done < <(unit_values "$SERVICE" Service SystemCallFilter)
    [[ -n $mode ]] || fail "no SystemCallFilter= in the unit"
    install -d -o "$U_USER" -g "$U_GROUP" -m 0700 "$T/trace"
    as_unit strace -f -qq -o "$T/trace/pre" "${EXEC_PRE[@]}" >>"$T/notesd.log" 2>&1 || fail "traced ExecStartPre failed"
    (unit_exec strace -f -qq -o "$T/trace/start" "${EXEC_START[@]}") >>"$T/notesd.log" 2>&1 &
    TRACER=$!
    LOAD_PIDS=("$TRACER")
    wait_generation "" 60 >/dev/null || fail "traced notesd did not get ready"
    MASTER=$(cat "$PIDFILE")
    for _ in 1 2 3; do
        "${CURL[@]}" -o /dev/null "$BASE/api/notes?limit=50"
        "${CURL[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' -d '{"title": "traced"}' "$BASE/api/notes"
    done
    "${CURL[@]}" -o /dev/null "$BASE/metrics"
    as_unit /usr/bin/notesd status >/dev/null
    gen=$(jq .generation <<<"$(status_json)")
    kill -HUP "$MASTER"
    wait_generation $((gen + 1)) 60 >/dev/null || fail "traced notesd: reload did not complete"
    kill -TERM "$MASTER"
    for _ in $(seq 450); do kill -0 "$TRACER" 2>/dev/null || break; sleep 0.1; done
    rc=0
    wait "$TRACER" || rc=$?
    MASTER="" LOAD_PIDS=()
    ((rc == 0)) || fail "traced notesd exited $rc after TERM"
    cat "$T"/trace/* | sed -n 's/^[0-9]\+ \+\([a-z0-9_]\+\)(.*/\1/p' | sort -u >"$T/syscalls.used"
    if [[ $mode == allow ]]; then
        denied=$(comm -23 "$T/syscalls.used" "$T/filter" | paste -sd' ')
    else
        denied=$(comm -12 "$T/syscalls.used" "$T/filter" | paste -sd' ')
    fi
    [[ -z $denied ]] || fail "notesd uses system calls the unit's SystemCallFilter= denies: $denied"
    families=$(cat "$T"/trace/* | sed -n 's/^[0-9]\+ \+socket(\(AF_[A-Z0-9]*\).*/\1/p' | sort -u | paste -sd' ')
    allowed_families=" $(unit_one RestrictAddressFamilies) "
    for f in $families; do
        [[ $allowed_families == *" $f "* ]] || fail "notesd opens $f sockets; RestrictAddressFamilies=$allowed_families"
    done
    # ProtectSystem=strict: writes only to the unit's directories (and PrivateTmp);
    # ProcSubset=pid: only per-process /proc entries; ProtectHome=yes: no /home, /root.
    writable="/run/$U_RUNDIR/ /var/lib/$U_STATEDIR/ /var/log/$U_LOGSDIR/ /tmp/ /var/tmp/ /dev/null"
    cat "$T"/trace/* | grep -E '^[0-9]+ +(openat\(AT_FDCWD, "[^"]*", [^)]*(O_WRONLY|O_RDWR|O_CREAT)|(bind|unlink|rename|mkdir|chmod|fchmodat|chown|fchownat|truncate|link|symlink)(at2?)?\()' |
        grep -oE '"/[^"]*"' | tr -d '"' | sort -u >"$T/paths.written"
    cat "$T"/trace/* | grep -oE '"/(proc|home|root)(/[^"]*)?"' | tr -d '"' | sort -u >"$T/paths.special"
    while read -r path; do
        ok=0
        for w in $writable; do [[ $path == "$w"* || $path == "$w" ]] && ok=1; done
        ((ok)) || fail "notesd writes $path, outside what ProtectSystem=strict leaves writable ($writable)"
    done <"$T/paths.written"
    while read -r path; do
        [[ $path =~ ^/proc/(self|thread-self|[0-9]+)(/|$) ]] ||
            fail "notesd accesses $path (hidden by ProcSubset=pid / ProtectHome=yes)"
    done <"$T/paths.special"
    measured "files written" "$(paste -sd' ' "$T/paths.written") (all within $writable)"
    measured "system calls used (migrate, serve)" "$(wc -l <"$T/syscalls.used"), all allowed by SystemCallFilter= ($(wc -l <"$T/filter") allowed)"
    measured "needs @chown (in @privileged)" "$(grep -qx chown "$T/syscalls.used" && echo "yes: chown of the socket to server.socket_group" || echo no)"
    measured "socket families used" "$families (RestrictAddressFamilies=$(unit_one RestrictAddressFamilies))"
    [[ ! -e $SOCK ]] || fail "$SOCK left behind by the traced run"
fi

# ---------------------------------------------------------------- socket activation
# As notesd.socket would: a listening socket made by someone else (owner, group
# and mode from the installed socket unit) passed as LISTEN_FDS; notesd adopts
# it, serves nginx on it, and leaves it alone when it exits.
if command -v systemd-socket-activate >/dev/null; then
    say "socket activation (the installed notesd.socket's settings, via systemd-socket-activate)"
    listen=$(unit_values "$SOCKET" Socket ListenStream)
    s_user=$(unit_values "$SOCKET" Socket SocketUser)
    s_group=$(unit_values "$SOCKET" Socket SocketGroup)
    s_mode=$(unit_values "$SOCKET" Socket SocketMode)
    [[ $listen == "$SOCK" ]] || fail "notesd.socket listens on $listen, the config binds $SOCK"
    env_args=()
    for kv in "${U_ENV[@]}"; do env_args+=(-E "$kv"); done
    (
        umask "$U_UMASK"
        cd "$U_WORKDIR"
        exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin systemd-socket-activate -l "$listen" \
            -E PATH -E HOME="$home" -E USER="$U_USER" "${env_args[@]}" \
            setpriv --reuid="$U_USER" --regid="$U_GROUP" ${U_SUPP:+--groups "$U_SUPP"} \
            --no-new-privs --inh-caps=-all --bounding-set=-all -- "${EXEC_START[@]}"
    ) >>"$T/notesd-activated.log" 2>&1 &
    MASTER=$!
    for _ in $(seq 50); do [[ -S $listen ]] && break; sleep 0.1; done
    chown "$s_user:$s_group" "$listen"
    chmod "$s_mode" "$listen"
    ino0=$(stat -c %i "$listen")
    # The first connection starts notesd (systemd-socket-activate, like systemd,
    # execs the service on the first connection attempt); it waits in the backlog.
    t0=$(now_ms)
    code=$(curl -sS --max-time 30 -o /dev/null -w '%{http_code}' "$BASE/api/notes?limit=5")
    first_ms=$(($(now_ms) - t0))
    [[ $code == 200 ]] || fail "through nginx on the activated socket: $code"
    wait_generation "" 30 >/dev/null || fail "socket-activated notesd did not get ready"
    grep -q 'socket activation' "$T/notesd-activated.log" || fail "notesd did not adopt LISTEN_FDS: $(tail -n 5 "$T/notesd-activated.log")"
    kill -TERM "$MASTER"
    for _ in $(seq 450); do kill -0 "$MASTER" 2>/dev/null || break; sleep 0.1; done
    rc=0
    wait "$MASTER" || rc=$?
    MASTER=""
    ((rc == 0)) || fail "socket-activated master exited $rc after TERM"
    [[ -S $listen && $(stat -c %i "$listen") == "$ino0" ]] || fail "notesd removed the socket systemd gave it"
    measured "socket activation" "adopted LISTEN_FDS ($listen $s_mode $s_user:$s_group); first request, queued while notesd started: 200 in $first_ms ms; TERM: exit 0, socket left in place"
    rm -f "$listen"
fi

stop_pid "$NGINX_PID" QUIT 10
NGINX_PID=""

# ---------------------------------------------------------------- remove, then purge
say "dpkg -r keeps data and config"
timeout 120 dpkg -r notesd </dev/null >"$T/dpkg-remove.log" 2>&1 || fail "dpkg -r failed: $(tail -n 20 "$T/dpkg-remove.log")"
[[ $(dpkg-query -W -f='${db:Status-Abbrev}' notesd) == "rc " ]] || fail "after dpkg -r: $(dpkg-query -W -f='${db:Status-Abbrev}' notesd)"
[[ ! -e /usr/bin/notesd ]] || fail "/usr/bin/notesd survived dpkg -r"
grep -qx "url = \"$URL\"" "$CONF" || fail "dpkg -r lost the config"
[[ -d /var/lib/notesd && -f $SITE ]] || fail "dpkg -r removed data or the nginx site"
getent passwd notesd >/dev/null || fail "dpkg -r removed the user"
measured "dpkg -r" "binary gone; config, site, /var/lib/notesd, user kept"

say "dpkg --purge removes what the install created"
# A sites-enabled link, as the README has the operator create: purge removes it.
ln -s /etc/nginx/sites-available/notesd /etc/nginx/sites-enabled/notesd
timeout 120 dpkg --purge notesd </dev/null >"$T/dpkg-purge.log" 2>&1 || fail "dpkg --purge failed: $(tail -n 20 "$T/dpkg-purge.log")"
INSTALLED=0
MADE_RUNDIR=0
MADE_LOGSDIR=0
st=$(dpkg-query -W -f='${db:Status-Status}' notesd 2>/dev/null || true)
[[ -z $st || $st == not-installed ]] || fail "after purge, dpkg says: $st"
getent passwd notesd >/dev/null && fail "user notesd survived the purge"
getent group notesd >/dev/null && fail "group notesd survived the purge"
for p in /etc/notesd /var/lib/notesd /var/log/notesd /run/notesd "$SITE" /etc/nginx/sites-enabled/notesd \
    /etc/systemd/system/multi-user.target.wants/notesd.service /etc/systemd/system/sockets.target.wants/notesd.socket; do
    [[ -e $p || -L $p ]] && fail "$p survived the purge"
done
dpkg-statoverride --list | grep -q notesd && fail "statoverrides survived the purge: $(dpkg-statoverride --list | grep notesd)"
ls /var/lib/systemd/deb-systemd-helper-enabled 2>/dev/null | grep -q notesd &&
    fail "deb-systemd-helper state survived the purge"
measured "dpkg --purge" "user, group, /etc/notesd, /var/lib/notesd, /var/log/notesd, /run/notesd, site + link, unit links gone"
say "all checks passed"
