#!/usr/bin/env bash
# Background hydration throughput against `qemu-img convert -t none -T none` (O_DIRECT on
# both sides) copying the same source to the same kind of destination.
#
#   bench/hydration.sh [SIZE_MIB] [DIR]     (default 1024 MiB, in a new directory under /var/tmp)
#
# Environment: DATA_PERCENT (below), ONLY_DEFAULTS=1 (only clonebd's defaults, with and
# without sparse-aware hydration), REPEAT (default 3: each time is the best of that many).
#
# With nbdcopy and qemu-nbd installed it also times `nbdcopy --flush` from qemu-nbd serving
# the source (`--cache=none`, read-only, over a unix socket) into the same kind of
# destination, the copy that skips holes by NBD block status: the ratio is nbdcopy's time
# over clonebd's defaults.
#
# For each clonebd configuration it starts `clonebd run` with hydration enabled, waits for
# `clonebd wait` to report every region hydrated and committed, and stops it; the time is
# from the start of `clonebd run` to the return of `wait`. The ratio is qemu-img's time over
# clonebd's (>= 1 means clonebd is as fast or faster). Each measurement is the best of
# REPEAT.
set -euo pipefail
size_mib="${1:-1024}"
dir="${2:-$(mktemp -d /var/tmp/clonebd-bench.XXXXXX)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p clonebd
bin="$here/target/release/clonebd"
command -v qemu-img >/dev/null || { echo "qemu-img is needed (apt-get install qemu-utils)" >&2; exit 1; }

# DATA_PERCENT (default 100): the share of the source that holds data; below 100 the
# source is a sparse file with 1 MiB of random data every 100/DATA_PERCENT MiB and holes
# between, as real disk images mostly are.
data_percent="${DATA_PERCENT:-100}"
src="$dir/src-$data_percent.img"
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" != $((size_mib << 20)) ]; then
    echo "making a ${size_mib} MiB source in $src ($data_percent % data)"
    if [ "$data_percent" -ge 100 ]; then
        head -c $((size_mib << 20)) /dev/urandom > "$src"
    else
        truncate -s $((size_mib << 20)) "$src"
        step=$((100 / data_percent))
        for ((i = 0; i < size_mib; i += step)); do
            dd if=/dev/urandom of="$src" bs=1M count=1 seek="$i" conv=notrunc status=none
        done
    fi
fi
sync

repeat="${REPEAT:-3}"
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }

best=""
time_qemu() {
    local t0 t1 best_q=""
    for _ in $(seq "$repeat"); do
        rm -f "$dir/q.img"; truncate -s "$((size_mib << 20))" "$dir/q.img"
        drop_caches
        t0=$(now)
        qemu-img convert -n -t none -T none -f raw -O raw "$src" "$dir/q.img"
        t1=$(now)
        best_q=$(echo "$t1 - $t0" | bc -l | awk -v b="$best_q" '{ if (b == "" || $1 < b) print $1; else print b }')
    done
    cmp -s "$src" "$dir/q.img" || { echo "qemu-img copy differs!" >&2; exit 1; }
    echo "$best_q"
}

time_clonebd() {
    local t0 t1 pid best_c=""
    for _ in $(seq "$repeat"); do
        rm -f "$dir/d.img" "$dir/meta" "$dir/ctl"; truncate -s "$((size_mib << 20))" "$dir/d.img"
        drop_caches
        t0=$(now)
        "$bin" run --source "$src" --dest "$dir/d.img" --metadata "$dir/meta" --create --control "$dir/ctl" "$@" \
            2>"$dir/run.log" &
        pid=$!
        while [ ! -S "$dir/ctl" ]; do sleep 0.005; kill -0 "$pid" || { cat "$dir/run.log" >&2; exit 1; }; done
        "$bin" wait --control "$dir/ctl" --interval 20 --no-progress
        t1=$(now)
        kill -TERM "$pid"; wait "$pid"
        best_c=$(echo "$t1 - $t0" | bc -l | awk -v b="$best_c" '{ if (b == "" || $1 < b) print $1; else print b }')
    done
    cmp -s "$src" "$dir/d.img" || { echo "clonebd copy differs!" >&2; exit 1; }
    echo "$best_c"
}

q=$(time_qemu)
printf "%-58s %8.3f s  %7.1f MiB/s\n" "qemu-img convert -t none -T none" "$q" "$(echo "$size_mib / $q" | bc -l)"
report() {
    local label="$1"; shift
    local c; c=$(time_clonebd "$@")
    printf "%-58s %8.3f s  %7.1f MiB/s  ratio %.3f\n" "$label" "$c" "$(echo "$size_mib / $c" | bc -l)" "$(echo "$q / $c" | bc -l)"
}
time_nbdcopy() {
    local t0 t1 qpid best_n=""
    for _ in $(seq "$repeat"); do
        rm -f "$dir/n.img" "$dir/qnbd.sock"; truncate -s "$((size_mib << 20))" "$dir/n.img"
        drop_caches
        qemu-nbd -r -f raw -t --cache=none -k "$dir/qnbd.sock" "$src" 2>"$dir/qemu-nbd.log" &
        qpid=$!
        while [ ! -S "$dir/qnbd.sock" ]; do sleep 0.005; kill -0 "$qpid" || { cat "$dir/qemu-nbd.log" >&2; exit 1; }; done
        t0=$(now)
        nbdcopy --flush "nbd+unix:///?socket=$dir/qnbd.sock" "$dir/n.img"
        t1=$(now)
        kill -TERM "$qpid"; wait "$qpid" || true
        best_n=$(echo "$t1 - $t0" | bc -l | awk -v b="$best_n" '{ if (b == "" || $1 < b) print $1; else print b }')
    done
    cmp -s "$src" "$dir/n.img" || { echo "nbdcopy copy differs!" >&2; exit 1; }
    echo "$best_n"
}
n=""
if command -v nbdcopy >/dev/null && command -v qemu-nbd >/dev/null; then
    n=$(time_nbdcopy)
    printf "%-58s %8.3f s  %7.1f MiB/s\n" "nbdcopy --flush from qemu-nbd --cache=none" "$n" "$(echo "$size_mib / $n" | bc -l)"
fi
if [ -n "${ONLY_DEFAULTS:-}" ]; then
    c=$(time_clonebd)
    printf "%-58s %8.3f s  %7.1f MiB/s  ratio %.3f\n" "clonebd defaults (4k regions, threshold 2048, batch 256)" "$c" "$(echo "$size_mib / $c" | bc -l)" "$(echo "$q / $c" | bc -l)"
    [ -n "$n" ] && printf "%-58s %19s  ratio %.3f\n" "  the same against nbdcopy" "" "$(echo "$n / $c" | bc -l)"
    report "clonebd defaults, --no-sparse-hydration" --no-sparse-hydration
    exit 0
fi
report "clonebd 64k regions, threshold 256, batch 64" --region-size 64k --hydration-threshold 256 --hydration-batch-size 64
report "clonebd defaults (4k regions, threshold 2048, batch 256)"
report "clonebd 64k regions, defaults (threshold 128, batch 16)" --region-size 64k
report "clonebd kernel defaults (4k, threshold 1, batch 1)" --hydration-threshold 1 --hydration-batch-size 1
