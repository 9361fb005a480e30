//! What a benchmark runs: the options and their validation.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::engine::BenchError;

/// Largest block size a request may carry.
pub const MAX_BS: u32 = 1 << 20;
/// Largest queue depth.
pub const MAX_DEPTH: u16 = 4096;
/// Capacity of the null backing when `--size` is not given.
pub const NULL_DEFAULT_CAPACITY: u64 = 1 << 40;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads of `bs` bytes.
    RandRead,
    /// Random writes of `bs` bytes.
    RandWrite,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        })
    }
}

/// What the workers serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchBacking {
    /// No storage: every request completes with an io_uring NOP.
    Null,
    /// A regular file or block device.
    Path(PathBuf),
}

impl BenchBacking {
    /// `null` is the null backing; anything else is a path.
    pub fn parse(s: &str) -> Self {
        if s == "null" {
            BenchBacking::Null
        } else {
            BenchBacking::Path(PathBuf::from(s))
        }
    }
}

impl fmt::Display for BenchBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchBacking::Null => f.write_str("null"),
            BenchBacking::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How a driver waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Ask for an interrupt at the next used entry (`used_event`) and block on the interrupt
    /// eventfd, as a guest driver does: every batch costs a worker → driver wake-up.
    Irq,
    /// Spin on the used index and never ask for interrupts (a polling guest): the driver's
    /// wake-up cost is gone, so the worker is what limits. Needs a CPU of its own.
    Poll,
}

impl fmt::Display for WaitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitMode::Irq => "irq",
            WaitMode::Poll => "poll",
        })
    }
}

/// Where threads run, over the `n` CPUs this process may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinning {
    /// [`Pinning::Same`] when drivers wait for interrupts, [`Pinning::Split`] when they poll
    /// (a spinning driver must not share its worker's CPU). Why same-CPU for interrupts: on a
    /// virtual machine a wake-up across CPUs goes through the hypervisor (an IPI to a halted
    /// vCPU); on the 2-vCPU machine perf/RESULTS.md was measured on it costs ~25 µs against
    /// ~2.3 µs on one CPU (`perf/wakeup`), and a queue pays two wake-ups per batch.
    Auto,
    /// Worker and driver of queue `q` both on CPU `q % n`.
    Same,
    /// Worker of queue `q` on CPU `q % n`, its driver on CPU `(q + 1) % n`, as a guest's vCPU
    /// and the host's I/O thread would be on a host with CPUs to spare.
    Split,
    /// Workers round robin over the first list, drivers over the second.
    Lists(Vec<usize>, Vec<usize>),
    /// Leave placement to the scheduler.
    None,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The backing.
    pub backing: BenchBacking,
    /// Size of a file to create (sparse), or of the null device; must match an existing file.
    pub size: Option<u64>,
    /// Open the backing with O_DIRECT.
    pub direct: bool,
    /// Write the whole file with pseudo-random data before measuring.
    pub prefill: bool,
    /// Queues (one worker and one driver thread each).
    pub queues: u16,
    /// Requests each driver keeps in flight.
    pub depth: u16,
    /// Bytes per request (a multiple of 512).
    pub bs: u32,
    /// Access pattern.
    pub rw: Pattern,
    /// Measured time.
    pub seconds: Duration,
    /// Unmeasured time before it (warm-up).
    pub ramp: Duration,
    /// Seed of the offsets (queue `q` uses `seed + q`).
    pub seed: u64,
    /// Post each request as one indirect descriptor (true) or three direct ones (false).
    pub indirect: bool,
    /// How drivers wait for completions.
    pub wait: WaitMode,
    /// The workers' busy-poll window (zero: they park at once).
    pub worker_poll: Duration,
    /// Offer each queue's buffers to its worker as a zero-copy area (io_uring fixed buffers).
    pub zero_copy: bool,
    /// Workers time each request's stages (as `serve` does unless `--no-stage-stats`).
    pub stage_stats: bool,
    /// CPU placement.
    pub pinning: Pinning,
}

impl BenchOptions {
    /// Defaults for everything but the backing: 1 queue, depth 32, 4 KiB random reads for
    /// 5 s, no ramp, seed 1, indirect chains, automatic pinning (the command line's defaults,
    /// which `main` fills in from clap; the unit tests start from these).
    #[cfg(test)]
    pub fn new(backing: BenchBacking) -> Self {
        BenchOptions {
            backing,
            size: None,
            direct: false,
            prefill: false,
            queues: 1,
            depth: 32,
            bs: 4096,
            rw: Pattern::RandRead,
            seconds: Duration::from_secs(5),
            ramp: Duration::ZERO,
            seed: 1,
            indirect: true,
            wait: WaitMode::Irq,
            worker_poll: Duration::ZERO,
            zero_copy: false,
            stage_stats: true,
            pinning: Pinning::Auto,
        }
    }
}

pub fn validate(o: &BenchOptions) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Invalid(m));
    if o.queues == 0 || o.queues > 64 {
        return bad(format!("--queues must be 1..=64, not {}", o.queues));
    }
    if o.depth == 0 || o.depth > MAX_DEPTH {
        return bad(format!("--depth must be 1..={MAX_DEPTH}, not {}", o.depth));
    }
    if o.bs < 512 || o.bs > MAX_BS || !o.bs.is_multiple_of(512) {
        return bad(format!(
            "--bs must be a multiple of 512 up to {MAX_BS}, not {}",
            o.bs
        ));
    }
    if o.seconds.is_zero() {
        return bad("--seconds must be positive".into());
    }
    if o.prefill && o.backing == BenchBacking::Null {
        return bad("--prefill needs a file backing".into());
    }
    Ok(())
}
