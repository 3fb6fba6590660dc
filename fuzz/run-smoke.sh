#!/usr/bin/env bash
# Build and run each fuzz target for a while; fail on any crash.
#
#   fuzz/run-smoke.sh [SECONDS_PER_TARGET]   (default 30)
#
# Needs rustup with a nightly toolchain; installs cargo-fuzz if it is missing. Without a
# nightly toolchain it fails, unless CLONEBD_FUZZ_OPTIONAL=1, in which case it says so and
# exits 0.
set -euo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
targets=(nbd_handshake nbd_request)

if ! command -v rustup >/dev/null 2>&1 || ! rustup run nightly rustc --version >/dev/null 2>&1; then
    msg="fuzz smoke: no nightly Rust toolchain (install one with: rustup toolchain install nightly)"
    if [ "${CLONEBD_FUZZ_OPTIONAL:-}" = "1" ]; then
        echo "$msg; skipped because CLONEBD_FUZZ_OPTIONAL=1"
        exit 0
    fi
    echo "error: $msg" >&2
    exit 1
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

for t in "${targets[@]}"; do
    echo "== building $t"
    cargo +nightly fuzz build "$t"
done

status=0
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$(mktemp)"
    echo "== running $t for ${secs}s"
    if cargo +nightly fuzz run "$t" "$corpus" "${seeds[@]}" -- \
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
