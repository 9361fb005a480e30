//! Replay fuzz inputs without libFuzzer, timing each: `cargo run --release --example replay
//! -- TARGET FILE_OR_DIR...` (a crash reproduces with a normal backtrace; `PRINT=1` prints
//! the decoded input first).
use std::path::Path;
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use vduse_blkd_fuzz::{queue, request};

/// A target's harness and its pretty-printer of decoded inputs.
type Target = (fn(&[u8]), fn(&[u8]) -> String);

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .expect("usage: replay request|queue FILE_OR_DIR...");
    let (run, print): Target = match target.as_str() {
        "request" => (request::fuzz, |d| decoded::<request::RequestInput>(d)),
        "queue" => (queue::fuzz, |d| decoded::<queue::QueueInput>(d)),
        t => panic!("unknown target {t}"),
    };
    let mut files = Vec::new();
    for a in args {
        let p = Path::new(&a);
        if p.is_dir() {
            files.extend(
                std::fs::read_dir(p)
                    .expect("directory")
                    .map(|e| e.expect("entry").path()),
            );
        } else {
            files.push(p.to_path_buf());
        }
    }
    files.sort();
    let start = Instant::now();
    let mut slowest = (0.0f64, None);
    for f in &files {
        let data = std::fs::read(f).expect("input");
        if std::env::var_os("PRINT").is_some() {
            println!("{f:?}: {}", print(&data));
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
        "{} inputs in {total:.3} s; slowest {:.1} ms: {:?}",
        files.len(),
        slowest.0 * 1e3,
        slowest.1
    );
}

fn decoded<T: for<'a> Arbitrary<'a> + std::fmt::Debug>(data: &[u8]) -> String {
    match T::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(v) => format!("{v:#?}"),
        Err(e) => format!("(does not decode: {e})"),
    }
}
