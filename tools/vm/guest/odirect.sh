# Does O_DIRECT into VDUSE's kernel bounce buffer work on this kernel? (busybox sh)
# One read of 64 KiB through each configuration; run:
#   tools/vm/run stable tools/vm/guest/odirect.sh --quiet --extra /usr/bin/qemu-storage-daemon
# shellcheck source=lib.sh
. /guest/lib.sh
load_vduse_modules || { fail diag "no vduse"; exit 0; }
try_ours() { # LABEL BACKING ARGS...
    _lab=$1 _b=$2; shift 2
    vduse-blkd serve "$_b" --name dg --queues 1 "$@" >/tmp/dg.out 2>/tmp/dg.err &
    _p=$!
    _l=$(wait_for_line /tmp/dg.out '^ready ' 60) || { note "$_lab: not ready"; show_tail /tmp/dg.err; kill "$_p"; return; }
    _d=${_l##*dev=}
    if dd if="$_d" of=/dev/null bs=4k count=16 iflag=direct 2>/tmp/dd.err; then note "$_lab: read OK"; else note "$_lab: read FAILED: $(tail -n1 /tmp/dd.err)"; fi
    kill -TERM "$_p"; wait_gone "$_p" 30; wait "$_p"
    note "$_lab: daemon stderr:"; sed 's/^/#     /' /tmp/dg.err | head -n 12
}
try_qsd() { # LABEL DRIVER FILE DIRECT
    qemu-storage-daemon --blockdev "driver=$2,node-name=f0,filename=$3,aio=io_uring,cache.direct=$4" \
        --export type=vduse-blk,id=e0,node-name=f0,name=dq,num-queues=1,writable=on >/tmp/q.out 2>&1 &
    _p=$!
    _end=$(($(now) + 30))
    while [ ! -e /dev/vduse/dq ]; do [ "$(now)" -lt "$_end" ] || break; sleep 0.1; done
    vdpa dev add name dq mgmtdev vduse
    _end=$(($(now) + 30))
    while [ -z "$(vdpa_blockdev dq)" ]; do [ "$(now)" -lt "$_end" ] || break; sleep 0.1; done
    _d=$(vdpa_blockdev dq)
    if dd if="$_d" of=/dev/null bs=4k count=16 iflag=direct 2>/tmp/dd.err; then note "$1: read OK"; else note "$1: read FAILED: $(tail -n1 /tmp/dd.err)"; fi
    vdpa dev del dq; kill -TERM "$_p"; wait_gone "$_p" 30; wait "$_p"
    sed 's/^/#     /' /tmp/q.out | head -n 5
}
dd if=/dev/zero of=/tmp/f.img bs=1M count=64 2>/dev/null
try_ours "ours nullb0 zc off (O_DIRECT)" /dev/nullb0 --zero-copy off
try_ours "ours nullb0 zc on (O_DIRECT)" /dev/nullb0 --zero-copy on
try_ours "ours nullb0 zc auto (default, O_DIRECT)" /dev/nullb0
try_ours "ours tmpfs file zc off, --direct" /tmp/f.img --zero-copy off --direct
try_ours "ours tmpfs file zc off, page cache" /tmp/f.img --zero-copy off
try_qsd "qsd nullb0 cache.direct=on" host_device /dev/nullb0 on
try_qsd "qsd nullb0 cache.direct=off" host_device /dev/nullb0 off
pass diag
