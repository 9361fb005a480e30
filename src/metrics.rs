//! Per-queue counters and latency histograms.
//!
//! Owns: what a worker counts (requests by kind, bytes, errors, kicks, batches, interrupts)
//! and the request latency histogram (pop from the avail ring to publication in the used
//! ring, nanoseconds). Each worker owns its own [`QueueStats`] (no atomics on the hot path);
//! they are merged when workers stop. Must not touch: queues, files or the kernel.

use hdrhistogram::Histogram;
use serde::Serialize;

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
    /// Requests the backing store failed (also counted in `errors`), by cause.
    pub backing: BackingErrors,
    /// Request latency in nanoseconds.
    pub latency: Histogram<u64>,
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
            backing: BackingErrors::default(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("static histogram bounds are valid"),
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
        self.backing.merge(&other.backing);
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
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
