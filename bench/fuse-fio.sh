#!/bin/sh
# fio, 4 KiB random reads and writes at queue depth 32, on a loop device over the clone's
# FUSE file (clonebd run --fuse), against the same on a loop device over the plain
# destination file. Prints IOPS and the ratio (docs/PERFORMANCE.md, "FUSE").
#
#   bench/fuse-fio.sh [DIR]      DIR holds the images (default: a temp dir; needs a disk
#                                file system with O_DIRECT, not tmpfs). Run as root.
#
# Environment: SIZE (default 1G), RUNTIME seconds per job (default 20), ENGINE (libaio or
# io_uring, default libaio).
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
SIZE="${SIZE:-1G}"
RUNTIME="${RUNTIME:-20}"
ENGINE="${ENGINE:-libaio}"
cargo build --release -q -p clonebd
bin="$CARGO_TARGET_DIR/release/clonebd"
keep="${1:-}"
dir="${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}")}"
loop=""
pid=""
cleanup() {
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -z "$keep" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT INT TERM

# IOPS of one fio job on $1 ($2: randread or randwrite).
iops() {
    fio --name=bench --filename="$1" --direct=1 --ioengine="$ENGINE" --rw="$2" --bs=4k \
        --iodepth=32 --numjobs=1 --runtime="$RUNTIME" --time_based --ramp_time=2 \
        --randrepeat=0 --norandommap --output-format=terse --terse-version=3 |
        awk -F';' -v rw="$2" 'END { printf "%d", (rw == "randread") ? $8 : $49 }'
}

# Attach $1 with direct I/O, run both jobs, detach; prints "READ WRITE".
both() {
    loop=$(losetup -f --show --direct-io=on "$1")
    r=$(iops "$loop" randread)
    w=$(iops "$loop" randwrite)
    losetup -d "$loop"; loop=""
    echo "$r $w"
}

start() { # extra clonebd arguments
    rm -f "$dir/ctl"
    "$bin" run --source "$dir/src.img" --dest "$dir/dst.img" --metadata "$dir/meta" \
        $([ -e "$dir/meta" ] || echo --create) --fuse "$dir/clone.img" --control "$dir/ctl" "$@" 2>>"$dir/clonebd.log" &
    pid=$!
    while [ ! -S "$dir/ctl" ]; do sleep 0.1; done
}

stop() { # label for the export's request counters
    kill -TERM "$pid"; wait "$pid"; pid=""
    grep 'FUSE .*reads' "$dir/clonebd.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g; s/.*FUSE [^:]*:/'"$1"':/'
}

echo "images in $dir, $SIZE, $RUNTIME s per job, fio $ENGINE 4k QD32 on a loop device (direct I/O)"
truncate -s "$SIZE" "$dir/src.img"
# A source that is not all holes: write it once.
fio --name=fill --filename="$dir/src.img" --rw=write --bs=1M --direct=1 --ioengine="$ENGINE" \
    --iodepth=8 --size="$SIZE" --output=/dev/null
rm -f "$dir/dst.img" "$dir/meta"
truncate -s "$SIZE" "$dir/dst.img"

# Cold: nothing hydrated, no background hydration; reads go to the source, and each 4 KiB
# write is a whole 4 KiB region, written without a copy.
start --no-hydration
set -- $(both "$dir/clone.img"); cold_r=$1; cold_w=$2
stop "FUSE requests, cold"

# Hydrated: every region on the destination.
start
"$bin" wait --control "$dir/ctl" --no-progress
set -- $(both "$dir/clone.img"); fuse_r=$1; fuse_w=$2
stop "FUSE requests, hydrated"

# The plain destination file.
set -- $(both "$dir/dst.img"); plain_r=$1; plain_w=$2

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
printf '%-34s %10s %10s\n' "" "randread" "randwrite"
printf '%-34s %10s %10s\n' "loop on plain destination (IOPS)" "$plain_r" "$plain_w"
printf '%-34s %10s %10s\n' "loop on FUSE, hydrated (IOPS)" "$fuse_r" "$fuse_w"
printf '%-34s %10s %10s\n' "loop on FUSE, cold (IOPS)" "$cold_r" "$cold_w"
printf '%-34s %10s %10s\n' "FUSE hydrated / plain" "$(ratio "$fuse_r" "$plain_r")" "$(ratio "$fuse_w" "$plain_w")"
printf '%-34s %10s %10s\n' "FUSE cold / plain" "$(ratio "$cold_r" "$plain_r")" "$(ratio "$cold_w" "$plain_w")"
