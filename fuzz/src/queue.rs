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
use vduse_blkd::blk::config::MAX_DWZ_SECTORS;
use vduse_blkd::sim::blk::{header, DwzSeg, POISON, S_IOERR, S_OK, S_UNSUPP, WZ_FLAG_UNMAP};
use vduse_blkd::sim::device::FREE_IOVA;
use vduse_blkd::sim::memory::{PROT_NONE, PROT_RO, PROT_RW};
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

// Memory for the moved status bytes and buffers (`StatusAt`, `DataAt`, `Via`): one sub-area per
// chain of a batch (a batch is answered, or its worker gone, before the next one is posted),
// each large enough for the largest buffer (a 16-byte header with 16 sectors).
/// Chains per batch at most.
const ITEMS: u64 = 8;
/// Bytes of one sub-area.
const SUB: u64 = 0x4000;
/// Item `k`'s two adjacent read-write regions of [`SUB`] bytes, then `2 * SUB` unmapped.
fn rw_pair(k: usize) -> u64 {
    FREE_IOVA + 4 * SUB * k as u64
}
/// Item `k`'s device-read-only sub-area (one region for all items).
fn ro(k: usize) -> u64 {
    FREE_IOVA + 0x10_0000 + SUB * k as u64
}
/// Item `k`'s no-access sub-area (one region for all items, unmapped after it).
fn noacc(k: usize) -> u64 {
    FREE_IOVA + 0x20_0000 + SUB * k as u64
}
/// Nothing is mapped from here up.
const UNMAPPED: u64 = FREE_IOVA + 0x40_0000;
/// Where raw chains' far descriptors point: above everything above (`| FAR`), so that a raw
/// chain never writes into another chain's memory.
const FAR: u64 = 1 << 40;

fn add_regions(dev: &SimDevice) {
    let m = &dev.mem;
    for k in 0..ITEMS as usize {
        m.add_region(rw_pair(k), SUB, PROT_RW).expect("region");
        m.add_region(rw_pair(k) + SUB, SUB, PROT_RW)
            .expect("region");
    }
    m.add_region(ro(0), SUB * ITEMS, PROT_RO).expect("region");
    m.add_region(noacc(0), SUB * ITEMS, PROT_NONE)
        .expect("region");
}

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

/// Where a request's status byte goes. The first alternative is the well-formed one.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAt {
    /// Where `BlkRequest` puts it (heap memory).
    Heap,
    /// Device-read-only memory.
    ReadOnly,
    /// No-access memory.
    NoAccess,
    /// Where nothing is mapped.
    Unmapped(u16),
}

/// Where one buffer of a request goes: for IN and GET_ID the first device-writable one (data),
/// otherwise the last device-readable one (data, the DISCARD / WRITE_ZEROES ranges, or for
/// FLUSH and unknown types the header). The first alternative is the well-formed one.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAt {
    /// Where `BlkRequest` puts it (heap memory).
    Heap,
    /// Device-read-only memory (fine for a buffer the device only reads).
    ReadOnly,
    /// No-access memory.
    NoAccess,
    /// Where nothing is mapped.
    Unmapped(u16),
    /// Across the boundary of two adjacent read-write regions (fine), `1 + n % (len - 1)`
    /// bytes before it.
    AcrossRegions(u16),
    /// Running from a read-write region into unmapped memory (half in; a 1-byte buffer lies
    /// just past the end).
    PastRegionEnd,
}

/// How a request reaches the descriptor table. The first alternatives are the well-formed ones.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    /// Through an indirect table.
    Indirect,
    /// Through an indirect table in no-access memory.
    IndirectNoAccess,
    /// Through an indirect table where nothing is mapped.
    IndirectUnmapped(u16),
}

/// A change to a request's shape (the first alternative leaves it as built). Any other one
/// makes [`StatusAt`], [`DataAt`] and the unreadable [`Via`]s ignored (an indirect table then
/// is an ordinary one), so that each request has at most one thing wrong with it.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    AsBuilt,
    /// The device-readable part cut to its first `n % 16` bytes.
    ShortHeader(u8),
    /// The header's descriptors (all device-readable ones) device-writable.
    WritableHeader,
    /// 512 bytes in the wrong direction: device-readable after the header for IN and GET_ID,
    /// otherwise device-writable before the status byte.
    WrongDirection,
    /// A device-readable descriptor after the status byte (then there is none).
    TrailingReadable,
    /// The status descriptor empty (then there is no status byte).
    EmptyStatus,
    /// IN / OUT: `1 + n % 511` more data bytes; GET_ID: a buffer of `n % 20` bytes; DISCARD /
    /// WRITE_ZEROES: the ranges `1 + n % 15` bytes short.
    Unaligned(u16),
    /// GET_ID: a buffer `n % 4096` bytes longer than 20 (fine).
    LongIdBuffer(u16),
    /// Two empty descriptors where nothing is mapped, after the header and before the status
    /// byte (fine).
    Empty(u16),
    /// DISCARD / WRITE_ZEROES: the first range of 0 sectors, of one more than allowed, with
    /// more flag bits, at a sector whose byte offset overflows; 17 ranges.
    RangeEmpty,
    RangeTooLong,
    RangeFlags(u32),
    RangeOverflow,
    TooManyRanges,
}

/// A request (its chain is built by `sim::BlkRequest`, then its status byte, one buffer or
/// its indirect table may be moved, or its shape changed; with every choice at its first
/// alternative it is well-formed).
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
    pub via: Via,
    /// Only when the status byte and the buffers stay where `BlkRequest` puts them.
    pub status_shared: bool,
    /// The byte each written sector is filled with (plus its index).
    pub fill: u8,
    pub status_at: StatusAt,
    pub data_at: DataAt,
    pub shape: Shape,
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

/// A deliberate ring corruption (or, for `DupHead`, a possible one). The first alternative
/// leaves the ring alone.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    None,
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
    pub edit: Edit,
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

/// What a request gets: its status and used length, or `None` when it has no status byte the
/// device can write (then it must get used length 0 and its status byte stays as it was).
fn expect(r: &Req, read_only: bool, placed: &Placed) -> Option<(u8, u32)> {
    if !placed.answerable {
        return None;
    }
    if let Some(status) = shape_status(r, read_only) {
        return Some((status, 1));
    }
    // A buffer the device cannot access (in its direction) fails the request: the header or
    // the ranges cannot be read, or the data cannot be translated. Only the parser's checks
    // of what it read before decide otherwise: it reads the ranges one by one, and refuses a
    // DISCARD with UNMAP for its first range's flags, so a readable first range means UNSUPP.
    if !placed.accessible {
        let first_range_read = placed.readable >= 32;
        if r.kind == Kind::Discard && r.unmap && !read_only && first_range_read {
            return Some((S_UNSUPP, 1));
        }
        return Some((S_IOERR, 1));
    }
    Some(expect_placed(r, read_only, u64::from(placed.split)))
}

/// What the spec says a request whose buffers are all accessible gets; `extra` iovecs come
/// from a data buffer split across two regions.
fn expect_placed(r: &Req, read_only: bool, extra: u64) -> (u8, u32) {
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
        Kind::In | Kind::Out if data_pieces(r, 512 * n) + extra > 1024 => (S_IOERR, 1),
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
    let count = match r.shape {
        Shape::TooManyRanges => 17,
        _ => u64::from(r.ranges % 4) + 1,
    };
    let mut v: Vec<DwzSeg> = (0..count)
        .map(|i| DwzSeg {
            sector: u64::from(r.sector) + 40 * (i % 4),
            num_sectors: n,
            flags: if r.unmap { WZ_FLAG_UNMAP } else { 0 },
        })
        .collect();
    let first = &mut v[0];
    match r.shape {
        Shape::RangeEmpty => first.num_sectors = 0,
        Shape::RangeTooLong => first.num_sectors = MAX_DWZ_SECTORS + 1,
        Shape::RangeFlags(f) => first.flags |= f,
        Shape::RangeOverflow => first.sector = u64::MAX / 512 + 1,
        _ => {}
    }
    v
}

/// The status a request's shape alone decides (`None`: as if it were well-formed), in the
/// parser's order of checks. Not for the shapes that leave no status byte.
fn shape_status(r: &Req, read_only: bool) -> Option<u8> {
    let dwz = matches!(r.kind, Kind::Discard | Kind::WriteZeroes);
    match r.shape {
        Shape::AsBuilt | Shape::Empty(_) | Shape::LongIdBuffer(_) => None,
        Shape::TrailingReadable | Shape::EmptyStatus => unreachable!("no status byte"),
        // Checked before the type is known.
        Shape::ShortHeader(_) | Shape::WritableHeader => Some(S_IOERR),
        Shape::WrongDirection if matches!(r.kind, Kind::Other(_)) => None,
        Shape::WrongDirection => Some(S_IOERR),
        Shape::Unaligned(_) if matches!(r.kind, Kind::Flush | Kind::Other(_)) => None,
        Shape::Unaligned(_) => Some(S_IOERR),
        _ if !dwz => None,
        // DISCARD / WRITE_ZEROES: the device's read-only state, the range count, then range
        // by range its flags, its length, its offset.
        _ if read_only => Some(S_IOERR),
        Shape::TooManyRanges => Some(S_IOERR),
        _ => {
            let allowed = if r.kind == Kind::WriteZeroes {
                WZ_FLAG_UNMAP
            } else {
                0
            };
            if ranges(r)[0].flags & !allowed != 0 {
                Some(S_UNSUPP)
            } else if let Shape::RangeFlags(_) = r.shape {
                None
            } else {
                Some(S_IOERR)
            }
        }
    }
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
    let mut b = match r.kind {
        Kind::In => BlkRequest::read(sector, 512 * n),
        Kind::Out => BlkRequest::write(sector, &pattern(r)),
        Kind::Flush => BlkRequest::flush(),
        Kind::GetId => BlkRequest::get_id(),
        Kind::Discard => BlkRequest::discard(&ranges(r)),
        Kind::WriteZeroes => BlkRequest::write_zeroes(&ranges(r)),
        Kind::Other(_) => BlkRequest::new(type_(r.kind), sector),
    };
    match (r.shape, r.kind) {
        (Shape::Unaligned(e), Kind::In) => b.in_len += 1 + u32::from(e % 511),
        (Shape::Unaligned(e), Kind::Out) => {
            b.out.resize(b.out.len() + 1 + usize::from(e % 511), 0x5a)
        }
        (Shape::Unaligned(e), Kind::GetId) => b.in_len = u32::from(e % 20),
        (Shape::Unaligned(e), Kind::Discard | Kind::WriteZeroes) => {
            b.out.truncate(b.out.len() - 1 - usize::from(e % 15))
        }
        (Shape::LongIdBuffer(e), Kind::GetId) => b.in_len += u32::from(e % 4096),
        _ => {}
    }
    let moved =
        r.status_at != StatusAt::Heap || r.data_at != DataAt::Heap || r.shape != Shape::AsBuilt;
    b.out_chunk(u32::from(r.out_chunk))
        .in_chunk(u32::from(r.in_chunk))
        .indirect(r.via != Via::Direct)
        .status_shared(r.status_shared && !moved)
}

/// What moving a request's status byte, buffer or table did.
#[derive(Debug, Clone, Copy)]
struct Placed {
    /// The status byte is writable and the chain can be walked.
    answerable: bool,
    /// The moved buffer (if any) is accessible in its direction.
    accessible: bool,
    /// How many of the device-readable bytes (header, then payload) the device can read
    /// before the first it cannot (all of them: `u64::MAX`).
    readable: u64,
    /// The moved buffer is split by a region boundary inside its data bytes (one more iovec).
    split: bool,
}

/// Apply `r`'s placements to its chain, as item `k` of the batch: move the status byte, one
/// buffer (its content copied, or poisoned if device-writable) or the indirect table.
fn place(mem: &vduse_blkd::sim::SimMemory, r: &Req, k: usize, chain: &mut Chain) -> Placed {
    let mut placed = Placed {
        answerable: true,
        accessible: true,
        readable: u64::MAX,
        split: false,
    };
    if r.shape != Shape::AsBuilt {
        reshape(mem, r, chain);
        placed.answerable = !matches!(r.shape, Shape::TrailingReadable | Shape::EmptyStatus);
        return placed;
    }
    let n = chain.descs.len();
    match r.status_at {
        StatusAt::Heap => {}
        at => {
            let addr = match at {
                StatusAt::ReadOnly => ro(k) + SUB - 1,
                StatusAt::NoAccess => noacc(k) + SUB - 1,
                _ => {
                    UNMAPPED
                        + u64::from(match at {
                            StatusAt::Unmapped(o) => o,
                            _ => 0,
                        })
                }
            };
            // `BlkRequest` gives the status byte a descriptor of its own (not shared).
            let last = &mut chain.descs[n - 1];
            debug_assert_eq!((last.len, last.is_write()), (1, true));
            last.addr = addr;
            let _ = mem.write(addr, &[POISON]);
            placed.answerable = false;
        }
    }
    if r.data_at != DataAt::Heap {
        let readable = chain.descs.iter().take_while(|d| !d.is_write()).count();
        // The descriptor, and how many device-readable bytes come before it.
        let (i, before) = match r.kind {
            Kind::In | Kind::GetId => (readable, None),
            _ => {
                let before = chain.descs[..readable - 1]
                    .iter()
                    .map(|d| u64::from(d.len))
                    .sum();
                (readable - 1, Some(before))
            }
        };
        // Bytes of the header in the descriptor are not data.
        let data_from = before.map_or(0, |b| 16u64.saturating_sub(b));
        let d = chain.descs[i];
        let len = u64::from(d.len);
        // Where it goes, how many of its bytes are mapped, and how many (from its start) the
        // device can access in its direction.
        let (addr, mapped, usable) = match r.data_at {
            DataAt::Heap => unreachable!(),
            DataAt::ReadOnly => (ro(k), len, if d.is_write() { 0 } else { len }),
            DataAt::NoAccess => (noacc(k), len, 0),
            DataAt::Unmapped(o) => (UNMAPPED + u64::from(o), 0, 0),
            DataAt::AcrossRegions(o) => {
                // Bytes ahead of the boundary.
                let ahead = if len >= 2 {
                    1 + u64::from(o) % (len - 1)
                } else {
                    1
                };
                placed.split = data_from < ahead && ahead < len;
                (rw_pair(k) + SUB - ahead, len, len)
            }
            DataAt::PastRegionEnd => (rw_pair(k) + 2 * SUB - len / 2, len / 2, len / 2),
        };
        let bytes = if d.is_write() {
            vec![POISON; mapped as usize]
        } else {
            mem.read_vec(d.addr, mapped as usize).expect("buffer")
        };
        if mapped > 0 {
            mem.write(addr, &bytes).expect("moved buffer");
        }
        chain.descs[i].addr = addr;
        placed.accessible = usable == len;
        if let (false, Some(before)) = (placed.accessible, before) {
            placed.readable = before + usable;
        }
    }
    let table_at = match r.via {
        Via::IndirectNoAccess => Some(noacc(k)),
        Via::IndirectUnmapped(o) => Some(UNMAPPED + u64::from(o)),
        _ => None,
    };
    if let Some(addr) = table_at {
        // Nothing is written there: the device cannot read the table, so the chain has no
        // status byte it can find.
        chain.indirect = Indirect::Raw {
            addr,
            len: 16 * n as u32,
        };
        placed.answerable = false;
    }
    placed
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
            // Outside the chain's own buffer only where nothing is mapped (see [`FAR`]).
            let at = u64::from(d.at) % SCRATCH;
            let (addr, len) = match d.far {
                Some(a) => (a | FAR, d.big_len.unwrap_or(u32::from(d.len))),
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

/// Apply `r`'s shape to its chain's descriptors (the changes `BlkRequest` cannot express).
fn reshape(mem: &vduse_blkd::sim::SimMemory, r: &Req, chain: &mut Chain) {
    let d = &mut chain.descs;
    let readable = d.iter().take_while(|d| !d.is_write()).count();
    let mut buffer = |bytes: &[u8]| {
        let a = mem.alloc_bytes(bytes).expect("buffer");
        chain.allocs.push((a, bytes.len() as u64));
        a
    };
    match r.shape {
        Shape::ShortHeader(n) => {
            d[0].len = d[0].len.min(u32::from(n % 16));
            d.drain(1..readable);
        }
        Shape::WritableHeader => d[..readable]
            .iter_mut()
            .for_each(|d| d.flags |= DESC_F_WRITE),
        Shape::WrongDirection => match r.kind {
            Kind::In | Kind::GetId => d.insert(readable, Desc::readable(buffer(&[0; 512]), 512)),
            _ => {
                let at = d.len() - 1;
                d.insert(at, Desc::writable(buffer(&[POISON; 512]), 512));
            }
        },
        Shape::TrailingReadable => d.push(Desc::readable(buffer(&[0; 16]), 16)),
        Shape::EmptyStatus => d.last_mut().expect("status descriptor").len = 0,
        Shape::Empty(o) => {
            let at = UNMAPPED + u64::from(o);
            let last = d.len() - 1;
            d.insert(last, Desc::writable(at, 0));
            d.insert(1, Desc::readable(at, 0));
        }
        _ => {}
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
        add_regions(&dev);
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
    Request(Req, Placed),
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
    for (k, c) in batch.chains.iter().take(ITEMS as usize).enumerate() {
        let p = match c {
            ChainSpec::Request(r) => {
                let mut chain = blk_request(r).chain(q.mem()).expect("request chain");
                let placed = place(q.mem(), r, k, &mut chain);
                let need = match chain.indirect {
                    Indirect::Direct => chain.descs.len(),
                    _ => 1,
                };
                if q.free_descs() < need {
                    for &(a, l) in &chain.allocs {
                        q.mem().free(a, l);
                    }
                    continue;
                }
                own_table(q, &mut chain);
                let allocs = chain.allocs.clone();
                let head = q.add(chain).expect("post request");
                Posted {
                    head,
                    allocs,
                    what: What::Request(r.clone(), placed),
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
        (Edit::HeadOutOfRange(h), _) => {
            q.add_head(size.saturating_add(h % 1024), None)
                .expect("avail entry");
            (true, None)
        }
        (Edit::DupHead, Some(h)) => {
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
            Edit::AvailJump(n) => {
                let v = q.avail_idx().wrapping_add(size + 1 + n % 1024);
                q.set_avail_idx_raw(v).expect("avail index");
                q.kick().expect("kick");
                true
            }
            Edit::AvailBack(n) => {
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
        if let What::Request(r, _) = &p.what {
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
            What::Request(r, placed) => {
                let Some((status, len)) = expect(r, read_only, placed) else {
                    // No status byte the device can write (nobody can, so this holds even
                    // when a raw chain leads into this one): used length 0, byte untouched.
                    assert!(
                        c.len == 0 && matches!(c.status, None | Some(POISON)),
                        "unanswerable request answered: used {} status {:?}: {r:?}",
                        c.len,
                        c.status
                    );
                    continue;
                };
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
                    Kind::GetId => {
                        assert_eq!(&c.data[..20], &d.serial[..], "serial");
                        assert!(
                            c.data[20..].iter().all(|&b| b == POISON),
                            "written past the 20-byte ID"
                        );
                    }
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
        let What::Request(r, placed) = &p.what else {
            continue;
        };
        if !writes(r.kind) {
            continue;
        }
        let answer = expect(r, read_only, placed);
        // An error writes nothing.
        if answer.is_some_and(|(status, _)| status != S_OK) {
            continue;
        }
        for (i, s) in touched(r).enumerate() {
            d.model[s] = match (answer, writers[s], r.kind) {
                // Unanswerable: the worker should do no I/O for it, but nothing tells the
                // driver, so the sectors are unknown.
                (None, ..) | (_, 2.., _) | (_, _, Kind::Discard) => None,
                (_, _, Kind::Out) => Some(r.fill.wrapping_add((i % 16) as u8)),
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
            What::Request(r, _) if writes(r.kind) => touched(r).for_each(|s| d.model[s] = None),
            What::Request(..) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of the `n` alternatives of the enum `T`, twice: with a payload of 0 bytes and of
    /// 0x13 bytes (`Unmapped(0x1313)`, `RangeFlags(0x1313_1313)`), decoded as `arbitrary`
    /// decodes choice `i` of `n`: a 32-bit value in `[i, i + 1) * 2^32 / n`.
    fn alternatives<T: for<'a> Arbitrary<'a>>(n: u64) -> Vec<T> {
        let mut v = Vec::new();
        for payload in [0u8, 0x13] {
            let mut seen = Vec::new();
            for i in 0..n {
                let mut b = (((i << 32).div_ceil(n)) as u32).to_le_bytes().to_vec();
                b.extend([payload; 8]);
                let t = T::arbitrary_take_rest(Unstructured::new(&b)).expect("decode");
                seen.push(std::mem::discriminant(&t));
                v.push(t);
            }
            seen.dedup();
            assert_eq!(seen.len() as u64, n, "not {n} alternatives");
        }
        v
    }

    fn req(kind: Kind, status_at: StatusAt, data_at: DataAt, via: Via, chunks: u16) -> Req {
        Req {
            kind,
            sector: 8,
            sectors: 3,
            ranges: 3,
            unmap: false,
            out_chunk: chunks,
            in_chunk: chunks,
            via,
            status_shared: true,
            fill: 0x30,
            status_at,
            data_at,
            shape: Shape::AsBuilt,
        }
    }

    /// Every kind with every placement and every shape, in batches of eight, on a writable and
    /// a read-only device: the harness's own checks (status, used length, data, the model)
    /// must hold.
    #[test]
    fn every_placement_and_shape_of_every_kind_gets_the_answer_it_expects() {
        let status: Vec<StatusAt> = alternatives(4);
        let data: Vec<DataAt> = alternatives(6);
        let via: Vec<Via> = alternatives(4);
        let mut all = Vec::new();
        for k in Kind::EACH {
            for &s in &status {
                for &d in &data {
                    for &v in &via {
                        // 100: the header and four ranges in one descriptor, which
                        // `PastRegionEnd` cuts after the first range.
                        for chunks in [0, 10, 100] {
                            for unmap in [false, true] {
                                let mut r = req(k, s, d, v, chunks);
                                r.unmap = unmap;
                                all.push(ChainSpec::Request(r));
                            }
                        }
                    }
                }
            }
        }
        let mut shapes: Vec<Shape> = alternatives(14);
        shapes.push(Shape::RangeFlags(WZ_FLAG_UNMAP));
        for k in Kind::EACH {
            for &shape in &shapes {
                for v in [Via::Direct, Via::Indirect, Via::IndirectUnmapped(1)] {
                    for chunks in [0, 10] {
                        for unmap in [false, true] {
                            // Placements are ignored with a shape.
                            let mut r = req(k, StatusAt::ReadOnly, DataAt::NoAccess, v, chunks);
                            r.unmap = unmap;
                            r.shape = shape;
                            all.push(ChainSpec::Request(r));
                        }
                    }
                }
            }
        }
        // 16 sectors in 8-byte pieces: 1024 iovecs, 1025 once one of them is split.
        for k in [Kind::In, Kind::Out] {
            for d in [DataAt::Heap, DataAt::AcrossRegions(0)] {
                let mut r = req(k, StatusAt::Heap, d, Via::Indirect, 8);
                r.sectors = 15;
                all.push(ChainSpec::Request(r));
            }
        }
        for config in [Config::Plain, Config::ReadOnly] {
            for batches in all.chunks(6 * 8) {
                let input = QueueInput {
                    config,
                    batches: batches
                        .chunks(8)
                        .map(|c| Batch {
                            chains: c.to_vec(),
                            kick_always: false,
                            edit: Edit::None,
                        })
                        .collect(),
                    check_sector: 100,
                };
                run(&input);
            }
        }
    }

    /// The expectation the test above relies on, for a few cases by hand.
    #[test]
    fn placements_change_the_expected_answer() {
        let p = |answerable, accessible, split| Placed {
            answerable,
            accessible,
            readable: 0,
            split,
        };
        let read = req(Kind::In, StatusAt::Heap, DataAt::Heap, Via::Direct, 0);
        assert_eq!(
            expect(&read, false, &p(true, true, false)),
            Some((S_OK, 4 * 512 + 1))
        );
        assert_eq!(expect(&read, false, &p(false, false, false)), None);
        assert_eq!(
            expect(&read, false, &p(true, false, false)),
            Some((S_IOERR, 1))
        );
        // 16 sectors in 8-byte pieces: 1024 iovecs, the most one readv takes; split, 1025.
        let mut many = read.clone();
        many.sectors = 15;
        many.in_chunk = 8;
        assert_eq!(
            expect(&many, false, &p(true, true, false)),
            Some((S_OK, 16 * 512 + 1))
        );
        assert_eq!(
            expect(&many, false, &p(true, true, true)),
            Some((S_IOERR, 1))
        );
    }
}
