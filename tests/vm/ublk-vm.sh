#!/usr/bin/env bash
# End-to-end test of the ublk export (`clonebd run --ublk`) in a small QEMU virtual machine.
#
# The ublk export needs the kernel's ublk_drv, which the machines that build clonebd do not
# always have. This script boots a Debian kernel that has it (CONFIG_BLK_DEV_UBLK) in QEMU,
# with a minimal initramfs holding busybox, the clonebd binary and its shared libraries, and
# ublk_drv.ko. Inside the VM it:
#   - loads ublk_drv and makes a 64 MiB random source image;
#   - starts `clonebd run --ublk --no-hydration --region-size 64k` in the background and
#     waits for /dev/ublkb0;
#   - checks the device's size, reads it whole with O_DIRECT and compares its sha256 with
#     the source's;
#   - writes through /dev/ublkb0 with O_DIRECT (a block inside a region, which must copy the
#     rest of the region from the source, whole regions, across two regions, the last block)
#     and flushes each, then reads the whole device back and compares it with the expected
#     image;
#   - enables hydration, waits for it with `clonebd wait`, stops the daemon with SIGTERM and
#     checks that it exits 0 and removes /dev/ublkb0;
#   - checks that the destination equals the expected image and the source is unchanged.
# It prints CLONEBD-VM-RESULT: PASS or FAIL on the console and powers off. This script exits
# 0 on PASS, 1 on FAIL or timeout, and 77 when a prerequisite is missing (scripts/test.sh
# turns that into a failure under CI).
#
# Needs: qemu-system-x86 busybox-static cpio xz-utils, apt-get (the kernel package is fetched
# with `apt-get download`, no root needed), cargo (clonebd is built with --features ublk and
# its build needs libclang-dev). QEMU emulates the CPU (TCG) by default: the whole run takes
# well under a minute that way, and KVM is not usable everywhere (nested under some
# hypervisors it cannot run the kernel's decompressor). Work files and the downloaded kernel
# package are kept under ${CARGO_TARGET_DIR:-target}/ublk-vm.
#
# Environment: CLONEBD_VM_KERNEL_PKG (a linux-image package name, default: what the
# linux-image-6.12-amd64 or linux-image-amd64 metapackage depends on; Debian 12's 6.1 kernel
# is built without ublk), CLONEBD_VM_ACCEL (tcg, the default, or kvm), CLONEBD_VM_TIMEOUT
# (seconds for the VM, default 600), CLONEBD_BIN (a clonebd built with the ublk feature,
# instead of building one).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

missing() {
    echo "ublk-vm: missing prerequisite: $*" >&2
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

target=${CARGO_TARGET_DIR:-$root/target}
work=$target/ublk-vm
mkdir -p "$work"

# The clonebd binary.
if [ -n "${CLONEBD_BIN:-}" ]; then
    bin=$CLONEBD_BIN
else
    command -v cargo >/dev/null || missing cargo
    cargo build --release --locked -p clonebd --features ublk
    bin=$target/release/clonebd
fi
[ -x "$bin" ] || { echo "ublk-vm: no clonebd binary at $bin" >&2; exit 1; }

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
    echo "ublk-vm: $pkg has no kernel" >&2
    exit 1
fi
ublk_ko=
if grep -q '^CONFIG_BLK_DEV_UBLK=m' "$config"; then
    ublk_ko=$(find "$kdir/lib/modules" -name 'ublk_drv.ko*' | head -n1)
    [ -n "$ublk_ko" ] || { echo "ublk-vm: $pkg has no ublk_drv module" >&2; exit 1; }
elif ! grep -q '^CONFIG_BLK_DEV_UBLK=y' "$config"; then
    echo "ublk-vm: $pkg's kernel is built without CONFIG_BLK_DEV_UBLK" >&2
    exit 1
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
case "$ublk_ko" in
    "") ;;
    *.xz) xz -dc "$ublk_ko" >"$rd/ublk_drv.ko" ;;
    *.zst) zstd -dc "$ublk_ko" >"$rd/ublk_drv.ko" ;;
    *.gz) gzip -dc "$ublk_ko" >"$rd/ublk_drv.ko" ;;
    *) cp "$ublk_ko" "$rd/ublk_drv.ko" ;;
esac

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
    echo "ublk-vm: FAIL: $*"
    if [ -f /data/log ]; then
        echo "--- clonebd's log"
        cat /data/log
        echo "---"
    fi
    dmesg | grep -i ublk | tail -n 20
    result FAIL
}
sum() { sha256sum "$1" | cut -d' ' -f1; }
devsum() { dd if="$1" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }
put() { # FILE OFFSET_KIB LEN_KIB: write FILE's first LEN_KIB KiB at OFFSET_KIB, to dev and expected
    dd if="$1" of=/dev/ublkb0 bs=1k seek="$2" count="$3" oflag=direct conv=notrunc,fsync 2>/dev/null ||
        fail "writing $3 KiB at $2 KiB through /dev/ublkb0"
    dd if="$1" of=expected bs=1k seek="$2" count="$3" conv=notrunc 2>/dev/null
}

echo "ublk-vm: kernel $(uname -r), $(nproc) CPUs"
if [ -f /ublk_drv.ko ]; then
    insmod /ublk_drv.ko || fail "insmod ublk_drv"
fi
[ -c /dev/ublk-control ] || fail "no /dev/ublk-control"

dd if=/dev/urandom of=src bs=1M count=64 2>/dev/null
src_sum=$(sum src)
truncate -s 64M dest
cp src expected
dd if=/dev/urandom of=patch bs=1M count=2 2>/dev/null

clonebd run --source src --dest dest --metadata meta --region-size 64k --no-hydration \
    --ublk --control ctl >log 2>&1 &
pid=$!
i=0
until grep -q 'serving the clone as /dev/ublkb0' log 2>/dev/null && [ -b /dev/ublkb0 ]; do
    kill -0 "$pid" 2>/dev/null || fail "clonebd exited before serving /dev/ublkb0"
    i=$((i + 1))
    [ "$i" -le 300 ] || fail "no /dev/ublkb0 after 30 s"
    sleep 0.1
done
echo "ublk-vm: clonebd serves /dev/ublkb0"

size=$(blockdev --getsize64 /dev/ublkb0)
[ "$size" = 67108864 ] || fail "/dev/ublkb0 is $size bytes, not 67108864"
[ "$(devsum /dev/ublkb0)" = "$src_sum" ] || fail "reading /dev/ublkb0 does not give the source"
echo "ublk-vm: read 64 MiB through ublk, equal to the source"

put patch 1032 4        # 4 KiB inside the region at 1 MiB: the region's rest comes from src
put patch 10240 1024    # 1 MiB of whole regions at 10 MiB
put patch 20484 100     # 100 KiB across two regions, neither covered whole
put patch 65532 4       # the last 4 KiB
[ "$(devsum /dev/ublkb0)" = "$(sum expected)" ] || fail "reading back after writes differs"
echo "ublk-vm: writes through ublk read back as expected"

clonebd status --control ctl || fail "clonebd status"
clonebd message --control ctl enable_hydration || fail "enable_hydration"
clonebd wait --control ctl --timeout 120 --no-progress || fail "clonebd wait"
[ "$(devsum /dev/ublkb0)" = "$(sum expected)" ] || fail "reading after hydration differs"
echo "ublk-vm: hydrated"

kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" = 0 ] || fail "clonebd exited $rc after SIGTERM"
[ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 still exists after clonebd stopped"
[ "$(sum dest)" = "$(sum expected)" ] || fail "the destination is not the source with the writes"
[ "$(sum src)" = "$src_sum" ] || fail "the source changed"
echo "ublk-vm: clonebd stopped cleanly; the destination holds the clone, the source is unchanged"
result PASS
EOF
chmod +x "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

case "${CLONEBD_VM_ACCEL:-tcg}" in
    kvm) accel=(-accel kvm) ;;
    tcg) accel=(-accel "tcg,thread=single") ;;
    *) echo "ublk-vm: CLONEBD_VM_ACCEL must be tcg or kvm" >&2; exit 1 ;;
esac
log=$work/console.log
echo "ublk-vm: booting $(basename "$vmlinuz") (console in $log)" >&2
set +e
timeout "${CLONEBD_VM_TIMEOUT:-600}" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 1536 \
    -nographic -no-reboot -nic none \
    -kernel "$vmlinuz" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4" </dev/null >"$log" 2>&1
qemu_rc=$?
set -e
clean() { tr -d '\r' | sed 's/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g'; }
grep -a 'ublk-vm:\|CLONEBD-VM-RESULT' "$log" | clean >&2 || true
if grep -aq '^CLONEBD-VM-RESULT: PASS' "$log"; then
    echo "ublk-vm: PASS" >&2
    exit 0
fi
[ "$qemu_rc" = 124 ] && echo "ublk-vm: the VM timed out" >&2
echo "ublk-vm: FAIL (console log: $log)" >&2
tail -n 40 "$log" | clean >&2
exit 1
