#!/usr/bin/env bash
# Build the test suite's other notesd binaries from this tree, for the upgrade
# tests (tests/upgrade.rs, tests/e2e/systemd.sh), into target/variants/:
#
#   notesd-b           version <package>+b, with one more migration, marked
#                      backward-compatible (tests/fixtures/migrations/)
#   notesd-nohandover  the same, but it takes no handover (its
#                      `notesd handover-check` refuses every record)
#
# They differ from this tree's notesd only by build-time variables
# (NOTESD_BUILD_VERSION, NOTESD_TEST_VARIANT; see src/lib.rs), in their own
# target dir, so target/debug stays as cargo test left it. A binary is rebuilt
# only when a source is newer than it; concurrent callers wait on a lock.
# Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/variants
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
newest=$(find src migrations tests/fixtures Cargo.toml Cargo.lock -type f -printf '%T@\n' | sort -n | tail -n1)
package=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)

build() { # build NAME VERSION FLAGS
    local bin=$out/notesd-$1
    if [[ -x $bin ]] && (($(stat -c %Y "$bin") > ${newest%.*})); then
        return
    fi
    NOTESD_BUILD_VERSION=$2 NOTESD_TEST_VARIANT=$3 \
        cargo build --quiet --bin notesd --target-dir "$out/build" >&2
    cp "$out/build/debug/notesd" "$bin.tmp"
    mv "$bin.tmp" "$bin"
}
build b "$package+b" compatible-migration
build nohandover "$package+nohandover" compatible-migration,no-handover
echo "$out"
