# The VM suite for vduse-blkd (busybox sh): tools/vm/run sid tools/vm/guest/suite.sh
# One RESULT line per case. VM_CASES="a b" (tools/vm/run --env) runs only those cases.
# shellcheck source=lib.sh
. /guest/lib.sh
export CASE_SCRIPT=/guest/suite.sh
MIB=1048576 # bytes

# bounded LIMIT_S OUT ERR CMD...: run CMD with stdout/stderr to files, killed (SIGKILL:
# a SIGTERM'd daemon would exit 0) after LIMIT_S; sets RC; fails the case on a timeout.
bounded() {
    _lim=$1 _o=$2 _e=$3
    shift 3
    timeout -s KILL "$_lim" "$@" >"$_o" 2>"$_e"
    RC=$?
    [ "$RC" != 137 ] || fail "'$*' did not finish within ${_lim}s"
}

need_daemon() {
    [ "$VM_BACKEND" != vduse-blkd ] || command -v vduse-blkd >/dev/null ||
        fail "vduse-blkd is not in this guest (build it: cargo build --release)"
}

# expected VDUSE API version from the running kernel: 7.x and later -> 1, 6.x -> 0
expected_api() {
    _major=$(uname -r | cut -d. -f1)
    if [ "$_major" -ge 7 ]; then echo 1; else echo 0; fi
}

# expected VDUSE_GET_FEATURES offer: 7.3 and later offer QUEUE_READY|SUSPEND (3), earlier
# kernels have no such ioctl (-)
expected_features() {
    _maj=$(uname -r | cut -d. -f1)
    _min=$(uname -r | cut -d. -f2 | sed 's/[^0-9].*//')
    if [ "$_maj" -gt 7 ] || { [ "$_maj" = 7 ] && [ "$_min" -ge 3 ]; }; then echo 3; else echo -; fi
}

# md5 of LEN_MIB MiB at OFF_MIB MiB of FILE (direct I/O for block devices)
md5_range() {
    _fl=
    [ -b "$1" ] && _fl=iflag=direct
    # shellcheck disable=SC2086
    dd if="$1" bs=1M skip="$2" count="$3" $_fl 2>/dev/null | md5sum | cut -d' ' -f1
}

zero_md5() { dd if=/dev/zero bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1; }

# ---------------------------------------------------------------------------------
case_missing_module() {
    need_daemon
    [ ! -d /sys/module/vduse ] || fail "the vduse module is already loaded (this case must run first)"
    rm -f /tmp/x.img
    bounded 30 /tmp/mm.out /tmp/mm.err vduse-blkd serve /tmp/x.img --name t --size 16M
    [ "$RC" != 0 ] || fail "serve exited 0 without the vduse module"
    { grep -qi vduse /tmp/mm.err && grep -qi module /tmp/mm.err; } ||
        fail "serve's stderr does not mention 'vduse' and 'module': $(head -c 300 /tmp/mm.err)"
    [ ! -e /tmp/x.img ] || fail "serve created /tmp/x.img although it could not serve it"
    [ ! -s /tmp/mm.out ] || fail "serve printed on stdout: $(head -c 200 /tmp/mm.out)"
    # a probe reports what is missing and exits 0
    bounded 30 /tmp/mp.out /tmp/mp.err vduse-blkd probe
    [ "$RC" = 0 ] || fail "probe exited $RC without the vduse module: $(head -c 300 /tmp/mp.err)"
    grep -q '^missing: *vduse ' /tmp/mp.out ||
        fail "probe does not report vduse as missing: $(cat /tmp/mp.out)"
    bounded 30 /tmp/mpj.out /tmp/mpj.err vduse-blkd probe --json
    [ "$RC" = 0 ] || fail "probe --json exited $RC without the vduse module: $(head -c 300 /tmp/mpj.err)"
    tr -d ' \n' </tmp/mpj.out | grep -q '"vduse":{"control_device":false' ||
        fail "probe --json lacks vduse.control_device=false: $(head -c 600 /tmp/mpj.out)"
}

case_load_modules() {
    load_vduse_modules || fail "loading vduse/virtio_vdpa/vhost_vdpa failed"
    [ -c /dev/vduse/control ] || fail "no /dev/vduse/control"
}

case_probe() {
    need_daemon
    bounded 30 /tmp/p.out /tmp/p.err vduse-blkd probe
    [ "$RC" = 0 ] || fail "probe exited $RC: $(head -c 300 /tmp/p.err)"
    [ -s /tmp/p.out ] || fail "probe printed nothing"
    sed 's/^/#   /' /tmp/p.out
    bounded 30 /tmp/pj.out /tmp/pj.err vduse-blkd probe --json
    [ "$RC" = 0 ] || fail "probe --json exited $RC: $(head -c 300 /tmp/pj.err)"
    got=$(tr -d '\n' </tmp/pj.out | grep -o '"api_version_chosen" *: *[0-9]*' | grep -o '[0-9]*$')
    want=$(expected_api)
    [ -n "$got" ] || fail "probe --json has no \"api_version_chosen\": $(head -c 300 /tmp/pj.out)"
    [ "$got" = "$want" ] || fail "api_version_chosen is $got, want $want on $(uname -r)"
    flat=$(tr -d ' \n' </tmp/pj.out)
    case $(expected_features) in
    -)
        echo "$flat" | grep -q '"features_ioctl":false' ||
            fail "features_ioctl should be false on $(uname -r): $flat"
        grep -q 'VDUSE features: *none' /tmp/p.out || fail "probe should print no VDUSE features on $(uname -r)"
        ;;
    *)
        echo "$flat" | grep -q '"features":3,"features_enabled":3,"features_ioctl":true' ||
            fail "want features 3 offered and enabled, ioctl present on $(uname -r): $flat"
        grep -q 'VDUSE features: *0x3 offered (QUEUE_READY SUSPEND), 0x3 enabled' /tmp/p.out ||
            fail "probe's features line on $(uname -r): $(grep 'VDUSE features' /tmp/p.out)"
        ;;
    esac
}

# fio job shared by the write pass (device) and the check pass (backing file):
# same seed, offsets, sizes and block sizes, so --verify_only re-derives every block.
FV_REGION1="--offset=0 --size=128M --iodepth=1"
FV_REGION2="--offset=128M --size=256M --iodepth=32"
fv_jobs() {
    # fv_jobs FILE ENGINE DIRECT EXTRA...
    _f=$1 _eng=$2 _dir=$3
    shift 3
    # shellcheck disable=SC2086
    fio --filename="$_f" --ioengine="$_eng" --direct="$_dir" --rw=randwrite --bsrange=4k-128k \
        --verify=crc32c --verify_fatal=1 --randrepeat=1 --randseed=4242 --norandommap=0 \
        --output-format=terse "$@" \
        --name=qd1 $FV_REGION1 --name=qd32 $FV_REGION2
}

case_fio_verify() { fio_verify_with; }
# The same with busy-polling workers (serve --poll-us): the poll loop serves every request.
case_fio_verify_poll() { fio_verify_with --poll-us 50; }
# The same through the kernel's bounce pages (mmap of IOTLB_GET_FD) instead of our umem.
case_fio_verify_copy() { fio_verify_with --zero-copy off; }

# fixed_ios NAME: the fixed-buffer I/O count of the stop line of daemon NAME ("-" if none).
fixed_ios() {
    _n=$(sed -n 's/^vduse-blkd: stopped: .* \([0-9][0-9]*\) on fixed buffers.*/\1/p' "/tmp/daemon.$1.err")
    echo "${_n:--}"
}

# assert_zero_copy NAME on|off: the stopped daemon NAME did (on) or did not (off) use fixed
# buffers: zero copy is the default where the kernel allows it (virtio_vdpa, 6.x and 7.x).
assert_zero_copy() {
    [ "$VM_BACKEND" = vduse-blkd ] || return 0
    _n=$(fixed_ios "$1")
    case "$2:$_n" in
    *:-) show_tail "/tmp/daemon.$1.err"; fail "$1: no fixed-buffer count in the stop line" ;;
    on:0) show_tail "/tmp/daemon.$1.err"; fail "$1: zero copy was expected, yet no I/O used fixed buffers" ;;
    off:0) note "$1: no fixed-buffer I/O (zero copy off)" ;;
    off:*) fail "$1: --zero-copy off, yet $_n I/Os used fixed buffers" ;;
    on:*) note "$1: $_n I/Os on fixed buffers (zero copy)" ;;
    esac
}

# fio_verify_with [SERVE-FLAGS...]
fio_verify_with() {
    need_daemon
    rm -f /tmp/fv.img
    truncate -s 512M /tmp/fv.img
    start_daemon fv /tmp/fv.img --queues 2 "$@"
    nq=$(find "/sys/block/${DEV#/dev/}/mq" -mindepth 1 -maxdepth 1 | wc -l)
    [ "$nq" = 2 ] || fail "$DEV has $nq hardware queues, want 2 (--queues 2)"
    if ! fv_jobs "$DEV" libaio 1 --do_verify=1 >/tmp/fv.fio 2>&1; then
        show_tail /tmp/fv.fio
        fail "fio write+verify through $DEV failed: $(grep -m 1 -i -E 'verify|error' /tmp/fv.fio)"
    fi
    written=$(awk -F';' '{w += $47} END {print int(w / 1024)}' /tmp/fv.fio)
    note "fio wrote ${written} MiB through $DEV and verified it"
    [ "$written" -ge 256 ] || fail "fio wrote only ${written} MiB (want >= 256)"
    stop_daemon fv
    case " $* " in
    *" --zero-copy off "*) assert_zero_copy fv off ;;
    *) assert_zero_copy fv on ;;
    esac
    # After shutdown: the file itself must hold every block fio wrote.
    if ! fv_jobs /tmp/fv.img psync 0 --verify_only >/tmp/fv2.fio 2>&1; then
        show_tail /tmp/fv2.fio
        fail "backing file does not match what fio wrote: $(grep -m 1 -i -E 'verify|error' /tmp/fv2.fio)"
    fi
    # The check must be able to fail: corrupt one block and expect a verify error.
    printf 'X' | dd of=/tmp/fv.img bs=1 seek=$((200 * MIB + 777)) conv=notrunc 2>/dev/null
    if fv_jobs /tmp/fv.img psync 0 --verify_only >/tmp/fv3.fio 2>&1; then
        fail "verify_only did not notice a corrupted byte in the backing file (the check is blind)"
    fi
    rm -f /tmp/fv.img
}

case_ext4() {
    need_daemon
    rm -f /tmp/e.img
    truncate -s 256M /tmp/e.img
    start_daemon ex /tmp/e.img
    /sbin/mke2fs -q -F -t ext4 "$DEV" >/tmp/ex.mkfs 2>&1 || fail "mke2fs failed: $(tail -n 3 /tmp/ex.mkfs)"
    mkdir -p /mnt/ex
    mount -t ext4 "$DEV" /mnt/ex || fail "mount $DEV failed"
    for i in 1 2 3 4 5; do
        dd if=/dev/urandom of="/mnt/ex/f$i" bs=64k count=$((i * 40)) 2>/dev/null || fail "writing f$i failed"
    done
    mkdir /mnt/ex/d && dd if=/dev/urandom of=/mnt/ex/d/small bs=1k count=3 2>/dev/null
    (cd /mnt/ex && md5sum f1 f2 f3 f4 f5 d/small) >/tmp/ex.md5
    sync
    umount /mnt/ex || fail "umount failed"
    /sbin/e2fsck -fn "$DEV" >/tmp/ex.fsck 2>&1 || { show_tail /tmp/ex.fsck; fail "e2fsck -fn $DEV not clean"; }
    mount -t ext4 "$DEV" /mnt/ex || fail "second mount failed"
    (cd /mnt/ex && md5sum -c /tmp/ex.md5 >/tmp/ex.check 2>&1) || { show_tail /tmp/ex.check; fail "md5sums differ after remount"; }
    umount /mnt/ex || fail "second umount failed"
    stop_daemon ex
    /sbin/e2fsck -fn /tmp/e.img >/tmp/ex.fsck2 2>&1 || { show_tail /tmp/ex.fsck2; fail "e2fsck of the backing file not clean"; }
    # the files' data must be in the backing file itself
    for f in f1 f3 f5 d/small; do
        /sbin/debugfs -R "dump /$f /tmp/ex.dump" /tmp/e.img >/dev/null 2>&1 || fail "debugfs could not read /$f from the backing file"
        want=$(grep " $f\$" /tmp/ex.md5 | cut -d' ' -f1)
        got=$(md5sum /tmp/ex.dump | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "/$f in the backing file has md5 $got, want $want"
    done
    rm -f /tmp/e.img /tmp/ex.dump
}

case_discard_zeroes() {
    need_daemon
    rm -f /tmp/dz.img
    truncate -s 64M /tmp/dz.img
    start_daemon dz /tmp/dz.img
    q=/sys/block/${DEV#/dev/}/queue
    [ "$(cat "$q/discard_max_bytes")" -gt 0 ] || fail "$DEV does not advertise discard"
    [ "$(cat "$q/write_zeroes_max_bytes")" -gt 0 ] || fail "$DEV does not advertise write zeroes"
    dd if=/dev/urandom of=/tmp/dz.rand bs=1M count=24 2>/dev/null
    # write [8M, 32M) with fsync (flush path) and check it landed
    dd if=/tmp/dz.rand of="$DEV" bs=1M seek=8 oflag=direct conv=fsync 2>/tmp/dz.dd ||
        fail "dd conv=fsync to $DEV failed: $(cat /tmp/dz.dd)"
    want=$(md5sum </tmp/dz.rand | cut -d' ' -f1)
    [ "$(md5_range "$DEV" 8 24)" = "$want" ] || fail "data read back from $DEV differs"
    [ "$(md5_range /tmp/dz.img 8 24)" = "$want" ] || fail "backing file does not hold the written data"
    blocks0=$(stat -c %b /tmp/dz.img)
    # discard [8M, 16M): reads back zeroes and punches a hole in the file
    /sbin/blkdiscard -o $((8 * MIB)) -l $((8 * MIB)) "$DEV" 2>/tmp/dz.bd || fail "blkdiscard failed: $(cat /tmp/dz.bd)"
    z8=$(zero_md5 8)
    [ "$(md5_range "$DEV" 8 8)" = "$z8" ] || fail "discarded range does not read back as zeroes"
    [ "$(md5_range /tmp/dz.img 8 8)" = "$z8" ] || fail "discarded range of the backing file is not zero"
    blocks1=$(stat -c %b /tmp/dz.img)
    note "backing file blocks: $blocks0 before discard, $blocks1 after"
    [ "$blocks1" -le $((blocks0 - 8 * 2048)) ] || fail "no hole: backing file has $blocks1 blocks after discarding 8 MiB (had $blocks0)"
    # write zeroes on [16M, 24M)
    /sbin/blkdiscard -z -o $((16 * MIB)) -l $((8 * MIB)) "$DEV" 2>/tmp/dz.bz || fail "blkdiscard -z failed: $(cat /tmp/dz.bz)"
    [ "$(md5_range "$DEV" 16 8)" = "$z8" ] || fail "write-zeroes range does not read back as zeroes"
    [ "$(md5_range /tmp/dz.img 16 8)" = "$z8" ] || fail "write-zeroes range of the backing file is not zero"
    # [24M, 32M) untouched
    want=$(dd if=/tmp/dz.rand bs=1M skip=16 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$(md5_range "$DEV" 24 8)" = "$want" ] || fail "data next to the discarded ranges changed"
    sync || fail "sync failed"
    stop_daemon dz
    [ "$(md5_range /tmp/dz.img 24 8)" = "$want" ] || fail "backing file lost data next to the discarded ranges"
    rm -f /tmp/dz.img /tmp/dz.rand
}

case_readonly() {
    need_daemon
    dd if=/dev/urandom of=/tmp/ro.img bs=1M count=16 2>/dev/null
    want=$(md5sum </tmp/ro.img | cut -d' ' -f1)
    start_daemon ro /tmp/ro.img --readonly
    [ "$(cat "/sys/block/${DEV#/dev/}/ro")" = 1 ] || fail "/sys/block/${DEV#/dev/}/ro is not 1"
    [ "$(blockdev --getro "$DEV")" = 1 ] || fail "blockdev --getro $DEV is not 1"
    [ "$(md5_range "$DEV" 0 16)" = "$want" ] || fail "reading $DEV does not give the file's content"
    if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct 2>/tmp/ro.dd; then
        fail "a direct write to the read-only $DEV succeeded"
    fi
    note "write refused: $(head -n 1 /tmp/ro.dd)"
    stop_daemon ro
    [ "$(md5sum </tmp/ro.img | cut -d' ' -f1)" = "$want" ] || fail "the backing file changed"
    rm -f /tmp/ro.img
}

case_sigterm_under_load() {
    need_daemon
    rm -f /tmp/sl.img
    truncate -s 256M /tmp/sl.img
    start_daemon sl /tmp/sl.img --queues 2
    dpid=$DAEMON_PID
    disk=${DEV#/dev/}
    bg_start /tmp/sl.fio fio --name=load --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 \
        --ioengine=libaio --direct=1 --time_based --runtime=300 --numjobs=2
    fpid=$BG_PID
    # wait until writes are really flowing
    end=$(($(now) + 60))
    while [ "$(awk '{print $5}' "/sys/block/$disk/stat" 2>/dev/null || echo 0)" -lt 2000 ]; do
        proc_gone "$fpid" && { show_tail /tmp/sl.fio; fail "fio ended before the load was up"; }
        [ "$(now)" -lt "$end" ] || fail "fio did not complete 2000 writes within 60s"
        sleep 0.1
    done
    note "under load ($(awk '{print $5}' "/sys/block/$disk/stat") writes done); SIGTERM to the daemon"
    kill -TERM "$dpid"
    t0=$(now)
    wait_gone "$dpid" 60 || { show_tail /tmp/daemon.sl.err; fail "daemon did not exit within 60s of SIGTERM under load"; }
    wait "$dpid"
    rc=$?
    note "daemon exited $rc after $(($(now) - t0))s"
    [ "$rc" = 0 ] || { show_tail /tmp/daemon.sl.err; fail "daemon exited $rc after SIGTERM under load (want 0)"; }
    assert_no_leftovers sl
    [ -z "$(vdpa dev show 2>/dev/null)" ] || fail "vdpa dev show still lists: $(vdpa dev show)"
    wait_gone "$fpid" 60 || fail "fio hangs: still running 60s after the device went away"
    wait "$fpid"
    note "fio exited $? (errors are expected)"
    [ ! -e "$DEV" ] || [ ! -e "/sys/block/$disk" ] || fail "$DEV still exists"
    rm -f /tmp/sl.img
}

# bad_row KEYWORD NAME CMD...: CMD must fail, its stderr must contain KEYWORD
# (case-insensitive), and no device NAME may be left behind.
bad_row() {
    _kw=$1 _nm=$2
    shift 2
    bounded 30 /tmp/bi.out /tmp/bi.err "$@"
    _show=$(echo "$*" | cut -c1-80)
    if [ "$RC" = 0 ]; then
        stop_row_daemon "$_nm"
        fail "'$_show' exited 0 (want failure with '$_kw')"
    fi
    grep -qi -- "$_kw" /tmp/bi.err || fail "'$_show': stderr lacks '$_kw': $(head -c 300 /tmp/bi.err)"
    [ -z "$_nm" ] || assert_no_leftovers "$_nm"
    [ "$(wc -l </tmp/bi.err)" = 1 ] || fail "'$_show': want one line on stderr, got: $(head -c 300 /tmp/bi.err)"
    note "ok: $_show -> $(cat /tmp/bi.err)"
}

# a row that wrongly succeeded would serve in the foreground until killed; nothing to do
stop_row_daemon() { :; }

case_bad_input() {
    need_daemon
    mkdir -p /tmp/bi-dir
    rm -f /tmp/bi-missing.img /tmp/bi-zero.img /tmp/bi-odd.img
    truncate -s 16M /tmp/bi-ok.img /tmp/bi-ok2.img
    long=$(printf '%0300d' 0 | tr 0 n)
    bad_row "does not exist" bi1 vduse-blkd serve /tmp/bi-missing.img --name bi1
    [ ! -e /tmp/bi-missing.img ] || fail "serve created /tmp/bi-missing.img without --size"
    bad_row "not a regular file or block device" bi2 vduse-blkd serve /tmp/bi-dir --name bi2
    bad_row "must not be zero" bi3 vduse-blkd serve /tmp/bi-zero.img --name bi3 --size 0
    [ ! -e /tmp/bi-zero.img ] || fail "serve created /tmp/bi-zero.img for --size 0"
    bad_row "multiple of" bi4 vduse-blkd serve /tmp/bi-odd.img --name bi4 --size 1000
    [ ! -e /tmp/bi-odd.img ] || fail "serve created /tmp/bi-odd.img for --size 1000"
    bad_row "empty" "" vduse-blkd serve /tmp/bi-ok.img --name ''
    bad_row "too long" "$long" vduse-blkd serve /tmp/bi-ok.img --name "$long"
    bad_row "reserved" vq0 vduse-blkd serve /tmp/bi-ok.img --name vq0
    # (/dev/vduse/control is the kernel's own node: no leftover check by name here)
    bad_row "reserved" "" vduse-blkd serve /tmp/bi-ok.img --name control
    ! vdpa dev show 2>/dev/null | grep -q '^control:' || fail "a vdpa device 'control' was left behind"
    bad_row "power of two" bi10 vduse-blkd serve /tmp/bi-ok.img --name bi10 --queue-size 100
    bad_row "too large" bi11 vduse-blkd serve /tmp/bi-ok.img --name bi11 --queue-size 65536
    bad_row "too many queues" bi12 vduse-blkd serve /tmp/bi-ok.img --name bi12 --queues 1000
    bad_row "512 or 4096" bi13 vduse-blkd serve /tmp/bi-ok.img --name bi13 --block-size 1024
    chown 65534:65534 /tmp/bi-ok2.img
    bad_row "permission denied" bi14 /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups \
        vduse-blkd serve /tmp/bi-ok2.img --name bi14
    # a name in use by a running daemon
    start_daemon busy /tmp/bi-ok.img
    bounded 30 /tmp/bi.out /tmp/bi.err vduse-blkd serve /tmp/bi-ok2.img --name busy
    [ "$RC" != 0 ] || fail "a second daemon with the name 'busy' exited 0"
    grep -qi "already exists" /tmp/bi.err || fail "name in use: stderr lacks 'already exists': $(head -c 300 /tmp/bi.err)"
    [ -b "$DEV" ] || fail "the first daemon's $DEV vanished after the clash"
    stop_daemon busy
    rm -rf /tmp/bi-dir /tmp/bi-ok.img /tmp/bi-ok2.img
}

case_list_del() {
    need_daemon
    truncate -s 16M /tmp/ld.img
    start_daemon ld0 /tmp/ld.img
    bounded 30 /tmp/ld.out /tmp/ld.err vduse-blkd list
    [ "$RC" = 0 ] || fail "list exited $RC: $(head -c 200 /tmp/ld.err)"
    grep -q -w ld0 /tmp/ld.out || fail "list does not show ld0: $(head -c 300 /tmp/ld.out)"
    bounded 30 /tmp/ld.out /tmp/ld.err vduse-blkd del nosuchdev
    [ "$RC" != 0 ] || fail "del of a device that does not exist exited 0"
    { grep -q nosuchdev /tmp/ld.err && grep -qi -E 'not found|no such|does not exist|unknown|no [a-z ]*device' /tmp/ld.err; } ||
        fail "del nosuchdev: unclear message: $(head -c 300 /tmp/ld.err)"
    stop_daemon ld0
    bounded 30 /tmp/ld.out /tmp/ld.err vduse-blkd list
    [ "$RC" = 0 ] || fail "list exited $RC after stop"
    ! grep -q -w ld0 /tmp/ld.out || fail "list still shows ld0 after the daemon stopped"
    rm -f /tmp/ld.img
}

# Zero copy survives a re-attach (vdpa dev del + add): 7.2 silently drops a registered umem
# then, and a daemon that did not register again would serve stale memory (write errors,
# wrong data). Data written before, after, and across the re-attach must all be there.
case_zero_copy_readd() {
    need_daemon
    rm -f /tmp/zr.img
    truncate -s 64M /tmp/zr.img
    start_daemon zr /tmp/zr.img --queues 2 --zero-copy on
    dd if=/dev/urandom of=/tmp/zr.a bs=1M count=8 2>/dev/null
    dd if=/dev/urandom of=/tmp/zr.b bs=1M count=8 2>/dev/null
    dd if=/tmp/zr.a of="$DEV" bs=1M oflag=direct 2>/dev/null || fail "write A to $DEV failed"
    for round in 1 2; do
        vdpa dev del zr || fail "round $round: vdpa dev del zr failed"
        end=$(($(now) + 30))
        while [ -n "$(vdpa_blockdev zr)" ] || [ -e /sys/bus/vdpa/devices/zr ]; do
            [ "$(now)" -lt "$end" ] || fail "round $round: zr still on the bus 30 s after del"
            sleep 0.1
        done
        vdpa dev add name zr mgmtdev vduse || fail "round $round: vdpa dev add zr failed"
        drv=$(basename "$(readlink /sys/bus/vdpa/devices/zr/driver 2>/dev/null)")
        if [ "$drv" = vhost_vdpa ]; then
            echo zr >/sys/bus/vdpa/drivers/vhost_vdpa/unbind
            echo zr >/sys/bus/vdpa/drivers/virtio_vdpa/bind
        fi
        wait_blockdev zr 30
        d=$D
        [ "$(md5_range "$d" 0 8)" = "$(md5sum </tmp/zr.a | cut -d' ' -f1)" ] ||
            fail "round $round: data written before the re-attach reads back differently"
        dd if=/tmp/zr.b of="$d" bs=1M seek=$((8 * round)) oflag=direct 2>/dev/null ||
            fail "round $round: write after the re-attach failed"
        [ "$(md5_range "$d" $((8 * round)) 8)" = "$(md5sum </tmp/zr.b | cut -d' ' -f1)" ] ||
            fail "round $round: data written after the re-attach reads back differently"
        fio --filename="$d" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
            --offset=32M --size=16M --verify=crc32c --verify_fatal=1 --name=zr \
            --output=/tmp/zr.fio >/dev/null 2>&1 ||
            { show_tail /tmp/zr.fio; fail "round $round: fio verify after the re-attach failed"; }
    done
    stop_daemon zr
    assert_zero_copy zr on
    [ "$(md5_range /tmp/zr.img 0 8)" = "$(md5sum </tmp/zr.a | cut -d' ' -f1)" ] ||
        fail "backing file does not hold A"
    for round in 1 2; do
        [ "$(md5_range /tmp/zr.img $((8 * round)) 8)" = "$(md5sum </tmp/zr.b | cut -d' ' -f1)" ] ||
            fail "backing file does not hold B of round $round"
    done
    rm -f /tmp/zr.img /tmp/zr.a /tmp/zr.b
}

# Online resize (vduse-blkd resize, through the control socket) while fio writes and
# verifies: the guest's size changes without I/O stopping, the new end is usable, a shrink
# without --force is refused, the socket goes with the daemon.
case_resize_under_fio() {
    need_daemon
    rm -f /tmp/rs.img
    truncate -s 128M /tmp/rs.img
    start_daemon rs /tmp/rs.img --queues 2
    [ -S /run/vduse-blkd/rs.sock ] || fail "no control socket /run/vduse-blkd/rs.sock"
    [ "$(stat -c %a /run/vduse-blkd/rs.sock)" = 600 ] || fail "control socket mode is not 0600"
    blk=/sys/block/${DEV#/dev/}/size
    [ "$(cat "$blk")" = 262144 ] || fail "$DEV starts with $(cat "$blk") sectors, want 262144"
    fio --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --size=96M --rate_iops=2000 --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
        --name=rs --output=/tmp/rs.fio >/dev/null 2>&1 &
    fpid=$!
    echo "$fpid" >>"$PIDS_FILE"
    # Resize once fio is under way (its first completions are in the device's counters of
    # /sys/block: poll them, no fixed sleep).
    end=$(($(now) + 30))
    while [ "$(awk '{print $5}' "/sys/block/${DEV#/dev/}/stat")" = 0 ]; do
        [ "$(now)" -lt "$end" ] || fail "fio wrote nothing within 30 s"
        sleep 0.1
    done
    bounded 30 /tmp/rs.out /tmp/rs.err vduse-blkd resize rs 512M
    [ "$RC" = 0 ] || fail "resize to 512M exited $RC: $(head -c 300 /tmp/rs.err)"
    end=$(($(now) + 30))
    while [ "$(cat "$blk")" != 1048576 ]; do
        [ "$(now)" -lt "$end" ] || fail "$DEV still has $(cat "$blk") sectors 30 s after resize (want 1048576)"
        sleep 0.1
    done
    note "$DEV grew to $(cat "$blk") sectors while fio ran"
    # 24576 writes at 2000/s: about 12 s, so the resize lands in the middle.
    proc_gone "$fpid" && fail "fio had already finished when the size changed: the resize was not under load"
    wait "$fpid" || { show_tail /tmp/rs.fio; fail "fio across the resize failed: $(grep -m 1 -i -E 'verify|error' /tmp/rs.fio)"; }
    # The new end is usable.
    dd if=/dev/urandom of=/tmp/rs.pat bs=1M count=8 2>/dev/null
    dd if=/tmp/rs.pat of="$DEV" bs=1M seek=500 oflag=direct 2>/dev/null || fail "write past the old end failed"
    [ "$(md5_range "$DEV" 500 8)" = "$(md5sum </tmp/rs.pat | cut -d' ' -f1)" ] || fail "data past the old end reads back differently"
    bounded 30 /tmp/rs.out /tmp/rs.err vduse-blkd resize rs 256M
    [ "$RC" != 0 ] || fail "a shrink without --force was accepted"
    grep -q -- --force /tmp/rs.err || fail "shrink refusal does not mention --force: $(head -c 300 /tmp/rs.err)"
    [ "$(cat "$blk")" = 1048576 ] || fail "a refused shrink changed the size"
    stop_daemon rs
    [ ! -e /run/vduse-blkd/rs.sock ] || fail "the control socket outlived the daemon"
    [ "$(stat -c %s /tmp/rs.img)" = $((512 * MIB)) ] || fail "backing file is $(stat -c %s /tmp/rs.img) bytes, want 512 MiB"
    [ "$(md5_range /tmp/rs.img 500 8)" = "$(md5sum </tmp/rs.pat | cut -d' ' -f1)" ] || fail "backing file lacks the data past the old end"
    bounded 30 /tmp/rs.out /tmp/rs.err vduse-blkd resize rs 1G
    { [ "$RC" != 0 ] && grep -q -i "no daemon" /tmp/rs.err; } || fail "resize without a daemon: exit $RC, $(head -c 300 /tmp/rs.err)"
    rm -f /tmp/rs.img /tmp/rs.pat
}

# A block device backing (null_blk, memory-backed), served with O_DIRECT as block devices
# are by default, zero copy on: data written through the device is in the block device.
# Where O_DIRECT from the kernel's own bounce pages fails (6.12), --zero-copy off is
# refused with a reason instead of failing every request.
case_blockdev() {
    need_daemon
    rmmod null_blk 2>/dev/null
    insmod /lib/modules/vm/null_blk.ko memory_backed=1 gb=1 nr_devices=1 ||
        fail "cannot load null_blk with memory_backed=1"
    end=$(($(now) + 30))
    while [ ! -b /dev/nullb0 ]; do
        [ "$(now)" -lt "$end" ] || fail "no /dev/nullb0 30 s after loading null_blk"
        sleep 0.1
    done
    start_daemon bd /dev/nullb0 --queues 2
    dd if=/dev/urandom of=/tmp/bd.pat bs=1M count=16 2>/dev/null
    dd if=/tmp/bd.pat of="$DEV" bs=1M seek=100 oflag=direct 2>/dev/null || fail "write to $DEV failed"
    want=$(md5sum </tmp/bd.pat | cut -d' ' -f1)
    [ "$(md5_range "$DEV" 100 16)" = "$want" ] || fail "$DEV reads back other data"
    fio --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
        --iodepth=16 --offset=256M --size=64M --verify=crc32c --verify_fatal=1 --name=bd \
        --output=/tmp/bd.fio >/dev/null 2>&1 ||
        { show_tail /tmp/bd.fio; fail "fio verify through $DEV failed: $(grep -m 1 -i -E 'verify|error' /tmp/bd.fio)"; }
    stop_daemon bd
    assert_zero_copy bd on
    [ "$(md5_range /dev/nullb0 100 16)" = "$want" ] || fail "the block device does not hold the written data"
    if [ "$(expected_api)" = 0 ]; then
        bounded 60 /tmp/bd.out /tmp/bd.err vduse-blkd serve /dev/nullb0 --name bd0 --zero-copy off
        [ "$RC" != 0 ] || fail "--zero-copy off with O_DIRECT on API 0 started (it fails every request there)"
        grep -q -- "--zero-copy off" /tmp/bd.err || fail "unclear refusal: $(head -c 300 /tmp/bd.err)"
        assert_no_leftovers bd0
    fi
    rmmod null_blk && insmod /lib/modules/vm/null_blk.ko
    rm -f /tmp/bd.pat
}

# Live stats while fio runs (vduse-blkd stats NAME, through the control socket): every
# queue shows traffic, every stage has requests and no stage's p50 exceeds the total's; the
# JSON has every stage for the total and each queue; --reset starts a new period; a second
# daemon of the same name is refused and leaves the first one's socket answering.
case_live_stats() {
    need_daemon
    rm -f /tmp/ls.img
    truncate -s 256M /tmp/ls.img
    start_daemon ls /tmp/ls.img --queues 2
    fio --filename="$DEV" --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=8 \
        --numjobs=2 --size=128M --time_based --runtime=20 --name=ls \
        --output=/tmp/ls.fio >/dev/null 2>&1 &
    fpid=$!
    echo "$fpid" >>"$PIDS_FILE"
    # Until both queues have served requests (fio's two jobs land on both hardware queues).
    end=$(($(now) + 60))
    while :; do
        bounded 30 /tmp/ls.txt /tmp/ls.err vduse-blkd stats ls
        [ "$RC" = 0 ] || fail "stats exited $RC: $(head -c 300 /tmp/ls.err)"
        busy=$(awk '/^queue [0-9]+:/ && $3 > 0 { n++ } END { print n + 0 }' /tmp/ls.txt)
        [ "$busy" = 2 ] && break
        [ "$(now)" -lt "$end" ] || { cat /tmp/ls.txt; fail "stats shows $busy of 2 queues with traffic after 60 s of fio"; }
        sleep 0.5
    done
    cat /tmp/ls.txt
    awk '
        $1 == "total" { tot = $3 }
        $1 ~ /^(dispatch|prepare|backend|complete|notify|total)$/ { n++; if ($2 + 0 <= 0) bad = bad " " $1 "(no requests)"; p50[$1] = $3 }
        END {
            if (n != 6) bad = bad " only " n " stage lines"
            for (s in p50) if (p50[s] > tot * 1.02 + 0.01) bad = bad " " s "(p50 " p50[s] " > total " tot ")"
            if (bad != "") { print bad; exit 1 }
        }' /tmp/ls.txt >/tmp/ls.bad || fail "stage table wrong:$(cat /tmp/ls.bad)"
    bounded 30 /tmp/ls.json /tmp/ls.err vduse-blkd stats ls --json
    [ "$RC" = 0 ] || fail "stats --json exited $RC"
    n=$(grep -o '"dispatch"' /tmp/ls.json | wc -l)
    [ "$n" = 3 ] || fail "stats --json has $n dispatch entries, want 3 (total + 2 queues)"
    grep -q '"queue":1' /tmp/ls.json || fail "stats --json lacks queue 1"
    bounded 30 /tmp/ls.txt /tmp/ls.err vduse-blkd stats ls --reset
    [ "$RC" = 0 ] || fail "stats --reset exited $RC"
    bounded 30 /tmp/ls.txt /tmp/ls.err vduse-blkd stats ls
    el=$(awk 'NR == 1 { print $2 }' /tmp/ls.txt)
    awk -v e="$el" 'BEGIN { exit !(e < 10) }' || fail "after --reset the period is $el s old"
    # Same name again: refused by the kernel (name taken); the first socket still answers.
    vduse-blkd serve /tmp/ls.img --name ls >/tmp/ls2.out 2>/tmp/ls2.err && fail "a second daemon named ls started"
    bounded 30 /tmp/ls.txt /tmp/ls.err vduse-blkd stats ls
    [ "$RC" = 0 ] || fail "the first daemon's socket stopped answering after a second daemon tried the name"
    wait "$fpid" || { show_tail /tmp/ls.fio; fail "fio failed"; }
    stop_daemon ls
    [ ! -e /run/vduse-blkd/ls.sock ] || fail "the control socket outlived the daemon"
    rm -f /tmp/ls.img
}

# --attach vhost hands the device to vhost_vdpa (no block device, a vhost-vdpa node);
# --attach none leaves it off the bus until the user adds it; SIGTERM detaches either.
case_attach_modes() {
    need_daemon
    vduse-blkd serve /tmp/am.img --name amv --size 16M --attach vhost >/tmp/amv.out 2>/tmp/amv.err &
    p=$!
    echo "$p" >>"$PIDS_FILE"
    wait_for_line /tmp/amv.out '^ready name=amv dev=-$' 60 >/dev/null ||
        { show_tail /tmp/amv.err; fail "no 'ready name=amv dev=-' line with --attach vhost"; }
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/amv/driver 2>/dev/null)")
    [ "$drv" = vhost_vdpa ] || fail "--attach vhost: bound to '$drv', want vhost_vdpa"
    vh=
    for f in /sys/bus/vdpa/devices/amv/vhost-vdpa-*; do [ -e "$f" ] && vh=${f##*/}; done
    [ -n "$vh" ] || fail "--attach vhost: no vhost-vdpa device in sysfs"
    [ -c "/dev/$vh" ] || fail "--attach vhost: no /dev/$vh"
    [ -z "$(vdpa_blockdev amv)" ] || fail "--attach vhost: the device also became a block device"
    kill -TERM "$p"
    wait_gone "$p" 30 || fail "--attach vhost: no exit within 30s of SIGTERM"
    wait "$p" || fail "--attach vhost: exit status $? after SIGTERM"
    assert_no_leftovers amv
    rm -f /tmp/am.img

    vduse-blkd serve /tmp/am.img --name amn --size 16M --attach none >/tmp/amn.out 2>/tmp/amn.err &
    p=$!
    echo "$p" >>"$PIDS_FILE"
    wait_for_line /tmp/amn.out '^ready name=amn dev=-$' 60 >/dev/null ||
        { show_tail /tmp/amn.err; fail "no 'ready name=amn dev=-' line with --attach none"; }
    [ -e /dev/vduse/amn ] || fail "--attach none: no /dev/vduse/amn"
    [ ! -e /sys/bus/vdpa/devices/amn ] || fail "--attach none: the device is on the vdpa bus"
    vdpa dev add name amn mgmtdev vduse || fail "--attach none: manual vdpa dev add failed"
    wait_blockdev amn 30
    d=$D
    dd if=/dev/urandom of=/tmp/am.pat bs=1M count=4 2>/dev/null
    dd if=/tmp/am.pat of="$d" bs=1M oflag=direct 2>/dev/null || fail "write to $d failed"
    [ "$(md5_range "$d" 0 4)" = "$(md5sum </tmp/am.pat | cut -d' ' -f1)" ] || fail "$d read back other data"
    # SIGTERM with the device still on the bus (added by hand): the daemon detaches it.
    kill -TERM "$p"
    wait_gone "$p" 30 || fail "--attach none: no exit within 30s of SIGTERM"
    wait "$p" || fail "--attach none: exit status $? after SIGTERM"
    assert_no_leftovers amn
    rm -f /tmp/am.img /tmp/am.pat
}

# Serve /tmp/NAME.img (64M, 2 queues) bound to vhost_vdpa; sets VH to /dev/vhost-vdpa-N and
# VH_PID to the daemon's pid.
serve_vhost() {
    need_daemon
    command -v vduse-blkd-vhost >/dev/null || fail "no vduse-blkd-vhost in the guest (cargo build --release --features test-utils --bin vduse-blkd-vhost)"
    rm -f "/tmp/$1.img"
    vduse-blkd serve "/tmp/$1.img" --name "$1" --size 64M --queues 2 --attach vhost \
        >"/tmp/$1.out" 2>"/tmp/$1.err" &
    VH_PID=$!
    echo "$VH_PID" >>"$PIDS_FILE"
    wait_for_line "/tmp/$1.out" "^ready name=$1 dev=-\$" 60 >/dev/null ||
        { show_tail "/tmp/$1.err"; fail "no ready line for $1 with --attach vhost"; }
    VH=
    for f in /sys/bus/vdpa/devices/"$1"/vhost-vdpa-*; do [ -e "$f" ] && VH=/dev/${f##*/}; done
    [ -c "$VH" ] || fail "no vhost-vdpa character device for $1"
}

# Stop the daemon of serve_vhost: it must exit 0 (no broken device on the way).
stop_vhost() {
    kill -TERM "$VH_PID"
    wait_gone "$VH_PID" 30 || fail "$1: no exit within 30s of SIGTERM"
    wait "$VH_PID" || { show_tail "/tmp/$1.err"; fail "$1: exit status $? after SIGTERM"; }
    assert_no_leftovers "$1"
}

# vhost_scenario NAME SUBCOMMAND [ARGS...]: serve NAME for vhost_vdpa, run one
# vduse-blkd-vhost scenario against it (it verifies its own data), and check that the
# daemon is still serving afterwards.
vhost_scenario() {
    name=$1
    shift
    serve_vhost "$name"
    bounded 300 "/tmp/$name.c.out" "/tmp/$name.c.err" vduse-blkd-vhost "$VH" "$@"
    [ "$RC" = 0 ] || { show_tail "/tmp/$name.err"; fail "vhost $1: $(head -c 400 "/tmp/$name.c.err")"; }
    note "$(cat "/tmp/$name.c.out")"
    proc_gone "$VH_PID" && fail "the daemon exited during vhost $1"
    stop_vhost "$name"
    rm -f "/tmp/$name.img"
}

# vhost_vdpa with data: a userspace driver writes through both queues, reads back, flushes;
# the backing file must then hold exactly what it wrote.
case_vhost_io() {
    serve_vhost vhio
    bounded 240 /tmp/vhio.c.out /tmp/vhio.c.err vduse-blkd-vhost "$VH" io --requests 16 \
        --expect-out /tmp/vhio.expect
    [ "$RC" = 0 ] || { show_tail /tmp/vhio.err; fail "vhost io: $(head -c 400 /tmp/vhio.c.err)"; }
    note "$(cat /tmp/vhio.c.out)"
    stop_vhost vhio
    n=$(stat -c %s /tmp/vhio.expect)
    [ "$n" = $((2 * 16 * 65536)) ] || fail "vhost io: expected-data file has $n bytes"
    cmp -n "$n" /tmp/vhio.expect /tmp/vhio.img || fail "the backing file differs from what the vhost driver wrote"
    rm -f /tmp/vhio.img /tmp/vhio.expect
}

# UPDATE_IOTLB with real bytes: a second region carries verified I/O, is invalidated while
# writes are in flight on both queues (they must complete and verify), must then be refused
# (IOERR: no stale mapping), and a region mapped at a new IOVA carries verified reads.
case_vhost_iotlb() { vhost_scenario vhit iotlb --requests 16; }

# VDUSE_F_QUEUE_READY (7.3): queue 1 disabled and re-enabled through vhost_vdpa while queue 0
# carries verified I/O; a request posted while disabled waits for the re-enable.
case_vhost_queue_ready() { vhost_scenario vhqr toggle --cycles 3; }

# VDUSE_F_SUSPEND (7.3): suspend with writes in flight on both queues; every request must be
# complete when the ioctl returns, and the data must verify after a reset.
case_vhost_suspend() { vhost_scenario vhsu suspend --requests 32; }

# Before 7.3 there is no VDUSE suspend: vhost_vdpa must not offer it, and the driver says so.
case_vhost_no_suspend() {
    serve_vhost vhns
    bounded 120 /tmp/vhns.c.out /tmp/vhns.c.err vduse-blkd-vhost "$VH" suspend --requests 4
    [ "$RC" = 1 ] || fail "vhost suspend on $(uname -r): exit $RC, want 1: $(head -c 300 /tmp/vhns.c.out)"
    grep -q 'does not offer VHOST_BACKEND_F_SUSPEND' /tmp/vhns.c.err ||
        fail "vhost suspend on $(uname -r): $(head -c 300 /tmp/vhns.c.err)"
    proc_gone "$VH_PID" && fail "the daemon exited"
    stop_vhost vhns
    rm -f /tmp/vhns.img
}

# --- failing and slow backing stores --------------------------------------------------
# null_blk (loaded by /init) made through configfs stands in for a failing or slow disk:
# `badblocks` fails every bio touching a sector range with BLK_STS_IOERR (EIO, what a
# device-mapper `error` target gives), `irqmode=2` + `completion_nsec` delays each I/O (as
# dm-delay does); `memory_backed=1` keeps the data, so it can be verified.

# nullb_make NAME SIZE_MIB [ATTR=VALUE...]: power on a null_blk device with those configfs
# attributes; sets NB to its block device.
nullb_make() {
    _n=$1 _sz=$2
    shift 2
    [ -d /sys/kernel/config/nullb ] || mount -t configfs configfs /sys/kernel/config 2>/dev/null
    [ -d /sys/kernel/config/nullb ] || fail "no /sys/kernel/config/nullb (null_blk configfs)"
    _d=/sys/kernel/config/nullb/$_n
    mkdir "$_d" || fail "cannot make the null_blk device $_n"
    echo "$_sz" >"$_d/size" || fail "null_blk $_n: size refused"
    echo 1 >"$_d/memory_backed" || fail "null_blk $_n: memory_backed refused"
    for _kv in "$@"; do
        echo "${_kv#*=}" >"$_d/${_kv%%=*}" || fail "null_blk $_n: ${_kv%%=*} refused"
    done
    echo 1 >"$_d/power" || fail "null_blk $_n: power on failed"
    # the disk takes the configfs name on newer kernels, nullb<index> on older ones
    NB=
    _end=$(($(now) + 10))
    while [ -z "$NB" ]; do
        for _c in "/dev/$_n" "/dev/nullb$(cat "$_d/index")"; do [ -b "$_c" ] && NB=$_c && break; done
        [ -n "$NB" ] || [ "$(now)" -lt "$_end" ] || fail "null_blk $_n has no block device"
        [ -n "$NB" ] || sleep 0.1
    done
    note "null_blk $_n: $NB ($_sz MiB, $*)"
}

nullb_remove() {
    echo 0 >"/sys/kernel/config/nullb/$1/power" 2>/dev/null
    rmdir "/sys/kernel/config/nullb/$1" 2>/dev/null
    return 0
}

# backing_stats NAME: "TOTAL EIO ENOSPC SHORT OTHER" from the stop line of daemon NAME.
backing_stats() {
    sed -n 's/^vduse-blkd: stopped: .*, backing errors \([0-9]*\) (EIO \([0-9]*\), ENOSPC \([0-9]*\), short \([0-9]*\), other \([0-9]*\)).*/\1 \2 \3 \4 \5/p' \
        "/tmp/daemon.$1.err"
}

# assert_backing_stats NAME "TOTAL EIO ENOSPC SHORT OTHER": the stopped daemon counted those.
assert_backing_stats() {
    _got=$(backing_stats "$1")
    [ -n "$_got" ] || { show_tail "/tmp/daemon.$1.err"; fail "$1: no backing error counts in the stop line"; }
    [ "$_got" = "$2" ] || fail "$1: backing errors (total EIO ENOSPC short other) are '$_got', want '$2'"
    note "$1: backing errors (total EIO ENOSPC short other): $_got"
}

# assert_backing_log NAME TOTAL SECS QUEUES: daemon NAME logged its TOTAL backing errors
# rate-limited: at most one line per second per queue over SECS seconds, the lines plus the
# counts they report as not logged adding up to TOTAL.
assert_backing_log() {
    _e=/tmp/daemon.$1.err
    _lines=$(grep -c 'backing store error:' "$_e")
    _more=$(grep 'backing store error' "$_e" | grep -o '[0-9][0-9]* more ' | awk '{s += $1} END {print s + 0}')
    note "$1: $_lines backing error lines for $2 errors ($_more reported as not logged) in ${3}s"
    [ "$_lines" -ge 1 ] || fail "$1: no backing store error was logged"
    [ "$((_lines + _more))" = "$2" ] || fail "$1: $_lines lines + $_more not logged != $2 errors counted"
    [ "$_lines" -le $(($4 * ($3 + 1))) ] || fail "$1: $_lines log lines in ${3}s on $4 queue(s): not rate-limited"
    [ "$_lines" -lt "$2" ] || fail "$1: one log line per failed request ($_lines for $2)"
}

# fio_wv FILE OFFSET SIZE SEED ENGINE DIRECT [EXTRA...]: randwrite [OFFSET, +SIZE) with crc32c
# verify headers (4k-64k blocks, iodepth 16); EXTRA --do_verify=1 --verify_backlog=N checks as
# it goes, --verify_only re-derives the same blocks later (same seed) and checks them.
fio_wv() {
    _f=$1 _o=$2 _s=$3 _seed=$4 _eng=$5 _dir=$6
    shift 6
    fio --name=wv --filename="$_f" --ioengine="$_eng" --direct="$_dir" --rw=randwrite --bsrange=4k-64k \
        --offset="$_o" --size="$_s" --iodepth=16 --verify=crc32c --verify_fatal=1 --randrepeat=1 \
        --randseed="$_seed" --norandommap=0 --eta=never "$@"
}

# dd_4k_fails DEV r|w BLOCK: one 4 KiB direct read or write of block BLOCK of DEV must fail.
dd_4k_fails() {
    if [ "$2" = r ]; then
        ! dd if="$1" of=/dev/null bs=4k skip="$3" count=1 iflag=direct 2>/dev/null
    else
        ! dd if=/dev/urandom of="$1" bs=4k seek="$3" count=1 oflag=direct conv=notrunc 2>/dev/null
    fi
}

# EIO: requests touching the bad range fail (the guest sees EIO), everything else is served
# and verified, before and after; one rate-limited log line, every failure counted.
case_backing_eio() {
    need_daemon
    # bad sectors [16 MiB, 17 MiB)
    nullb_make beio 64 badblocks=+32768-34815
    start_daemon be "$NB" --queues 2
    fio_wv "$DEV" 0 8M 11 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/be1.fio ||
        { show_tail /tmp/be1.fio; fail "write+verify of [0, 8M) failed"; }
    fio_wv "$DEV" 24M 8M 12 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/be2.fio ||
        { show_tail /tmp/be2.fio; fail "write+verify of [24M, 32M) failed"; }
    t0=$(now)
    i=0
    while [ "$i" -lt 32 ]; do
        dd_4k_fails "$DEV" r $((4096 + i * 8)) || fail "read of bad block $((4096 + i * 8)) succeeded"
        dd_4k_fails "$DEV" w $((4096 + i * 8 + 4)) || fail "write of bad block $((4096 + i * 8 + 4)) succeeded"
        i=$((i + 1))
    done
    proc_gone "$DAEMON_PID" && fail "the daemon exited after the I/O errors"
    # still serving: the good ranges verify, and new data next to the bad range lands
    fio_wv "$DEV" 0 8M 11 libaio 1 --verify_only --output=/tmp/be3.fio ||
        { show_tail /tmp/be3.fio; fail "[0, 8M) no longer verifies after the errors"; }
    fio_wv "$DEV" 17M 4M 13 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/be4.fio ||
        { show_tail /tmp/be4.fio; fail "write+verify of [17M, 21M) after the errors failed"; }
    stop_daemon be
    secs=$(($(now) - t0))
    assert_backing_stats be "64 64 0 0 0"
    assert_backing_log be 64 "$secs" 2
    for r in "0 8M 11" "24M 8M 12" "17M 4M 13"; do
        # shellcheck disable=SC2086
        set -- $r
        fio_wv "$NB" "$1" "$2" "$3" psync 1 --verify_only --output=/tmp/be5.fio ||
            { show_tail /tmp/be5.fio; fail "the backing device does not hold [$1, +$2)"; }
    done
    nullb_remove beio
}

# ENOSPC: a sparse file on a full filesystem. Writes that need a new block fail; overwrites,
# reads and holes are served; once there is room again the same writes succeed.
case_backing_enospc() {
    need_daemon
    mkdir -p /mnt/small
    mount -t tmpfs -o size=16m small /mnt/small || fail "cannot mount a 16 MiB tmpfs"
    truncate -s 64M /mnt/small/sp.img
    start_daemon sp /mnt/small/sp.img --queues 2
    fio_wv "$DEV" 0 8M 21 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/sp1.fio ||
        { show_tail /tmp/sp1.fio; fail "write+verify of [0, 8M) failed"; }
    # fill what is left of the filesystem
    dd if=/dev/zero of=/mnt/small/filler bs=64k 2>/dev/null
    avail=$(df -k /mnt/small | awk 'NR == 2 {print $4}')
    [ "$avail" -lt 64 ] || fail "the filesystem still has $avail KiB free after filling it"
    t0=$(now)
    i=0
    while [ "$i" -lt 32 ]; do
        dd_4k_fails "$DEV" w $((8192 + i * 4)) || fail "write of new block $((8192 + i * 4)) succeeded on a full filesystem"
        i=$((i + 1))
    done
    proc_gone "$DAEMON_PID" && fail "the daemon exited after ENOSPC"
    # blocks that exist: overwritten in place and verified; a hole reads as zeroes
    fio_wv "$DEV" 0 8M 22 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/sp2.fio ||
        { show_tail /tmp/sp2.fio; fail "overwrite+verify of [0, 8M) failed on a full filesystem"; }
    [ "$(md5_range "$DEV" 48 1)" = "$(zero_md5 1)" ] || fail "a hole does not read as zeroes"
    # room again: the refused writes succeed
    rm -f /mnt/small/filler
    fio_wv "$DEV" 32M 4M 23 libaio 1 --do_verify=1 --verify_backlog=32 --output=/tmp/sp3.fio ||
        { show_tail /tmp/sp3.fio; fail "write+verify of [32M, 36M) failed once there was room"; }
    stop_daemon sp
    secs=$(($(now) - t0))
    assert_backing_stats sp "32 0 32 0 0"
    assert_backing_log sp 32 "$secs" 2
    for r in "0 8M 22" "32M 4M 23"; do
        # shellcheck disable=SC2086
        set -- $r
        fio_wv /mnt/small/sp.img "$1" "$2" "$3" psync 0 --verify_only --output=/tmp/sp4.fio ||
            { show_tail /tmp/sp4.fio; fail "the backing file does not hold [$1, +$2)"; }
    done
    umount /mnt/small
}

# A backing file truncated underneath the daemon: reads past the new end fail (the data is
# gone), reads before it return the data, writes past it land (the file grows again).
case_backing_truncated() {
    need_daemon
    dd if=/dev/urandom of=/tmp/tr.img bs=1M count=32 2>/dev/null
    want=$(md5_range /tmp/tr.img 0 16)
    start_daemon tr /tmp/tr.img --queues 2
    [ "$(md5_range "$DEV" 0 32)" = "$(md5_range /tmp/tr.img 0 32)" ] || fail "$DEV does not read as the file"
    truncate -s 16M /tmp/tr.img
    t0=$(now)
    i=0
    while [ "$i" -lt 32 ]; do
        dd_4k_fails "$DEV" r $((4096 + i * 64)) || fail "read of block $((4096 + i * 64)) past the end succeeded"
        i=$((i + 1))
    done
    # a read across the new end ([16M - 4k, 16M + 8k), one request) fails as a whole
    ! dd if="$DEV" of=/dev/null bs=12k skip=1365 count=1 iflag=direct 2>/dev/null ||
        fail "a read across the truncated end succeeded"
    [ "$(md5_range "$DEV" 0 16)" = "$want" ] || fail "the data before the new end reads back differently"
    dd if=/dev/urandom of=/tmp/tr.new bs=1M count=1 2>/dev/null
    dd if=/tmp/tr.new of="$DEV" bs=1M seek=24 oflag=direct 2>/dev/null || fail "a write past the new end failed"
    [ "$(md5_range "$DEV" 24 1)" = "$(md5sum </tmp/tr.new | cut -d' ' -f1)" ] || fail "the write past the end reads back differently"
    proc_gone "$DAEMON_PID" && fail "the daemon exited"
    stop_daemon tr
    secs=$(($(now) - t0))
    assert_backing_stats tr "33 0 0 33 0"
    assert_backing_log tr 33 "$secs" 2
    [ "$(stat -c %s /tmp/tr.img)" = $((25 * MIB)) ] || fail "backing file is $(stat -c %s /tmp/tr.img) bytes, want 25 MiB"
    [ "$(md5_range /tmp/tr.img 0 16)" = "$want" ] || fail "the backing file lost data before the new end"
    [ "$(md5_range /tmp/tr.img 24 1)" = "$(md5sum </tmp/tr.new | cut -d' ' -f1)" ] || fail "the backing file lacks the write past the end"
    rm -f /tmp/tr.img /tmp/tr.new
}

# wait_writes DISK N FPID DEADLINE_S: poll until DISK completed N more writes while fio FPID runs.
wait_writes() {
    _w0=$(awk '{print $5}' "/sys/block/$1/stat")
    _end=$(($(now) + $4))
    while [ "$(awk '{print $5}' "/sys/block/$1/stat" 2>/dev/null || echo 0)" -lt $((_w0 + $2)) ]; do
        proc_gone "$3" && return 1
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
}

# Unbind/rebind storm: each cycle checks that the previous cycle's verified data survived its
# reset (verify_only through the new block device), writes and verifies a region of its own
# (a pass that completes and must be clean), then unbinds virtio_vdpa beneath a fio load of
# reads and writes (fio sees the device vanish) and binds it again. The daemon must serve
# throughout; data written after the last rebind verifies, also in the backing file.
# (The load itself is not verified: once the disk is deleted its capacity is 0, reads fio
# issues then return EOF, and fio "verifies" the stale contents of its own buffers: "bad
# header" errors that appear only across an unbind, never in the same load without one.)
case_reset_storm() {
    need_daemon
    rm -f /tmp/rs.img
    truncate -s 256M /tmp/rs.img
    start_daemon rs /tmp/rs.img --queues 2
    cycles=${RESET_STORM_CYCLES:-20}
    i=1
    while [ "$i" -le "$cycles" ]; do
        wait_blockdev rs 30
        if [ "$i" -gt 1 ]; then
            fio_wv "$D" $((((i - 1) % 8) * 16))M 4M $((i - 1)) libaio 1 --verify_only --output=/tmp/rs.p.fio ||
                { show_tail /tmp/rs.p.fio; fail "cycle $i: data verified in cycle $((i - 1)) does not verify after the rebind"; }
        fi
        fio_wv "$D" $(((i % 8) * 16))M 4M "$i" libaio 1 --do_verify=1 --verify_backlog=32 \
            --output=/tmp/rs.v.fio || { show_tail /tmp/rs.v.fio; fail "cycle $i: verify pass on $D failed"; }
        bg_start /tmp/rs.l.fio fio --eta=never --name=load --filename="$D" --ioengine=libaio --direct=1 \
            --rw=randrw --bs=4k-64k --iodepth=32 --offset=128M --size=128M --time_based --runtime=120 \
            --randseed="$i"
        lp=$BG_PID
        wait_writes "${D#/dev/}" 200 "$lp" 60 || { show_tail /tmp/rs.l.fio; fail "cycle $i: no load on $D"; }
        echo rs >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "cycle $i: unbind failed"
        wait_gone "$lp" 60 || fail "cycle $i: fio still runs 60s after its device was unbound"
        [ -z "$(vdpa_blockdev rs)" ] || fail "cycle $i: the block device is still there after unbind"
        proc_gone "$DAEMON_PID" && { show_tail /tmp/daemon.rs.err; fail "cycle $i: the daemon exited on unbind"; }
        echo rs >/sys/bus/vdpa/drivers/virtio_vdpa/bind || fail "cycle $i: bind failed"
        i=$((i + 1))
    done
    note "$cycles unbind/bind cycles under fio done"
    wait_blockdev rs 30
    fio_wv "$D" 0 64M 4242 libaio 1 --do_verify=1 --verify_backlog=64 --output=/tmp/rs.f.fio ||
        { show_tail /tmp/rs.f.fio; fail "write+verify after the last rebind failed"; }
    ! grep -q -i -E 'panic|broken' /tmp/daemon.rs.err || { show_tail /tmp/daemon.rs.err; fail "the daemon logged a panic or a broken device"; }
    stop_daemon rs
    fio_wv /tmp/rs.img 0 64M 4242 psync 0 --verify_only --output=/tmp/rs.b.fio ||
        { show_tail /tmp/rs.b.fio; fail "the backing file does not hold what fio wrote after the last rebind"; }
    # the check can fail: one corrupted byte in the region must be noticed
    printf 'X' | dd of=/tmp/rs.img bs=1 seek=$((20 * MIB + 333)) conv=notrunc 2>/dev/null
    if fio_wv /tmp/rs.img 0 64M 4242 psync 0 --verify_only --output=/tmp/rs.c.fio; then
        fail "verify_only did not notice a corrupted byte (the check is blind)"
    fi
    rm -f /tmp/rs.img
}

# msg_timeout: a reset (unbind) while slow I/O (1 s per I/O) is in flight must be answered
# before VDUSE's msg_timeout (lowered to 4 s here: a late reply breaks the device for good),
# the daemon must survive and the device must serve verified I/O after a rebind.
case_msg_timeout() {
    need_daemon
    nullb_make slow 64 irqmode=2 completion_nsec=1000000000
    START_DEADLINE=120 start_daemon mt "$NB" --queues 2
    [ -w /sys/class/vduse/mt/msg_timeout ] || fail "no writable /sys/class/vduse/mt/msg_timeout"
    echo 4 >/sys/class/vduse/mt/msg_timeout || fail "cannot set msg_timeout"
    disk=${DEV#/dev/}
    bg_start /tmp/mt.fio fio --eta=never --name=slow --filename="$DEV" --ioengine=libaio --direct=1 \
        --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --size=32M --time_based --runtime=120
    lp=$BG_PID
    # wait until many requests are in flight (each takes a second in the backing)
    end=$(($(now) + 60))
    while [ "$(awk '{print $2}' "/sys/block/$disk/inflight")" -lt 16 ]; do
        proc_gone "$lp" && { show_tail /tmp/mt.fio; fail "fio ended before I/O was in flight"; }
        [ "$(now)" -lt "$end" ] || fail "fewer than 16 writes in flight after 60s"
        sleep 0.1
    done
    note "$(awk '{print $2}' "/sys/block/$disk/inflight") writes in flight; unbinding"
    t0=$(now)
    echo mt >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "unbind failed"
    dt=$(($(now) - t0))
    note "unbind with slow I/O in flight took ${dt}s (msg_timeout 4s)"
    wait_gone "$lp" 60 || fail "fio still runs 60s after its device was unbound"
    proc_gone "$DAEMON_PID" && { show_tail /tmp/daemon.mt.err; fail "the daemon exited on the reset"; }
    ! grep -q -i -E 'broken|timed out' /tmp/daemon.mt.err || { show_tail /tmp/daemon.mt.err; fail "the device broke: a reply was late"; }
    echo mt >/sys/bus/vdpa/drivers/virtio_vdpa/bind || fail "bind after the reset failed (device broken?)"
    wait_blockdev mt 60
    fio_wv "$D" 40M 1M 31 libaio 1 --do_verify=1 --verify_backlog=16 --output=/tmp/mt.v.fio ||
        { show_tail /tmp/mt.v.fio; fail "write+verify after the rebind failed"; }
    stop_daemon mt 120
    fio_wv "$NB" 40M 1M 31 psync 1 --verify_only --output=/tmp/mt.b.fio ||
        { show_tail /tmp/mt.b.fio; fail "the backing device does not hold what fio wrote"; }
    nullb_remove slow
}

# msg_timeout, sharp: through vhost_vdpa a reset reaches the daemon while writes are in
# flight in a slow backing (1 s per I/O; virtio_vdpa's remove path drains them first). The
# daemon must complete them before it replies (nothing released that io_uring still writes
# into) and still reply well before msg_timeout (4 s here); afterwards the device is set up
# again and every completed write reads back.
case_msg_timeout_vhost() {
    need_daemon
    command -v vduse-blkd-vhost >/dev/null || fail "no vduse-blkd-vhost in the guest (cargo build --release --features test-utils --bin vduse-blkd-vhost)"
    nullb_make slowv 64 irqmode=2 completion_nsec=1000000000
    vduse-blkd serve "$NB" --name mtv --queues 2 --attach vhost >/tmp/mtv.out 2>/tmp/mtv.err &
    VH_PID=$!
    echo "$VH_PID" >>"$PIDS_FILE"
    wait_for_line /tmp/mtv.out '^ready name=mtv dev=-$' 120 >/dev/null ||
        { show_tail /tmp/mtv.err; fail "no ready line for mtv with --attach vhost"; }
    VH=
    for f in /sys/bus/vdpa/devices/mtv/vhost-vdpa-*; do [ -e "$f" ] && VH=/dev/${f##*/}; done
    [ -c "$VH" ] || fail "no vhost-vdpa character device for mtv"
    echo 4 >/sys/class/vduse/mtv/msg_timeout || fail "cannot set msg_timeout"
    bounded 300 /tmp/mtv.c.out /tmp/mtv.c.err vduse-blkd-vhost "$VH" reset --requests 16 \
        --inflight "/sys/block/${NB#/dev/}/inflight" --min-inflight 8
    [ "$RC" = 0 ] || { show_tail /tmp/mtv.err; fail "vhost reset: $(head -c 400 /tmp/mtv.c.err)"; }
    note "$(cat /tmp/mtv.c.out)"
    took=$(sed -n 's/.*returned after \([0-9.]*\) s.*/\1/p' /tmp/mtv.c.out)
    [ -n "$took" ] || fail "no reset time in: $(cat /tmp/mtv.c.out)"
    awk -v t="$took" 'BEGIN { exit !(t < 4) }' || fail "the reset took ${took}s, not within msg_timeout (4s)"
    # 1 s I/Os were in flight: a reply much sooner would mean it did not wait for them
    awk -v t="$took" 'BEGIN { exit !(t >= 0.2) }' || fail "the reset returned after ${took}s, before the in-flight I/O could complete"
    proc_gone "$VH_PID" && { show_tail /tmp/mtv.err; fail "the daemon exited"; }
    ! grep -q -i -E 'broken|timed out' /tmp/mtv.err || { show_tail /tmp/mtv.err; fail "the device broke"; }
    stop_vhost mtv
    nullb_remove slowv
}

if [ "${1:-}" = --case ]; then
    "$2"
    exit $?
fi


note "suite on $(uname -r), backend $VM_BACKEND, $(vduse-blkd --version 2>/dev/null || echo 'no vduse-blkd')"
want() { [ -z "${VM_CASES:-}" ] || case " $VM_CASES " in *" $1 "*) ;; *) return 1 ;; esac; }
# missing-module runs before the VDUSE modules are loaded
want missing-module && run_case missing-module 60 case_missing_module
load_vduse_modules || fail load-modules "could not load vduse/virtio_vdpa/vhost_vdpa"
want probe && run_case probe 60 case_probe
want bad-input && run_case bad-input 240 case_bad_input
want list-del && run_case list-del 90 case_list_del
want readonly && run_case readonly 90 case_readonly
want discard-zeroes && run_case discard-zeroes 120 case_discard_zeroes
want ext4 && run_case ext4 180 case_ext4
want fio-verify && run_case fio-verify 300 case_fio_verify
# (a vduse-blkd flag: not for the qsd backend)
[ "$VM_BACKEND" = vduse-blkd ] && want fio-verify-poll && run_case fio-verify-poll 300 case_fio_verify_poll
[ "$VM_BACKEND" = vduse-blkd ] && want fio-verify-copy && run_case fio-verify-copy 300 case_fio_verify_copy
[ "$VM_BACKEND" = vduse-blkd ] && want zero-copy-readd && run_case zero-copy-readd 240 case_zero_copy_readd
[ "$VM_BACKEND" = vduse-blkd ] && want blockdev && run_case blockdev 180 case_blockdev
[ "$VM_BACKEND" = vduse-blkd ] && want live-stats && run_case live-stats 180 case_live_stats
[ "$VM_BACKEND" = vduse-blkd ] && want resize-under-fio && run_case resize-under-fio 180 case_resize_under_fio
want sigterm-under-load && run_case sigterm-under-load 180 case_sigterm_under_load
want attach-modes && run_case attach-modes 120 case_attach_modes
# (vduse-blkd's own stop line and log: not for the qsd backend)
if [ "$VM_BACKEND" = vduse-blkd ]; then
    want backing-eio && run_case backing-eio 300 case_backing_eio
    want backing-enospc && run_case backing-enospc 300 case_backing_enospc
    want backing-truncated && run_case backing-truncated 180 case_backing_truncated
fi
want reset-storm && run_case reset-storm 900 case_reset_storm
want msg-timeout && run_case msg-timeout 300 case_msg_timeout
want vhost-io && run_case vhost-io 300 case_vhost_io
want vhost-iotlb && run_case vhost-iotlb 360 case_vhost_iotlb
want msg-timeout-vhost && run_case msg-timeout-vhost 300 case_msg_timeout_vhost
# The VDUSE feature requests exist only where the kernel offers them (7.3+).
if [ "$(expected_features)" = 3 ]; then
    want vhost-queue-ready && run_case vhost-queue-ready 360 case_vhost_queue_ready
    want vhost-suspend && run_case vhost-suspend 360 case_vhost_suspend
else
    want vhost-no-suspend && run_case vhost-no-suspend 180 case_vhost_no_suspend
fi
exit 0
