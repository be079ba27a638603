# Shared by the end-to-end tests (sourced; uses the caller's say, fail and $T).

# The .deb under test: $NOTESD_E2E_DEB, else one built now with
# packaging/build-deb (`cargo deb`, then the md5sums control file) as the
# README says (its log in $T/build.log). Prints its absolute path.
e2e_deb() {
    local deb
    if [[ -n ${NOTESD_E2E_DEB:-} ]]; then
        deb=$NOTESD_E2E_DEB
    else
        say "building the .deb (packaging/build-deb: cargo deb + md5sums)" >&2
        command -v cargo-deb >/dev/null || fail "cargo-deb is missing: cargo install cargo-deb --locked"
        timeout 1800 packaging/build-deb --locked >"$T/build.out" 2>"$T/build.log" || {
            tail -n 40 "$T/build.log" >&2
            fail "packaging/build-deb failed"
        }
        deb=$(grep '/notesd_[^/]*\.deb$' "$T/build.out" | head -n1)
        # Write the build's gigabytes back now, not under the timed steps.
        sync
    fi
    [[ -f $deb ]] || fail "no .deb at $deb"
    realpath "$deb"
}
