# The kernel's own dm-clone against clonebd, both directions; run inside the VM of
# kernel-vm.sh, whose init sources this file after its ublk and NBD checks (it uses that
# init's helpers: fail, put, start, await, stop, sum, devsum and $dev, $src_img, $region).
#
# dm-clone.ko is built by kernel-vm.sh from the kernel's own source package and loaded here
# with its dependencies (/dm/order). Sources, destinations and metadata are files on the
# VM's tmpfs, under the kernel through loop devices (the source read-only). clonebd writes
# through /dev/ublkb0 and the kernel through /dev/mapper/clone, with the same O_DIRECT
# writes (`put`). For each case, clonebd's table words (`clonebd table`, so the hydration
# threshold and batch size are clonebd's defaults on both sides) make the kernel's table:
#   - clonebd's metadata in the kernel: `dmsetup create` loads it, and its status line is
#     clonebd's, byte for byte; over a destination holding a marker everywhere, the kernel
#     reads the marker exactly on the regions `clonebd dump` lists and the source elsewhere
#     (it serves clonebd's hydrated map); over clonebd's destination it reads the clone's
#     data, then hydrates it to the end (enable_hydration);
#   - the kernel's commits in clonebd: after the kernel hydrated, `clonebd check` passes and
#     `clonebd dump` counts every region;
#   - the same scenario in the kernel from zeroed metadata: the status line when fresh and
#     after the writes equals clonebd's, byte for byte; `clonebd check` passes on the
#     kernel's metadata and `clonebd dump` of it equals `clonebd dump` of clonebd's, byte for
#     byte; clonebd restarted on the kernel's metadata prints the kernel's status line; the
#     status line once hydrated is the kernel's, byte for byte;
#   - the fully hydrated metadata clonebd wrote loads in the kernel with every region
#     hydrated (the marker everywhere) and clonebd's status line.
# Cases: 16 MiB at 4 KiB regions (scattered, partial-region and full-region writes, writes
# across two regions, the last region), 16 MiB + 12 KiB at 64 KiB regions (a 12 KiB last
# region), and a 64 GiB sparse clone at 4 KiB regions, a map of 2^24 regions (the bitset's
# btree has an internal node; checked in windows around the writes, and with a kernel write
# read back by `clonebd dump`, without hydrating 64 GiB).
# Each check prints `kernel-vm: PASS: ...`, or `kernel-vm: FAIL: ...` and stops the VM.

export DM_DISABLE_UDEV=1 # no udev here: libdevmapper makes the device nodes itself
dm() { dmsetup --noudevsync "$@"; }
pass() { echo "kernel-vm: PASS: $*"; }
same() { # WHAT EXPECTED ACTUAL: the two lines are equal, byte for byte
    [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
    pass "$1: $3"
}
kcreate() { # META DEST SRC: the kernel's dm-clone `clone` over them, with clonebd's table words $words
    losetup /dev/loop0 "$1" && losetup /dev/loop1 "$2" && losetup -r /dev/loop2 "$3" ||
        fail "losetup $1 $2 $3"
    dm create clone --table "0 $(($(stat -c %s "$3") / 512)) clone /dev/loop0 /dev/loop1 /dev/loop2 $words" ||
        fail "dmsetup create: the kernel refused $1 (table words: $words)"
    [ -b /dev/mapper/clone ] || fail "no /dev/mapper/clone"
}
kremove() { # suspend (the kernel commits) and remove `clone`, free the loop devices
    dm suspend clone && dm remove clone || fail "dmsetup suspend/remove clone"
    losetup -d /dev/loop0 && losetup -d /dev/loop1 && losetup -d /dev/loop2 || fail "losetup -d"
}
kstatus() { dm status clone || fail "dmsetup status clone"; }
khydrate() { # enable the kernel's hydration and wait until every region is hydrated, none in flight
    dm message clone 0 enable_hydration || fail "dmsetup message enable_hydration"
    i=0
    while :; do
        set -- $(kstatus)
        [ "${7%/*}" = "${7#*/}" ] && [ "$8" = 0 ] && break
        i=$((i + 1))
        [ "$i" -le 1800 ] || fail "the kernel has not hydrated after 180 s: $*"
        sleep 0.1
    done
}
ranges() { # META: `clonebd dump`'s hydrated ranges, one "first count" a line
    clonebd dump "$1" | awk '/^  [0-9]/ {
        if (index($1, "..=")) { split($1, a, "[.][.]="); print a[1], a[2] - a[1] + 1 } else print $1, 1 }'
}
hydrated() { # REGION: listed in the file `ranges`
    awk -v r="$1" '$1 <= r && r < $1 + $2 { found = 1 } END { exit !found }' ranges
}
marker_image() { # SIZE: a file `marker` of SIZE bytes of "M"
    dd if=/dev/zero bs=1M count=1 2>/dev/null | tr '\0' 'M' >mchunk
    : >marker
    i=0
    while [ $((i * 1048576)) -lt "$1" ]; do
        dd if=mchunk of=marker bs=1M seek="$i" conv=notrunc 2>/dev/null
        i=$((i + 1))
    done
    truncate -s "$1" marker
}
served_map() { # REGION_BYTES: the kernel reads the marker on `ranges`, the source elsewhere
    cp "$src_img" mexp
    while read -r first count; do
        dd if=marker of=mexp bs="$1" skip="$first" seek="$first" count="$count" conv=notrunc 2>/dev/null
    done <ranges
    [ "$(devsum /dev/mapper/clone)" = "$(sum mexp)" ] ||
        fail "$name: the kernel does not serve clonebd's hydrated map ($(wc -l <ranges) ranges)"
    rm -f mexp
}

ops_4k() { # on $dev: scattered, partial-region, full-region and straddling writes, the last region
    put /data/patch 41 1      # 1 KiB inside region 10
    put /data/patch 400 4     # region 100, whole
    put /data/patch 1024 64   # regions 256..271, whole
    put /data/patch 2050 4    # half of 512, half of 513
    put /data/patch 8190 4    # across regions 2047 and 2048
    put /data/patch 16383 1   # inside the last region, 4095
}
ops_64k() { # on $dev, 64 KiB regions over 16 MiB + 12 KiB: the last region is 12 KiB
    put /data/patch 457 1     # 1 KiB inside region 7
    put /data/patch 640 64    # region 10, whole
    put /data/patch 16388 4   # inside the 12 KiB last region, 256
}

dm_case() { # NAME SIZE_KIB REGION_KIB OPS
    name=$1 size=$(($2 * 1024)) rbytes=$(($3 * 1024)) ops=$4
    t=$(date +%s)
    mkdir "/data/dm-$name" && cd "/data/dm-$name" || fail "mkdir"
    dd if=/data/src of=src bs=1k count="$2" 2>/dev/null
    truncate -s "$size" dest
    cp src expected
    src_img=$PWD/src region=${3}k dev=/dev/ublkb0
    marker_image "$size"

    # clonebd writes the scenario.
    start --ublk
    await 'serving the clone as /dev/ublkb0' test -b /dev/ublkb0
    words=$(clonebd table --control ctl | cut -d' ' -f7-)
    s_fresh=$(clonebd status --control ctl)
    $ops
    s_written=$(clonebd status --control ctl)
    stop
    clonebd check -q meta || fail "$name: clonebd check on clonebd's metadata"
    cp meta meta.clonebd
    ranges meta >ranges

    # clonebd's metadata in the kernel, over the marker: clonebd's status, clonebd's map.
    cp meta meta.k
    kcreate meta.k marker src
    same "$name: the kernel's status on clonebd's metadata" "$s_written" "$(kstatus)"
    served_map "$rbytes"
    pass "$name: the kernel serves clonebd's hydrated map exactly ($(wc -l <ranges) ranges)"
    kremove
    # ... over clonebd's destination: the clone's data, then hydrated by the kernel.
    kcreate meta dest src
    [ "$(devsum /dev/mapper/clone)" = "$(sum expected)" ] || fail "$name: the kernel reads other data"
    pass "$name: the kernel reads the clone clonebd wrote"
    khydrate
    k_hydrated=$(kstatus)
    [ "$(devsum /dev/mapper/clone)" = "$(sum expected)" ] ||
        fail "$name: the kernel reads other data after hydrating"
    kremove
    [ "$(sum dest)" = "$(sum expected)" ] || fail "$name: the kernel's hydrated destination differs"
    pass "$name: the kernel hydrated clonebd's clone: $k_hydrated"
    # The kernel's commits in clonebd.
    clonebd check meta >check.out || { cat check.out; fail "$name: clonebd check on the kernel's commits"; }
    set -- $k_hydrated
    clonebd dump meta | grep -q "^hydrated: *${7} " ||
        fail "$name: clonebd dump of the kernel's commits: $(clonebd dump meta | grep '^hydrated')"
    pass "$name: clonebd check and dump read the kernel's commits ($7 hydrated)"

    # The same scenario in the kernel, from zeroed metadata.
    mkdir k && cd k || fail "mkdir"
    truncate -s "$(stat -c %s ../meta.clonebd)" meta
    truncate -s "$size" dest
    cp ../src expected
    kcreate meta dest ../src
    same "$name: fresh, the kernel's status is clonebd's" "$s_fresh" "$(kstatus)"
    dev=/dev/mapper/clone
    $ops
    same "$name: after the writes, the kernel's status is clonebd's" "$s_written" "$(kstatus)"
    kremove
    clonebd check meta >check.out || { cat check.out; fail "$name: clonebd check on the kernel's metadata"; }
    same "$name: clonebd dump of the kernel's metadata is clonebd dump of clonebd's" \
        "$(clonebd dump ../meta.clonebd | tr '\n' '|')" "$(clonebd dump meta | tr '\n' '|')"
    # clonebd goes on with the kernel's clone, and hydrates it.
    src_img=$PWD/../src dev=/dev/ublkb0
    start --ublk
    await 'serving the clone as /dev/ublkb0' test -b /dev/ublkb0
    same "$name: clonebd's status on the kernel's metadata is the kernel's" "$s_written" \
        "$(clonebd status --control ctl)"
    clonebd message --control ctl enable_hydration || fail "enable_hydration"
    clonebd wait --control ctl --timeout 120 --no-progress || fail "clonebd wait"
    same "$name: hydrated, clonebd's status is the kernel's" "$k_hydrated" "$(clonebd status --control ctl)"
    # Fully hydrated metadata from clonebd, with hydration off as the table says.
    clonebd message --control ctl disable_hydration || fail "disable_hydration"
    s_full=$(clonebd status --control ctl)
    stop
    [ "$(sum dest)" = "$(sum expected)" ] || fail "$name: clonebd's hydrated destination differs"
    ranges meta >ranges
    kcreate meta ../marker ../src
    same "$name: fully hydrated, the kernel's status on clonebd's metadata" "$s_full" "$(kstatus)"
    [ "$(devsum /dev/mapper/clone)" = "$(sum ../marker)" ] ||
        fail "$name: the kernel does not serve every region of clonebd's hydrated clone"
    pass "$name: the kernel serves every region of clonebd's fully hydrated metadata"
    kremove
    cd /data && rm -rf "/data/dm-$name"
    echo "kernel-vm: $name: $(($(date +%s) - t)) s"
}

dm_case_2p24() { # a 64 GiB sparse clone at 4 KiB regions: 2^24 regions
    name=map-2^24
    t=$(date +%s)
    mkdir /data/dm-big && cd /data/dm-big || fail "mkdir"
    truncate -s 64G src dest expected marker
    src_img=$PWD/src region=4k dev=/dev/ublkb0
    start --ublk --no-preallocate # 64 GiB: a sparse destination on the tmpfs
    await 'serving the clone as /dev/ublkb0' test -b /dev/ublkb0
    words=$(clonebd table --control ctl | cut -d' ' -f7-)
    put /data/patch 0 4               # region 0
    put /data/patch 10485760 28       # regions 2621440..2621446 (10 GiB)
    put /data/patch 33554434 1        # 1 KiB inside region 8388608 (32 GiB)
    put /data/patch 67108860 4        # the last region, 16777215
    s_written=$(clonebd status --control ctl)
    stop
    ranges meta >ranges
    set -- $s_written
    [ "$7" = 10/16777216 ] || fail "$name: clonebd's status: $s_written"
    # The marker in windows around the writes; the rest of the marker destination is a hole.
    dd if=/dev/zero bs=4k count=8 2>/dev/null | tr '\0' 'M' >mchunk
    windows="0 2621437 2621443 8388605 16777208"
    for w in $windows; do
        dd if=mchunk of=marker bs=4k seek="$w" conv=notrunc 2>/dev/null
    done
    cp meta meta.k
    kcreate meta.k marker src
    same "$name: the kernel's status on clonebd's metadata" "$s_written" "$(kstatus)"
    for w in $windows; do
        : >wexp
        r=$w
        while [ "$r" -lt $((w + 8)) ]; do
            if hydrated "$r"; then from=mchunk; else from=/dev/zero; fi
            dd if="$from" of=wexp bs=4k count=1 seek=$((r - w)) conv=notrunc 2>/dev/null
            r=$((r + 1))
        done
        [ "$(dd if=/dev/mapper/clone bs=4k skip="$w" count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" = \
            "$(sum wexp)" ] || fail "$name: the kernel does not serve clonebd's map in regions $w..$((w + 7))"
    done
    pass "$name: the kernel serves clonebd's hydrated map in regions around every write"
    kremove
    # A kernel write, committed by the kernel, read back by clonebd.
    kcreate meta dest src
    dev=/dev/mapper/clone
    put /data/patch 50331648 4 # region 12582912 (48 GiB)
    set -- $(kstatus)
    [ "$7" = 11/16777216 ] || fail "$name: the kernel's status after its write: $*"
    kremove
    clonebd check meta >check.out || { cat check.out; fail "$name: clonebd check on the kernel's commit"; }
    printf '0 1\n2621440 7\n8388608 1\n12582912 1\n16777215 1\n' >want
    ranges meta >got
    cmp -s want got || fail "$name: clonebd dump of the kernel's commit: $(tr '\n' ',' <got)"
    pass "$name: clonebd check and dump read the kernel's commit: $(tr '\n' ',' <got)"
    cd /data && rm -rf /data/dm-big
    echo "kernel-vm: $name: $(($(date +%s) - t)) s"
}

for m in $(cat /dm/order); do
    insmod "/dm/$m.ko" || fail "insmod $m"
done
echo "kernel-vm: dm-clone loaded: $(dmesg | grep -o 'device-mapper: ioctl: [^ ]* [^ ]*' | tail -n 1)"
[ -b /dev/loop0 ] || fail "no /dev/loop0"
dm_case 4k 16384 4 ops_4k
dm_case 64k-tail 16396 64 ops_64k
dm_case_2p24
