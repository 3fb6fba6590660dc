#!/bin/sh
# Opening dm-clone metadata with 2^28 regions (1 TiB of 4 KiB regions, half hydrated):
# time and peak memory of a process that only opens it (docs/PERFORMANCE.md, "Metadata").
#
#   bench/metadata-open.sh [DIR]     DIR holds the 100 MiB metadata file (default: a temp dir)
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
cargo build --release -q -p clonebd-metadata --example open_metadata
bin="$CARGO_TARGET_DIR/release/examples/open_metadata"
dir="${1:-$(mktemp -d)}"
meta="$dir/meta-2e28.img"
"$bin" create "$meta" 268435456 50
for run in 1 2 3; do
    /usr/bin/time -f "run $run: %e s wall, peak RSS %M KiB" "$bin" open "$meta"
done
if [ -z "${1:-}" ]; then rm -rf "$dir"; fi
