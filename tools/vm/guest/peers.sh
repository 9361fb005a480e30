# Peer benchmark in one boot (busybox sh), run by perf/vm-peers. Same kernel, same fio
# job, same backing for every peer:
#   raw            fio on the backing itself
#   qsd            qemu-storage-daemon --export vduse-blk (2 queues)
#   rublk          rublk add loop on the backing (2 queues; ublk_drv)
#   vduse-zc-on    vduse-blkd serve --queues 2 --zero-copy on
#   vduse-zc-off   vduse-blkd serve --queues 2 --zero-copy off
# Backings: tmpfs (a file in the guest's tmpfs), nvme (QEMU's emulated NVMe disk,
# /dev/nvme0n1; tools/vm/run --nvme), null (null_blk, /dev/nullb0). Loads: 4 KiB
# randread and randwrite, libaio, direct, at QD1, QD16 and 2 jobs x QD16.
# Rounds interleave the peers (the order rotates each round) so that drift of the
# emulated machine hits all alike. One "# PEER ..." line per fio run, "# NOPEER ..."
# for a peer this kernel cannot run (with the reason), one RESULT line at the end.
# shellcheck source=lib.sh
. /guest/lib.sh
ROUNDS=${PEER_ROUNDS:-3}
SECS=${PEER_SECONDS:-3}
BACKINGS=${PEER_BACKINGS:-tmpfs nvme null}
PEERS=${PEER_PEERS:-raw qsd rublk vduse-zc-on vduse-zc-off}
LOADS=${PEER_LOADS:-qd1 qd16 2x16}
RWS=${PEER_RWS:-randread randwrite}
SIZE_MB=256
FIO_DEADLINE=$((SECS + 60)) # a run that takes longer than this is a hang

load_vduse_modules || { fail peers "cannot load the VDUSE modules"; exit 0; }
note "peers: kernel $(uname -r), $ROUNDS rounds of ${SECS}s (+1s ramp) per run; backings: $BACKINGS; peers: $PEERS"

ok=1
bug() { # a daemon misbehaved: say so loudly; the run fails
    note "BUG: $*"
    ok=0
}

# --- which peers and backings this boot has -----------------------------------
nopeer=""
skip() { # WHAT REASON: WHAT (a peer or a backing) cannot be measured here
    note "NOPEER $1 reason=$2"
    nopeer="$nopeer $1 "
}
skipped() { case $nopeer in *" $1 "*) return 0 ;; esac; return 1; }
command -v qemu-storage-daemon >/dev/null || skip qsd "no qemu-storage-daemon in the guest"
if ! command -v rublk >/dev/null; then
    skip rublk "no rublk binary in the guest"
elif [ ! -c /dev/ublk-control ]; then
    if [ -f /lib/modules/vm/ublk_drv.ko ]; then
        insmod /lib/modules/vm/ublk_drv.ko 2>/dev/null
    fi
    [ -c /dev/ublk-control ] || skip rublk "no ublk_drv in this kernel (no /dev/ublk-control)"
fi
wait_block() { # DEV: poll for block device DEV (the nvme driver probes asynchronously)
    _end=$(($(now) + 30))
    while [ ! -b "$1" ]; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
}
for b in $BACKINGS; do
    case $b in
    tmpfs)
        dd if=/dev/zero of=/tmp/peer.img bs=1M count=$SIZE_MB 2>/dev/null || skip tmpfs "cannot write /tmp/peer.img"
        ;;
    nvme) wait_block /dev/nvme0n1 || skip nvme "no /dev/nvme0n1 (boot with tools/vm/run --nvme IMG; module nvme)" ;;
    null) wait_block /dev/nullb0 || skip null "no /dev/nullb0 (null_blk not loaded)" ;;
    *) skip "$b" "unknown backing" ;;
    esac
done
path_of() { # BACKING
    case $1 in tmpfs) echo /tmp/peer.img ;; nvme) echo /dev/nvme0n1 ;; null) echo /dev/nullb0 ;; esac
}

# --- fio ---------------------------------------------------------------------------
# fio_run BACKING PEER DEV ROUND: every load and direction on DEV, one PEER line each;
# a failed run is a "# fio failed" line, and the next runs go on (1 if any failed).
fio_run() {
    _frc=0
    for _l in $LOADS; do
        case $_l in qd1) _qd=1 _nj=1 ;; qd16) _qd=16 _nj=1 ;; 2x16) _qd=16 _nj=2 ;; esac
        for _rw in $RWS; do
            if ! timeout -k 5 "$FIO_DEADLINE" fio --name=p --filename="$3" --rw="$_rw" --bs=4k \
                --iodepth="$_qd" --numjobs="$_nj" --group_reporting --ioengine=libaio --direct=1 \
                --runtime="$SECS" --time_based --ramp_time=1 --size=${SIZE_MB}M --randrepeat=0 \
                --output-format=json >/tmp/peer.json 2>/tmp/peer.err; then
                note "fio failed or hung ($1 $2 $_l $_rw round $4): $(tail -n 1 /tmp/peer.err)"
                _frc=1
                continue
            fi
            _d="read"
            [ "$_rw" = randwrite ] && _d="write"
            _s=$(fio_summary /tmp/peer.json)
            _iops=$(echo "$_s" | tr ' ' '\n' | sed -n "s/^${_d}_iops=//p")
            _p50=$(echo "$_s" | tr ' ' '\n' | sed -n "s/^${_d}_p50_us=//p")
            _p99=$(echo "$_s" | tr ' ' '\n' | sed -n "s/^${_d}_p99_us=//p")
            echo "# PEER backing=$1 peer=$2 load=$_l rw=$_rw round=$4 iops=$_iops p50_us=$_p50 p99_us=$_p99"
        done
    done
    return $_frc
}

# wait_bdev VDPA-NAME: the block device of a vdpa device, polled (deadline 30 s).
wait_bdev() {
    _end=$(($(now) + 30))
    while [ -z "$(vdpa_blockdev "$1")" ]; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
    vdpa_blockdev "$1"
}

# stop_pid PID WHAT: SIGTERM, wait (deadline 30 s); 1 (and a BUG line) if it hangs or
# exits non-zero.
stop_pid() {
    kill -TERM "$1" 2>/dev/null
    if ! wait_gone "$1" 30; then
        bug "$2 did not exit within 30s of SIGTERM"
        kill -KILL "$1" 2>/dev/null
        return 1
    fi
    wait "$1" || { bug "$2 exited with status $? after SIGTERM"; return 1; }
}

# --- the peers -------------------------------------------------------------------
run_raw() { # BACKING ROUND
    fio_run "$1" raw "$(path_of "$1")" "$2"
}

run_qsd() { # BACKING ROUND
    _p=$(path_of "$1") _drv=host_device
    [ "$1" = tmpfs ] && _drv="file"
    qemu-storage-daemon \
        --blockdev "driver=$_drv,node-name=f0,filename=$_p,aio=io_uring,cache.direct=on" \
        --export type=vduse-blk,id=e0,node-name=f0,name=pqsd,num-queues=2,writable=on \
        >/tmp/qsd.out 2>/tmp/qsd.err &
    _pid=$!
    _end=$(($(now) + 30))
    while [ ! -e /dev/vduse/pqsd ]; do
        if proc_gone "$_pid" || [ "$(now)" -ge "$_end" ]; then
            show_tail /tmp/qsd.err
            kill "$_pid" 2>/dev/null
            note "qsd did not create /dev/vduse/pqsd"
            return 1
        fi
        sleep 0.1
    done
    vdpa dev add name pqsd mgmtdev vduse || { stop_pid "$_pid" qsd; return 1; }
    _rc=0
    if _d=$(wait_bdev pqsd); then
        fio_run "$1" qsd "$_d" "$2" || _rc=1
    else
        note "no block device for pqsd"
        _rc=1
    fi
    vdpa dev del pqsd || _rc=1
    stop_pid "$_pid" qsd || _rc=1
    return $_rc
}

run_rublk() { # BACKING ROUND
    # rublk forks its server and returns once the device is live; a fixed id names it.
    _id=7
    if ! timeout -k 5 60 rublk add loop -n "$_id" -f "$(path_of "$1")" -q 2 >/tmp/rublk.out 2>/tmp/rublk.err; then
        show_tail /tmp/rublk.out
        show_tail /tmp/rublk.err
        note "rublk add failed"
        return 1
    fi
    _end=$(($(now) + 30))
    while [ ! -b "/dev/ublkb$_id" ]; do
        [ "$(now)" -lt "$_end" ] || { note "no /dev/ublkb$_id"; timeout 30 rublk del -n "$_id"; return 1; }
        sleep 0.1
    done
    _rc=0
    fio_run "$1" rublk "/dev/ublkb$_id" "$2" || _rc=1
    timeout -k 5 30 rublk del -n "$_id" >/dev/null 2>/tmp/rublk.err || { show_tail /tmp/rublk.err; note "rublk del failed"; _rc=1; }
    return $_rc
}

# run_vduse BACKING ROUND on|off
run_vduse() {
    _p=$(path_of "$1") _peer=vduse-zc-$3
    vduse-blkd serve "$_p" --name pours --queues 2 --zero-copy "$3" >/tmp/ours.out 2>/tmp/ours.err &
    _pid=$!
    if ! _l=$(wait_for_line /tmp/ours.out '^ready ' 60); then
        show_tail /tmp/ours.err
        if proc_gone "$_pid"; then bug "vduse-blkd ($_peer) exited before its ready line"; else bug "vduse-blkd ($_peer) not ready within 60s"; fi
        kill -KILL "$_pid" 2>/dev/null
        return 1
    fi
    _d=${_l##*dev=}
    _rc=0
    if [ "$1" = tmpfs ] && [ "$2" = 1 ]; then
        # Data check, first round: what goes in through the device is in the file.
        dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
        dd if=/tmp/pattern of="$_d" bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null
        dd if="$_d" of=/tmp/back bs=1M count=4 skip=8 iflag=direct 2>/dev/null
        dd if=/tmp/peer.img of=/tmp/file bs=1M count=4 skip=8 2>/dev/null
        if ! cmp -s /tmp/pattern /tmp/back || ! cmp -s /tmp/pattern /tmp/file; then
            bug "vduse-blkd ($_peer): data read back (device or file) differs from data written"
            _rc=1
        fi
    fi
    fio_run "$1" "$_peer" "$_d" "$2" || { _rc=1; proc_gone "$_pid" && bug "vduse-blkd ($_peer) died during fio"; }
    stop_pid "$_pid" "vduse-blkd ($_peer)" || { show_tail /tmp/ours.err; _rc=1; }
    _stop=$(grep -m 1 'stopped:' /tmp/ours.err)
    _fixed=$(echo "$_stop" | sed -n 's/.* \([0-9]*\) on fixed buffers.*/\1/p')
    echo "# PEERSTOP backing=$1 peer=$_peer round=$2 fixed=${_fixed:-?} line=$_stop"
    return $_rc
}

run_peer() { # PEER BACKING ROUND
    case $1 in
    raw) run_raw "$2" "$3" ;;
    qsd) run_qsd "$2" "$3" ;;
    rublk) run_rublk "$2" "$3" ;;
    vduse-zc-on) run_vduse "$2" "$3" on ;;
    vduse-zc-off) run_vduse "$2" "$3" off ;;
    *) note "unknown peer $1"; return 1 ;;
    esac
}

# rotate N WORDS...: the words, rotated left by N
rotate() {
    _n=$1
    shift
    _c=$#
    [ "$_c" -gt 0 ] || return 0
    _n=$((_n % _c))
    while [ "$_n" -gt 0 ]; do
        _f=$1
        shift
        set -- "$@" "$_f"
        _n=$((_n - 1))
    done
    echo "$@"
}

r=1
while [ "$r" -le "$ROUNDS" ]; do
    _t0=$(now)
    for b in $BACKINGS; do
        skipped "$b" && continue
        # shellcheck disable=SC2086
        for pe in $(rotate $((r - 1)) $PEERS); do
            skipped "$pe" && continue
            run_peer "$pe" "$b" "$r" || { note "run failed: $pe on $b, round $r"; ok=0; }
        done
    done
    note "round $r took $(($(now) - _t0))s"
    r=$((r + 1))
done
if [ "$ok" = 1 ]; then pass peers; else fail peers "a run failed (see # lines)"; fi
