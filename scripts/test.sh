#!/usr/bin/env bash
# clonebd's whole test suite, as CI runs it:
#  - every crate's tests: unit and scenario tests, the model-based engine test, 10,000 seeds
#    of the power-cut simulation, golden tests against kernel-written metadata, real NBD
#    clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against the real binary, the
#    SIGKILL-and-restart test, and (as root, with /dev/fuse) ext4 on a loop device over FUSE;
#  - the ublk export and the kernel's NBD client end to end in a small VM
#    (tests/vm/kernel-vm.sh): /dev/ublkb0 served by `clonebd run --ublk` and /dev/nbd0
#    connected by nbd-client to `clonebd run --nbd-unix`, on a Debian kernel with ublk_drv
#    and nbd, booted in QEMU; and in the same VM the kernel's own dm-clone (built there from
#    the kernel's source package) on clonebd's metadata and clonebd on the kernel's, with
#    their status lines compared byte for byte (tests/vm/dm-clone.sh). Under CI (CI=true) a
#    missing prerequisite fails; elsewhere the test is skipped with a message;
#  - a short run of every fuzz target (CLONEBD_FUZZ_SECONDS per target, default 30).
#
# The real-client tests need qemu-utils libnbd-bin fio fuse3 e2fsprogs util-linux, the
# ublk feature's build needs libclang-dev, and the VM test needs qemu-system-x86
# busybox-static cpio xz-utils nbd-client dmsetup make gcc-12 and apt-get (.ci/run installs
# them all).
# Benchmarks are not run here (bench/ and `cargo bench`); clippy in .ci/run checks that they
# build.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --locked

vm_status=0
bash tests/vm/kernel-vm.sh || vm_status=$?
case $vm_status in
    0) ;;
    77)
        if [ "${CI:-}" = true ]; then
            echo "VM test: prerequisites missing under CI" >&2
            exit 1
        fi
        echo "VM test skipped: prerequisites missing (see tests/vm/kernel-vm.sh)" >&2
        ;;
    *) exit "$vm_status" ;;
esac
bash fuzz/run-smoke.sh "${CLONEBD_FUZZ_SECONDS:-30}"
