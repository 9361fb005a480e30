//! Per-queue counters and latency histograms.
//!
//! Owns: what a worker counts (requests by kind, bytes, errors, kicks, batches, interrupts),
//! the request latency histogram (pop from the avail ring to publication in the used ring,
//! nanoseconds; the worker reads the clock once per batch, so a request's start is its pop
//! batch's and its end its completion batch's), and the per-stage histograms
//! ([`StageStats`]: each stage span of every request, by request kind). Each worker owns its
//! own [`QueueStats`] (no atomics on the hot path); they are merged when workers stop, and
//! copied when a live view asks. Must not touch: queues, files or the kernel.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::blk::RequestKind;

/// The stages of a request in the worker, in order. Each is the span between two batch
/// clock readings (see [`Stamps`]):
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Worker woke (its `io_uring_enter` returned, or a poll turn began) → the drain that
    /// popped the request began: what the wake-up spent on completions first.
    Dispatch,
    /// Drain began → the `io_uring_enter` that carried the request's SQEs: chain walk, parse,
    /// translation and SQE preparation of the whole batch.
    Prepare,
    /// That enter → the enter that returned the request's last CQE: the backing store and
    /// io_uring.
    Backend,
    /// CQEs reaped → the batch's used entries written (status bytes, used ring).
    Complete,
    /// Used entries written → the interrupt injected (or found unneeded).
    Notify,
    /// Woke → interrupt: the sum of the five.
    Total,
}

/// Every stage, in order.
pub const STAGES: [Stage; 6] = [
    Stage::Dispatch,
    Stage::Prepare,
    Stage::Backend,
    Stage::Complete,
    Stage::Notify,
    Stage::Total,
];

/// Every request kind, in [`kind_index`] order.
pub const KINDS: [RequestKind; 6] = [
    RequestKind::Read,
    RequestKind::Write,
    RequestKind::Flush,
    RequestKind::GetId,
    RequestKind::Discard,
    RequestKind::WriteZeroes,
];

/// The position of `k` in [`KINDS`].
pub fn kind_index(k: RequestKind) -> usize {
    match k {
        RequestKind::Read => 0,
        RequestKind::Write => 1,
        RequestKind::Flush => 2,
        RequestKind::GetId => 3,
        RequestKind::Discard => 4,
        RequestKind::WriteZeroes => 5,
    }
}

/// The name of a request kind in reports.
pub fn kind_name(k: RequestKind) -> &'static str {
    match k {
        RequestKind::Read => "read",
        RequestKind::Write => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId => "get_id",
        RequestKind::Discard => "discard",
        RequestKind::WriteZeroes => "write_zeroes",
    }
}

impl Stage {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Dispatch => "dispatch",
            Stage::Prepare => "prepare",
            Stage::Backend => "backend",
            Stage::Complete => "complete",
            Stage::Notify => "notify",
            Stage::Total => "total",
        }
    }
}

/// A monotonic clock in nanoseconds since its creation: readings are plain integers, so a
/// span is one subtraction (the hot path reads the clock once per batch boundary).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }
}

impl Clock {
    /// Nanoseconds since the clock was made (CLOCK_MONOTONIC underneath).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// The six clock readings of one request ([`Clock`] nanoseconds; batch readings, shared by
/// the batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    /// The worker woke.
    pub wake: u64,
    /// The drain that popped it began.
    pub pop: u64,
    /// Just before the enter that submitted its SQEs (= `pop` when it needed none).
    pub submit: u64,
    /// Its last CQE was reaped (= `submit` when it needed none).
    pub reaped: u64,
    /// Its used entry was written with its batch.
    pub published: u64,
    /// The batch's interrupt was injected or found unneeded.
    pub irq: u64,
}

impl Stamps {
    /// The span of `stage`, in nanoseconds (a reading that went backwards counts as 0).
    pub fn span(&self, stage: Stage) -> u64 {
        let (a, b) = match stage {
            Stage::Dispatch => (self.wake, self.pop),
            Stage::Prepare => (self.pop, self.submit),
            Stage::Backend => (self.submit, self.reaped),
            Stage::Complete => (self.reaped, self.published),
            Stage::Notify => (self.published, self.irq),
            Stage::Total => (self.wake, self.irq),
        };
        b.saturating_sub(a)
    }
}

/// Nanosecond histograms with 2 significant digits up to 60 s (about 30 KiB each).
fn stage_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("static histogram bounds are valid")
}

/// Per-stage, per-kind histograms, and the batch sizes.
#[derive(Debug, Clone)]
pub struct StageStats {
    /// `[stage][kind]`, in [`STAGES`] and [`KINDS`] order.
    pub spans: Vec<Vec<Histogram<u64>>>,
    /// Requests popped per drain.
    pub drain_batch: Histogram<u64>,
    /// Completions per reap.
    pub reap_batch: Histogram<u64>,
}

impl Default for StageStats {
    fn default() -> Self {
        let batch = || Histogram::new_with_bounds(1, 1 << 20, 2).expect("static bounds");
        StageStats {
            spans: STAGES
                .iter()
                .map(|_| KINDS.iter().map(|_| stage_histogram()).collect())
                .collect(),
            drain_batch: batch(),
            reap_batch: batch(),
        }
    }
}

impl StageStats {
    /// Record every stage of one request of kind `k`.
    pub fn record(&mut self, k: RequestKind, s: &Stamps) {
        self.record_n(k, s, 1);
    }

    /// Record every stage of `n` requests of kind `k` with the same readings (requests of
    /// one batch share them: one histogram update per stage for the lot).
    pub fn record_n(&mut self, k: RequestKind, s: &Stamps, n: u64) {
        let ki = kind_index(k);
        for (si, stage) in STAGES.iter().enumerate() {
            // Values above the top are clamped, counts cannot overflow u64 in practice.
            let v = s.span(*stage).min(self.spans[si][ki].high());
            let _ = self.spans[si][ki].record_n(v, n);
        }
    }

    /// One stage over every kind.
    pub fn stage(&self, stage: Stage) -> Histogram<u64> {
        let si = STAGES.iter().position(|s| *s == stage).unwrap_or(0);
        let mut all = stage_histogram();
        for h in &self.spans[si] {
            // Same bounds on both sides: adding cannot fail.
            let _ = all.add(h);
        }
        all
    }

    /// What was recorded after `base` (an earlier copy of the same counters).
    pub fn since(&self, base: &StageStats) -> StageStats {
        let mut d = self.clone();
        for (mine, theirs) in d.spans.iter_mut().zip(&base.spans) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                // An earlier copy never holds more: a failure would mean a wrong base.
                if m.subtract(t).is_err() {
                    m.reset();
                }
            }
        }
        if d.drain_batch.subtract(&base.drain_batch).is_err() {
            d.drain_batch.reset();
        }
        if d.reap_batch.subtract(&base.reap_batch).is_err() {
            d.reap_batch.reset();
        }
        d
    }

    /// Add `other` into `self`.
    pub fn merge(&mut self, other: &StageStats) {
        for (mine, theirs) in self.spans.iter_mut().zip(&other.spans) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                let _ = m.add(t);
            }
        }
        let _ = self.drain_batch.add(&other.drain_batch);
        let _ = self.reap_batch.add(&other.reap_batch);
    }
}

/// Counters and latency of one queue (or the merge of several).
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// Requests completed, by kind: read, write, flush, get_id, discard, write_zeroes.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// GET_ID requests completed.
    pub get_ids: u64,
    /// DISCARD requests completed.
    pub discards: u64,
    /// WRITE_ZEROES requests completed.
    pub write_zeroes: u64,
    /// Requests completed with a status other than OK.
    pub errors: u64,
    /// Requests that had no status byte to report into.
    pub unanswerable: u64,
    /// Bytes read from the backing store.
    pub bytes_read: u64,
    /// Bytes written to the backing store.
    pub bytes_written: u64,
    /// Kick wake-ups.
    pub kicks: u64,
    /// Interrupts injected.
    pub interrupts: u64,
    /// `io_uring_enter` calls that submitted at least one I/O.
    pub submits: u64,
    /// Reads and writes done on io_uring fixed buffers (the zero-copy area).
    pub fixed_ios: u64,
    /// Requests in flight when the copy was taken (a gauge: live views only).
    pub in_flight: u64,
    /// Requests the backing store failed (also counted in `errors`), by cause.
    pub backing: BackingErrors,
    /// Request latency in nanoseconds.
    pub latency: Histogram<u64>,
    /// Where each request's time went.
    pub stages: Box<StageStats>,
}

impl Default for QueueStats {
    fn default() -> Self {
        Self {
            reads: 0,
            writes: 0,
            flushes: 0,
            get_ids: 0,
            discards: 0,
            write_zeroes: 0,
            errors: 0,
            unanswerable: 0,
            bytes_read: 0,
            bytes_written: 0,
            kicks: 0,
            interrupts: 0,
            submits: 0,
            fixed_ios: 0,
            in_flight: 0,
            backing: BackingErrors::default(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("static histogram bounds are valid"),
            stages: Box::default(),
        }
    }
}

/// Why the backing store failed a request (the first failure of the request decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFailure {
    /// EIO: the medium or the device below failed.
    Eio,
    /// ENOSPC (or EDQUOT): no room to allocate what a write needed.
    NoSpace,
    /// A read or write moved fewer bytes than asked: the file ends earlier than the device
    /// (truncated underneath), or the filesystem filled up mid-write.
    Short,
    /// Any other errno from the backing store.
    Other,
}

/// Requests failed by the backing store, by [`BackingFailure`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BackingErrors {
    /// EIO.
    pub eio: u64,
    /// ENOSPC / EDQUOT.
    pub no_space: u64,
    /// Short transfers.
    pub short: u64,
    /// Other errnos.
    pub other: u64,
}

impl BackingErrors {
    /// Count one failed request.
    pub fn count(&mut self, f: BackingFailure) {
        match f {
            BackingFailure::Eio => self.eio += 1,
            BackingFailure::NoSpace => self.no_space += 1,
            BackingFailure::Short => self.short += 1,
            BackingFailure::Other => self.other += 1,
        }
    }

    /// Every failed request.
    pub fn total(&self) -> u64 {
        self.eio + self.no_space + self.short + self.other
    }

    fn merge(&mut self, o: &BackingErrors) {
        self.eio += o.eio;
        self.no_space += o.no_space;
        self.short += o.short;
        self.other += o.other;
    }

    /// What was counted after `base`.
    fn since(&self, base: &BackingErrors) -> BackingErrors {
        BackingErrors {
            eio: self.eio.saturating_sub(base.eio),
            no_space: self.no_space.saturating_sub(base.no_space),
            short: self.short.saturating_sub(base.short),
            other: self.other.saturating_sub(base.other),
        }
    }
}

/// A printable summary of [`QueueStats`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsSummary {
    /// Requests completed.
    pub requests: u64,
    /// Requests with a non-OK status.
    pub errors: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Interrupts injected.
    pub interrupts: u64,
    /// Reads and writes on fixed buffers (zero copy).
    pub fixed_ios: u64,
    /// Requests failed by the backing store, by cause.
    pub backing: BackingErrors,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
}

impl QueueStats {
    /// Completed requests of every kind.
    pub fn requests(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.get_ids + self.discards + self.write_zeroes
    }

    /// Add `other` into `self`.
    pub fn merge(&mut self, other: &QueueStats) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.get_ids += other.get_ids;
        self.discards += other.discards;
        self.write_zeroes += other.write_zeroes;
        self.errors += other.errors;
        self.unanswerable += other.unanswerable;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.kicks += other.kicks;
        self.interrupts += other.interrupts;
        self.submits += other.submits;
        self.fixed_ios += other.fixed_ios;
        self.in_flight += other.in_flight;
        self.backing.merge(&other.backing);
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.stages.merge(&other.stages);
    }

    /// What was counted after `base` (an earlier copy of the same queue's counters; gauges
    /// are this copy's).
    pub fn since(&self, base: &QueueStats) -> QueueStats {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let mut latency = self.latency.clone();
        if latency.subtract(&base.latency).is_err() {
            latency.reset();
        }
        QueueStats {
            reads: d(self.reads, base.reads),
            writes: d(self.writes, base.writes),
            flushes: d(self.flushes, base.flushes),
            get_ids: d(self.get_ids, base.get_ids),
            discards: d(self.discards, base.discards),
            write_zeroes: d(self.write_zeroes, base.write_zeroes),
            errors: d(self.errors, base.errors),
            unanswerable: d(self.unanswerable, base.unanswerable),
            bytes_read: d(self.bytes_read, base.bytes_read),
            bytes_written: d(self.bytes_written, base.bytes_written),
            kicks: d(self.kicks, base.kicks),
            interrupts: d(self.interrupts, base.interrupts),
            submits: d(self.submits, base.submits),
            fixed_ios: d(self.fixed_ios, base.fixed_ios),
            in_flight: self.in_flight,
            backing: self.backing.since(&base.backing),
            latency,
            stages: Box::new(self.stages.since(&base.stages)),
        }
    }

    /// The live view's JSON of these counters over `elapsed_s` seconds: totals, rates,
    /// in-flight requests, and per stage (and per kind that has requests) the count and
    /// p50/p99/p99.9/max in µs.
    pub fn live_json(&self, elapsed_s: f64) -> serde_json::Value {
        let q = |h: &Histogram<u64>| {
            let us = |v: u64| (v as f64 / 10.0).round() / 100.0;
            serde_json::json!({
                "count": h.len(),
                "p50_us": us(h.value_at_quantile(0.5)),
                "p99_us": us(h.value_at_quantile(0.99)),
                "p999_us": us(h.value_at_quantile(0.999)),
                "max_us": us(h.max()),
            })
        };
        let mut stages = serde_json::Map::new();
        for (si, stage) in STAGES.iter().enumerate() {
            let mut by_kind = serde_json::Map::new();
            for (ki, kind) in KINDS.iter().enumerate() {
                let h = &self.stages.spans[si][ki];
                if !h.is_empty() {
                    by_kind.insert(kind_name(*kind).into(), q(h));
                }
            }
            let mut all = q(&self.stages.stage(*stage));
            all["by_kind"] = by_kind.into();
            stages.insert(stage.name().into(), all);
        }
        let per_s = |n: u64| {
            if elapsed_s > 0.0 {
                n as f64 / elapsed_s
            } else {
                0.0
            }
        };
        serde_json::json!({
            "requests": self.requests(),
            "reads": self.reads,
            "writes": self.writes,
            "errors": self.errors,
            "backing_errors": {
                "eio": self.backing.eio,
                "no_space": self.backing.no_space,
                "short": self.backing.short,
                "other": self.backing.other,
            },
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "iops": per_s(self.requests()).round(),
            "mib_s": (per_s(self.bytes_read + self.bytes_written) / 1048576.0 * 10.0).round() / 10.0,
            "in_flight": self.in_flight,
            "kicks": self.kicks,
            "interrupts": self.interrupts,
            "fixed_ios": self.fixed_ios,
            "drain_batch_p50": self.stages.drain_batch.value_at_quantile(0.5),
            "reap_batch_p50": self.stages.reap_batch.value_at_quantile(0.5),
            "stages": stages,
        })
    }

    /// Percentiles and totals.
    pub fn summary(&self) -> StatsSummary {
        let q = |p: f64| self.latency.value_at_quantile(p) as f64 / 1000.0;
        StatsSummary {
            requests: self.requests(),
            errors: self.errors,
            bytes_read: self.bytes_read,
            bytes_written: self.bytes_written,
            interrupts: self.interrupts,
            fixed_ios: self.fixed_ios,
            backing: self.backing,
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = QueueStats::default();
        let mut b = QueueStats::default();
        a.reads = 2;
        b.writes = 3;
        for v in [1000u64, 2000, 3000] {
            a.latency.saturating_record(v);
        }
        b.latency.saturating_record(1_000_000);
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.requests, 5);
        assert_eq!(a.latency.len(), 4);
        assert!(s.p999_us >= 999.0, "{s:?}");
        assert!((s.p50_us - 2.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn a_period_counts_only_what_came_after_its_base_and_renders_every_stage() {
        let s = Stamps {
            wake: 7,
            pop: 7,
            submit: 7,
            reaped: 50_007,
            published: 51_007,
            irq: 52_007,
        };
        let mut a = QueueStats {
            reads: 3,
            bytes_read: 3 << 12,
            ..Default::default()
        };
        for _ in 0..3 {
            a.stages.record(RequestKind::Read, &s);
            a.latency.saturating_record(50_000);
        }
        let base = a.clone();
        a.reads += 2;
        a.bytes_read += 2 << 12;
        a.in_flight = 4;
        for _ in 0..2 {
            a.stages.record(RequestKind::Read, &s);
        }
        let d = a.since(&base);
        assert_eq!((d.reads, d.bytes_read, d.in_flight), (2, 2 << 12, 4));
        assert_eq!(d.stages.stage(Stage::Total).len(), 2);
        assert_eq!(d.latency.len(), 0);
        let j = d.live_json(2.0);
        assert_eq!(j["iops"], 1.0);
        for st in STAGES {
            assert_eq!(j["stages"][st.name()]["count"], 2, "{}", st.name());
        }
        assert_eq!(j["stages"]["backend"]["by_kind"]["read"]["count"], 2);
        assert!(j["stages"]["backend"]["by_kind"].get("write").is_none());
        let p50 = j["stages"]["backend"]["p50_us"].as_f64().unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
    }

    #[test]
    fn stage_spans_add_up_to_the_total_and_merge_across_queues() {
        let at = |us: u64| us * 1000;
        let s = Stamps {
            wake: at(0),
            pop: at(3),
            submit: at(10),
            reaped: at(110),
            published: at(114),
            irq: at(120),
        };
        let parts: u64 = STAGES[..5].iter().map(|st| s.span(*st)).sum();
        assert_eq!(parts, s.span(Stage::Total));
        assert_eq!(s.span(Stage::Backend), 100_000);
        let mut a = StageStats::default();
        let mut b = StageStats::default();
        a.record(RequestKind::Read, &s);
        b.record(RequestKind::Write, &s);
        b.record(RequestKind::Write, &s);
        a.merge(&b);
        let backend = a.stage(Stage::Backend);
        assert_eq!(backend.len(), 3);
        // 2 significant digits: within 1% of 100 µs.
        assert!(backend.value_at_quantile(0.5).abs_diff(100_000) <= 1_000);
        assert_eq!(a.spans[1][kind_index(RequestKind::Write)].len(), 2);
        // A clock reading that went backwards is a zero span, never a panic or a huge one.
        let back = Stamps {
            pop: at(0),
            wake: at(5),
            ..s
        };
        assert_eq!(back.span(Stage::Dispatch), 0);
    }

    #[test]
    fn backing_errors_are_counted_by_cause_and_merged() {
        let mut a = QueueStats::default();
        let mut b = QueueStats::default();
        a.backing.count(BackingFailure::Eio);
        a.backing.count(BackingFailure::Eio);
        b.backing.count(BackingFailure::NoSpace);
        b.backing.count(BackingFailure::Short);
        b.backing.count(BackingFailure::Other);
        a.merge(&b);
        let want = BackingErrors {
            eio: 2,
            no_space: 1,
            short: 1,
            other: 1,
        };
        assert_eq!(a.summary().backing, want);
        assert_eq!(want.total(), 5);
    }
}
