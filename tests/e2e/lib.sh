# Shared by the end-to-end tests (sourced; uses the caller's say, fail and $T).

# The .deb under test: $NOTESD_E2E_DEB, else one built now with `cargo deb`
# as the README says (its log in $T/build.log). Prints its absolute path.
e2e_deb() {
    local deb
    if [[ -n ${NOTESD_E2E_DEB:-} ]]; then
        deb=$NOTESD_E2E_DEB
    else
        say "building the .deb (cargo deb)" >&2
        command -v cargo-deb >/dev/null || fail "cargo-deb is missing: cargo install cargo-deb --locked"
        timeout 1800 cargo deb --locked >"$T/build.log" 2>&1 || {
            tail -n 40 "$T/build.log" >&2
            fail "cargo deb failed"
        }
        deb=$(ls -t target/debian/notesd_*.deb | head -n1)
        # Write the build's gigabytes back now, not under the timed steps.
        sync
    fi
    [[ -f $deb ]] || fail "no .deb at $deb"
    realpath "$deb"
}
