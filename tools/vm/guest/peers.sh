# Peer benchmark in one boot (busybox sh): vduse-blkd against QEMU's qemu-storage-daemon
# vduse-blk export, same kernel, same tmpfs file size, same fio job, alternating rounds so
# that drift of the emulated machine hits both alike. Prints one "# PEER ..." line per run
# and one RESULT line. Run by perf/vm-peers.
# shellcheck source=lib.sh
. /guest/lib.sh
ROUNDS=${PEER_ROUNDS:-3}
SECS=${PEER_SECONDS:-5}

load_vduse_modules || { fail peers "cannot load the VDUSE modules"; exit 0; }
command -v qemu-storage-daemon >/dev/null || { fail peers "no qemu-storage-daemon in the guest"; exit 0; }

bdev_of() { # NAME: wait (deadline 30 s) for the block device of vdpa device NAME
    _end=$(($(now) + 30))
    while [ -z "$(vdpa_blockdev "$1")" ]; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
    vdpa_blockdev "$1"
}

fio_run() { # LABEL DEV QD
    fio --name=p --filename="$2" --rw=randread --bs=4k --iodepth="$3" --ioengine=libaio \
        --direct=1 --runtime="$SECS" --time_based --ramp_time=1 --size=256M \
        --output-format=json >/tmp/peer.json 2>/tmp/peer.err || { echo "# fio failed: $(tail -n 1 /tmp/peer.err)"; return 1; }
    echo "# PEER $1 qd=$3 $(fio_summary /tmp/peer.json)"
}

ours() { # QD
    truncate -s 256M /tmp/ours.img
    vduse-blkd serve /tmp/ours.img --name pours >/tmp/ours.out 2>/tmp/ours.err &
    _p=$!
    wait_for_line /tmp/ours.out '^ready' 60 >/dev/null || { show_tail /tmp/ours.err; return 1; }
    _d=$(sed -n 's/.*dev=//p' /tmp/ours.out)
    dd if=/dev/zero of="$_d" bs=1M count=256 oflag=direct 2>/dev/null
    fio_run vduse-blkd "$_d" "$1"
    kill -TERM "$_p"
    wait "$_p"
    rm -f /tmp/ours.img
}

qsd() { # QD
    truncate -s 256M /tmp/qsd.img
    qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/qsd.img \
        --export type=vduse-blk,id=e0,node-name=f0,name=pqsd,num-queues=1,writable=on \
        >/tmp/qsd.out 2>/tmp/qsd.err &
    _p=$!
    _end=$(($(now) + 30))
    while [ ! -e /dev/vduse/pqsd ]; do
        [ "$(now)" -lt "$_end" ] || { show_tail /tmp/qsd.err; return 1; }
        sleep 0.1
    done
    vdpa dev add name pqsd mgmtdev vduse || return 1
    _d=$(bdev_of pqsd) || return 1
    dd if=/dev/zero of="$_d" bs=1M count=256 oflag=direct 2>/dev/null
    fio_run qemu-storage-daemon "$_d" "$1"
    vdpa dev del pqsd
    kill -TERM "$_p"
    wait "$_p"
    rm -f /tmp/qsd.img
}

ok=1
r=1
while [ "$r" -le "$ROUNDS" ]; do
    for qd in 1 16; do
        ours "$qd" || ok=0
        qsd "$qd" || ok=0
    done
    r=$((r + 1))
done
if [ "$ok" = 1 ]; then pass peers; else fail peers "a run failed (see # lines)"; fi
