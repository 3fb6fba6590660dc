#!/bin/sh
# fio's nbd engine, 4 KiB random reads and writes at queue depth 1 and 32, against clonebd
# and against qemu-nbd serving the same files, over unix sockets. Prints IOPS of both and
# the ratio clonebd / qemu-nbd (docs/PERFORMANCE.md, "NBD"). Cases:
#
#   cold       reads of regions not hydrated: clonebd (no_hydration) vs qemu-nbd on SOURCE
#   hydrated   reads and writes after full hydration: clonebd vs qemu-nbd on DEST
#   cold-write 4 KiB writes to 4 KiB regions never written (each a full-region overwrite of
#              a cold region; one pass, fresh files per run): clonebd vs qemu-nbd on a fresh
#              sparse DEST (clonebd reserves its destination's space at start, so a second
#              row compares with qemu-nbd on a DEST reserved the same way, `fallocate -l`)
#   cor        (not in the default CASES) copy-on-read: one pass of 4 KiB random reads over
#              cold regions with --hydrate-on-read against the same without it (the "qemu-nbd"
#              column is then clonebd without copy-on-read), both --no-hydration, fresh files
#              per run; also prints the bytes hydrated against the bytes read
#
# Both servers bypass the page cache: clonebd opens its devices with O_DIRECT (the default),
# qemu-nbd runs with --cache=none --aio=native (O_DIRECT, Linux AIO).
#
#   bench/nbd-fio.sh [DIR]      DIR holds the images (default: a temp dir under $TMPDIR or
#                               /var/tmp; it needs a disk file system with O_DIRECT, not tmpfs)
#
# Environment: SIZE (default 1G), RUNTIME seconds per job (default 20), REGION (default 4k),
# CASES (default "cold hydrated cold-write"), CARGO_TARGET_DIR.
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
SIZE="${SIZE:-1G}"
RUNTIME="${RUNTIME:-20}"
REGION="${REGION:-4k}"
cargo build --release -q -p clonebd
bin="$CARGO_TARGET_DIR/release/clonebd"
keep="${1:-}"
dir="${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}")}"
mkdir -p "$dir"
pid=""
qpid=""
cleanup() {
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -n "$qpid" ]; then kill -TERM "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true; fi
    if [ -z "$keep" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT INT TERM

if [ "$(stat -f -c %T "$dir")" = tmpfs ]; then
    echo "$dir is on tmpfs: give a directory on a disk file system" >&2
    exit 2
fi

# IOPS of one fio job: $1 URI, $2 randread|randwrite, $3 iodepth, $4 "once" for one pass
# over the export without repeats (cold writes), else time based.
iops() {
    if [ "${4:-}" = once ]; then
        mode="--runtime=$RUNTIME"
    else
        mode="--runtime=$RUNTIME --time_based --ramp_time=2 --norandommap"
    fi
    # shellcheck disable=SC2086
    fio --name=bench --ioengine=nbd --uri="$1" --direct=1 --rw="$2" --bs=4k --iodepth="$3" \
        --numjobs=1 --size="$SIZE" --randrepeat=0 $mode --output-format=terse --terse-version=3 |
        awk -F';' -v rw="$2" 'END { printf "%d", (rw == "randread") ? $8 : $49 }'
}

fresh_dest() {
    rm -f "$dir/dst.img" "$dir/meta"
    truncate -s "$SIZE" "$dir/dst.img"
}

start() { # extra clonebd arguments
    rm -f "$dir/ctl" "$dir/clonebd.sock"
    "$bin" run --source "$dir/src.img" --dest "$dir/dst.img" --metadata "$dir/meta" \
        $([ -e "$dir/meta" ] || echo --create) --region-size "$REGION" --nbd-unix "$dir/clonebd.sock" --control "$dir/ctl" "$@" \
        2>>"$dir/clonebd.log" &
    pid=$!
    while [ ! -S "$dir/ctl" ] || [ ! -S "$dir/clonebd.sock" ]; do sleep 0.1; done
}

stop() {
    kill -TERM "$pid"; wait "$pid"; pid=""
}

qstart() { # image
    rm -f "$dir/qemu.sock"
    qemu-nbd -k "$dir/qemu.sock" -f raw --cache=none --aio=native --discard=unmap \
        --persistent --shared=8 -x bench "$1" &
    qpid=$!
    while [ ! -S "$dir/qemu.sock" ]; do sleep 0.1; done
}

qstop() {
    kill -TERM "$qpid"; wait "$qpid" 2>/dev/null || true; qpid=""
}

CB="nbd+unix:///clonebd?socket=$dir/clonebd.sock"
QN="nbd+unix:///bench?socket=$dir/qemu.sock"
results="$dir/results.txt"
: >"$results"
row() { # case rw qd clonebd qemu
    ratio=$(awk -v a="$4" -v b="$5" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    printf '%-19s %-9s %4s %10s %10s %7s\n' "$1" "$2" "$3" "$4" "$5" "$ratio" | tee -a "$results"
}

echo "making a $SIZE source in $dir ($(df -h --output=source,fstype "$dir" | tail -1))"
head -c "$SIZE" /dev/urandom >"$dir/src.img"
sync

printf '%-19s %-9s %4s %10s %10s %7s\n' case rw qd clonebd qemu-nbd ratio | tee -a "$results"

CASES="${CASES:-cold hydrated cold-write}"
want() { case " $CASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# Cold regions: reads go to the source.
if want cold; then
fresh_dest
start --no-hydration
qstart "$dir/src.img"
for qd in 1 32; do
    row cold randread "$qd" "$(iops "$CB" randread "$qd")" "$(iops "$QN" randread "$qd")"
done
qstop
stop
fi

# Hydrated regions: hydrate all, then everything goes to the destination.
if want hydrated; then
fresh_dest
start --hydration-threshold 4096 --hydration-batch-size 256
"$bin" wait --control "$dir/ctl" --no-progress
qstart "$dir/dst.img"
for rw in randread randwrite; do
    for qd in 1 32; do
        row hydrated "$rw" "$qd" "$(iops "$CB" "$rw" "$qd")" "$(iops "$QN" "$rw" "$qd")"
    done
done
qstop
stop
fi

# Copy-on-read against plain cold reads: one pass each, fresh files for every run.
if want cor; then
for qd in 1 32; do
    fresh_dest
    start --no-hydration
    base=$(iops "$CB" randread "$qd" once)
    stop
    fresh_dest
    start --no-hydration --hydrate-on-read
    # shellcheck disable=SC2086
    fio --name=bench --ioengine=nbd --uri="$CB" --direct=1 --rw=randread --bs=4k \
        --iodepth="$qd" --numjobs=1 --size="$SIZE" --randrepeat=0 --runtime="$RUNTIME" \
        --output-format=terse --terse-version=3 >"$dir/cor.terse"
    c=$(awk -F';' 'END { printf "%d", $8 }' "$dir/cor.terse")
    read_kb=$(awk -F';' 'END { printf "%d", $6 }' "$dir/cor.terse")
    field() { "$bin" status --control "$dir/ctl" --json --noflush |
        python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
    # The last reads' data may still be on its way to the destination.
    while [ "$(field fill_bytes_pending)" != 0 ]; do sleep 0.1; done
    hydrated=$(field bytes_hydrated)
    stop
    row cor-vs-cold randread "$qd" "$c" "$base"
    awk -v h="$hydrated" -v r="$read_kb" -v qd="$qd" 'BEGIN {
        printf "cor qd %s: %d bytes hydrated for %d bytes read (%.3f)\n", qd, h, r * 1024, h / (r * 1024) }' |
        tee -a "$results"
done
fi

# Writes overwriting cold 4 KiB regions: fresh files for every run, one pass.
if want cold-write; then
for qd in 1 32; do
    fresh_dest
    start --no-hydration
    c=$(iops "$CB" randwrite "$qd" once)
    stop
    fresh_dest
    qstart "$dir/dst.img"
    q=$(iops "$QN" randwrite "$qd" once)
    qstop
    row cold-write randwrite "$qd" "$c" "$q"
    fresh_dest
    fallocate -l "$SIZE" "$dir/dst.img"
    qstart "$dir/dst.img"
    q=$(iops "$QN" randwrite "$qd" once)
    qstop
    row cold-write-reserved randwrite "$qd" "$c" "$q"
done
fi

echo "results in $results" >&2
