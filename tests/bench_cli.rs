//! The `vduse-blkd-bench` binary end to end: a short null-backing run with `--json`, and the
//! JSON's keys and types pinned (perf/compare and perf/table read them).

use std::process::Command;

use serde_json::{Map, Value};

/// Every key of the JSON report, sorted: adding or renaming one is a decision for the perf/
/// scripts and perf/RESULTS.md.
const KEYS: [&str; 24] = [
    "backing",
    "bs",
    "chains",
    "depth",
    "direct",
    "driver_cpus",
    "errors",
    "fixed_ios",
    "interrupts",
    "iops",
    "kicks",
    "mib_s",
    "p50_us",
    "p999_us",
    "p99_us",
    "queues",
    "requests",
    "rw",
    "seconds",
    "wait",
    "worker_cpus",
    "worker_p50_us",
    "worker_p999_us",
    "worker_p99_us",
];

fn field<'a>(o: &'a Map<String, Value>, key: &str) -> &'a Value {
    o.get(key)
        .unwrap_or_else(|| panic!("no key {key:?} in {o:?}"))
}

#[test]
fn json_report_has_integer_counts_and_rounded_latencies() {
    if !vduse_blkd::sim::io_uring_available() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vduse-blkd-bench"))
        .args(["--backing", "null", "--depth", "4", "--seconds", "0.3"])
        .args(["--pin", "none", "--json"])
        .output()
        .expect("run vduse-blkd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    let v: Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let o = v.as_object().expect("a JSON object");

    for key in ["iops", "requests", "kicks", "interrupts"] {
        let n = field(o, key);
        assert!(
            n.as_u64().is_some_and(|n| n > 0),
            "{key} must be a positive integer: {n}"
        );
    }
    assert_eq!(field(o, "errors").as_u64(), Some(0));
    assert_eq!(field(o, "queues").as_u64(), Some(1));
    assert_eq!(field(o, "depth").as_u64(), Some(4));
    assert_eq!(field(o, "bs").as_u64(), Some(4096));
    assert_eq!(field(o, "rw"), "randread");
    assert_eq!(field(o, "backing"), "null");
    assert_eq!(field(o, "chains"), "indirect");
    assert_eq!(field(o, "wait"), "irq");
    assert_eq!(field(o, "direct"), false);
    assert_eq!(field(o, "seconds").as_f64(), Some(0.3));
    assert_eq!(field(o, "worker_cpus"), &Value::Array(vec![]));
    assert_eq!(field(o, "driver_cpus"), &Value::Array(vec![]));

    // iops is requests per second of the window, rounded.
    let (iops, requests) = (o["iops"].as_u64().unwrap(), o["requests"].as_u64().unwrap());
    assert_eq!(iops, (requests as f64 / 0.3).round() as u64);
    let mib_s = field(o, "mib_s").as_f64().expect("mib_s is a number");
    assert_eq!(
        mib_s,
        (mib_s * 10.0).round() / 10.0,
        "mib_s to 0.1: {mib_s}"
    );
    let lat = |key: &str| {
        let x = field(o, key)
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"));
        assert!(x > 0.0, "{key} = {x}");
        assert_eq!(x, (x * 100.0).round() / 100.0, "{key} to 0.01 us: {x}");
        x
    };
    for side in ["", "worker_"] {
        let p = |q: &str| lat(&format!("{side}{q}_us"));
        let (p50, p99, p999) = (p("p50"), p("p99"), p("p999"));
        assert!(p50 <= p99 && p99 <= p999, "{side}: {p50} {p99} {p999}");
    }
    // The text must also be short: a rounded number prints with few digits.
    for key in ["p50_us", "p99_us", "worker_p50_us", "mib_s"] {
        let text = o[key].to_string();
        assert!(text.len() <= 12, "{key} printed as {text}");
    }
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, KEYS);
}

#[test]
fn bad_arguments_exit_nonzero_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_vduse-blkd-bench"))
        .args(["--backing", "null", "--bs", "1000", "--seconds", "0.1"])
        .output()
        .expect("run vduse-blkd-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vduse-blkd-bench: --bs must be a multiple of 512"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
