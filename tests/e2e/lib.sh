# Shared by the end-to-end tests (sourced; uses the caller's say, fail and $T).

# The .deb under test: $NOTESD_E2E_DEB, else one built now with
# packaging/build-deb.sh (its log in $T/build.log). Prints its absolute path.
e2e_deb() {
    local deb
    if [[ -n ${NOTESD_E2E_DEB:-} ]]; then
        deb=$NOTESD_E2E_DEB
    else
        say "building the .deb (packaging/build-deb.sh)" >&2
        timeout 1800 bash packaging/build-deb.sh >"$T/build.log" 2>&1 || {
            tail -n 40 "$T/build.log" >&2
            fail "packaging/build-deb.sh failed"
        }
        deb=$(ls -t target/debian/notesd_*.deb | head -n1)
        # Write the build's gigabytes back now, not under the timed steps.
        sync
    fi
    [[ -f $deb ]] || fail "no .deb at $deb"
    realpath "$deb"
}
