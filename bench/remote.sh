#!/usr/bin/env bash
# Hydration from remote sources, each against the best copy tool for the job on the same
# source and the same machine (docs/PERFORMANCE.md, "Remote sources"):
#
#   http   nginx serving the image         vs  nbdcopy from `nbdkit curl` on the same URL
#   s3     moto's S3 server (the object)   vs  boto3's multi-threaded download_file
#   nbd    nbdkit file plugin, delay-read  vs  nbdcopy from the same export to a file
#   fio    4 KiB random reads at QD32 of cold regions through clonebd's NBD export (source:
#          the delayed nbdkit export)      vs  fio's nbd engine on that export directly
#
#   bench/remote.sh [WHICH...]     WHICH: http s3 nbd fio (default: all)
#
# Environment: SIZE_MIB (default 1024; S3_SIZE_MIB, default 256, for moto, which is a Python
# server and the slowest part of its own benchmark), DELAY (nbdkit delay-read, default 2ms),
# RUNTIME (fio seconds, default 20), DIR (default a new directory under /var/tmp),
# CLONEBD_MOTO_SERVER (moto_server; default the one on PATH).
#
# Every copy is checked byte for byte against the source. Times are the best of 3 runs;
# a ratio is the baseline's time over clonebd's (>= 1: clonebd is as fast or faster), or
# for fio clonebd's IOPS over the baseline's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size_mib="${SIZE_MIB:-1024}"
s3_size_mib="${S3_SIZE_MIB:-256}"
delay="${DELAY:-2ms}"
runtime="${RUNTIME:-20}"
dir="${DIR:-$(mktemp -d /var/tmp/clonebd-remote.XXXXXX)}"
which=("$@")
[ ${#which[@]} -gt 0 ] || which=(http s3 nbd fio)
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p clonebd
bin="$here/target/release/clonebd"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

need() { command -v "$1" >/dev/null || { echo "$1 is needed ($2)" >&2; exit 1; }; }
now() { date +%s.%N; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }

image() { # NAME MIB: a random image of MIB MiB, made once
    local f="$dir/$1"
    if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != $(($2 << 20)) ]; then
        head -c $(($2 << 20)) /dev/urandom >"$f"
    fi
    echo "$f"
}

# Seconds clonebd takes to hydrate all of SOURCE-URI (size MIB) onto a fresh file, from the
# start of `clonebd run` to the return of `clonebd wait`; checked against FILE. Best of 3.
# Extra arguments go to `clonebd run`.
time_clonebd() { # URI FILE [ARGS...]
    local uri="$1" file="$2" best="" t0 t1 pid size
    shift 2
    size=$(stat -c %s "$file")
    for _ in 1 2 3; do
        rm -f "$dir/d.img" "$dir/meta" "$dir/meta.source-pin" "$dir/ctl"
        truncate -s "$size" "$dir/d.img"
        t0=$(now)
        "$bin" run --source "$uri" --dest "$dir/d.img" --metadata "$dir/meta" --create \
            --control "$dir/ctl" "$@" 2>"$dir/run.log" &
        pid=$!
        while [ ! -S "$dir/ctl" ]; do
            sleep 0.005
            kill -0 "$pid" 2>/dev/null || { cat "$dir/run.log" >&2; exit 1; }
        done
        "$bin" wait --control "$dir/ctl" --interval 20 --no-progress
        t1=$(now)
        kill -TERM "$pid"; wait "$pid"
        cmp -s "$file" "$dir/d.img" || { echo "clonebd's copy of $uri differs" >&2; exit 1; }
        best=$(min "$best" "$(echo "$t1 - $t0" | bc -l)")
    done
    echo "$best"
}

# Seconds a command takes, best of 3; it writes $dir/b.img, checked against FILE.
time_baseline() { # FILE COMMAND...
    local file="$1" best="" t0 t1
    shift
    for _ in 1 2 3; do
        rm -f "$dir/b.img"
        t0=$(now)
        "$@"
        t1=$(now)
        cmp -s "$file" "$dir/b.img" || { echo "the baseline's copy differs" >&2; exit 1; }
        best=$(min "$best" "$(echo "$t1 - $t0" | bc -l)")
    done
    echo "$best"
}

report() { # LABEL MIB BASELINE_S CLONEBD_S
    printf "%-44s %5d MiB  baseline %8.3f s (%7.1f MiB/s)  clonebd %8.3f s (%7.1f MiB/s)  ratio %.3f\n" \
        "$1" "$2" "$3" "$(echo "$2 / $3" | bc -l)" "$4" "$(echo "$2 / $4" | bc -l)" "$(echo "$3 / $4" | bc -l)"
}

bench_http() {
    need nginx "apt-get install nginx-light"
    need nbdkit "apt-get install nbdkit"
    need nbdcopy "apt-get install libnbd-bin"
    local src port conf
    src=$(image http.img "$size_mib")
    port=$(free_port)
    mkdir -p "$dir/nginx"
    conf="$dir/nginx/nginx.conf"
    cat >"$conf" <<EOF
daemon off; master_process off; worker_processes 1;
pid $dir/nginx/pid; error_log $dir/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000; sendfile on;
  client_body_temp_path $dir/nginx; proxy_temp_path $dir/nginx; fastcgi_temp_path $dir/nginx;
  uwsgi_temp_path $dir/nginx; scgi_temp_path $dir/nginx;
  server { listen 127.0.0.1:$port; root $dir; } }
EOF
    nginx -p "$dir/nginx" -c "$conf" -e "$dir/nginx/error.log" &
    pids+=($!)
    wait_port "$port"
    local url="http://127.0.0.1:$port/http.img"
    local b c
    b=$(time_baseline "$src" nbdkit -r -U - curl "url=$url" --run "nbdcopy \"\$uri\" $dir/b.img")
    c=$(time_clonebd "$url" "$src")
    report "http: nginx (nbdcopy from nbdkit curl)" "$size_mib" "$b" "$c"
}

bench_s3() {
    local moto="${CLONEBD_MOTO_SERVER:-$(command -v moto_server || true)}"
    [ -n "$moto" ] || { echo "moto_server is needed (pip install 'moto[server]' in a virtualenv)" >&2; exit 1; }
    local py src port
    py="$(dirname "$moto")/python3"
    src=$(image s3.img "$s3_size_mib")
    port=$(free_port)
    "$moto" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
    pids+=($!)
    wait_port "$port"
    export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
    "$py" - "$src" <<'EOF'
import boto3, sys
s3 = boto3.client("s3")
s3.create_bucket(Bucket="bench")
s3.upload_file(sys.argv[1], "bench", "disk.raw")
EOF
    local b c
    b=$(time_baseline "$src" "$py" -c "
import boto3
from boto3.s3.transfer import TransferConfig
boto3.client('s3').download_file('bench', 'disk.raw', '$dir/b.img', Config=TransferConfig(max_concurrency=16))
")
    c=$(time_clonebd "s3://bench/disk.raw" "$src")
    report "s3: moto (boto3 download_file, 16 threads)" "$s3_size_mib" "$b" "$c"
}

nbd_port=""
nbd_export() { # FILE: serves it read-only by nbdkit with delay-read on TCP, at $nbd_port
    nbd_port=$(free_port)
    nbdkit -f -r -p "$nbd_port" -i 127.0.0.1 --filter=delay file "$1" "delay-read=$delay" \
        >"$dir/nbdkit.log" 2>&1 &
    pids+=($!)
    wait_port "$nbd_port"
}

bench_nbd() {
    need nbdkit "apt-get install nbdkit"
    need nbdcopy "apt-get install libnbd-bin"
    local src port b c
    src=$(image nbd.img "$size_mib")
    nbd_export "$src"
    port=$nbd_port
    b=$(time_baseline "$src" nbdcopy "nbd://127.0.0.1:$port" "$dir/b.img")
    c=$(time_clonebd "nbd://127.0.0.1:$port" "$src")
    report "nbd: nbdkit delay-read=$delay (nbdcopy)" "$size_mib" "$b" "$c"
}

fio_iops() { # fio arguments: IOPS of 4 KiB random reads at QD32
    fio --name=bench --ioengine=nbd --rw=randread --bs=4k --iodepth=32 --numjobs=1 \
        --runtime="$runtime" --time_based --ramp_time=2 --norandommap --randrepeat=0 \
        --output-format=terse --terse-version=3 "$@" | awk -F';' 'END { printf "%d", $8 }'
}

bench_fio() {
    need fio "apt-get install fio"
    need nbdkit "apt-get install nbdkit"
    local src port b c pid
    src=$(image nbd.img "$size_mib")
    nbd_export "$src"
    port=$nbd_port
    b=$(fio_iops --uri="nbd://127.0.0.1:$port")
    rm -f "$dir/d.img" "$dir/meta" "$dir/meta.source-pin" "$dir/ctl" "$dir/nbd.sock"
    truncate -s "$(stat -c %s "$src")" "$dir/d.img"
    # Hydration off: every read is of a cold region, served from the source.
    "$bin" run --source "nbd://127.0.0.1:$port" --dest "$dir/d.img" --metadata "$dir/meta" \
        --create --no-hydration --nbd-unix "$dir/nbd.sock" --control "$dir/ctl" 2>"$dir/run.log" &
    pid=$!
    pids+=("$pid")
    while [ ! -S "$dir/nbd.sock" ]; do sleep 0.01; kill -0 "$pid" || { cat "$dir/run.log" >&2; exit 1; }; done
    c=$(fio_iops --uri="nbd+unix:///?socket=$dir/nbd.sock")
    kill -TERM "$pid"; wait "$pid" || true
    printf "%-44s %5d MiB  baseline %8d IOPS  clonebd %8d IOPS  ratio %.3f\n" \
        "fio: 4k randread QD32 cold, delay-read=$delay" "$size_mib" "$b" "$c" "$(echo "$c / $b" | bc -l)"
}

for w in "${which[@]}"; do
    "bench_$w"
done
