#!/usr/bin/env bash
# End-to-end test of the exports that kernel drivers serve, in a small QEMU virtual machine:
# the ublk export (`clonebd run --ublk`) and the NBD export under the Linux kernel's own NBD
# client (`clonebd run --nbd-unix` and `nbd-client`).
#
# The ublk export needs the kernel's ublk_drv and the kernel's NBD client needs nbd.ko,
# which the machines that build clonebd do not always have. This script boots a Debian
# kernel that has both (CONFIG_BLK_DEV_UBLK, CONFIG_BLK_DEV_NBD) in QEMU, with a minimal
# initramfs holding busybox, the clonebd binary, nbd-client and their shared libraries, and
# ublk_drv.ko and nbd.ko. Inside the VM it makes a 64 MiB random source image and, for each
# export in turn, a fresh clone of it:
#   - ublk: loads ublk_drv, starts `clonebd run --ublk --no-hydration --region-size 64k` in
#     the background and waits for /dev/ublkb0;
#   - nbd: loads nbd, starts `clonebd run --nbd-unix SOCK --no-hydration --region-size 64k`
#     in the background, connects /dev/nbd0 to it with `nbd-client -unix SOCK -N clonebd`
#     and checks that the kernel sends flushes (the device has a write-back cache);
# then, on /dev/ublkb0 or /dev/nbd0:
#   - checks the device's size, reads it whole with O_DIRECT and compares its sha256 with
#     the source's;
#   - writes through the device with O_DIRECT (a block inside a region, which must copy the
#     rest of the region from the source, whole regions, across two regions, the last block)
#     and flushes each, then reads the whole device back and compares it with the expected
#     image;
#   - enables hydration and waits for it with `clonebd wait`; for nbd, disconnects the
#     device (`nbd-client -d`); stops the daemon with SIGTERM and checks that it exits 0 and
#     removes /dev/ublkb0 or the socket;
#   - checks that the destination equals the expected image and the source is unchanged.
# Then the kernel's own dm-clone against clonebd, both directions (tests/vm/dm-clone.sh, whose
# header lists the checks): clonebd's metadata (partial, fully hydrated, 64 KiB regions with a
# partial last region, a map of 2^24 regions) loaded by `dmsetup create`, serving clonebd's
# hydrated map and data and hydrating to the end; the kernel's commits read back by
# `clonebd check` and `clonebd dump`; the status lines of the same scenario from both,
# compared byte for byte. Debian builds its kernels without CONFIG_DM_CLONE, so dm-clone.ko
# is built here, out of tree, from drivers/md/dm-clone-{target,metadata}.c of the kernel's
# own source package (linux-source-X.Y of the image's version) against its headers
# (linux-headers-RELEASE, its -common part and linux-kbuild), all fetched with `apt-get
# download` and unpacked, not installed (`make -C HEADERS M=DIR`, gcc-12); it is loaded in
# the VM with insmod after its dependencies (loop, crc32c_generic, and what each module's
# modinfo `depends` names: libcrc32c, dm-mod, dm-bufio, dm-persistent-data), unsigned, so
# the kernel is tainted. dmsetup and its libraries are copied into the initramfs.
#
# It prints CLONEBD-VM-RESULT: PASS or FAIL on the console and powers off. This script prints
# the checks' PASS/FAIL lines and the wall time, and exits 0 on PASS, 1 on FAIL or timeout,
# and 77 when a prerequisite is missing (scripts/test.sh turns that into a failure under CI).
#
# Needs: qemu-system-x86 busybox-static cpio xz-utils nbd-client dmsetup make gcc-12, apt-get
# (the kernel packages are fetched with `apt-get download`, no root needed), cargo (clonebd
# is built with --features ublk and its build needs libclang-dev). QEMU emulates the CPU
# (TCG) by default: the VM runs about 3 minutes that way (the first run also downloads
# about 280 MB of packages and builds dm-clone.ko), and KVM is not usable everywhere (nested
# under some hypervisors it cannot run the kernel's decompressor). Work files, the unpacked
# kernel package and the built dm-clone.ko are kept under ${CARGO_TARGET_DIR:-target}/kernel-vm.
#
# Environment: CLONEBD_VM_KERNEL_PKG (a linux-image package name, default: what the
# linux-image-6.12-amd64 or linux-image-amd64 metapackage depends on; Debian 12's 6.1 kernel
# is built without ublk; the 6.12 kernel's source and headers packages are in Debian 12 too,
# so one kernel serves every check), CLONEBD_VM_ACCEL (tcg, the default, or kvm),
# CLONEBD_VM_TIMEOUT (seconds for the VM, default 600), CLONEBD_VM_SCENARIOS (exports,
# dm-clone or both, the default: exports,dm-clone), CLONEBD_BIN (a clonebd built with the
# ublk feature, instead of building one), CLONEBD_VM_NBD_CLIENT (an nbd-client binary,
# default the one on PATH or /usr/sbin/nbd-client).
set -euo pipefail
started=$(date +%s)
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

missing() {
    echo "kernel-vm: missing prerequisite: $*" >&2
    exit 77
}

for tool in qemu-system-x86_64 cpio xz apt-get apt-cache dpkg-deb ldd gzip; do
    command -v "$tool" >/dev/null || missing "$tool"
done
busybox=
for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then
        busybox=$b # statically linked
        break
    fi
done
[ -n "$busybox" ] || missing "a static busybox (package busybox-static)"
nbd_client=${CLONEBD_VM_NBD_CLIENT:-$(command -v nbd-client || echo /usr/sbin/nbd-client)}
[ -x "$nbd_client" ] || missing "nbd-client (package nbd-client)"

target=${CARGO_TARGET_DIR:-$root/target}
work=$target/kernel-vm
mkdir -p "$work"

# The clonebd binary.
if [ -n "${CLONEBD_BIN:-}" ]; then
    bin=$CLONEBD_BIN
else
    command -v cargo >/dev/null || missing cargo
    cargo build --release --locked -p clonebd --features ublk
    bin=$target/release/clonebd
fi
[ -x "$bin" ] || { echo "kernel-vm: no clonebd binary at $bin" >&2; exit 1; }

# The kernel: a Debian linux-image package with ublk_drv, unpacked (not installed).
pkg=${CLONEBD_VM_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
    for meta in linux-image-6.12-amd64 linux-image-amd64; do
        pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
        [ -n "$pkg" ] && break
    done
fi
[ -n "$pkg" ] || missing "a linux-image package known to apt (run apt-get update)"
kdir=$work/kernel-$pkg
if [ ! -d "$kdir" ]; then
    rm -rf "$work/deb" && mkdir -p "$work/deb"
    (cd "$work/deb" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    deb=$(find "$work/deb" -name '*.deb' | head -n1)
    [ -n "$deb" ] || missing "apt-get download $pkg failed"
    rm -rf "$kdir.tmp"
    dpkg-deb -x "$deb" "$kdir.tmp"
    mv "$kdir.tmp" "$kdir"
    rm -rf "$work/deb"
fi
vmlinuz=$(find "$kdir/boot" -name 'vmlinuz-*' | head -n1)
config=$(find "$kdir/boot" -name 'config-*' | head -n1)
if [ -z "$vmlinuz" ] || [ -z "$config" ]; then
    echo "kernel-vm: $pkg has no kernel" >&2
    exit 1
fi
# A driver the test needs: built in, or a module whose path is printed.
driver_module() { # CONFIG_NAME MODULE
    if grep -q "^$1=m" "$config"; then
        local ko
        ko=$(find "$kdir/lib/modules" -name "$2.ko*" | head -n1)
        [ -n "$ko" ] || { echo "kernel-vm: $pkg has no $2 module" >&2; exit 1; }
        echo "$ko"
    elif ! grep -q "^$1=y" "$config"; then
        echo "kernel-vm: $pkg's kernel is built without $1" >&2
        exit 1
    fi
}
ublk_ko=$(driver_module CONFIG_BLK_DEV_UBLK ublk_drv)
nbd_ko=$(driver_module CONFIG_BLK_DEV_NBD nbd)

# dm-clone.ko, built out of tree against the kernel's own headers from its source package
# (Debian builds its kernels without CONFIG_DM_CLONE): the headers, their common part, kbuild
# and the source, all of the image's version, fetched with `apt-get download` and unpacked.
krel=$(basename "$(find "$kdir/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
dmclone=$work/dm-clone-$krel
if [ ! -f "$dmclone/dm-clone.ko" ]; then
    for tool in make gcc-12 xz tar; do
        command -v "$tool" >/dev/null || missing "$tool (to build dm-clone.ko)"
    done
    version=$(apt-cache show "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
    headers=linux-headers-$krel
    deps=$(apt-cache depends "$headers" 2>/dev/null |
        awk '/Depends: linux-(headers-.*-common|kbuild-)/ {print $2}' | sort -u | tr '\n' ' ')
    [ -n "$version" ] && [ -n "$deps" ] || missing "$headers known to apt (run apt-get update)"
    series=$(echo "$krel" | cut -d. -f1-2)
    rm -rf "$work/deb" "$dmclone.tmp" && mkdir -p "$work/deb" "$dmclone.tmp/src"
    # shellcheck disable=SC2086 # $deps is a list of package names
    (cd "$work/deb" && apt-get download "$headers=$version" $deps "linux-source-$series=$version" 2>&1 |
        grep -v '^W: Download is performed unsandboxed' >&2) || true
    for deb in "$work"/deb/linux-headers-*.deb "$work"/deb/linux-kbuild-*.deb; do
        [ -f "$deb" ] || missing "apt-get download $headers $deps failed"
        dpkg-deb -x "$deb" "$dmclone.tmp/root"
    done
    srcdeb=$(find "$work/deb" -name "linux-source-${series}_*.deb" | head -n1)
    [ -n "$srcdeb" ] || missing "apt-get download linux-source-$series=$version failed"
    # dm-clone's files and the headers they include, from the source tarball.
    dpkg-deb --fsys-tarfile "$srcdeb" | tar -xO "./usr/src/linux-source-$series.tar.xz" | xz -dc |
        tar -x -C "$dmclone.tmp/src" --strip-components=3 --wildcards \
            "linux-source-$series/drivers/md/dm-clone*" "linux-source-$series/drivers/md/*.h"
    hdir=$dmclone.tmp/root/usr/src/$headers
    # The headers' Makefile includes the common part by its installed path.
    sed -i "s|^include /usr/src/|include $dmclone.tmp/root/usr/src/|" "$hdir/Makefile"
    printf 'obj-m := dm-clone.o\ndm-clone-y := dm-clone-target.o dm-clone-metadata.o\n' >"$dmclone.tmp/src/Kbuild"
    # No BTF for the module: that needs pahole, and nothing here reads it.
    make -s -C "$hdir" M="$dmclone.tmp/src" CONFIG_DEBUG_INFO_BTF_MODULES= modules >&2 ||
        { echo "kernel-vm: building dm-clone.ko failed" >&2; exit 1; }
    mkdir -p "$dmclone"
    cp "$dmclone.tmp/src/dm-clone.ko" "$dmclone/dm-clone.ko"
    rm -rf "$dmclone.tmp" "$work/deb"
fi

# The initramfs.
rd=$work/initramfs
rm -rf "$rd"
mkdir -p "$rd"/{bin,proc,sys,dev,data}
cp "$busybox" "$rd/bin/busybox"
copy_with_libs() { # FILE DEST: FILE and the shared libraries it loads
    cp "$1" "$2"
    ldd "$1" | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$rd$(dirname "$lib")"
        cp -L "$lib" "$rd$lib"
    done
}
copy_with_libs "$bin" "$rd/bin/clonebd"
if command -v strip >/dev/null; then strip "$rd/bin/clonebd"; fi
copy_with_libs "$nbd_client" "$rd/bin/nbd-client"
copy_module() { # KO NAME: the module KO, uncompressed, as /NAME.ko (nothing for a built-in)
    case "$1" in
        "") ;;
        *.xz) xz -dc "$1" >"$rd/$2.ko" ;;
        *.zst) zstd -dc "$1" >"$rd/$2.ko" ;;
        *.gz) gzip -dc "$1" >"$rd/$2.ko" ;;
        *) cp "$1" "$rd/$2.ko" ;;
    esac
}
copy_module "$ublk_ko" ublk_drv
copy_module "$nbd_ko" nbd
# dm-clone and the modules it needs, in /dm, with the order to load them in /dm/order:
# each module's own dependencies (its modinfo `depends`) before it.
mkdir -p "$rd/dm"
modfield() { tr '\0' '\n' <"$1" | sed -n "s/^$2=//p"; }
add_module() { # NAME [KO]: NAME (from the kernel package, or KO) after its dependencies
    local name=$1 ko=${2:-} dep
    grep -qx "$name" "$rd/dm/order" 2>/dev/null && return
    if [ -z "$ko" ]; then
        ko=$(find "$kdir/lib/modules" \( -name "$name.ko*" -o -name "${name//-/_}.ko*" \
            -o -name "${name//_/-}.ko*" \) | head -n1)
        if [ -z "$ko" ]; then
            # Built in: nothing to load.
            grep -q "/\(${name//-/_}\|${name//_/-}\)\.ko$" "$kdir"/lib/modules/*/modules.builtin && return
            echo "kernel-vm: $pkg has no $name module" >&2
            exit 1
        fi
    fi
    rd_dm=$rd/dm
    case "$ko" in
        *.xz) xz -dc "$ko" >"$rd_dm/$name.ko" ;;
        *.zst) zstd -dc "$ko" >"$rd_dm/$name.ko" ;;
        *) cp "$ko" "$rd_dm/$name.ko" ;;
    esac
    for dep in $(modfield "$rd_dm/$name.ko" depends | tr ',' ' '); do
        add_module "$dep"
    done
    echo "$name" >>"$rd/dm/order"
}
add_module loop
add_module crc32c_generic # libcrc32c's crc32c (a soft dependency, not in `depends`)
add_module dm-clone "$dmclone/dm-clone.ko"
command -v dmsetup >/dev/null || [ -x /usr/sbin/dmsetup ] || missing "dmsetup (package dmsetup)"
copy_with_libs "$(command -v dmsetup || echo /usr/sbin/dmsetup)" "$rd/bin/dmsetup"
cp tests/vm/dm-clone.sh "$rd/dm-clone.sh"

cat >"$rd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=600m tmpfs /data
cd /data

result() {
    echo "CLONEBD-VM-RESULT: $1"
    sync
    poweroff -f
}
fail() {
    echo "kernel-vm: FAIL: $*"
    if [ -f log ]; then
        echo "--- clonebd's log"
        cat log
        echo "---"
    fi
    dmesg | grep -i 'ublk\|nbd\|clone\|device-mapper' | tail -n 20
    result FAIL
}
sum() { sha256sum "$1" | cut -d' ' -f1; }
devsum() { dd if="$1" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }
put() { # FILE OFFSET_KIB LEN_KIB: write FILE's first LEN_KIB KiB at OFFSET_KIB, to $dev and expected
    dd if="$1" of="$dev" bs=1k seek="$2" count="$3" oflag=direct conv=notrunc,fsync 2>/dev/null ||
        fail "writing $3 KiB at $2 KiB through $dev"
    dd if="$1" of=expected bs=1k seek="$2" count="$3" conv=notrunc 2>/dev/null
}
new_clone() { # DIR: a fresh destination of the source in DIR, which becomes the current directory
    mkdir "$1" && cd "$1" || fail "mkdir $1"
    truncate -s 64M dest
    cp /data/src expected
}
start() { # ARGS...: clonebd run over the clone in the current directory, in the background
    # --create for a new clone; a restart goes on with the metadata it has.
    clonebd run --source "$src_img" --dest dest --metadata meta --region-size "$region" \
        $([ -e meta ] || echo --create) --no-hydration --control ctl "$@" >log 2>&1 &
    pid=$!
}
await() { # MESSAGE TEST...: until clonebd logs MESSAGE and TEST holds
    msg=$1
    shift
    i=0
    until grep -q "$msg" log 2>/dev/null && "$@"; do
        kill -0 "$pid" 2>/dev/null || fail "clonebd exited before $msg"
        i=$((i + 1))
        [ "$i" -le 300 ] || fail "not $msg after 30 s"
        sleep 0.1
    done
}
# The checks on a device $dev serving the clone in the current directory, up to hydration.
check_device() { # NAME
    size=$(blockdev --getsize64 "$dev")
    [ "$size" = 67108864 ] || fail "$dev is $size bytes, not 67108864"
    [ "$(devsum "$dev")" = "$src_sum" ] || fail "reading $dev does not give the source"
    echo "kernel-vm: read 64 MiB through $1, equal to the source"

    put /data/patch 1032 4        # 4 KiB inside the region at 1 MiB: the region's rest comes from src
    put /data/patch 10240 1024    # 1 MiB of whole regions at 10 MiB
    put /data/patch 20484 100     # 100 KiB across two regions, neither covered whole
    put /data/patch 65532 4       # the last 4 KiB
    [ "$(devsum "$dev")" = "$(sum expected)" ] || fail "reading back after writes differs"
    echo "kernel-vm: writes through $1 read back as expected"

    clonebd status --control ctl || fail "clonebd status"
    clonebd message --control ctl enable_hydration || fail "enable_hydration"
    clonebd wait --control ctl --timeout 120 --no-progress || fail "clonebd wait"
    [ "$(devsum "$dev")" = "$(sum expected)" ] || fail "reading after hydration differs"
    echo "kernel-vm: hydrated"
}
stop() { # stop clonebd with SIGTERM: it must exit 0
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    [ "$rc" = 0 ] || fail "clonebd exited $rc after SIGTERM"
}
check_clone() { # the destination in the current directory, after clonebd stopped
    [ "$(sum dest)" = "$(sum expected)" ] || fail "the destination is not the source with the writes"
    [ "$(sum /data/src)" = "$src_sum" ] || fail "the source changed"
}

echo "kernel-vm: kernel $(uname -r), $(nproc) CPUs"
t0=$(date +%s)
src_img=/data/src region=64k
scenarios=$(sed -n 's/.*clonebd.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
want() { case " $scenarios " in *" $1 "*) return 0 ;; esac; return 1; }
dd if=/dev/urandom of=src bs=1M count=64 2>/dev/null
src_sum=$(sum src)
dd if=/dev/urandom of=patch bs=1M count=2 2>/dev/null

# ublk_drv, for the ublk export and for clonebd's side of the dm-clone checks.
if [ -f /ublk_drv.ko ]; then
    insmod /ublk_drv.ko || fail "insmod ublk_drv"
fi
[ -c /dev/ublk-control ] || fail "no /dev/ublk-control"

if want exports; then
    # The ublk export: /dev/ublkb0.
    dev=/dev/ublkb0
    new_clone /data/ublk
    start --ublk
    await 'serving the clone as /dev/ublkb0' test -b /dev/ublkb0
    echo "kernel-vm: clonebd serves /dev/ublkb0"
    check_device ublk
    stop
    [ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 still exists after clonebd stopped"
    check_clone
    echo "kernel-vm: clonebd stopped cleanly; the destination holds the clone, the source is unchanged"
    cd /data && rm -rf ublk

    # The NBD export under the kernel's NBD client: /dev/nbd0.
    if [ -f /nbd.ko ]; then
        insmod /nbd.ko nbds_max=1 || fail "insmod nbd"
    fi
    [ -b /dev/nbd0 ] || fail "no /dev/nbd0"
    dev=/dev/nbd0
    new_clone /data/nbd
    start --nbd-unix sock
    await 'serving NBD on unix socket' test -S sock
    nbd-client -unix /data/nbd/sock /dev/nbd0 -N clonebd || fail "nbd-client could not connect /dev/nbd0"
    echo "kernel-vm: nbd-client connected /dev/nbd0 to clonebd"
    # clonebd advertises flushes, so the kernel sends fsync's flush to it as NBD_CMD_FLUSH.
    [ "$(cat /sys/block/nbd0/queue/write_cache)" = "write back" ] ||
        fail "/dev/nbd0 has no write cache: the kernel would not send flushes to clonebd"
    check_device nbd
    nbd-client -d /dev/nbd0 || fail "nbd-client -d /dev/nbd0"
    size=$(blockdev --getsize64 /dev/nbd0)
    [ "$size" = 0 ] || fail "/dev/nbd0 is still $size bytes after nbd-client -d"
    stop
    [ ! -e sock ] || fail "the socket still exists after clonebd stopped"
    check_clone
    echo "kernel-vm: clonebd stopped cleanly; the destination holds the clone, the source is unchanged"
    cd /data && rm -rf nbd
    echo "kernel-vm: ublk and nbd: $(($(date +%s) - t0)) s"
fi

# The kernel's dm-clone against clonebd (tests/vm/dm-clone.sh).
if want dm-clone; then
    . /dm-clone.sh
fi
echo "kernel-vm: all scenarios: $(($(date +%s) - t0)) s"
result PASS
EOF
chmod +x "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

case "${CLONEBD_VM_ACCEL:-tcg}" in
    kvm) accel=(-accel kvm) ;;
    tcg) accel=(-accel "tcg,thread=single") ;;
    *) echo "kernel-vm: CLONEBD_VM_ACCEL must be tcg or kvm" >&2; exit 1 ;;
esac
log=$work/console.log
echo "kernel-vm: booting $(basename "$vmlinuz") (console in $log)" >&2
booted=$(date +%s)
set +e
timeout "${CLONEBD_VM_TIMEOUT:-600}" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 1536 \
    -nographic -no-reboot -nic none \
    -kernel "$vmlinuz" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 clonebd.scenarios=${CLONEBD_VM_SCENARIOS:-exports,dm-clone}" </dev/null >"$log" 2>&1
qemu_rc=$?
set -e
clean() { tr -d '\r' | sed 's/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g'; }
grep -a 'kernel-vm:\|CLONEBD-VM-RESULT' "$log" | clean >&2 || true
wall="wall time $(($(date +%s) - started)) s, the VM $(($(date +%s) - booted)) s"
if grep -aq '^CLONEBD-VM-RESULT: PASS' "$log"; then
    echo "kernel-vm: PASS ($wall)" >&2
    exit 0
fi
[ "$qemu_rc" = 124 ] && echo "kernel-vm: the VM timed out" >&2
echo "kernel-vm: FAIL ($wall; console log: $log)" >&2
tail -n 40 "$log" | clean >&2
exit 1
