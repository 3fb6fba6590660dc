#!/bin/sh
# Foreground I/O while hydrating (docs/PERFORMANCE.md, "Foreground I/O first"): fio's nbd
# engine, 4 KiB random reads of cold regions at queue depth 1 and 32, through clonebd's NBD
# unix socket, with hydration off (idle) and with hydration running at full speed; and the
# hydration bandwidth under that load against the same clone hydrating with no client.
# The unloaded bandwidth is that of a full hydration with no client, which is also compared
# with a raw copy of the same source
# (`qemu-img convert -t none -T none`, O_DIRECT on both sides, as bench/hydration.sh).
#
#   bench/foreground.sh [DIR]   DIR holds the images (default: a temp dir under $TMPDIR or
#                               /var/tmp; a disk file system with O_DIRECT, not tmpfs)
#
# The loaded figures hold only while hydration runs all through the job: a job during which
# the last region hydrated is reported with a warning (choose SIZE and RUNTIME so that
# hydration under load takes longer than RUNTIME).
#
# Environment: SIZE (default 4G), RUNTIME seconds per fio job (default 10), REPEAT rounds
# (default 3), PRIORITIES (default "balanced"; any of background balanced hydration),
# BEFORE (another clonebd binary, measured loaded beside this one, as a baseline: its
# --hydration-priority is not given), FLOOR (piece sizes, e.g. "64k 256k": the disk's own
# floor, the reads beside a plain `dd` copy stream of that size, see measure_floor),
# CARGO_TARGET_DIR.
#
# Every round measures each case once, back to back (idle, loaded for each priority, the
# full hydration and the raw copy), so a machine shared with other
# work slows every case of a round alike; each figure printed at the end is the median of
# the rounds. Ratios: loaded / idle for IOPS and latency, loaded / unloaded for hydration
# bandwidth, raw copy time / hydration time for the idle hydration.
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
SIZE="${SIZE:-4G}"
RUNTIME="${RUNTIME:-10}"
REPEAT="${REPEAT:-3}"
PRIORITIES="${PRIORITIES:-balanced}"
BEFORE="${BEFORE:-}"
FLOOR="${FLOOR:-}"
cargo build --release -q --locked -p clonebd
bin="$CARGO_TARGET_DIR/release/clonebd"
for t in fio jq qemu-img; do
    command -v "$t" >/dev/null || { echo "$t is needed" >&2; exit 1; }
done
keep="${1:-}"
dir="${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}")}"
mkdir -p "$dir"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -z "$keep" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT INT TERM
if [ "$(stat -f -c %T "$dir")" = tmpfs ]; then
    echo "$dir is on tmpfs: give a directory on a disk file system" >&2
    exit 2
fi

fresh_dest() {
    rm -f "$dir/dst.img" "$dir/meta"
    truncate -s "$SIZE" "$dir/dst.img"
}

start() { # binary, extra clonebd arguments
    b="$1"; shift
    rm -f "$dir/ctl" "$dir/clonebd.sock"
    "$b" run --source "$dir/src.img" --dest "$dir/dst.img" --metadata "$dir/meta" --create \
        --nbd-unix "$dir/clonebd.sock" --control "$dir/ctl" "$@" 2>>"$dir/clonebd.log" &
    pid=$!
    while [ ! -S "$dir/ctl" ] || [ ! -S "$dir/clonebd.sock" ]; do
        kill -0 "$pid" 2>/dev/null || { tail "$dir/clonebd.log" >&2; exit 1; }
        sleep 0.05
    done
}

stop() {
    kill -TERM "$pid"; wait "$pid"; pid=""
}

hydrated() { "$bin" status --control "$dir/ctl" --json --noflush | jq .bytes_hydrated; }
now() { date +%s.%N; }

# One fio job of RUNTIME seconds: prints "IOPS P50_US P99_US".
fio_job() { # iodepth
    fio --name=fg --ioengine=nbd --uri="nbd+unix:///?socket=$dir/clonebd.sock" --direct=1 \
        --rw=randread --bs=4k --iodepth="$1" --numjobs=1 --size="$SIZE" --randrepeat=0 \
        --norandommap --runtime="$RUNTIME" --time_based --output-format=json |
        sed -n '/^{/,$p' | # fio's nbd engine prints "fio: connected to NBD server" first
        jq -r '.jobs[0].read | "\(.iops) \(.clat_ns.percentile["50.000000"] / 1000) \(.clat_ns.percentile["99.000000"] / 1000)"'
}

# Hydration bandwidth in MiB/s over one fio job: prints "MIB_S".
bandwidth_over() { # command...
    b0=$(hydrated); t0=$(now)
    "$@" >"$dir/job.out"
    b1=$(hydrated); t1=$(now)
    echo "($b1 - $b0) / ($t1 - $t0) / 1048576" | bc -l
}

record() { # key value: appended to the round's results
    echo "$1 $2" >>"$dir/results.raw"
}

measure_loaded() { # label binary [args]
    label="$1"; b="$2"; shift 2
    for qd in 1 32; do
        fresh_dest
        start "$b" "$@"
        bw=$(bandwidth_over fio_job "$qd")
        read -r iops p50 p99 <"$dir/job.out"
        # Reads after the last region hydrated meet no copies: the figures would flatter.
        if [ "$(hydrated)" -ge "$(stat -c %s "$dir/src.img")" ]; then
            echo "warning: $label QD$qd: hydration finished during the job; use a larger SIZE or a shorter RUNTIME" >&2
            record "$label.qd$qd.finished" 1
        fi
        stop
        record "$label.qd$qd.iops" "$iops"
        record "$label.qd$qd.p50" "$p50"
        record "$label.qd$qd.p99" "$p99"
        record "$label.qd$qd.bw" "$bw"
    done
}

# The disk's own floor: the same reads, hydration off, beside one `dd` stream copying the
# source into a scratch file in BS pieces with O_DIRECT: what any copy of that piece size,
# issued back to back, costs the reads here; its bandwidth is reported as the hydration's.
measure_floor() { # bs
    for qd in 1 32; do
        fresh_dest
        start "$bin" --no-hydration
        rm -f "$dir/floor.img"
        dd if="$dir/src.img" of="$dir/floor.img" bs="$1" iflag=direct oflag=direct 2>/dev/null &
        dpid=$!
        t0=$(now)
        fio_job "$qd" >"$dir/job.out"
        t1=$(now)
        copied=$(stat -c %s "$dir/floor.img")
        kill "$dpid" 2>/dev/null || true; wait "$dpid" 2>/dev/null || true
        rm -f "$dir/floor.img"
        read -r iops p50 p99 <"$dir/job.out"
        stop
        record "dd-$1.qd$qd.iops" "$iops"
        record "dd-$1.qd$qd.p50" "$p50"
        record "dd-$1.qd$qd.p99" "$p99"
        record "dd-$1.qd$qd.bw" "$(echo "$copied / ($t1 - $t0) / 1048576" | bc -l)"
    done
}

echo "making a $SIZE source in $dir ($(df -h --output=source,fstype "$dir" | tail -1))" >&2
head -c "$SIZE" /dev/urandom >"$dir/src.img"
sync
: >"$dir/results.raw"
size_mib=$(( $(stat -c %s "$dir/src.img") >> 20 ))

round=1
while [ "$round" -le "$REPEAT" ]; do
    echo "round $round of $REPEAT" >&2
    # Idle: hydration off, the same reads.
    for qd in 1 32; do
        fresh_dest
        start "$bin" --no-hydration
        read -r iops p50 p99 <<EOF
$(fio_job "$qd")
EOF
        stop
        record "idle.qd$qd.iops" "$iops"
        record "idle.qd$qd.p50" "$p50"
        record "idle.qd$qd.p99" "$p99"
    done
    for p in $PRIORITIES; do
        measure_loaded "$p" "$bin" --hydration-priority "$p"
    done
    if [ -n "$BEFORE" ]; then
        measure_loaded before "$BEFORE"
    fi
    for bs in $FLOOR; do
        measure_floor "$bs"
    done
    # Idle hydration, whole (its mean bandwidth is the unloaded one), against a raw copy.
    rm -f "$dir/q.img"; truncate -s "$SIZE" "$dir/q.img"
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(now)
    qemu-img convert -n -t none -T none -f raw -O raw "$dir/src.img" "$dir/q.img"
    t1=$(now)
    record raw.s "$(echo "$t1 - $t0" | bc -l)"
    rm -f "$dir/q.img"
    fresh_dest
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(now)
    start "$bin"
    "$bin" wait --control "$dir/ctl" --interval 20 --no-progress
    t1=$(now)
    stop
    cmp -s "$dir/src.img" "$dir/dst.img" || { echo "the hydrated clone differs from its source" >&2; exit 1; }
    record hydrate.s "$(echo "$t1 - $t0" | bc -l)"
    round=$((round + 1))
done

# The median of a key's values over the rounds.
median() {
    awk -v k="$1" '$1 == k { print $2 }' "$dir/results.raw" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

raw=$(median raw.s); hyd=$(median hydrate.s)
unloaded=$(echo "$size_mib / $hyd" | bc -l)
printf 'SIZE=%s RUNTIME=%s s, %s rounds, medians (latency in us, bandwidth in MiB/s)\n' "$SIZE" "$RUNTIME" "$REPEAT"
printf '%-11s %3s %9s %8s %8s | %6s %6s %6s | %8s %6s\n' case qd iops p50 p99 iops/i p50/i p99/i hyd-bw bw/unl
for qd in 1 32; do
    i_iops=$(median "idle.qd$qd.iops"); i_p50=$(median "idle.qd$qd.p50"); i_p99=$(median "idle.qd$qd.p99")
    printf '%-11s %3s %9.0f %8.1f %8.1f | %6s %6s %6s | %8s %6s\n' idle "$qd" "$i_iops" "$i_p50" "$i_p99" - - - - -
    for p in $PRIORITIES ${BEFORE:+before} $(for bs in $FLOOR; do echo "dd-$bs"; done); do
        iops=$(median "$p.qd$qd.iops"); p50=$(median "$p.qd$qd.p50"); p99=$(median "$p.qd$qd.p99"); bw=$(median "$p.qd$qd.bw")
        printf '%-11s %3s %9.0f %8.1f %8.1f | %6s %6s %6s | %8.1f %6s\n' "$p" "$qd" "$iops" "$p50" "$p99" \
            "$(ratio "$iops" "$i_iops")" "$(ratio "$p50" "$i_p50")" "$(ratio "$p99" "$i_p99")" "$bw" "$(ratio "$bw" "$unloaded")"
    done
done
printf 'unloaded (whole) hydration %.2f s (%.1f MiB/s) vs raw copy %.2f s (%.1f MiB/s): ratio %s\n' \
    "$hyd" "$(echo "$size_mib / $hyd" | bc -l)" "$raw" "$(echo "$size_mib / $raw" | bc -l)" "$(ratio "$raw" "$hyd")"
if [ -n "$keep" ]; then echo "raw figures in $dir/results.raw" >&2; fi
