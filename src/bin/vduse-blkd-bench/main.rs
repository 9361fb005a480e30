//! `vduse-blkd-bench`: a load generator that drives the production queue workers through the
//! in-process driver simulator, with no kernel VDUSE device involved. A test tool, built only
//! with the `test-utils` feature: `cargo build --release --features test-utils --bin
//! vduse-blkd-bench`. (Until the simulator left the daemon build this was `vduse-blkd bench`.)
//!
//! Owns: the benchmark's setup (backing, simulated memory, one production worker per queue
//! started with [`vduse_blkd::worker::spawn`]), its driver threads (one per queue), CPU pinning
//! of both, the measurement window, the report and this command line. Must not touch: the
//! worker's internals (it is driven only through its ring, kick eventfd and interrupt line, as
//! a kernel would) or the simulator's internals (only its public API).
//!
//! Each driver thread keeps `depth` requests in flight on its queue: it posts them, publishes
//! the avail index, kicks when `avail_event` asks for it (EVENT_IDX, as a Linux guest
//! negotiates it), and when the used ring is empty asks for an interrupt on the next entry
//! (`used_event`), re-checks, and blocks on the interrupt eventfd. Every completed request is
//! checked (used length and status byte) and reposted at a new random offset (aligned to the
//! block size, from a fixed seed). Latency is driver-side: from the avail-index store that
//! published the request to the moment the driver saw its used entry.
//!
//! The simulator's `SimQueue` provides the connection (kick eventfd, interrupt line,
//! [`vduse_blkd::worker::QueueSetup`]), but the hot path writes the rings directly through the
//! region the simulator's memory hands out, with every request's descriptors and buffers laid
//! out once at setup: `SimQueue`'s general posting (a mutex per ring access, heap allocation per
//! request) would make the driver, not the worker, the thing measured. Requests are three
//! descriptors (header, data, status) behind one indirect descriptor by default, the layout a
//! Linux virtio_blk driver uses when VIRTIO_RING_F_INDIRECT_DESC is negotiated.
//!
//! Modules: [`options`] (what to run), [`engine`] (setup, threads, collection), [`driver`]
//! (one queue's driver side and its hot loop), [`report`] (JSON and text).

mod driver;
mod engine;
mod options;
mod report;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vduse_blkd::cli::{parse_cpus, parse_size, CpuList};

use crate::options::{BenchBacking, BenchOptions, Pattern, Pinning, WaitMode};

/// Measure the data path: the production queue workers under load from the in-process
/// driver simulator (no kernel device needed).
///
/// Per queue, one worker (as `vduse-blkd serve` runs it) and one driver thread keeping --depth
/// requests in flight at random offsets aligned to --bs (fixed seed). Prints IOPS, MiB/s
/// and driver-side latency (publish -> used entry seen) percentiles. Pinning (--pin auto):
/// with --wait irq, worker and driver of queue q share CPU q (a wake-up across vCPUs costs
/// ~10x more than on one CPU on a virtual machine); with --wait poll, the driver runs on
/// CPU q+1. A random read of a never-written (sparse) file
/// reads holes and touches no storage: write the file first or pass --prefill.
#[derive(Debug, Parser)]
#[command(name = "vduse-blkd-bench", version)]
struct Args {
    /// A regular file or block device, or `null` for no storage at all (every request
    /// completes with an io_uring NOP: the whole path without data movement).
    #[arg(long)]
    backing: String,
    /// Size of a file to create (sparse), or of the null device (default 1T).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Number of queues (each a worker and a driver thread).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    depth: u16,
    /// Bytes per request, e.g. 4K (a multiple of 512).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    bs: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before the measurement.
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Open the backing with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Write the whole file with pseudo-random data first.
    #[arg(long)]
    prefill: bool,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Post three direct descriptors per request instead of one indirect one.
    #[arg(long)]
    direct_chains: bool,
    /// How the driver threads wait for completions.
    #[arg(long, value_enum, default_value_t = Wait::Irq)]
    wait: Wait,
    /// The workers' busy-poll window in microseconds (`serve --poll-us`); 0: none.
    #[arg(long, default_value_t = 0, value_name = "US")]
    poll_us: u64,
    /// Register each queue's buffers with its worker's io_uring as fixed buffers (what
    /// `serve --zero-copy` does with VDUSE's umem): one-segment I/O becomes READ/WRITE_FIXED.
    #[arg(long)]
    zero_copy: bool,
    /// Do not time each request's stages (what `serve --no-stage-stats` does), to measure
    /// what the stage timing costs.
    #[arg(long)]
    no_stage_stats: bool,
    /// Thread placement (CPU numbers are taken mod the CPUs this process may use).
    #[arg(long, value_enum, default_value_t = Pin::Auto)]
    pin: Pin,
    /// CPUs for the workers, round robin (with --driver-cpus; overrides --pin).
    #[arg(long, value_parser = parse_cpus, requires = "driver_cpus")]
    worker_cpus: Option<CpuList>,
    /// CPUs for the driver threads, round robin (with --worker-cpus).
    #[arg(long, value_parser = parse_cpus, requires = "worker_cpus")]
    driver_cpus: Option<CpuList>,
    /// Print one JSON object (keys iops, mib_s, p50_us, p99_us, p999_us, queues, depth,
    /// bs, rw, backing, seconds, and more). Counts such as iops are integers, MiB/s is
    /// rounded to 0.1 and latencies (µs) to 0.01.
    #[arg(long)]
    json: bool,
}

/// `--rw`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
}

/// `--wait`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Wait {
    /// Block on the interrupt eventfd (re-arming used_event), as a guest driver does.
    Irq,
    /// Spin on the used ring, no interrupts (needs a CPU per driver).
    Poll,
}

/// `--pin`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Pin {
    /// `same` with --wait irq, `split` with --wait poll.
    Auto,
    /// Worker and driver of queue q both on CPU q.
    Same,
    /// Worker of queue q on CPU q, its driver on CPU q+1.
    Split,
    /// No pinning.
    None,
}

impl Args {
    /// The options these arguments ask for, or the one-line reason they are unusable.
    fn options(self) -> Result<BenchOptions, String> {
        let secs = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| format!("--{name} must be a non-negative number of seconds"))
        };
        let bs = u32::try_from(self.bs).map_err(|_| format!("--bs {} is too large", self.bs))?;
        Ok(BenchOptions {
            backing: BenchBacking::parse(&self.backing),
            size: self.size,
            direct: self.direct,
            prefill: self.prefill,
            queues: self.queues,
            depth: self.depth,
            bs,
            rw: match self.rw {
                Rw::Randread => Pattern::RandRead,
                Rw::Randwrite => Pattern::RandWrite,
            },
            seconds: secs("seconds", self.seconds)?,
            ramp: secs("ramp", self.ramp)?,
            seed: self.seed,
            indirect: !self.direct_chains,
            wait: match self.wait {
                Wait::Irq => WaitMode::Irq,
                Wait::Poll => WaitMode::Poll,
            },
            worker_poll: Duration::from_micros(self.poll_us),
            zero_copy: self.zero_copy,
            stage_stats: !self.no_stage_stats,
            pinning: match (self.worker_cpus, self.driver_cpus, self.pin) {
                (Some(w), Some(d), _) => Pinning::Lists(w, d),
                (_, _, Pin::Auto) => Pinning::Auto,
                (_, _, Pin::Same) => Pinning::Same,
                (_, _, Pin::Split) => Pinning::Split,
                (_, _, Pin::None) => Pinning::None,
            },
        })
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "vduse-blkd-bench: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    let json = args.json;
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut note = |line: String| {
        let _ = writeln!(std::io::stderr(), "vduse-blkd-bench: {line}");
    };
    match engine::run(&opts, &mut note) {
        Ok(r) => {
            let text = if json {
                serde_json::to_string(&r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            } else {
                r.human()
            };
            let _ = writeln!(std::io::stdout(), "{text}");
            if r.errors > 0 {
                return fail(format!("{} requests completed with an error", r.errors));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cpu_lists_parse_on_the_command_line() {
        let a = Args::try_parse_from([
            "vduse-blkd-bench",
            "--backing",
            "null",
            "--worker-cpus",
            "0",
            "--driver-cpus",
            "1",
        ])
        .unwrap();
        assert_eq!(
            a.options().unwrap().pinning,
            Pinning::Lists(vec![0], vec![1])
        );
        assert!(Args::try_parse_from([
            "vduse-blkd-bench",
            "--backing",
            "null",
            "--worker-cpus",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn bad_numbers_are_refused_before_running() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["vduse-blkd-bench", "--backing", "null"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap().options()
        };
        assert!(parse(&["--seconds=-1"]).is_err());
        assert!(parse(&["--bs", "8T"]).is_err());
        let o = parse(&["--bs", "16K", "--seconds", "0.5"]).unwrap();
        assert_eq!((o.bs, o.seconds), (16384, Duration::from_millis(500)));
    }

    #[test]
    fn help_is_consistent() {
        Args::command().debug_assert();
    }
}
