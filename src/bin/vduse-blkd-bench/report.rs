//! The result of a benchmark: JSON keys and the human-readable summary.

use hdrhistogram::Histogram;
use serde::Serialize;

use vduse_blkd::metrics::QueueStats;

use crate::options::{BenchOptions, Pattern, WaitMode};

/// The result. The first eleven fields are the stable JSON keys.
///
/// Numbers in JSON: counts (`iops`, `requests`, `errors`, `kicks`, `interrupts`,
/// `fixed_ios`, `queues`, `depth`, `bs`) are integers; `mib_s` is rounded to 0.1 MiB/s; every `*_us` latency is in
/// microseconds rounded to 0.01 µs (10 ns, the resolution the text output prints; the
/// histograms keep 3 significant digits); `seconds` is the measured window as given.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests completed per second in the measured window, all queues (rounded).
    pub iops: u64,
    /// MiB per second (`requests * bs / 2^20 / seconds`), rounded to 0.1.
    pub mib_s: f64,
    /// Driver-side latency percentiles (publish → used entry seen), microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Queues.
    pub queues: u16,
    /// Depth per queue.
    pub depth: u16,
    /// Bytes per request.
    pub bs: u32,
    /// Access pattern.
    pub rw: Pattern,
    /// `null` or the path.
    pub backing: String,
    /// Length of the measured window.
    pub seconds: f64,
    /// O_DIRECT was used.
    pub direct: bool,
    /// `indirect` or `direct` descriptor chains.
    pub chains: &'static str,
    /// How the drivers waited: `irq` or `poll`.
    pub wait: WaitMode,
    /// Requests completed in the window.
    pub requests: u64,
    /// Requests completed with a bad status or used length (any at all is a failure).
    pub errors: u64,
    /// Kicks the workers woke up for, whole run.
    pub kicks: u64,
    /// Interrupts the workers raised, whole run.
    pub interrupts: u64,
    /// Reads and writes the workers did on fixed buffers (`--zero-copy`).
    pub fixed_ios: u64,
    /// Worker-side latency (avail pop → used publication), whole run, microseconds.
    pub worker_p50_us: f64,
    /// Worker-side 99th percentile.
    pub worker_p99_us: f64,
    /// Worker-side 99.9th percentile.
    pub worker_p999_us: f64,
    /// CPU of each queue's worker (empty: not pinned).
    pub worker_cpus: Vec<usize>,
    /// CPU of each queue's driver (empty: not pinned).
    pub driver_cpus: Vec<usize>,
}

/// What the drivers and workers of a finished run measured.
pub struct Totals {
    /// Requests completed inside the measured window, all queues.
    pub completed: u64,
    /// Requests completed with a bad used length or status byte.
    pub errors: u64,
    /// Driver-side latency, nanoseconds, all queues.
    pub hist: Histogram<u64>,
    /// The workers' counters and latency, merged.
    pub stats: QueueStats,
}

/// `v` rounded to `decimals` decimal places. Dividing by the (exact) power of ten, rather than
/// multiplying by its inverse, gives the double nearest the decimal, which JSON prints short.
fn round_to(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

/// A latency quantile of a nanosecond histogram, in µs rounded to 0.01.
fn us(h: &Histogram<u64>, q: f64) -> f64 {
    round_to(h.value_at_quantile(q) as f64 / 1000.0, 2)
}

impl BenchReport {
    /// The report of a run of `o` (`direct`: the backing was opened with O_DIRECT).
    pub fn new(
        o: &BenchOptions,
        direct: bool,
        t: &Totals,
        worker_cpus: Vec<usize>,
        driver_cpus: Vec<usize>,
    ) -> Self {
        let secs = o.seconds.as_secs_f64();
        let per_sec = t.completed as f64 / secs;
        let w = t.stats.summary();
        BenchReport {
            iops: per_sec.round() as u64,
            mib_s: round_to(per_sec * f64::from(o.bs) / f64::from(1u32 << 20), 1),
            p50_us: us(&t.hist, 0.5),
            p99_us: us(&t.hist, 0.99),
            p999_us: us(&t.hist, 0.999),
            queues: o.queues,
            depth: o.depth,
            bs: o.bs,
            rw: o.rw,
            backing: o.backing.to_string(),
            seconds: secs,
            direct,
            chains: if o.indirect { "indirect" } else { "direct" },
            wait: o.wait,
            requests: t.completed,
            errors: t.errors,
            kicks: t.stats.kicks,
            interrupts: t.stats.interrupts,
            fixed_ios: t.stats.fixed_ios,
            worker_p50_us: round_to(w.p50_us, 2),
            worker_p99_us: round_to(w.p99_us, 2),
            worker_p999_us: round_to(w.p999_us, 2),
            worker_cpus,
            driver_cpus,
        }
    }

    /// The human-readable summary.
    pub fn human(&self) -> String {
        let cpus = |v: &[usize]| {
            if v.is_empty() {
                "unpinned".to_string()
            } else {
                v.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        format!(
            "{rw} bs={bs} depth={depth} queues={queues} backing={backing}{direct} chains={chains} \
             wait={wait} {secs:.1} s\n\
             iops {iops}  MiB/s {mib:.1}  requests {req}  errors {err}\n\
             latency (driver: publish -> used seen) us: p50 {p50:.2}  p99 {p99:.2}  p99.9 {p999:.2}\n\
             latency (worker: pop -> used published) us: p50 {wp50:.2}  p99 {wp99:.2}  p99.9 {wp999:.2}\n\
             kicks {kicks}  interrupts {irqs}  fixed-buffer I/Os {fixed}  worker cpus {wc}  \
             driver cpus {dc}",
            rw = self.rw,
            bs = self.bs,
            depth = self.depth,
            queues = self.queues,
            backing = self.backing,
            direct = if self.direct { " (O_DIRECT)" } else { "" },
            chains = self.chains,
            wait = self.wait,
            secs = self.seconds,
            iops = self.iops,
            mib = self.mib_s,
            req = self.requests,
            err = self.errors,
            p50 = self.p50_us,
            p99 = self.p99_us,
            p999 = self.p999_us,
            wp50 = self.worker_p50_us,
            wp99 = self.worker_p99_us,
            wp999 = self.worker_p999_us,
            kicks = self.kicks,
            irqs = self.interrupts,
            fixed = self.fixed_ios,
            wc = cpus(&self.worker_cpus),
            dc = cpus(&self.driver_cpus),
        )
    }
}
