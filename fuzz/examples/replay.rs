//! Replay fuzz inputs without libFuzzer, timing each: `cargo run --release --example replay
//! -- TARGET FILE_OR_DIR...` (a crash reproduces with a normal backtrace).
use std::path::Path;
use std::time::Instant;

use vduse_blkd_fuzz::wire::Wire;

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .expect("usage: replay request|queue FILE_OR_DIR...");
    let run: fn(&[u8]) = match target.as_str() {
        "request" => vduse_blkd_fuzz::request::fuzz,
        "queue" => vduse_blkd_fuzz::queue::fuzz,
        t => panic!("unknown target {t}"),
    };
    let mut files = Vec::new();
    for a in args {
        let p = Path::new(&a);
        if p.is_dir() {
            for e in std::fs::read_dir(p).expect("directory") {
                files.push(e.expect("entry").path());
            }
        } else {
            files.push(p.to_path_buf());
        }
    }
    files.sort();
    // REPEAT=n: run the list n times, rotated by a different offset each time (state carries
    // over between inputs, as in a libFuzzer process).
    let repeat: usize = std::env::var("REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let base = files.clone();
    for r in 1..repeat {
        let mut v = base.clone();
        v.rotate_left((r * 7919) % base.len().max(1));
        files.extend(v);
    }
    let start = Instant::now();
    let mut slowest = (0.0f64, None);
    for f in &files {
        let data = std::fs::read(f).expect("input");
        if std::env::var_os("PRINT").is_some() {
            match target.as_str() {
                "request" => {
                    println!(
                        "{f:?}: {:#?}",
                        vduse_blkd_fuzz::request::RequestInput::from_bytes(&data)
                    )
                }
                _ => println!(
                    "{f:?}: {:#?}",
                    vduse_blkd_fuzz::queue::QueueInput::from_bytes(&data)
                ),
            }
        }
        let t = Instant::now();
        run(&data);
        let s = t.elapsed().as_secs_f64();
        if s > slowest.0 {
            slowest = (s, Some(f.clone()));
        }
    }
    let total = start.elapsed().as_secs_f64();
    println!(
        "{} inputs in {total:.3} s ({:.0}/s); slowest {:.1} ms: {:?}",
        files.len(),
        files.len() as f64 / total.max(1e-9),
        slowest.0 * 1e3,
        slowest.1
    );
}
