//! The command line: argument syntax, help text, and turning results into exit codes and
//! one-line messages.
//!
//! Owns: parsing (sizes like `512M`, CPU lists like `0-3,6`), `--help`, signal setup for
//! `serve`, printing the results of `serve`, `probe` and `list`, and exit codes: 0 on
//! success (a `probe` that could look succeeds whatever it found missing), 1 with one line
//! `vduse-blkd: MESSAGE` on stderr otherwise, 2 for usage errors (clap). Must not touch:
//! validation that needs the kernel or the backing store (that is [`crate::control`]).
//! The data-path benchmark is its own binary, `vduse-blkd-bench` (feature `test-utils`),
//! which reuses [`parse_size`] and [`parse_cpus`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::backend::BackingSpec;
use crate::control::daemon::{self, AttachMode, ServeOptions, ZeroCopyMode};
use crate::control::probe;
use crate::control::socket;

/// Serve a file or block device as a virtio-blk device through VDUSE, with an io_uring data
/// path.
#[derive(Debug, Parser)]
#[command(name = "vduse-blkd", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A parsed CPU list. The alias matters: clap's derive reads a literal `Vec<usize>` as "many
/// values of usize" and would then fail at run time to find the one `Vec` `parse_cpus` made.
pub type CpuList = Vec<usize>;

/// Where the device is attached.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Attach {
    /// Bind to virtio_vdpa: the device becomes /dev/vdX on this host.
    Virtio,
    /// Bind to vhost_vdpa: the device becomes /dev/vhost-vdpa-N for a VM.
    Vhost,
    /// Do not attach; run `vdpa dev add name NAME mgmtdev vduse` yourself.
    None,
}

/// Whether the data path uses our own memory as the bounce buffer.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ZeroCopyArg {
    /// On where the kernel allows (virtio_vdpa on 6.x/7.x), else the bounce mmap.
    Auto,
    /// Required: the device stops with the kernel's reason where it cannot be had.
    On,
    /// Never: data goes through the kernel's bounce pages (mmap of VDUSE_IOTLB_GET_FD).
    Off,
}

/// `serve`'s arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Backing regular file or block device. A missing file is created (sparse) when
    /// --size is given.
    pub backing: PathBuf,
    /// Device name: /dev/vduse/NAME and the vdpa device name (letters, digits, - _ .).
    #[arg(long)]
    pub name: String,
    /// Size of a file to create, e.g. 512M, 20G (K/M/G/T are powers of 1024). Must match
    /// an existing file's size if given.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Number of virtqueues, each served by its own pinned worker thread (1-64).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Size of each virtqueue: a power of two, at most 32768.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u32,
    /// CPUs to pin the queue workers to, round robin, e.g. 0-3,6 (default: spread over
    /// the CPUs this process may use).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Busy-poll window in microseconds: after its last request a worker keeps watching its
    /// ring (the driver's notifications off) this long before it parks; costs CPU only while
    /// requests keep coming, one window after the last. 0: park at once.
    #[arg(long, default_value_t = 0, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,
    /// Expose the device read-only (VIRTIO_BLK_F_RO); the backing is opened read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Open the backing with O_DIRECT (default: on for block devices, off for files).
    #[arg(long)]
    pub direct: bool,
    /// Logical block size the device advertises: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Serial number returned to GET_ID (at most 20 bytes; default: the name).
    #[arg(long)]
    pub serial: Option<String>,
    /// Which vdpa bus driver gets the device.
    #[arg(long, value_enum, default_value_t = Attach::Virtio)]
    pub attach: Attach,
    /// Use this VDUSE API version (0 or 1) instead of the highest one both the kernel
    /// and vduse-blkd speak. For testing and for comparing the code paths.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1))]
    pub api_version: Option<u64>,
    /// Zero copy: register memory of our own as the device's bounce buffer
    /// (VDUSE_IOTLB_REG_UMEM) and with each worker's io_uring as fixed buffers, so that reads
    /// and writes of one segment are READ_FIXED / WRITE_FIXED. Needs RLIMIT_MEMLOCK room for
    /// the bounce size (raised when allowed). The stop line counts the fixed-buffer I/Os.
    #[arg(long, value_enum, default_value_t = ZeroCopyArg::Auto)]
    pub zero_copy: ZeroCopyArg,
    /// Directory of the control socket NAME.sock (mode 0600), which `vduse-blkd resize`
    /// talks to; it exists while the daemon serves and is removed at exit.
    #[arg(long, value_name = "DIR", default_value = socket::RUN_DIR)]
    pub run_dir: PathBuf,
    /// Do not time each request's stages (`vduse-blkd stats` then shows counts and rates,
    /// with empty stage tables); saves two clock readings per batch.
    #[arg(long)]
    pub no_stage_stats: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve BACKING as a virtio-blk VDUSE device until SIGINT or SIGTERM.
    ///
    /// Prints exactly one line `ready name=NAME dev=/dev/vdX` on stdout once the device is
    /// usable (`dev=-` when not bound to virtio_vdpa). On SIGINT/SIGTERM it detaches the
    /// device, finishes in-flight I/O, destroys the device and exits 0.
    Serve(ServeArgs),
    /// Print what the running kernel's VDUSE offers and what this host lacks.
    ///
    /// With VDUSE: API versions, the version chosen, optional features, umem support, bounce
    /// size. Always: the vduse module and its file, the kernel configuration
    /// (CONFIG_VDPA_USER, CONFIG_VIRTIO_VDPA, CONFIG_VHOST_VDPA, ...), the bus drivers, and one
    /// `missing:` line per missing piece with advice that works on this host. Exits 0
    /// whenever it could look, whatever is missing.
    Probe {
        /// Print one JSON object instead (the same facts; `missing` is a list of
        /// {what, needed_for, advice}).
        #[arg(long)]
        json: bool,
    },
    /// List VDUSE devices: name, attached or not, driver, block device.
    List,
    /// Remove a leftover VDUSE device (detach it from the vdpa bus and destroy it).
    Del {
        /// The device name.
        name: String,
    },
    /// Show a running device's live counters: IOPS, MiB/s, requests in flight, and the
    /// latency of each stage a request passes in the worker (dispatch, prepare, backend,
    /// complete, notify, and their total: p50/p99/p99.9/max), in total and per queue, since
    /// the daemon started or the last --reset.
    Stats {
        /// The device name (of a running `serve`).
        name: String,
        /// Print the daemon's JSON object instead of tables (per queue, per stage, per
        /// request kind).
        #[arg(long)]
        json: bool,
        /// Print again every SECS seconds, each time over the last interval only (each
        /// sample starts a new counting period, as --reset does); until interrupted.
        #[arg(long, value_name = "SECS")]
        interval: Option<f64>,
        /// Start a new counting period after this answer.
        #[arg(long)]
        reset: bool,
        /// Where the daemon's control socket is (serve --run-dir).
        #[arg(long, value_name = "DIR", default_value = socket::RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Change the capacity of a running device, online: a backing file is extended (or,
    /// with --force, truncated), the config space updated and the config interrupt
    /// injected, so the driver sees the new size while I/O goes on. A block device must
    /// have been grown first; SIZE is then its new size.
    Resize {
        /// The device name (of a running `serve`).
        name: String,
        /// The new size, e.g. 1G, 20G (K/M/G/T are powers of 1024); a multiple of the block
        /// size.
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Allow shrinking: data past the new end is discarded (and a write already admitted
        /// past it may extend the file again).
        #[arg(long)]
        force: bool,
        /// Where the daemon's control socket is (serve --run-dir).
        #[arg(long, value_name = "DIR", default_value = socket::RUN_DIR)]
        run_dir: PathBuf,
    },
}

/// Parse `4096`, `16K`, `512M`, `20G`, `1T` (binary units; an optional trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 512M, 20G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parse `0-3,6` into `[0, 1, 2, 3, 6]`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a CPU or range (example: 0-3,6)");
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().map_err(|_| bad())?;
                let b: usize = b.parse().map_err(|_| bad())?;
                if a > b || b >= 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(out)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "vduse-blkd: {msg}");
    ExitCode::FAILURE
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Probe { json } => run_probe(json),
        Command::List => run_list(),
        Command::Del { name } => run_del(&name),
        Command::Resize {
            name,
            size,
            force,
            run_dir,
        } => run_resize(&run_dir, &name, size, force),
        Command::Stats {
            name,
            json,
            interval,
            reset,
            run_dir,
        } => run_stats(&run_dir, &name, json, interval, reset),
    }
}

impl ServeArgs {
    fn into_options(self) -> ServeOptions {
        ServeOptions {
            backing: BackingSpec {
                path: self.backing,
                size: self.size,
                read_only: self.readonly,
                direct: self.direct.then_some(true),
                block_size: self.block_size,
            },
            name: self.name,
            queues: self.queues,
            queue_size: self.queue_size,
            cpus: self.cpus.unwrap_or_default(),
            poll: Duration::from_micros(self.poll_us),
            serial: self.serial,
            attach: match self.attach {
                Attach::Virtio => AttachMode::Virtio,
                Attach::Vhost => AttachMode::Vhost,
                Attach::None => AttachMode::None,
            },
            api_version: self.api_version,
            run_dir: self.run_dir,
            stage_stats: !self.no_stage_stats,
            zero_copy: match self.zero_copy {
                ZeroCopyArg::Auto => ZeroCopyMode::Auto,
                ZeroCopyArg::On => ZeroCopyMode::On,
                ZeroCopyArg::Off => ZeroCopyMode::Off,
            },
        }
    }
}

/// Termination signals are read from a signalfd; block them before any thread exists so
/// every thread inherits the mask.
fn termination_signals() -> Result<SignalFd, String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("cannot create a signalfd: {e}"))
}

fn run_serve(args: ServeArgs) -> ExitCode {
    let signals = match termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match daemon::serve(&args.into_options(), &signals) {
        Ok(report) => {
            let s = report.stats.summary();
            let _ = writeln!(
                std::io::stderr(),
                "vduse-blkd: stopped: {} requests ({} errors), {} MiB read, {} MiB written, {} on fixed buffers, latency p50 {:.1} us p99 {:.1} us p99.9 {:.1} us, backing errors {} (EIO {}, ENOSPC {}, short {}, other {})",
                s.requests,
                s.errors,
                s.bytes_read >> 20,
                s.bytes_written >> 20,
                s.fixed_ios,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.backing.total(),
                s.backing.eio,
                s.backing.no_space,
                s.backing.short,
                s.backing.other
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn run_probe(json: bool) -> ExitCode {
    match probe::print_probe(&probe::probe(), json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot print the probe report: {e}")),
    }
}

fn run_list() -> ExitCode {
    let entries = match daemon::list() {
        Ok(entries) => entries,
        Err(e) => return fail(e),
    };
    let mut out = std::io::stdout().lock();
    for e in entries {
        let _ = writeln!(
            out,
            "{} attached={} driver={} dev={}",
            e.name,
            if e.attached { "yes" } else { "no" },
            e.driver.as_deref().unwrap_or("-"),
            e.block_device.as_deref().unwrap_or("-")
        );
    }
    ExitCode::SUCCESS
}

fn run_resize(run_dir: &std::path::Path, name: &str, bytes: u64, force: bool) -> ExitCode {
    match socket::call(run_dir, name, &socket::Request::Resize { bytes, force }) {
        Ok(r) if r.ok => {
            let _ = writeln!(
                std::io::stdout(),
                "{name}: capacity {} bytes",
                r.capacity.unwrap_or(bytes)
            );
            ExitCode::SUCCESS
        }
        Ok(r) => fail(format!(
            "{name}: {}",
            r.error.unwrap_or_else(|| "refused".into())
        )),
        Err(e) => fail(format!("{name}: {e}")),
    }
}

fn run_stats(
    run_dir: &std::path::Path,
    name: &str,
    json: bool,
    interval: Option<f64>,
    reset: bool,
) -> ExitCode {
    let every = match interval {
        Some(s) if !(0.1..=86_400.0).contains(&s) => {
            return fail(format!("--interval {s}: give 0.1 to 86400 seconds"))
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    if every.is_some() {
        // The first sample only starts the period the next one covers.
        if let Err(e) = socket::call(run_dir, name, &socket::Request::Stats { reset: true }) {
            return fail(format!("{name}: {e}"));
        }
    }
    loop {
        if let Some(d) = every {
            std::thread::sleep(d); // the sampling interval itself
        }
        let req = socket::Request::Stats {
            reset: reset || every.is_some(),
        };
        let v = match socket::call(run_dir, name, &req) {
            Ok(r) if r.ok => r.stats.unwrap_or_default(),
            Ok(r) => return fail(format!("{name}: {}", r.error.unwrap_or_default())),
            Err(e) => return fail(format!("{name}: {e}")),
        };
        let text = if json { v.to_string() } else { stats_table(&v) };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return ExitCode::SUCCESS; // the reader went away (a pipe closed)
        }
        if every.is_none() {
            return ExitCode::SUCCESS;
        }
    }
}

/// The human form of a `stats` answer.
fn stats_table(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let t = &v["total"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {:.1} s  {:.0} IOPS  {:.1} MiB/s  {} in flight  {} requests ({} errors)",
        v["name"].as_str().unwrap_or("?"),
        f(&v["elapsed_s"]),
        f(&t["iops"]),
        f(&t["mib_s"]),
        t["in_flight"],
        t["requests"],
        t["errors"]
    );
    let _ = writeln!(
        s,
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "stage", "count", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    for stage in crate::metrics::STAGES {
        let h = &t["stages"][stage.name()];
        let _ = writeln!(
            s,
            "{:<10} {:>10} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            stage.name(),
            h["count"],
            f(&h["p50_us"]),
            f(&h["p99_us"]),
            f(&h["p999_us"]),
            f(&h["max_us"])
        );
    }
    for q in v["queues"].as_array().into_iter().flatten() {
        let tot = &q["stages"]["total"];
        let _ = writeln!(
            s,
            "queue {}: {:.0} IOPS  {:.1} MiB/s  {} in flight  total p50 {:.2} us  p99 {:.2} us",
            q["queue"],
            f(&q["iops"]),
            f(&q["mib_s"]),
            q["in_flight"],
            f(&tot["p50_us"]),
            f(&tot["p99_us"])
        );
    }
    s.trim_end().to_string()
}

fn run_del(name: &str) -> ExitCode {
    match daemon::del(name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0-3,6"), Ok(vec![0, 1, 2, 3, 6]));
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn cpu_lists_parse_on_the_command_line() {
        let cli =
            Cli::try_parse_from(["vduse-blkd", "serve", "f", "--name", "a", "--cpus", "0-1,3"])
                .unwrap();
        match cli.command {
            Command::Serve(a) => assert_eq!(a.cpus, Some(vec![0, 1, 3])),
            c => panic!("{c:?}"),
        }
        assert!(
            Cli::try_parse_from(["vduse-blkd", "serve", "f", "--name", "a", "--cpus", "2-1"])
                .is_err()
        );
    }

    #[test]
    fn resize_takes_a_name_a_size_and_force() {
        let cli = Cli::try_parse_from(["vduse-blkd", "resize", "d0", "20G", "--force"]).unwrap();
        match cli.command {
            Command::Resize {
                name, size, force, ..
            } => assert_eq!((name.as_str(), size, force), ("d0", 20 << 30, true)),
            c => panic!("{c:?}"),
        }
        assert!(Cli::try_parse_from(["vduse-blkd", "resize", "d0", "big"]).is_err());
    }

    #[test]
    fn bench_is_not_a_subcommand_any_more() {
        assert!(Cli::try_parse_from(["vduse-blkd", "bench", "--backing", "null"]).is_err());
    }

    #[test]
    fn every_subcommand_help_mentions_every_flag() {
        let mut root = Cli::command();
        root.build();
        let mut seen = 0;
        for sub in root.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            let longs: Vec<String> = sub
                .get_arguments()
                .filter_map(|a| a.get_long())
                .map(|l| format!("--{l}"))
                .collect();
            for flag in longs {
                assert!(
                    help.contains(&flag),
                    "{} --help lacks {flag}",
                    sub.get_name()
                );
                seen += 1;
            }
        }
        // serve alone has 11 flags (plus --help on each subcommand).
        assert!(seen >= 11 + 4, "only {seen} flags seen");
    }

    #[test]
    fn help_is_consistent() {
        Cli::command().debug_assert();
    }
}
