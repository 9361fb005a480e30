//! A logger that keeps the last lines the production code logged (the worker's `debug!` /
//! `warn!`), so that a failing fuzz input can show what the worker said just before.

use std::collections::VecDeque;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

const KEEP: usize = 64;

struct Ring(Mutex<VecDeque<String>>);

impl Log for Ring {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= Level::Debug
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(format!("[{} {}] {}", r.level(), r.target(), r.args()));
    }

    fn flush(&self) {}
}

static RING: Ring = Ring(Mutex::new(VecDeque::new()));

/// Install the logger (once per process; later calls do nothing).
pub fn install() {
    if log::set_logger(&RING).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}

/// The lines kept so far, oldest first.
pub fn dump() -> String {
    let q = RING.0.lock().unwrap_or_else(|e| e.into_inner());
    q.iter().map(|l| format!("  {l}\n")).collect()
}
