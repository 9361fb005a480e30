# The demo (busybox sh in the VM, or bash on a host with VDUSE): serve a sparse tmpfs
# file through vduse-blkd with 2 queues and measure 4 KiB random read/write with fio.
# Settings (environment): DEMO_SECONDS (20), DEMO_SIZE (1G), DEMO_QUEUES (2),
# DEMO_DIR (/tmp, must be tmpfs for the numbers to mean the device path), GUEST_DIR.
# shellcheck source=lib.sh
. "${GUEST_DIR:-/guest}/lib.sh"
export CASE_SCRIPT="${GUEST_DIR:-/guest}/demo.sh"
DEMO_SECONDS=${DEMO_SECONDS:-20}
DEMO_SIZE=${DEMO_SIZE:-1G}
DEMO_QUEUES=${DEMO_QUEUES:-2}
DEMO_DIR=${DEMO_DIR:-/tmp}

demo() {
    command -v vduse-blkd >/dev/null || fail "vduse-blkd not found (cargo build --release)"
    img=$DEMO_DIR/vduse-blkd-demo.img
    rm -f "$img"
    truncate -s "$DEMO_SIZE" "$img"
    start_daemon demo "$img" --queues "$DEMO_QUEUES"
    engine=io_uring
    if ! fio --name=probe --filename="$DEV" --rw=read --bs=4k --size=64k --ioengine=io_uring \
        --direct=1 >/tmp/demo-probe.out 2>&1; then
        note "io_uring is not usable here ($(grep -m 1 -i -E 'error|fail' /tmp/demo-probe.out)); using libaio"
        engine=libaio
    fi
    note "demo: $(uname -r): vduse-blkd serves a sparse $DEMO_SIZE tmpfs file as $DEV, $DEMO_QUEUES queues"
    note "demo: fio randrw 4k, iodepth 32, 2 jobs, ${DEMO_SECONDS}s, --ioengine=$engine --direct=1"
    fio --name=demo --filename="$DEV" --rw=randrw --bs=4k --iodepth=32 --numjobs=2 --group_reporting \
        --ioengine="$engine" --direct=1 --time_based --runtime="$DEMO_SECONDS" --ramp_time=2 \
        --output-format=json --output=/tmp/demo.json >/tmp/demo.err 2>&1 ||
        { show_tail /tmp/demo.err; fail "fio failed"; }
    s=$(fio_summary /tmp/demo.json)
    val() { echo "$s" | tr ' ' '\n' | grep "^$1=" | cut -d= -f2; }
    { [ "$(val read_iops)" -gt 0 ] && [ "$(val write_iops)" -gt 0 ]; } || fail "fio reported no I/O: $s"
    note "demo: IOPS        read $(val read_iops)   write $(val write_iops)"
    note "demo: latency us  read  p50 $(val read_p50_us)  p99 $(val read_p99_us)  p99.9 $(val read_p99.9_us)"
    note "demo: latency us  write p50 $(val write_p50_us)  p99 $(val write_p99_us)  p99.9 $(val write_p99.9_us)"
    stop_daemon demo
    rm -f "$img"
}

if [ "${1:-}" = --case ]; then
    "$2"
    exit $?
fi
load_vduse_modules || { fail demo "could not load the VDUSE modules"; exit 0; }
run_case demo $((DEMO_SECONDS + 180)) demo
