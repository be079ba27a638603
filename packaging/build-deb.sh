#!/usr/bin/env bash
# Build target/debian/notesd_*.deb: release binary, man pages and completions
# generated from the clap definitions, then cargo-deb (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release --locked
rm -rf target/assets
target/release/notesd generate-assets --out target/assets
gzip -9n target/assets/*.1
cargo deb --no-build "$@"
ls -1 target/debian/*.deb
