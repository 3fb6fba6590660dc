#!/usr/bin/env bash
# Build and run each fuzz target for a while; fail on any crash.
#
#   fuzz/run-smoke.sh [SECONDS_PER_TARGET]   (default 30)
#
# Runs on the project's own (stable) toolchain: cargo-fuzz passes unstable compiler flags
# (the sanitizer and coverage instrumentation), which RUSTC_BOOTSTRAP=1 lets a stable rustc
# take, so no nightly toolchain is needed. Installs cargo-fuzz if it is missing.
set -euo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
targets=(nbd_handshake nbd_request)

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz"
    cargo install --locked cargo-fuzz@0.13.2
fi

for t in "${targets[@]}"; do
    echo "== building $t"
    cargo fuzz build "$t"
done

status=0
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$(mktemp)"
    echo "== running $t for ${secs}s"
    if cargo fuzz run "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
        cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
        echo "$t: ok, ${runs:-?} executions in ${secs}s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) inputs"
    else
        status=1
        echo "$t: FAILED" >&2
        tail -n 60 "$log" >&2
    fi
    rm -f "$log"
done
exit "$status"
