//! Target `queue`: the production worker (`worker::spawn`, io_uring, real file I/O on a 1 MiB
//! backing file) driven through the simulator's driver side.
//!
//! An input ([`QueueInput`], derived with `arbitrary`) is a device configuration and up to 6
//! batches of up to 8 chains: well-formed requests built by the simulator's `BlkRequest`, or
//! raw descriptor lists. A batch may carry one ring edit (a head out of range, an avail index
//! jump or step back, a head posted twice). Each batch is written, published at once, then
//! waited for (bounded by [`DEADLINE`], never by a sleep). One `SimDevice` per configuration
//! lives across inputs; a worker that ends `Broken` is replaced. The checks are properties, and
//! the data model is one byte per sector (see `fuzz/README.md`).

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use vduse_blkd::sim::blk::{header, DwzSeg, POISON, S_IOERR, S_OK, S_UNSUPP, WZ_FLAG_UNMAP};
use vduse_blkd::sim::device::FREE_IOVA;
use vduse_blkd::sim::queue::{DESC_F_INDIRECT, DESC_F_WRITE};
use vduse_blkd::sim::SimQueue;
use vduse_blkd::sim::{BlkRequest, Chain, Completion, Desc, Indirect, SimDevice, SimDeviceConfig};
use vduse_blkd::worker::WorkerError;

use crate::Kind;

/// Any wait longer than this is a hang.
pub const DEADLINE: Duration = Duration::from_secs(5);
const CAPACITY: u64 = 1 << 20;
const SECTORS: u64 = CAPACITY / 512;
/// Bytes of each raw chain's own buffer.
const SCRATCH: u64 = 0x4000;

/// The device: queue size 32; 64 with EVENT_IDX; 8 with EVENT_IDX on a read-only backing.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Plain,
    EventIdx,
    ReadOnly,
}

impl Config {
    fn index(self) -> usize {
        self as usize
    }
}

/// The type field of a request: [`Kind::Other`] picks a type the device does not implement.
fn type_(k: Kind) -> u32 {
    match k {
        // 2, 3, 5..7, 9, 10, 12, 14.. are not implemented.
        Kind::Other(t) => [2, 3, 5, 7, 9, 10, 12, 14, 0xffff_ffff][t as usize % 9],
        k => k.value(),
    }
}

/// A well-formed request (its chain is built by `sim::BlkRequest`).
#[derive(Arbitrary, Debug, Clone)]
pub struct Req {
    pub kind: Kind,
    /// First sector (In/Out) or first range's sector; may be past the end.
    pub sector: u16,
    /// 1..=16 sectors (In/Out) or per range.
    pub sectors: u8,
    /// 1..=4 ranges (Discard/WriteZeroes).
    pub ranges: u8,
    pub unmap: bool,
    /// Split the readable part / the data into pieces of this many bytes (0: one piece).
    pub out_chunk: u16,
    pub in_chunk: u16,
    pub indirect: bool,
    pub status_shared: bool,
    /// The byte each written sector is filled with (plus its index).
    pub fill: u8,
}

/// A raw descriptor: anything, within the chain's own buffer or outside all memory.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct RawDesc {
    /// Offset in the chain's buffer, or (`far`) an unmapped / wrapping address.
    pub at: u16,
    pub far: Option<u64>,
    pub len: u16,
    pub big_len: Option<u32>,
    pub write: bool,
    pub indirect: bool,
    /// An explicit `next` (a table index, possibly another chain's or out of range).
    pub next: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum ChainSpec {
    Request(Req),
    /// A header (type, sector) at the start of the chain's buffer, then up to 12 descriptors.
    Raw {
        kind: Kind,
        sector: u16,
        indirect: bool,
        descs: Vec<RawDesc>,
    },
}

/// A deliberate ring corruption (or, for `DupHead`, a possible one).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Edit {
    HeadOutOfRange(u16),
    AvailJump(u16),
    AvailBack(u8),
    /// The batch's first head posted again.
    DupHead,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Batch {
    /// At most 8 used.
    pub chains: Vec<ChainSpec>,
    /// Kick even when the device asks not to be kicked.
    pub kick_always: bool,
    pub edit: Option<Edit>,
}

/// One input of target `queue`.
#[derive(Arbitrary, Debug, Clone)]
pub struct QueueInput {
    pub config: Config,
    /// At most 6 used.
    pub batches: Vec<Batch>,
    /// Where the closing write + read goes.
    pub check_sector: u16,
}

/// What the spec says a request gets: its status and used length.
fn expect(r: &Req, read_only: bool) -> (u8, u32) {
    let n = u64::from(r.sectors % 16) + 1;
    let fits = |s: u64| s + n <= SECTORS;
    let writes = writes(r.kind);
    let ok_len = match r.kind {
        Kind::In => 512 * n as u32 + 1,
        Kind::GetId => 21,
        _ => 1,
    };
    match r.kind {
        Kind::Other(_) => (S_UNSUPP, 1),
        _ if writes && read_only => (S_IOERR, 1),
        Kind::Discard if r.unmap => (S_UNSUPP, 1),
        Kind::In | Kind::Out if !fits(u64::from(r.sector)) => (S_IOERR, 1),
        // The worker passes at most IOV_MAX (1024) iovecs to one readv/writev.
        Kind::In | Kind::Out if data_pieces(r, 512 * n) > 1024 => (S_IOERR, 1),
        Kind::Discard | Kind::WriteZeroes if !ranges(r).iter().all(|d| fits(d.sector)) => {
            (S_IOERR, 1)
        }
        _ => (S_OK, ok_len),
    }
}

/// How many descriptors carry the `len` data bytes of an In/Out request.
fn data_pieces(r: &Req, len: u64) -> u64 {
    match (r.kind, u64::from(r.out_chunk), u64::from(r.in_chunk)) {
        (Kind::Out, 0, _) | (Kind::In, _, 0) => 1,
        (Kind::Out, c, _) => (16 + len).div_ceil(c) - 16 / c,
        (_, _, c) => len.div_ceil(c),
    }
}

fn ranges(r: &Req) -> Vec<DwzSeg> {
    let n = u32::from(r.sectors % 16) + 1;
    (0..u64::from(r.ranges % 4) + 1)
        .map(|i| DwzSeg {
            sector: u64::from(r.sector) + 40 * i,
            num_sectors: n,
            flags: if r.unmap { WZ_FLAG_UNMAP } else { 0 },
        })
        .collect()
}

/// The data of a write: sector `i` filled with `fill + i`.
fn pattern(r: &Req) -> Vec<u8> {
    let n = usize::from(r.sectors % 16) + 1;
    (0..n)
        .flat_map(|i| std::iter::repeat_n(r.fill.wrapping_add(i as u8), 512))
        .collect()
}

fn blk_request(r: &Req) -> BlkRequest {
    let n = u32::from(r.sectors % 16) + 1;
    let sector = u64::from(r.sector);
    let b = match r.kind {
        Kind::In => BlkRequest::read(sector, 512 * n),
        Kind::Out => BlkRequest::write(sector, &pattern(r)),
        Kind::Flush => BlkRequest::flush(),
        Kind::GetId => BlkRequest::get_id(),
        Kind::Discard => BlkRequest::discard(&ranges(r)),
        Kind::WriteZeroes => BlkRequest::write_zeroes(&ranges(r)),
        Kind::Other(_) => BlkRequest::new(type_(r.kind), sector),
    };
    b.out_chunk(u32::from(r.out_chunk))
        .in_chunk(u32::from(r.in_chunk))
        .indirect(r.indirect)
        .status_shared(r.status_shared)
}

/// The one builder of raw chains: a buffer of their own, the header at its start.
fn raw_chain(q: &SimQueue, kind: Kind, sector: u16, indirect: bool, descs: &[RawDesc]) -> Chain {
    let mem = q.mem();
    let buf = mem.alloc(SCRATCH, 16).expect("scratch buffer");
    mem.fill(buf, SCRATCH as usize, POISON).expect("poison");
    mem.write(buf, &header(type_(kind), u64::from(sector)))
        .expect("header");
    let descs = descs
        .iter()
        .take(12)
        .map(|d| {
            // Outside the chain's own buffer only where nothing is mapped (the heap and the
            // rings lie below `FREE_IOVA`), so that a raw chain never writes into another's.
            let at = u64::from(d.at) % SCRATCH;
            let (addr, len) = match d.far {
                Some(a) => (a | FREE_IOVA, d.big_len.unwrap_or(u32::from(d.len))),
                None => (buf + at, u32::from(d.len).min((SCRATCH - at) as u32)),
            };
            Desc {
                addr,
                len,
                flags: (u16::from(d.write) * DESC_F_WRITE)
                    | (u16::from(d.indirect) * DESC_F_INDIRECT),
                next: d.next,
            }
        })
        .collect();
    Chain {
        descs,
        indirect: if indirect {
            Indirect::Table
        } else {
            Indirect::Direct
        },
        allocs: vec![(buf, SCRATCH)],
        tag: 0,
    }
}

/// Allocate an indirect table ourselves (listed in `allocs`), so that a chain the worker never
/// answers can be freed in full.
fn own_table(q: &SimQueue, chain: &mut Chain) {
    if chain.indirect == Indirect::Table {
        let len = 16 * chain.descs.len() as u64;
        let t = q.mem().alloc(len, 16).expect("indirect table");
        chain.indirect = Indirect::TableAt(t);
        chain.allocs.push((t, len));
    }
}

struct Dev {
    dev: SimDevice,
    config: Config,
    serial: [u8; 20],
    /// What each sector holds, when known: every byte equal to this one.
    model: Vec<Option<u8>>,
}

impl Dev {
    fn new(config: Config) -> Self {
        let mut cfg = SimDeviceConfig::new(CAPACITY);
        (cfg.queue_size, cfg.event_idx, cfg.read_only) = match config {
            Config::Plain => (32, false, false),
            Config::EventIdx => (64, true, false),
            Config::ReadOnly => (8, true, true),
        };
        cfg.heap_len = 4 << 20;
        if Path::new("/dev/shm").is_dir() {
            cfg.dir = Some("/dev/shm".into());
        }
        let serial = cfg.serial;
        let dev = SimDevice::create(cfg).expect("simulated device");
        Dev {
            dev,
            config,
            serial,
            model: vec![Some(0); SECTORS as usize],
        }
    }

    fn q(&mut self) -> &mut SimQueue {
        &mut self.dev.queues[0]
    }

    fn read_only(&self) -> bool {
        self.config == Config::ReadOnly
    }

    /// Replace a worker that ended: fresh rings and driver state, a new worker at index 0.
    fn restart(&mut self) {
        let old = &self.dev.queues[0];
        let fresh = SimQueue::new(
            self.dev.mem.clone(),
            0,
            old.size(),
            old.layout(),
            self.config != Config::Plain,
        )
        .expect("fresh queue");
        self.dev.queues[0] = fresh;
        self.dev.start(0, 0, 0).expect("restart worker");
    }

    /// Reap until `n` entries arrived or the worker is gone; a hang past [`DEADLINE`] panics.
    fn collect(&mut self, n: usize, what: &str) -> (Vec<Completion>, bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut out = Vec::new();
        loop {
            let gone = self.dev.worker_gone(0);
            let q = &mut self.dev.queues[0];
            out.extend(q.reap().expect("reap"));
            if out.len() >= n || gone {
                return (out, gone);
            }
            assert!(
                Instant::now() < deadline,
                "hang: {what}: {} of {n} used entries after {DEADLINE:?}\nworker log:\n{}",
                out.len(),
                crate::logring::dump()
            );
            // With EVENT_IDX, ask for an interrupt on the next entry, then wait for one; the
            // short timeout also covers interrupts the device legitimately suppresses.
            let _ = q.set_used_event(q.last_used());
            q.irq().wait(Duration::from_millis(2));
        }
    }
}

thread_local! {
    static DEVS: RefCell<[Option<Dev>; 3]> = const { RefCell::new([None, None, None]) };
}

/// Decode `data` (any bytes) and run it.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = QueueInput::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Run one input and check every property (panics on a violation).
pub fn run(input: &QueueInput) {
    crate::logring::install();
    DEVS.with(|d| {
        let mut d = d.borrow_mut();
        let d = d[input.config.index()].get_or_insert_with(|| {
            let mut d = Dev::new(input.config);
            d.dev.start(0, 0, 0).expect("start worker");
            d
        });
        for b in input.batches.iter().take(6) {
            run_batch(d, b);
        }
        check_serves(d, input.check_sector);
    });
}

enum What {
    Request(Req),
    Raw { writable: u64, linked: bool },
}

struct Posted {
    head: u16,
    /// Heap memory of the chain (freed by `reap`, or by us when the worker broke first).
    allocs: Vec<(u64, u64)>,
    what: What,
}

fn run_batch(d: &mut Dev, batch: &Batch) {
    let q = d.q();
    let size = q.size();
    let before = q.avail_idx();
    let mut posted = Vec::new();
    for c in batch.chains.iter().take(8) {
        let p = match c {
            ChainSpec::Request(r) => {
                if q.free_descs() < blk_request(r).desc_count() {
                    continue;
                }
                let mut chain = blk_request(r).chain(q.mem()).expect("request chain");
                own_table(q, &mut chain);
                let allocs = chain.allocs.clone();
                let head = q.add(chain).expect("post request");
                Posted {
                    head,
                    allocs,
                    what: What::Request(r.clone()),
                }
            }
            ChainSpec::Raw {
                kind,
                sector,
                indirect,
                descs,
            } => {
                let need = if *indirect { 1 } else { descs.len().min(12) };
                if descs.is_empty() || q.free_descs() < need {
                    continue;
                }
                let mut chain = raw_chain(q, *kind, *sector, *indirect, descs);
                own_table(q, &mut chain);
                let writable = chain
                    .descs
                    .iter()
                    .filter(|d| d.is_write())
                    .map(|d| u64::from(d.len))
                    .sum();
                let linked = chain
                    .descs
                    .iter()
                    .all(|d| d.next.is_none() && d.flags & DESC_F_INDIRECT == 0);
                let allocs = chain.allocs.clone();
                let head = q.add(chain).expect("post raw chain");
                Posted {
                    head,
                    allocs,
                    what: What::Raw { writable, linked },
                }
            }
        };
        posted.push(p);
    }
    let first = posted.first().map(|p| p.head);
    // A ring edit that certainly corrupts the ring, or a duplicate head that does so only
    // while the first request is still in flight.
    let (corrupt, dup) = match (batch.edit, first) {
        (Some(Edit::HeadOutOfRange(h)), _) => {
            q.add_head(size.saturating_add(h % 1024), None)
                .expect("avail entry");
            (true, None)
        }
        (Some(Edit::DupHead), Some(h)) => {
            q.add_head(h, None).expect("avail entry");
            (false, Some(h))
        }
        _ => (false, None),
    };
    if batch.kick_always {
        q.publish().expect("publish");
        q.kick().expect("kick");
    } else {
        q.publish_and_notify().expect("publish");
    }
    let corrupt = corrupt
        || match batch.edit {
            Some(Edit::AvailJump(n)) => {
                let v = q.avail_idx().wrapping_add(size + 1 + n % 1024);
                q.set_avail_idx_raw(v).expect("avail index");
                q.kick().expect("kick");
                true
            }
            Some(Edit::AvailBack(n)) => {
                q.set_avail_idx_raw(before.wrapping_sub(1 + u16::from(n)))
                    .expect("avail index");
                q.kick().expect("kick");
                true
            }
            _ => false,
        };
    let raw = posted.iter().any(|p| matches!(p.what, What::Raw { .. }));
    let want = posted.len() + usize::from(dup.is_some());
    let (done, gone) = if corrupt {
        (Vec::new(), true)
    } else {
        d.collect(want, "batch")
    };
    if gone {
        assert!(
            corrupt || raw || dup.is_some(),
            "the worker ended on a batch of well-formed requests\n{}",
            crate::logring::dump()
        );
        match d.dev.wait_exit(0, DEADLINE) {
            Ok(Err(WorkerError::Broken { .. })) => {}
            Ok(other) => panic!("the worker ended with {other:?}, expected Broken"),
            Err(e) => panic!("corrupt ring: the worker did not end within {DEADLINE:?}: {e}"),
        }
        // Free what the worker never answered (its in-flight I/O is over: it ended).
        let late = d.q().reap().expect("reap");
        let answered: Vec<u32> = done
            .iter()
            .chain(&late)
            .filter(|c| c.tracked)
            .map(|c| c.head)
            .collect();
        for p in posted
            .iter()
            .filter(|p| !answered.contains(&u32::from(p.head)))
        {
            for &(a, l) in &p.allocs {
                d.dev.mem.free(a, l);
            }
        }
        d.restart();
        forget(d, &posted);
        return;
    }
    check_batch(d, &posted, &done, dup, raw);
}

fn check_batch(d: &mut Dev, posted: &[Posted], done: &[Completion], dup: Option<u16>, raw: bool) {
    // Every head gets exactly one used entry (the untracked extra is the duplicate's).
    for c in done.iter().filter(|c| !c.tracked) {
        assert_eq!(
            Some(c.head),
            dup.map(u32::from),
            "used entry for head {} not in flight",
            c.head
        );
    }
    let read_only = d.read_only();
    // Sectors more than one request of the batch writes: unordered, so unknown afterwards.
    let mut writers = vec![0u8; SECTORS as usize];
    for p in posted {
        if let What::Request(r) = &p.what {
            for s in touched(r).filter(|_| writes(r.kind)) {
                writers[s] = writers[s].saturating_add(1);
            }
        }
    }
    for p in posted {
        let head = u32::from(p.head);
        let c = done
            .iter()
            .find(|c| c.tracked && c.head == head)
            .unwrap_or_else(|| panic!("no used entry for head {head}"));
        match &p.what {
            What::Raw { writable, linked } => {
                assert!(
                    u64::from(c.len) <= *writable,
                    "used {} > writable {writable}",
                    c.len
                );
                if *linked && c.len > 0 && !posted_raw_next(posted) {
                    if let Some(s) = c.status {
                        assert!(s <= S_UNSUPP, "status byte {s}");
                    }
                }
            }
            What::Request(r) => {
                let (status, len) = expect(r, read_only);
                if posted_raw_next(posted) {
                    // A raw chain's `next` may lead into this chain and answer through it.
                    assert!(
                        c.status.is_some_and(|s| s <= S_UNSUPP) && c.len <= len.max(1 + 512 * 16)
                    );
                    continue;
                }
                assert_eq!((c.status, c.len), (Some(status), len), "{r:?}");
                if status != S_OK {
                    continue;
                }
                match r.kind {
                    Kind::GetId => assert_eq!(&c.data[..], &d.serial[..], "serial"),
                    // A raw chain of the batch may have written anywhere.
                    Kind::In if !raw => {
                        for (i, s) in touched(r).enumerate() {
                            if let (1.., _) | (_, None) = (writers[s], d.model[s]) {
                                continue;
                            }
                            let want = d.model[s].expect("known");
                            let got = &c.data[512 * i..512 * (i + 1)];
                            assert!(
                                got.iter().all(|&b| b == want),
                                "sector {s} read {got:?}, written {want}"
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    // Update the model from what was acknowledged.
    for p in posted {
        let What::Request(r) = &p.what else { continue };
        if !writes(r.kind) || expect(r, read_only).0 != S_OK {
            continue;
        }
        for (i, s) in touched(r).enumerate() {
            d.model[s] = match (writers[s], r.kind) {
                (2.., _) | (_, Kind::Discard) => None,
                (_, Kind::Out) => Some(r.fill.wrapping_add((i % 16) as u8)),
                _ => Some(0),
            };
        }
    }
    if raw {
        forget(d, posted);
    }
}

/// Whether any raw chain has an explicit `next` (it may reach into another chain).
fn posted_raw_next(posted: &[Posted]) -> bool {
    posted
        .iter()
        .any(|p| matches!(p.what, What::Raw { linked: false, .. }))
}

fn writes(k: Kind) -> bool {
    matches!(k, Kind::Out | Kind::Discard | Kind::WriteZeroes)
}

/// After a broken ring: what the batch's requests (and any raw chain) wrote is unknown.
fn forget(d: &mut Dev, posted: &[Posted]) {
    for p in posted {
        match &p.what {
            What::Request(r) if writes(r.kind) => touched(r).for_each(|s| d.model[s] = None),
            What::Request(_) => {}
            What::Raw { .. } => d.model.fill(None),
        }
    }
}

/// Sectors a request reads (In) or changes (Out, Discard, WriteZeroes), within the device.
fn touched(r: &Req) -> impl Iterator<Item = usize> {
    let n = u64::from(r.sectors % 16) + 1;
    let spans: Vec<(u64, u64)> = match r.kind {
        Kind::In | Kind::Out => vec![(u64::from(r.sector), n)],
        Kind::Discard | Kind::WriteZeroes => ranges(r).iter().map(|s| (s.sector, n)).collect(),
        _ => Vec::new(),
    };
    spans
        .into_iter()
        .flat_map(|(s, n)| s..s + n)
        .filter(|&s| s < SECTORS)
        .map(|s| s as usize)
}

/// After every input the worker still serves: a write and a read of a fresh pattern.
fn check_serves(d: &mut Dev, sector: u16) {
    let sector = u64::from(sector) % (SECTORS - 8);
    let data: Vec<u8> = (0..4096u32)
        .map(|i| (i ^ (i >> 8) ^ sector as u32) as u8)
        .collect();
    let ro = d.read_only();
    let w = BlkRequest::write(sector, &data)
        .chain(d.q().mem())
        .expect("chain");
    let c = d.q().run(w, DEADLINE).expect("closing write");
    assert_eq!(
        c.status,
        Some(if ro { S_IOERR } else { S_OK }),
        "closing write"
    );
    let r = BlkRequest::read(sector, 4096)
        .chain(d.q().mem())
        .expect("chain");
    let c = d.q().run(r, DEADLINE).expect("closing read");
    assert_eq!(c.status, Some(S_OK), "closing read");
    if !ro {
        assert_eq!(c.data, data, "closing read returns the closing write");
        for s in sector..sector + 8 {
            d.model[s as usize] = None;
        }
    }
    let file = d
        .dev
        .backing_read(sector * 512, 4096)
        .expect("backing file");
    assert_eq!(c.data, file, "closing read equals the file");
    assert!(d.q().reap().expect("reap").is_empty(), "stray used entries");
}
