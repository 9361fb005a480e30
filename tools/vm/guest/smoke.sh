# Testbed smoke test (no vduse-blkd needed): tools/vm/run stable tools/vm/guest/smoke.sh
# Checks that the base modules loaded, the VDUSE modules load, the vdpa tool sees
# the vduse management device, and fio runs and its JSON output parses.
# shellcheck source=lib.sh
. /guest/lib.sh
export CASE_SCRIPT=/guest/smoke.sh

smoke_base_modules() {
    for m in vdpa vhost_iotlb virtio_blk null_blk ext4 jbd2; do
        [ -d "/sys/module/$m" ] || fail "module $m is not loaded"
    done
    [ ! -d /sys/module/vduse ] || fail "vduse was loaded by /init (must be left to load_vduse_modules)"
    [ ! -e /dev/vduse/control ] || fail "/dev/vduse/control exists before load_vduse_modules"
}

smoke_vduse_modules() {
    load_vduse_modules || fail "load_vduse_modules failed"
    [ -c /dev/vduse/control ] || fail "no /dev/vduse/control"
    for m in vduse virtio_vdpa vhost_vdpa; do
        [ -d "/sys/module/$m" ] || fail "module $m is not loaded"
    done
    vdpa mgmtdev show >/tmp/mgmt 2>&1 || fail "vdpa mgmtdev show failed: $(cat /tmp/mgmt)"
    grep -q '^vduse' /tmp/mgmt || fail "vdpa mgmtdev show does not list vduse: $(cat /tmp/mgmt)"
    note "$(tr '\n' ' ' </tmp/mgmt)"
}

smoke_fio_null_blk() {
    [ -b /dev/nullb0 ] || fail "no /dev/nullb0"
    fio --name=smoke --filename=/dev/nullb0 --rw=randread --bs=4k --iodepth=16 --ioengine=libaio \
        --direct=1 --runtime=2 --time_based --output-format=json >/tmp/smoke.json 2>/tmp/smoke.err ||
        fail "fio failed: $(tail -n 3 /tmp/smoke.err)"
    s=$(fio_summary /tmp/smoke.json)
    note "null_blk randread 4k qd16: $s"
    iops=$(echo "$s" | sed 's/^read_iops=\([0-9]*\) .*/\1/')
    [ "$iops" -gt 0 ] || fail "fio reported no read IOPS: $s"
}

smoke_tools() {
    /sbin/mke2fs -V >/tmp/v 2>&1 || fail "/sbin/mke2fs does not run: $(cat /tmp/v)"
    grep -q 'mke2fs [0-9]' /tmp/v || fail "/sbin/mke2fs is not e2fsprogs' mke2fs: $(cat /tmp/v)"
    /sbin/blkdiscard -V >/tmp/v 2>&1 || fail "/sbin/blkdiscard does not run"
    grep -q util-linux /tmp/v || fail "/sbin/blkdiscard is not util-linux: $(cat /tmp/v)"
    /sbin/e2fsck -V >/dev/null 2>&1 || fail "/sbin/e2fsck does not run"
    /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups id -u >/tmp/v 2>&1 || fail "setpriv failed: $(cat /tmp/v)"
    [ "$(cat /tmp/v)" = 65534 ] || fail "setpriv did not drop to uid 65534: $(cat /tmp/v)"
}

if [ "${1:-}" = --case ]; then
    "$2"
    exit $?
fi
run_case base-modules 30 smoke_base_modules
run_case vduse-modules 60 smoke_vduse_modules
run_case fio-null_blk 60 smoke_fio_null_blk
run_case tools 30 smoke_tools
