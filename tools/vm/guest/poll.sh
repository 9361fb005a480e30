# Busy-poll window (serve --poll-us) in one boot (busybox sh): fio 4 KiB random reads through
# the kernel's virtio_blk at QD1 and at 2 jobs x QD16 on 2 queues, for each window, rounds
# interleaved; then the daemon's CPU use while the device sits idle. One "# POLL ..." line
# per run, one "# IDLE ..." line per window and round, one RESULT line. Run by perf/vm-poll.
# shellcheck source=lib.sh
. /guest/lib.sh
ROUNDS=${POLL_ROUNDS:-3}
SECS=${POLL_SECONDS:-4}
WINDOWS=${POLL_WINDOWS:-0 20 50}
IDLE_SECS=5

load_vduse_modules || { fail poll "cannot load the VDUSE modules"; exit 0; }
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)

# cpu_ticks PID: utime + stime of every thread of PID, in clock ticks.
cpu_ticks() {
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

fio_run() { # WINDOW LOAD DEV QD JOBS
    fio --name=p --filename="$3" --rw=randread --bs=4k --iodepth="$4" --numjobs="$5" \
        --group_reporting --ioengine=libaio --direct=1 --runtime="$SECS" --time_based \
        --ramp_time=1 --size=256M --output-format=json >/tmp/poll.json 2>/tmp/poll.err ||
        { echo "# fio failed: $(tail -n 1 /tmp/poll.err)"; return 1; }
    echo "# POLL poll=$1 load=$2 $(fio_summary /tmp/poll.json)"
}

one() { # WINDOW
    truncate -s 256M /tmp/poll.img
    vduse-blkd serve /tmp/poll.img --name ppoll --queues 2 --poll-us "$1" >/tmp/poll.out 2>/tmp/poll.derr &
    _p=$!
    wait_for_line /tmp/poll.out '^ready' 60 >/dev/null || { show_tail /tmp/poll.derr; return 1; }
    _d=$(sed -n 's/.*dev=//p' /tmp/poll.out)
    dd if=/dev/zero of="$_d" bs=1M count=256 oflag=direct 2>/dev/null
    fio_run "$1" qd1 "$_d" 1 1 || return 1
    fio_run "$1" 2x16 "$_d" 16 2 || return 1
    # Idle: nothing submits; a worker that keeps spinning after its window shows here.
    _t0=$(cpu_ticks "$_p")
    sleep "$IDLE_SECS" # a measuring interval, not a synchronisation
    _t1=$(cpu_ticks "$_p")
    echo "# IDLE poll=$1 cpu_pct=$(awk -v a="$_t0" -v b="$_t1" -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN { printf "%.2f", (b - a) * 100 / hz / s }')"
    kill -TERM "$_p"
    wait "$_p"
    rm -f /tmp/poll.img
}

ok=1
r=1
while [ "$r" -le "$ROUNDS" ]; do
    for w in $WINDOWS; do
        one "$w" || ok=0
    done
    r=$((r + 1))
done
if [ "$ok" = 1 ]; then pass poll; else fail poll "a run failed (see # lines)"; fi
