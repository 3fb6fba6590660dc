#!/usr/bin/env bash
# clonebd's whole test suite, as CI runs it:
#  - every crate's tests: unit and scenario tests, the model-based engine test, 10,000 seeds
#    of the power-cut simulation, golden tests against kernel-written metadata, real NBD
#    clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against the real binary, the
#    SIGKILL-and-restart test, and (as root, with /dev/fuse) ext4 on a loop device over FUSE;
#  - a short run of every fuzz target (CLONEBD_FUZZ_SECONDS per target, default 30).
#
# The real-client tests need qemu-utils libnbd-bin fio fuse3 e2fsprogs util-linux, and the
# ublk feature's build needs libclang-dev (.ci/run installs them all). Benchmarks are not run
# here (bench/ and `cargo bench`); clippy in .ci/run checks that they build.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --locked
bash fuzz/run-smoke.sh "${CLONEBD_FUZZ_SECONDS:-30}"
