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
        end=$(($(now) + 30))
        while [ -z "$(vdpa_blockdev zr)" ]; do
            [ "$(now)" -lt "$end" ] || fail "round $round: no block device 30 s after vdpa dev add"
            sleep 0.1
        done
        d=$(vdpa_blockdev zr)
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
    end=$(($(now) + 30))
    while [ -z "$(vdpa_blockdev amn)" ]; do
        [ "$(now)" -lt "$end" ] || fail "--attach none: no block device after a manual add"
        sleep 0.1
    done
    d=$(vdpa_blockdev amn)
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
want vhost-io && run_case vhost-io 300 case_vhost_io
want vhost-iotlb && run_case vhost-iotlb 360 case_vhost_iotlb
# The VDUSE feature requests exist only where the kernel offers them (7.3+).
if [ "$(expected_features)" = 3 ]; then
    want vhost-queue-ready && run_case vhost-queue-ready 360 case_vhost_queue_ready
    want vhost-suspend && run_case vhost-suspend 360 case_vhost_suspend
else
    want vhost-no-suspend && run_case vhost-no-suspend 180 case_vhost_no_suspend
fi
exit 0
