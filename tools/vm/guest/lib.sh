# Helpers for guest scripts (busybox sh), sourced: . /guest/lib.sh
#
# Result protocol (parsed by tools/vm/run): one JSON object per case on one line,
#   RESULT {"case":"<case>","status":"pass"|"fail","secs":<n>,"reason":"<text>"}
# written only through `result`; tools/vm/run adds the kernel and collects them.
# Diagnostics start with "# " (shown by tools/vm/run --quiet).
#
# Cases run through run_case, each in its own shell under busybox timeout. Inside a
# case, `fail REASON` records the reason and ends the case. Processes a case starts
# through start_daemon/bg_start are recorded and killed by run_case afterwards.
#
# VM_BACKEND=qsd (validation only) makes start_daemon/stop_daemon use QEMU's
# qemu-storage-daemon vduse-blk export instead of vduse-blkd (pass the binary with
# tools/vm/run --extra /usr/bin/qemu-storage-daemon).

PIDS_FILE=/tmp/.case-pids
CASE_FAIL_FILE=/tmp/.case-fail
VM_BACKEND=${VM_BACKEND:-vduse-blkd}

note() { echo "# $*"; }

# json_str TEXT: TEXT as the inside of a JSON string, on one line.
json_str() {
    printf '%s' "$1" | tr '\t\n\r' '   ' | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

# result pass|fail CASE [SECS] [REASON]: the one result line of a case.
result() {
    printf 'RESULT {"case":"%s","status":"%s","secs":%d,"reason":"%s"}\n' \
        "$(json_str "$2")" "$1" "${3:-0}" "$(json_str "${4:-}")"
}

pass() { result pass "$1"; }

fail() {
    # Inside a case: record the reason and end the case. Outside: print a result line.
    if [ -n "${CASE_NAME:-}" ]; then
        echo "$*" >"$CASE_FAIL_FILE"
        note "$CASE_NAME: FAIL: $*"
        exit 1
    fi
    _c=$1
    shift
    result fail "$_c" 0 "$*"
}

now() { cut -d. -f1 /proc/uptime; }

# Show the last lines of a file as diagnostics.
show_tail() {
    [ -s "$1" ] || return 0
    note "--- tail of $1"
    tail -n "${2:-15}" "$1" | sed 's/^/#   /'
}

# wait_for_line FILE REGEX DEADLINE_S: poll until FILE has a line matching REGEX
# (grep -E); prints the first such line. Returns 1 on the deadline.
wait_for_line() {
    _f=$1 _re=$2 _end=$(($(now) + $3))
    while :; do
        if [ -f "$_f" ] && grep -m 1 -E "$_re" "$_f"; then
            return 0
        fi
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
}

# proc_gone PID: true if PID has exited (gone or a zombie waiting to be reaped).
proc_gone() {
    [ -e "/proc/$1/status" ] || return 0
    grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# wait_gone PID DEADLINE_S: poll until PID has exited; 1 on the deadline.
wait_gone() {
    _end=$(($(now) + $2))
    while ! proc_gone "$1"; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
    return 0
}

# bg_start OUT CMD...: run CMD in the background (stdout+stderr to OUT), record it
# for cleanup, set BG_PID.
bg_start() {
    _out=$1
    shift
    "$@" >"$_out" 2>&1 &
    BG_PID=$!
    echo "$BG_PID" >>"$PIDS_FILE"
}

# Load the modules /init left out (vduse, virtio_vdpa, vhost_vdpa) in load order,
# then wait for /dev/vduse/control. (On a host: modprobe vduse and virtio_vdpa.)
load_vduse_modules() {
    if [ ! -f /lib/modules/vm/load-order ]; then
        # not in the test VM (tools/demo --host): the host's own modules
        [ -c /dev/vduse/control ] || modprobe vduse || return 1
        [ -d /sys/module/virtio_vdpa ] || modprobe virtio_vdpa || return 1
        return 0
    fi
    _late=" $(tr '\n' ' ' </lib/modules/vm/late) "
    [ "$VM_BACKEND" = qsd ] && _late=" vduse virtio_vdpa "
    while read -r _m; do
        case "$_late" in *" $_m "*) ;; *) continue ;; esac
        [ -d "/sys/module/$_m" ] && continue
        insmod "/lib/modules/vm/$_m.ko" || return 1
    done </lib/modules/vm/load-order
    _end=$(($(now) + 10))
    while [ ! -c /dev/vduse/control ]; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.1
    done
}

# The block device the kernel made for vdpa device NAME (empty if none yet).
vdpa_blockdev() {
    for _b in /sys/bus/vdpa/devices/"$1"/virtio*/block/vd*; do
        [ -e "$_b" ] && echo "/dev/${_b##*/}" && return 0
    done
    return 0
}

# wait_blockdev NAME DEADLINE_S: poll until vdpa device NAME has a block device; sets D.
wait_blockdev() {
    _end=$(($(now) + $2))
    D=$(vdpa_blockdev "$1")
    while [ -z "$D" ] || [ ! -b "$D" ]; do
        [ "$(now)" -lt "$_end" ] || fail "no block device for $1 within ${2}s"
        sleep 0.1
        D=$(vdpa_blockdev "$1")
    done
}

# start_daemon NAME BACKING [SERVE-ARGS...]: start `vduse-blkd serve BACKING --name NAME
# SERVE-ARGS` in the background (stdout /tmp/daemon.NAME.out, stderr .err), wait for
# its one line "ready name=NAME dev=/dev/vdX" and set DEV and DAEMON_PID.
start_daemon() {
    _name=$1 _backing=$2
    shift 2
    _out=/tmp/daemon.$_name.out _err=/tmp/daemon.$_name.err
    rm -f "$_out" "$_err"
    if [ "$VM_BACKEND" = qsd ]; then
        qsd_start "$_name" "$_backing" "$@"
        return
    fi
    vduse-blkd serve "$_backing" --name "$_name" "$@" >"$_out" 2>"$_err" &
    DAEMON_PID=$!
    echo "$DAEMON_PID" >>"$PIDS_FILE"
    echo "$DAEMON_PID" >"/tmp/daemon.$_name.pid"
    _end=$(($(now) + ${START_DEADLINE:-60}))
    while :; do
        if _line=$(grep -m 1 -E "^ready name=$_name dev=/dev/vd[a-z]+\$" "$_out" 2>/dev/null); then
            DEV=${_line##*dev=}
            break
        fi
        if proc_gone "$DAEMON_PID"; then
            show_tail "$_err"
            fail "daemon exited before printing its ready line: $(tail -n 1 "$_err" 2>/dev/null)"
        fi
        if [ "$(now)" -ge "$_end" ]; then
            show_tail "$_out"
            show_tail "$_err"
            fail "no 'ready name=$_name dev=/dev/vdX' line within ${START_DEADLINE:-60}s"
        fi
        sleep 0.1
    done
    [ -b "$DEV" ] || fail "daemon said ready with $DEV, which is not a block device"
    note "daemon $_name (pid $DAEMON_PID) serves $_backing as $DEV"
}

# stop_daemon NAME [DEADLINE_S]: SIGTERM, wait (deadline, default 30s), require exit
# status 0, exactly one stdout line, and no leftovers.
stop_daemon() {
    _name=$1 _dl=${2:-30}
    if [ "$VM_BACKEND" = qsd ]; then
        qsd_stop "$_name" "$_dl"
        return
    fi
    _pid=$(cat "/tmp/daemon.$_name.pid")
    kill -TERM "$_pid" 2>/dev/null || true
    if ! wait_gone "$_pid" "$_dl"; then
        show_tail "/tmp/daemon.$_name.err"
        fail "daemon $_name did not exit within ${_dl}s of SIGTERM"
    fi
    wait "$_pid"
    _rc=$?
    if [ "$_rc" != 0 ]; then
        show_tail "/tmp/daemon.$_name.err"
        fail "daemon $_name exited with status $_rc after SIGTERM (want 0)"
    fi
    _n=$(wc -l <"/tmp/daemon.$_name.out")
    if [ "$_n" != 1 ]; then
        show_tail "/tmp/daemon.$_name.out"
        fail "daemon $_name printed $_n stdout lines (want exactly the ready line)"
    fi
    assert_no_leftovers "$_name"
}

# assert_no_leftovers NAME: no /dev/vduse/NAME, no vdpa device NAME.
assert_no_leftovers() {
    [ ! -e "/dev/vduse/$1" ] || fail "/dev/vduse/$1 still exists"
    if vdpa dev show 2>/dev/null | grep -q -E "^$1:"; then
        fail "vdpa dev show still lists $1"
    fi
    return 0
}

# --- validation backend: qemu-storage-daemon's vduse-blk export -----------------
qsd_start() {
    _name=$1 _backing=$2
    shift 2
    _q=1 _ro=off _qs=
    while [ $# -gt 0 ]; do
        case $1 in
        --queues) _q=$2; shift 2 ;;
        --queue-size) _qs=",queue-size=$2"; shift 2 ;;
        --size)
            [ -e "$_backing" ] || truncate -s "$2" "$_backing"
            shift 2
            ;;
        --readonly) _ro=on; shift ;;
        *) shift ;;
        esac
    done
    _w=on
    [ "$_ro" = on ] && _w=off
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$_backing,discard=unmap,read-only=$_ro" \
        --export "type=vduse-blk,id=e0,node-name=f0,name=$_name,num-queues=$_q,writable=$_w$_qs" \
        >"/tmp/daemon.$_name.out" 2>"/tmp/daemon.$_name.err" &
    DAEMON_PID=$!
    echo "$DAEMON_PID" >>"$PIDS_FILE"
    echo "$DAEMON_PID" >"/tmp/daemon.$_name.pid"
    _end=$(($(now) + 30))
    while [ ! -e "/dev/vduse/$_name" ]; do
        proc_gone "$DAEMON_PID" && { show_tail "/tmp/daemon.$_name.err"; fail "qemu-storage-daemon exited"; }
        [ "$(now)" -lt "$_end" ] || fail "no /dev/vduse/$_name"
        sleep 0.1
    done
    vdpa dev add name "$_name" mgmtdev vduse || fail "vdpa dev add $_name failed"
    DEV=
    while [ -z "$DEV" ] || [ ! -b "$DEV" ]; do
        [ "$(now)" -lt "$_end" ] || fail "no block device for $_name"
        sleep 0.1
        DEV=$(vdpa_blockdev "$_name")
    done
    note "qemu-storage-daemon $_name (pid $DAEMON_PID) serves $_backing as $DEV"
}

qsd_stop() {
    _name=$1 _dl=$2
    _pid=$(cat "/tmp/daemon.$_name.pid")
    vdpa dev del "$_name" || fail "vdpa dev del $_name failed"
    kill -TERM "$_pid"
    wait_gone "$_pid" "$_dl" || fail "qemu-storage-daemon did not exit"
    wait "$_pid" || fail "qemu-storage-daemon exited non-zero"
    assert_no_leftovers "$_name"
}

# --- fio -------------------------------------------------------------------------
# fio_summary JSON: one line "read_iops=.. write_iops=.. read_p50_us=.. ..." from fio
# --output-format=json (one job, or group_reporting). Percentiles are completion
# latency (clat) in microseconds.
fio_summary() {
    awk '
    /^ *"(read|write|trim|sync)" : \{/ { x = $0; gsub(/[^a-z]/, "", x); sec = x }
    function num(line) { sub(/^[^:]*:/, "", line); gsub(/[^0-9.]/, "", line); return line }
    sec != "" && /"iops" :/ && !((sec, "iops") in v) { v[sec, "iops"] = num($0) }
    sec != "" && /"bw" :/ && !((sec, "bw") in v) { v[sec, "bw"] = num($0) }
    sec != "" && /"50\.000000" :/ && !((sec, "p50") in v) { v[sec, "p50"] = num($0) / 1000 }
    sec != "" && /"99\.000000" :/ && !((sec, "p99") in v) { v[sec, "p99"] = num($0) / 1000 }
    sec != "" && /"99\.900000" :/ && !((sec, "p999") in v) { v[sec, "p999"] = num($0) / 1000 }
    END {
        split("read write", s, " ")
        for (i = 1; i <= 2; i++) {
            d = s[i]
            printf "%s_iops=%d %s_bw_kib=%d %s_p50_us=%.1f %s_p99_us=%.1f %s_p99.9_us=%.1f%s", \
                d, v[d, "iops"], d, v[d, "bw"], d, v[d, "p50"], d, v[d, "p99"], d, v[d, "p999"], (i < 2 ? " " : "\n")
        }
    }' "$1"
}

# run_case NAME LIMIT_S FUNCTION: run FUNCTION in its own shell (this file and the
# caller's script sourced) under busybox timeout; print exactly one RESULT line.
run_case() {
    _case=$1 _limit=$2 _fn=$3
    rm -f "$CASE_FAIL_FILE" "$PIDS_FILE"
    note "case $_case (limit ${_limit}s)"
    _t0=$(now)
    timeout -k 5 "$_limit" env CASE_NAME="$_case" sh "$CASE_SCRIPT" --case "$_fn"
    _rc=$?
    case_cleanup
    _dt=$(($(now) - _t0))
    if [ -s "$CASE_FAIL_FILE" ]; then
        result fail "$_case" "$_dt" "$(head -n 1 "$CASE_FAIL_FILE")"
    elif [ "$_rc" = 143 ] || [ "$_rc" = 137 ]; then
        result fail "$_case" "$_dt" "timed out after ${_limit}s"
    elif [ "$_rc" != 0 ]; then
        result fail "$_case" "$_dt" "case script exited $_rc"
    else
        result pass "$_case" "$_dt"
    fi
}

# Kill what the case left running (only processes it recorded), unmount /mnt/*.
case_cleanup() {
    [ -f "$PIDS_FILE" ] || return 0
    while read -r _p; do
        proc_gone "$_p" || kill -TERM "$_p" 2>/dev/null
    done <"$PIDS_FILE"
    while read -r _p; do
        wait_gone "$_p" 20 || kill -KILL "$_p" 2>/dev/null
    done <"$PIDS_FILE"
    awk '$2 ~ "^/mnt/" {print $2}' /proc/mounts | while read -r _m; do umount "$_m" 2>/dev/null; done
    rm -f "$PIDS_FILE"
}
