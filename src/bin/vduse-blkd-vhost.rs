//! `vduse-blkd-vhost`: drive a virtio-blk device bound to `vhost_vdpa` from userspace, as a VMM
//! would, and check every byte. A test tool for the VM suite (built with the `test-utils`
//! feature), not part of the daemon.
//!
//! - `io`: verified writes and reads on every queue, a flush, and optionally the expected
//!   disk contents in a file, so the caller can compare them with the backing file;
//! - `toggle` (needs the device to handle `VDUSE_SET_VQ_READY`, Linux 7.3): queue 0 carries
//!   verified I/O throughout while queue 1 is disabled and re-enabled through
//!   `VHOST_VDPA_SET_VRING_ENABLE`; a request posted on queue 1 while it is disabled must stay
//!   pending, and complete (verified) once it is enabled again;
//! - `suspend` (`VDUSE_SUSPEND`, Linux 7.3): writes in flight on every queue, then
//!   `VHOST_VDPA_SUSPEND`; when it returns every request must already be in the used ring with
//!   status OK and `GET_VRING_BASE` must match; then reset, set up again, and read it all back.
//!
//! - `reset`: writes in flight on every queue (optionally until a sysfs `inflight` file of the
//!   backing device shows that many in flight there), then a device reset (status 0); when it
//!   returns, every write the device completed must have status OK, and after a new setup each
//!   of them must read back. The time the reset took is reported (VDUSE's `msg_timeout` bounds
//!   it: a late reply breaks the device for good).
//!
//! - `iotlb`: the `UPDATE_IOTLB` path with real bytes. A second region is mapped and carries
//!   verified I/O; writes are put in flight on every queue (data in the first region) and the
//!   second region is invalidated (`VHOST_IOTLB_INVALIDATE`) while they run; they must all
//!   complete and verify; a request naming the invalidated range must now fail with IOERR
//!   (the daemon dropped its stale mapping), and a region mapped at a new IOVA must carry
//!   verified reads of what was written.
//!
//! Owns: these scenarios and their data pattern (a function of seed and disk offset, so any
//! range can be checked without keeping what was written). Must not touch: the daemon; it
//! goes through the kernel only ([`vduse_blkd::sim::vhost`]).

use std::fs;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use crossbeam_channel::RecvTimeoutError;
use vduse_blkd::sim::blk::{header, BlkRequest, ChainBuilder, S_IOERR, S_OK, T_IN, T_OUT};
use vduse_blkd::sim::queue::Desc;
use vduse_blkd::sim::vhost::{VhostConfig, VhostDriver};
use vduse_blkd::sim::{Chain, Completion, SimQueue};
use vduse_blkd::uapi::virtio as vf;

/// Bytes of one request's slot on the disk (and of each request).
const SLOT: u32 = 64 << 10;
const SLOT_SECTORS: u64 = (SLOT / 512) as u64;
/// How long any one completion may take (an emulated CPU is slow).
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(
    name = "vduse-blkd-vhost",
    about = "Drive a virtio-blk vhost-vdpa device from userspace and verify the data"
)]
struct Cli {
    /// The vhost-vdpa character device, e.g. /dev/vhost-vdpa-0.
    dev: String,
    /// Queue size to use (at most the device's maximum).
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Seed of the data pattern (the same seed reads back what it wrote).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Verified writes, reads and a flush on every queue (slots of 64 KiB from sector 0).
    Io {
        /// Requests per queue.
        #[arg(long, default_value_t = 32)]
        requests: u64,
        /// Queues to use (0: all the device has).
        #[arg(long, default_value_t = 0)]
        queues: u16,
        /// Write the expected contents of the disk's written range to this file.
        #[arg(long)]
        expect_out: Option<String>,
    },
    /// Disable and re-enable queue 1 while queue 0 carries verified I/O (Linux 7.3).
    Toggle {
        /// Disable/enable cycles.
        #[arg(long, default_value_t = 3)]
        cycles: u32,
        /// Requests queue 0 must verify before and after queue 1 gets its request, per cycle.
        #[arg(long, default_value_t = 8)]
        during: u32,
    },
    /// Suspend with writes in flight on every queue, then verify after a reset (Linux 7.3).
    Suspend {
        /// Writes per queue in flight at the suspend.
        #[arg(long, default_value_t = 32)]
        requests: u16,
    },
    /// Reset the device with writes in flight, then verify every write it completed.
    Reset {
        /// Writes per queue posted before the reset.
        #[arg(long, default_value_t = 16)]
        requests: u16,
        /// A sysfs `inflight` file ("reads writes") of the daemon's backing device: reset
        /// only once it shows at least `--min-inflight` I/Os in flight.
        #[arg(long)]
        inflight: Option<String>,
        /// I/Os that must be in flight in the backing before the reset.
        #[arg(long, default_value_t = 1)]
        min_inflight: u64,
    },
    /// Invalidate an IOTLB mapping while writes are in flight, then check old and new mappings.
    Iotlb {
        /// Writes per queue in flight at the invalidation.
        #[arg(long, default_value_t = 32)]
        requests: u16,
    },
}

/// The second region's IOVA before the invalidation, and the IOVA it is mapped at afterwards
/// (both far from the heap at [`vduse_blkd::sim::vhost::MEM_IOVA`]).
const SPARE_IOVA: u64 = 0x4000_0000;
const REMAP_IOVA: u64 = 0x8000_0000;
/// The second region's size: one slot per queue request at most.
const SPARE_LEN: u64 = 1 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(line) => {
            println!("ok: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vduse-blkd-vhost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<String> {
    let mut cfg = VhostConfig::new(&cli.dev);
    cfg.queue_size = cli.queue_size;
    match &cli.cmd {
        Cmd::Io {
            requests,
            queues,
            expect_out,
        } => {
            cfg.queues = *queues;
            io(&cfg, cli.seed, *requests, expect_out.as_deref())
        }
        Cmd::Toggle { cycles, during } => toggle(&cfg, cli.seed, *cycles, *during),
        Cmd::Suspend { requests } => suspend(&cfg, cli.seed, *requests),
        Cmd::Reset {
            requests,
            inflight,
            min_inflight,
        } => reset(
            &cfg,
            cli.seed,
            *requests,
            inflight.as_deref(),
            *min_inflight,
        ),
        Cmd::Iotlb { requests } => iotlb(&cfg, cli.seed, *requests),
    }
}

fn open(cfg: &VhostConfig) -> Result<VhostDriver> {
    let d = VhostDriver::open(cfg).with_context(|| format!("setting up {}", cfg.path))?;
    // The scenarios post most requests through indirect tables.
    ensure!(
        d.features & (1 << vf::VIRTIO_F_INDIRECT_DESC) != 0,
        "the device did not offer VIRTIO_F_INDIRECT_DESC (features {:#x})",
        d.features
    );
    Ok(d)
}

/// The pattern's bytes for `len` bytes at disk byte `offset` (8-byte granular).
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|w| splitmix(seed ^ (offset + 8 * w)).to_le_bytes())
        .collect()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn slot_data(seed: u64, slot: u64) -> Vec<u8> {
    pattern(seed, slot * u64::from(SLOT), SLOT as usize)
}

/// Post writes (or reads) of `slots` on `q` at once, wait for all, check status and data.
fn batch(q: &mut SimQueue, seed: u64, slots: &[u64], write: bool) -> Result<()> {
    for (i, &slot) in slots.iter().enumerate() {
        let sector = slot * SLOT_SECTORS;
        // Vary the layout: 18 descriptors (header, 16 data pieces of 4 KiB, status), direct
        // for every fourth request and behind one indirect descriptor for the others, so that
        // a batch of `queue size / 8` fits the ring.
        let req = if write {
            BlkRequest::write(sector, &slot_data(seed, slot)).out_chunk(4096)
        } else {
            BlkRequest::read(sector, SLOT).in_chunk(4096)
        };
        let chain = req.indirect(i % 4 != 0).tag(slot).chain(q.mem())?;
        q.add(chain)?;
    }
    publish_and_check(q, seed, slots.len(), !write)
}

/// Publish what was added to `q`, kick, and wait for `n` completions: each of a head we
/// gave, OK, and (`reads`) holding its slot's pattern.
fn publish_and_check(q: &mut SimQueue, seed: u64, n: usize, reads: bool) -> Result<()> {
    q.publish()?;
    q.kick()?;
    let done = q.wait_used(n, DEADLINE)?;
    ensure!(
        done.len() == n,
        "{} completions for {n} requests",
        done.len()
    );
    for c in done {
        ensure!(
            c.tracked,
            "queue completed head {} it was never given",
            c.head
        );
        ensure!(
            c.status == Some(S_OK),
            "slot {}: status {:?}",
            c.tag,
            c.status
        );
        if reads {
            ensure!(
                c.data == slot_data(seed, c.tag),
                "slot {}: data differs",
                c.tag
            );
        }
    }
    Ok(())
}

fn check_capacity(d: &VhostDriver, slots: u64) -> Result<()> {
    let need = slots * SLOT_SECTORS;
    ensure!(
        d.capacity >= need,
        "the device has {} sectors, the run needs {need}",
        d.capacity
    );
    Ok(())
}

fn io(cfg: &VhostConfig, seed: u64, requests: u64, expect_out: Option<&str>) -> Result<String> {
    let mut d = open(cfg)?;
    let nq = d.queues.len() as u64;
    check_capacity(&d, nq * requests)?;
    let depth = u64::from(cfg.queue_size / 8).max(1);
    for (qi, q) in d.queues.iter_mut().enumerate() {
        let slots: Vec<u64> = (0..requests).map(|i| qi as u64 * requests + i).collect();
        for part in slots.chunks(depth as usize) {
            batch(q, seed, part, true).with_context(|| format!("queue {qi}: writes"))?;
        }
        for part in slots.chunks(depth as usize) {
            batch(q, seed, part, false).with_context(|| format!("queue {qi}: reads"))?;
        }
        if d.features & (1 << vduse_blkd::blk::VIRTIO_BLK_F_FLUSH) != 0 {
            let c = q.run(BlkRequest::flush().chain(q.mem())?, DEADLINE)?;
            ensure!(
                c.status == Some(S_OK),
                "queue {qi}: flush status {:?}",
                c.status
            );
        }
    }
    if let Some(path) = expect_out {
        let total = nq * requests * u64::from(SLOT);
        fs::write(path, pattern(seed, 0, total as usize)).with_context(|| path.to_owned())?;
    }
    Ok(format!(
        "io: {nq} queue(s) x {requests} writes of {} KiB verified by reading back (features {:#x})",
        SLOT >> 10,
        d.features
    ))
}

fn toggle(cfg: &VhostConfig, seed: u64, cycles: u32, during: u32) -> Result<String> {
    let mut d = open(cfg)?;
    ensure!(
        d.queues.len() >= 2,
        "toggle needs 2 queues, the device has {}",
        d.queues.len()
    );
    // Queue 0 rewrites and verifies slots 0..16; queue 1 uses slots 16.. (one per cycle).
    check_capacity(&d, 16 + u64::from(cycles))?;
    let mut q0 = d.queues.remove(0);
    let mut q1 = d.queues.remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let stop2 = Arc::clone(&stop);
    let carrier = thread::spawn(move || -> Result<u64> {
        let mut n = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            let slot = n % 16;
            batch(&mut q0, seed, &[slot], true)?;
            batch(&mut q0, seed, &[slot], false)?;
            n += 1;
            let _ = tx.send(());
        }
        Ok(n)
    });
    let wait_carrier = |k: u32| -> Result<()> {
        for _ in 0..k {
            match rx.recv_timeout(DEADLINE) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => bail!("queue 0 made no progress in {DEADLINE:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("queue 0's I/O failed"),
            }
        }
        Ok(())
    };
    let result = (|| -> Result<()> {
        for cycle in 0..cycles {
            let slot = 16 + u64::from(cycle);
            d.set_queue_enabled(1, false)?;
            wait_carrier(during)?;
            let used_before = q1.used_idx()?;
            let chain = BlkRequest::write(slot * SLOT_SECTORS, &slot_data(seed, slot))
                .tag(slot)
                .chain(q1.mem())?;
            q1.add(chain)?;
            q1.publish()?;
            q1.kick()?;
            wait_carrier(during)?;
            ensure!(
                q1.used_idx()? == used_before,
                "cycle {cycle}: queue 1 completed a request while disabled"
            );
            d.set_queue_enabled(1, true)?;
            let c = q1.wait_used(1, DEADLINE).with_context(|| {
                format!("cycle {cycle}: queue 1's pending request after re-enable")
            })?;
            ensure!(
                c.len() == 1 && c[0].status == Some(S_OK),
                "cycle {cycle}: {c:?}"
            );
            batch(&mut q1, seed, &[slot], false).with_context(|| format!("cycle {cycle}"))?;
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    let carried = carrier
        .join()
        .map_err(|_| anyhow::anyhow!("queue 0's thread panicked"))?
        .context("queue 0")?;
    result?;
    Ok(format!(
        "toggle: {cycles} disable/enable cycles of queue 1; it held each request while \
         disabled and completed it (verified) once enabled; queue 0 verified {carried} \
         write+read pairs meanwhile"
    ))
}

/// Open the device for `requests` writes in flight on every queue at once.
fn open_for_writes(cfg: &VhostConfig, requests: u16) -> Result<(VhostDriver, u64)> {
    let d = open(cfg)?;
    ensure!(
        requests <= cfg.queue_size / 2,
        "at most {} requests per queue",
        cfg.queue_size / 2
    );
    let per = u64::from(requests);
    check_capacity(&d, d.queues.len() as u64 * per)?;
    Ok((d, per))
}

/// Post `per` writes on every queue (slots `queue * per ..`) and kick, without waiting;
/// returns how many were still outstanding right after the last kick.
fn post_writes(d: &mut VhostDriver, seed: u64, per: u64) -> Result<u64> {
    for (qi, q) in d.queues.iter_mut().enumerate() {
        for i in 0..per {
            let slot = qi as u64 * per + i;
            // Mostly indirect (one ring descriptor each), so that `queue size / 2` fit.
            let chain = BlkRequest::write(slot * SLOT_SECTORS, &slot_data(seed, slot))
                .out_chunk(4096)
                .indirect(i % 8 != 0)
                .tag(slot)
                .chain(q.mem())?;
            q.add(chain)?;
        }
        q.publish()?;
        q.kick()?;
    }
    let mut outstanding = 0u64;
    for q in &d.queues {
        outstanding += u64::from(q.avail_idx().wrapping_sub(q.used_idx()?));
    }
    Ok(outstanding)
}

/// `done` holds exactly `n` completions, each with status OK.
fn all_ok(done: &[Completion], n: u64) -> Result<()> {
    ensure!(done.len() as u64 == n, "{} of {n} completions", done.len());
    for c in done {
        ensure!(
            c.status == Some(S_OK),
            "slot {}: status {:?}",
            c.tag,
            c.status
        );
    }
    Ok(())
}

fn suspend(cfg: &VhostConfig, seed: u64, requests: u16) -> Result<String> {
    let (mut d, per) = open_for_writes(cfg, requests)?;
    let nq = d.queues.len() as u64;
    let outstanding = post_writes(&mut d, seed, per)?;
    d.suspend()?;
    // No waiting: a device that replied to SUSPEND has completed and published everything.
    let mut queues = std::mem::take(&mut d.queues);
    for (qi, q) in queues.iter_mut().enumerate() {
        let used = q.used_idx()?;
        ensure!(
            used == q.avail_idx(),
            "queue {qi}: {} of {per} requests not completed when SUSPEND returned",
            q.avail_idx().wrapping_sub(used)
        );
        all_ok(&q.reap()?, per).with_context(|| format!("queue {qi}"))?;
        let base = d.vring_base(qi as u16)?;
        ensure!(
            base == u32::from(q.avail_idx()),
            "queue {qi}: GET_VRING_BASE {base}, want {}",
            q.avail_idx()
        );
    }
    // Suspend has no resume: reset, set the device up again and read everything back.
    d.reset()?;
    drop(d);
    let mut d = open(cfg)?;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        let slots: Vec<u64> = (0..per).map(|i| qi as u64 * per + i).collect();
        for part in slots.chunks(16) {
            batch(q, seed, part, false).with_context(|| format!("queue {qi} after reset"))?;
        }
    }
    Ok(format!(
        "suspend: {outstanding} of {} writes outstanding just before VHOST_VDPA_SUSPEND; all \
         completed with status OK when it returned, vring bases matched, data verified after \
         reset",
        nq * per
    ))
}

/// Poll a sysfs `inflight` file ("reads writes") until it shows at least `min` I/Os; the
/// count seen.
fn wait_inflight(path: &str, min: u64) -> Result<u64> {
    let end = Instant::now() + DEADLINE;
    loop {
        let text = fs::read_to_string(path).with_context(|| path.to_owned())?;
        let n = text
            .split_whitespace()
            .map(|w| {
                w.parse::<u64>()
                    .with_context(|| format!("{path}: {text:?}"))
            })
            .sum::<Result<u64>>()?;
        if n >= min {
            return Ok(n);
        }
        ensure!(
            Instant::now() < end,
            "{path}: {n} in flight, want {min}, after {DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A read or write of `slot` with its data in one 4 KiB-aligned buffer: a daemon serving a
/// block device uses O_DIRECT, which refuses the other scenarios' unaligned pieces.
fn aligned(q: &SimQueue, seed: u64, slot: u64, write: bool) -> Result<Chain> {
    let mem = q.mem();
    let t = if write { T_OUT } else { T_IN };
    let data = mem.alloc(u64::from(SLOT), 4096)?;
    let desc = if write {
        mem.write(data, &slot_data(seed, slot))?;
        Desc::readable(data, SLOT)
    } else {
        Desc::writable(data, SLOT)
    };
    let mut b = ChainBuilder::new(mem)
        .readable(&header(t, slot * SLOT_SECTORS))?
        .desc(desc);
    b.chain_mut().allocs.push((data, u64::from(SLOT)));
    Ok(b.writable(1)?.tag(slot).build())
}

/// Post aligned writes of `slots` on `q` and kick, without waiting.
fn post_aligned(q: &mut SimQueue, seed: u64, slots: &[u64]) -> Result<()> {
    for &slot in slots {
        let chain = aligned(q, seed, slot, true)?;
        q.add(chain)?;
    }
    q.publish()?;
    q.kick()?;
    Ok(())
}

/// Aligned reads of `slots` on `q`: every one OK and holding the pattern.
fn read_aligned(q: &mut SimQueue, seed: u64, slots: &[u64]) -> Result<()> {
    for &slot in slots {
        let chain = aligned(q, seed, slot, false)?;
        q.add(chain)?;
    }
    publish_and_check(q, seed, slots.len(), true)
}

fn reset(
    cfg: &VhostConfig,
    seed: u64,
    requests: u16,
    inflight: Option<&str>,
    min: u64,
) -> Result<String> {
    let (mut d, per) = open_for_writes(cfg, requests)?;
    let posted = d.queues.len() as u64 * per;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        let slots: Vec<u64> = (0..per).map(|i| qi as u64 * per + i).collect();
        post_aligned(q, seed, &slots).with_context(|| format!("queue {qi}"))?;
    }
    let seen = match inflight {
        Some(path) => wait_inflight(path, min)?,
        None => 0,
    };
    let t = Instant::now();
    d.reset().context("reset with writes in flight")?;
    let took = t.elapsed();
    // The device answered the reset: everything it fetched is complete and published.
    let mut queues = std::mem::take(&mut d.queues);
    let mut done: Vec<Vec<u64>> = Vec::new();
    for (qi, q) in queues.iter_mut().enumerate() {
        let mut slots = Vec::new();
        for c in q.reap()? {
            ensure!(
                c.tracked,
                "queue {qi}: completed head {} never given",
                c.head
            );
            ensure!(
                c.status == Some(S_OK),
                "queue {qi}: slot {}: status {:?}",
                c.tag,
                c.status
            );
            slots.push(c.tag);
        }
        done.push(slots);
    }
    let completed: u64 = done.iter().map(|s| s.len() as u64).sum();
    ensure!(
        completed >= seen.min(posted),
        "{completed} writes completed by the reset, but {seen} were in flight in the backing"
    );
    drop(queues);
    drop(d);
    let mut d = open(cfg).context("setting up again after the reset")?;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        for part in done.get(qi).map_or(&[][..], |s| &s[..]).chunks(16) {
            read_aligned(q, seed, part).with_context(|| format!("queue {qi} after reset"))?;
        }
    }
    Ok(format!(
        "reset: {seen} I/Os in flight in the backing of {posted} writes posted; the reset \
         returned after {:.2} s; {completed} writes completed OK and read back verified after \
         a new setup",
        took.as_secs_f64()
    ))
}

/// `chain` with its data descriptors (all but the header and the status byte) moved, in order
/// and with their bytes, to consecutive addresses from `iova` (driver memory outside the heap).
fn data_at(q: &SimQueue, mut chain: Chain, iova: u64) -> Result<Chain> {
    let n = chain.descs.len();
    ensure!(n >= 3, "a chain of {n} descriptors has no separate data");
    let mut at = iova;
    for d in &mut chain.descs[1..n - 1] {
        let bytes = q.mem().read_vec(d.addr, d.len as usize)?;
        q.mem().write(at, &bytes)?;
        d.addr = at;
        at += u64::from(d.len);
    }
    Ok(chain)
}

/// Post `chain` on `q`, wait for it, and return its status and the data it read.
fn run_one(q: &mut SimQueue, chain: Chain) -> Result<(Option<u8>, Vec<u8>)> {
    let c = q.run(chain, DEADLINE)?;
    Ok((c.status, c.data))
}

fn iotlb(cfg: &VhostConfig, seed: u64, requests: u16) -> Result<String> {
    let (mut d, per) = open_for_writes(cfg, requests)?;
    let nq = d.queues.len() as u64;
    ensure!(
        per * u64::from(SLOT) <= SPARE_LEN,
        "at most {} requests per queue",
        SPARE_LEN / u64::from(SLOT)
    );
    // 1. The second region carries a verified write and read on every queue, so that each
    //    worker has it mapped (and cached) before it is invalidated.
    d.map_region(SPARE_IOVA, SPARE_LEN)?;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        let slot = qi as u64 * per;
        let w =
            BlkRequest::write(slot * SLOT_SECTORS, &slot_data(seed ^ 1, slot)).chain(q.mem())?;
        let w = data_at(q, w, SPARE_IOVA)?;
        let (status, _) = run_one(q, w)?;
        ensure!(
            status == Some(S_OK),
            "queue {qi}: write through the second region: {status:?}"
        );
        let r = BlkRequest::read(slot * SLOT_SECTORS, SLOT).chain(q.mem())?;
        let r = data_at(q, r, SPARE_IOVA + u64::from(SLOT))?;
        let (status, data) = run_one(q, r)?;
        ensure!(
            status == Some(S_OK) && data == slot_data(seed ^ 1, slot),
            "queue {qi}: read through the second region: status {status:?}, data {}",
            if data == slot_data(seed ^ 1, slot) {
                "verified"
            } else {
                "differs"
            }
        );
    }
    // 2. Writes in flight on every queue (data in the heap), and the invalidation meanwhile.
    let outstanding = post_writes(&mut d, seed, per)?;
    d.unmap_region(SPARE_IOVA, SPARE_LEN)?;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        all_ok(&q.wait_used(per as usize, DEADLINE)?, per)
            .with_context(|| format!("queue {qi}, across the invalidation"))?;
    }
    // 3. The invalidated range is gone for the device: a read into it must fail, not land in
    //    a stale mapping.
    for (qi, q) in d.queues.iter_mut().enumerate() {
        let r = BlkRequest::read(0, SLOT).chain(q.mem())?;
        let r = data_at(q, r, SPARE_IOVA)?;
        let (status, _) = run_one(q, r)?;
        ensure!(
            status == Some(S_IOERR),
            "queue {qi}: a read into the invalidated range got status {status:?}, want IOERR"
        );
    }
    // 4. A new region mapped at a new IOVA carries verified reads of every write.
    d.map_region(REMAP_IOVA, SPARE_LEN)?;
    for (qi, q) in d.queues.iter_mut().enumerate() {
        for i in 0..per {
            let slot = qi as u64 * per + i;
            let r = BlkRequest::read(slot * SLOT_SECTORS, SLOT).chain(q.mem())?;
            let r = data_at(q, r, REMAP_IOVA + i * u64::from(SLOT))?;
            let (status, data) = run_one(q, r)?;
            ensure!(
                status == Some(S_OK) && data == slot_data(seed, slot),
                "queue {qi} slot {slot}: read through the new mapping: status {status:?}, data {}",
                if data == slot_data(seed, slot) {
                    "verified"
                } else {
                    "differs"
                }
            );
        }
    }
    Ok(format!(
        "iotlb: {outstanding} of {} writes outstanding when the second region was \
         invalidated; all completed OK; a read into the invalidated range got IOERR on every \
         queue; {} reads through a new mapping verified",
        nq * per,
        nq * per
    ))
}
