//! Setting up and running one benchmark: the backing, the simulated memory, one production
//! worker and one driver thread per queue, CPU placement, and collecting what they measured.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use thiserror::Error;

use vduse_blkd::backend::{Backend, BackendError, BackingSpec};
use vduse_blkd::blk::VIRTIO_BLK_ID_BYTES;
use vduse_blkd::metrics::QueueStats;
use vduse_blkd::sim::device::HEAP_BASE;
use vduse_blkd::sim::{SimError, SimMemory, SimRng};
use vduse_blkd::worker::{DeviceIo, WorkerError, WorkerHandle};

use crate::driver::{build_queue, latency_histogram, Driver, Outcome, META};
use crate::options::{
    validate, BenchBacking, BenchOptions, Pattern, Pinning, WaitMode, NULL_DEFAULT_CAPACITY,
};
use crate::report::{BenchReport, Totals};

/// Why a benchmark could not run or finish.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The backing cannot be used.
    #[error(transparent)]
    Backing(#[from] BackendError),
    /// The simulator failed.
    #[error("simulator: {0}")]
    Sim(#[from] SimError),
    /// An OS call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A queue stopped completing requests.
    #[error("queue {queue}: {why}")]
    Stalled {
        /// Queue index.
        queue: u16,
        /// What was seen.
        why: String,
    },
    /// A worker ended with an error.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Map an OS error to [`BenchError::Io`] with what was being done.
pub fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

/// Write the whole backing file with pseudo-random data (not through O_DIRECT), then sync.
fn prefill(path: &std::path::Path, capacity: u64, seed: u64) -> Result<(), BenchError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("cannot open the backing to prefill it"))?;
    let mut rng = SimRng::new(seed ^ 0x9e37_79b9);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < capacity {
        let n = (capacity - off).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)
            .map_err(io_err("cannot prefill the backing"))?;
        off += n as u64;
    }
    f.sync_data()
        .map_err(io_err("cannot sync the prefilled backing"))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

fn placement(p: &Pinning, queues: u16, wait: WaitMode) -> (Vec<usize>, Vec<usize>) {
    let pick = |list: &[usize], q: usize| list[q % list.len()];
    match p {
        Pinning::None => (Vec::new(), Vec::new()),
        Pinning::Lists(w, d) if !w.is_empty() && !d.is_empty() => {
            let n = usize::from(queues);
            (
                (0..n).map(|q| pick(w, q)).collect(),
                (0..n).map(|q| pick(d, q)).collect(),
            )
        }
        Pinning::Lists(..) => (Vec::new(), Vec::new()),
        Pinning::Auto if wait == WaitMode::Poll => placement(&Pinning::Split, queues, wait),
        Pinning::Auto => placement(&Pinning::Same, queues, wait),
        Pinning::Same | Pinning::Split => {
            let cpus = allowed_cpus();
            if cpus.is_empty() {
                return (Vec::new(), Vec::new());
            }
            let shift = usize::from(*p == Pinning::Split);
            let n = usize::from(queues);
            (
                (0..n).map(|q| pick(&cpus, q)).collect(),
                (0..n).map(|q| pick(&cpus, q + shift)).collect(),
            )
        }
    }
}

/// Open (or create, or make) the backing; warn about reading holes.
fn open_backing(o: &BenchOptions, warn: &mut dyn FnMut(String)) -> Result<Backend, BenchError> {
    let path = match &o.backing {
        BenchBacking::Null => {
            return Ok(Backend::null(o.size.unwrap_or(NULL_DEFAULT_CAPACITY), 512)?)
        }
        BenchBacking::Path(p) => p.clone(),
    };
    let b = Backend::open(&BackingSpec {
        path: path.clone(),
        size: o.size,
        read_only: false,
        direct: Some(o.direct),
        block_size: 512,
    })?;
    if o.prefill {
        warn(format!(
            "prefilling {} ({} MiB)",
            path.display(),
            b.capacity >> 20
        ));
        prefill(&path, b.capacity, o.seed)?;
    } else if o.rw == Pattern::RandRead {
        let meta = std::fs::metadata(&path).map_err(io_err("cannot stat the backing"))?;
        if meta.file_type().is_file() && meta.blocks() * 512 < b.capacity {
            warn(format!(
                "warning: {} is sparse ({} of {} MiB allocated): random reads of holes touch no \
                 storage; write it first or pass --prefill",
                path.display(),
                (meta.blocks() * 512) >> 20,
                b.capacity >> 20
            ));
        }
    }
    if u64::from(o.bs) > b.capacity {
        return Err(BenchError::Invalid(format!(
            "--bs {} is larger than the backing ({} bytes)",
            o.bs, b.capacity
        )));
    }
    Ok(b)
}

fn pin_current(cpu: Option<usize>) {
    if let Some(id) = cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            log::warn!("bench driver: cannot pin to CPU {id}");
        }
    }
}

/// Run a benchmark. `note` receives progress and warnings (one line each) for stderr.
pub fn run(o: &BenchOptions, note: &mut dyn FnMut(String)) -> Result<BenchReport, BenchError> {
    validate(o)?;
    let backend = open_backing(o, note)?;
    let (capacity, direct) = (backend.capacity, backend.direct);
    let io = device_io(backend);
    let queue_size = queue_size(o)?;
    let (worker_cpus, driver_cpus) = placement(&o.pinning, o.queues, o.wait);
    let mem = SimMemory::new();
    let mut drivers = Vec::new();
    let mut workers = Vec::new();
    let mut buf_base = HEAP_BASE;
    for q in 0..o.queues {
        let cpu = worker_cpus.get(usize::from(q)).copied();
        let (d, h) = build_queue(o, &mem, q, buf_base, queue_size, &io, cpu, capacity)?;
        buf_base += (d.meta + u64::from(o.depth) * META).div_ceil(1 << 21) * (1 << 21);
        drivers.push(d);
        workers.push(h);
    }
    let threads = start_drivers(o, drivers, &driver_cpus)?;
    let totals = finish(threads, workers)?;
    Ok(BenchReport::new(
        o,
        direct,
        &totals,
        worker_cpus,
        driver_cpus,
    ))
}

/// What every worker serves: the backing and the serial GET_ID returns.
fn device_io(backend: Backend) -> Arc<DeviceIo> {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..16].copy_from_slice(b"vduse-blkd-bench");
    Arc::new(DeviceIo::new(Arc::new(backend), serial))
}

/// The smallest power-of-two queue (at least 256) that holds `depth` requests' descriptors.
fn queue_size(o: &BenchOptions) -> Result<u16, BenchError> {
    let per_request = if o.indirect { 1 } else { 3 };
    let size = (usize::from(o.depth) * per_request)
        .next_power_of_two()
        .max(256);
    u16::try_from(size)
        .ok()
        .filter(|&s| s <= 32768)
        .ok_or_else(|| BenchError::Invalid(format!("--depth {} needs too large a queue", o.depth)))
}

type DriverThread = JoinHandle<Result<Outcome, BenchError>>;

/// One thread per driver, pinned, all released together by a barrier.
fn start_drivers(
    o: &BenchOptions,
    drivers: Vec<Driver>,
    cpus: &[usize],
) -> Result<Vec<DriverThread>, BenchError> {
    let start = Arc::new(Barrier::new(drivers.len()));
    let mut threads = Vec::new();
    for (q, d) in drivers.into_iter().enumerate() {
        let start = Arc::clone(&start);
        let cpu = cpus.get(q).copied();
        let (ramp, seconds) = (o.ramp, o.seconds);
        let t = std::thread::Builder::new()
            .name(format!("bench_drv{q}"))
            .spawn(move || {
                pin_current(cpu);
                d.run(&start, ramp, seconds)
            })
            .map_err(io_err("cannot start a driver thread"))?;
        threads.push(t);
    }
    Ok(threads)
}

/// Join the driver threads, then stop the workers; the first error of either wins.
fn finish(threads: Vec<DriverThread>, workers: Vec<WorkerHandle>) -> Result<Totals, BenchError> {
    let mut totals = Totals {
        completed: 0,
        errors: 0,
        hist: latency_histogram(),
        stats: QueueStats::default(),
    };
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(r)) => {
                totals.completed += r.completed;
                totals.errors += r.errors;
                // Same bounds on both sides: adding cannot fail.
                let _ = totals.hist.add(&r.hist);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(BenchError::Invalid("a driver thread panicked".into()));
            }
        }
    }
    for h in workers {
        match h.stop() {
            Ok(exit) => totals.stats.merge(&exit.stats),
            Err(e) => {
                first_err.get_or_insert(BenchError::Worker(e));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(totals),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn quick(backing: BenchBacking, rw: Pattern) -> BenchOptions {
        let mut o = BenchOptions::new(backing);
        o.rw = rw;
        o.depth = 8;
        o.seconds = Duration::from_millis(200);
        o.pinning = Pinning::None;
        o
    }

    #[test]
    fn null_backing_completes_reads_and_writes() {
        if !vduse_blkd::sim::io_uring_available() {
            return;
        }
        for rw in [Pattern::RandRead, Pattern::RandWrite] {
            let r = run(&quick(BenchBacking::Null, rw), &mut |_| {}).unwrap();
            assert_eq!(r.errors, 0, "{r:?}");
            assert!(r.requests > 0 && r.iops > 0, "{r:?}");
            assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us && r.p99_us <= r.p999_us);
        }
    }

    #[test]
    fn file_backing_two_queues_direct_chains() {
        if !vduse_blkd::sim::io_uring_available() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut o = quick(
            BenchBacking::Path(d.path().join("f.img")),
            Pattern::RandRead,
        );
        o.size = Some(8 << 20);
        let mut notes = Vec::new();
        let r = run(&o, &mut |n| notes.push(n)).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(notes.iter().any(|n| n.contains("sparse")), "{notes:?}");
        o.rw = Pattern::RandWrite;
        o.queues = 2;
        o.indirect = false;
        let r = run(&o, &mut |_| {}).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.requests > 0 && r.chains == "direct");
        o.rw = Pattern::RandRead;
        o.prefill = true;
        notes.clear();
        let r = run(&o, &mut |n| notes.push(n)).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(notes.iter().any(|n| n.contains("prefilling")), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("sparse")), "{notes:?}");
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut o = quick(BenchBacking::Null, Pattern::RandRead);
        o.bs = 1000;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
        o.bs = 4096;
        o.depth = 0;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
        o.depth = 1;
        o.prefill = true;
        assert!(matches!(run(&o, &mut |_| {}), Err(BenchError::Invalid(_))));
    }

    #[test]
    fn placements() {
        let n = allowed_cpus().len();
        let (w, d) = placement(&Pinning::Auto, 2, WaitMode::Irq);
        assert_eq!(w, d, "interrupt-waiting drivers share their worker's CPU");
        let (w, d) = placement(&Pinning::Auto, 2, WaitMode::Poll);
        if n >= 2 {
            assert_eq!(w.len(), 2);
            assert!(w.iter().zip(&d).all(|(a, b)| a != b), "{w:?} {d:?}");
        }
        assert_eq!(placement(&Pinning::Split, 2, WaitMode::Irq), (w, d));
        let (w, d) = placement(&Pinning::Lists(vec![3], vec![5, 6]), 2, WaitMode::Irq);
        assert_eq!((w, d), (vec![3, 3], vec![5, 6]));
    }
}
