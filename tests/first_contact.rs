//! First contact: the binary on this host, whatever its kernel has (issue #12).
//!
//! Runs `vduse-blkd` itself. On a host without VDUSE (no `/dev/vduse/control`, the usual case
//! for CI and containers) it pins that `probe` reports what is missing and exits 0, that
//! `probe --json` is JSON with the missing pieces as fields, and that the other commands fail
//! with one line of advice that works here. On a host with VDUSE the probe assertions check
//! the other shape; `list`/`del` are then left to the VM suite.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vduse-blkd");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vduse-blkd")
}

/// Run with `args`, assert that it exits 0, and return the output with its stdout as text.
fn run_ok(args: &[&str]) -> (Output, String) {
    let out = run(args);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}\nstdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    (out, stdout)
}

fn has_vduse() -> bool {
    Path::new("/dev/vduse/control").exists()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("UTF-8 output")
}

fn release() -> String {
    let out = Command::new("uname").arg("-r").output().expect("uname -r");
    text(&out.stdout).trim().to_string()
}

/// Whether `modprobe M` could work on this host at all.
fn modprobe_could_work() -> bool {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("modprobe").is_file()));
    on_path && Path::new("/lib/modules").join(release()).is_dir()
}

#[test]
fn probe_exits_0_and_says_what_is_missing() {
    let (out, stdout) = run_ok(&["probe"]);
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    assert!(stdout.starts_with("kernel:"), "{stdout}");
    assert!(stdout.contains("kernel config:"), "{stdout}");
    if has_vduse() {
        assert!(stdout.contains("control device:      yes"), "{stdout}");
        assert!(stdout.contains("API version chosen:"), "{stdout}");
        return;
    }
    assert!(stdout.contains("control device:      no"), "{stdout}");
    let vduse_line = stdout
        .lines()
        .find(|l| l.starts_with("missing:") && l.contains("vduse (for "))
        .unwrap_or_else(|| panic!("no 'missing: vduse' line:\n{stdout}"));
    if !modprobe_could_work() {
        assert!(!vduse_line.contains("run: modprobe"), "{vduse_line}");
    }
    assert!(!stdout.contains("API version chosen"), "{stdout}");
}

fn tristate_or_null(v: &Value) -> bool {
    v.is_null() || matches!(v.as_str(), Some("y" | "m" | "n"))
}

#[test]
fn probe_json_has_the_missing_pieces_as_fields() {
    let (_, stdout) = run_ok(&["probe", "--json"]);
    let v: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let vduse = &v["vduse"];
    assert_eq!(vduse["control_device"], Value::Bool(has_vduse()), "{v}");
    assert_eq!(v["control_device"], Value::Bool(has_vduse()), "{v}");
    assert!(vduse["module_loaded"].is_boolean(), "{v}");
    assert!(
        vduse["module_available"].is_null() || vduse["module_available"].is_boolean(),
        "{v}"
    );
    let config = vduse["kernel_config"]
        .as_object()
        .expect("kernel_config object");
    for key in [
        "CONFIG_VDPA_USER",
        "CONFIG_VIRTIO_VDPA",
        "CONFIG_VHOST_VDPA",
    ] {
        assert!(tristate_or_null(&config[key]), "{key}: {v}");
    }
    let source = &vduse["config_source"];
    assert!(source.is_null() || source.is_string(), "{v}");
    // The values are null exactly when no configuration was found.
    assert!(
        config.values().all(|x| x.is_null() == source.is_null()),
        "{v}"
    );
    if Path::new("/proc/config.gz").exists() {
        assert_eq!(source, "/proc/config.gz", "{v}");
    }
    if !Path::new("/lib/modules").join(release()).is_dir() {
        assert!(vduse["module_available"].is_null(), "{v}");
    }
    let missing = v["missing"].as_array().expect("missing is a list");
    for m in missing {
        for field in ["what", "needed_for", "advice"] {
            assert!(m[field].as_str().is_some_and(|s| !s.is_empty()), "{m}");
        }
    }
    if has_vduse() {
        assert!(v["api_version_chosen"].is_u64(), "{v}");
    } else {
        assert!(missing.iter().any(|m| m["what"] == "vduse"), "{v}");
        assert!(v.get("api_version_chosen").is_none(), "{v}");
    }
}

/// A failing command's stderr: exactly one line `vduse-blkd: ...`.
fn one_line_error(args: &[&str]) -> String {
    let out = run(args);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{args:?} succeeded: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{args:?} stdout: {}",
        text(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("vduse-blkd: "), "{args:?}: {stderr}");
    stderr
}

#[test]
fn serve_names_a_missing_backing_file_before_the_kernel() {
    let err = one_line_error(&["serve", "/nonexistent/backing.img", "--name", "x"]);
    assert!(err.contains("/nonexistent/backing.img"), "{err}");
    assert!(!err.contains("module"), "{err}");
    // With --size the file would be created, but not in a directory that does not exist.
    let err = one_line_error(&[
        "serve",
        "/nonexistent/backing.img",
        "--name",
        "x",
        "--size",
        "16M",
    ]);
    assert!(err.contains("/nonexistent/backing.img"), "{err}");
    assert!(!err.contains("module"), "{err}");
}

fn assert_module_advice(err: &str) {
    assert!(err.contains("vduse") && err.contains("module"), "{err}");
    if !modprobe_could_work() {
        assert!(
            !err.contains("run: modprobe"),
            "advice that cannot work here: {err}"
        );
    }
}

#[test]
fn list_without_vduse_fails_with_one_line_of_advice() {
    if has_vduse() {
        eprintln!("this host has /dev/vduse/control: the VM suite covers list");
        return;
    }
    assert_module_advice(&one_line_error(&["list"]));
}

#[test]
fn del_without_vduse_fails_with_one_line_of_advice() {
    if has_vduse() {
        eprintln!("this host has /dev/vduse/control: the VM suite covers del");
        return;
    }
    assert_module_advice(&one_line_error(&["del", "nosuchdev"]));
}

#[test]
fn help_mentions_every_flag() {
    let cases: [(&str, &[&str]); 4] = [
        (
            "serve",
            &[
                "--name",
                "--size",
                "--queues",
                "--queue-size",
                "--cpus",
                "--readonly",
                "--direct",
                "--block-size",
                "--serial",
                "--attach",
                "--api-version",
            ],
        ),
        ("probe", &["--json"]),
        ("list", &[]),
        ("del", &[]),
    ];
    for (sub, flags) in cases {
        let (_, help) = run_ok(&[sub, "--help"]);
        for flag in flags {
            assert!(help.contains(flag), "{sub} --help lacks {flag}:\n{help}");
        }
    }
    let top = text(&run(&["--help"]).stdout);
    for sub in ["serve", "probe", "list", "del"] {
        assert!(top.contains(sub), "--help lacks {sub}:\n{top}");
    }
}
