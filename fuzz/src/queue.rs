//! Target `queue`: batches of requests posted through the simulator to the production worker
//! (`worker::spawn`, io_uring, a backing file on tmpfs).
//!
//! Most requests are well formed, with knobs for layout (descriptor splitting, indirect
//! tables, a status byte shared with data); one in eight on average carries one "rarely"
//! perturbation (a bad type, sector, length, direction, header, status or buffer placement, bad
//! DISCARD / WRITE_ZEROES ranges), whose outcome is known. Raw chains put arbitrary descriptors
//! (any flags, lengths, `next`, indirect tables anywhere) on the ring, and rare ring edits
//! corrupt it (a head out of range, the avail index jumping or going back, a head posted twice
//! while in flight).
//!
//! One simulated device per configuration stays alive across inputs; a worker that ended
//! `Broken` is replaced (fresh rings, a new worker). Each batch is written, then published at
//! once, then waited for, so the reference model sees the descriptors the worker will see.
//!
//! Checked:
//! - nothing panics, the worker never ends with `WorkerError::Panicked` (the simulator's drop
//!   and libFuzzer's panic hook would also abort on one);
//! - every used entry names a head the driver has in flight;
//! - a worker ends `Broken` exactly when a batch corrupts the ring (per [`crate::model`] or a
//!   deliberate edit), and it ends within 5 s; any wait longer than 5 s is a hang and panics;
//! - a well-formed or perturbed request gets exactly the status byte and used length it must;
//!   a request without a usable status byte gets used length 0 and its status byte untouched;
//!   a raw chain's used length is 0 exactly when its status byte is not device-writable, and
//!   otherwise at most its writable bytes with a status byte of 0, 1 or 2;
//! - in batches without raw chains, data read, written and zeroed is what the backing file
//!   holds afterwards (for ranges no other request of the batch touched);
//! - after every input the worker still serves a write and a read of a fresh pattern.

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use vduse_blkd::blk::config::MAX_DWZ_SECTORS;
use vduse_blkd::blk::VIRTIO_BLK_ID_BYTES;
use vduse_blkd::sim::blk::{
    header, DwzSeg, POISON, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, WZ_FLAG_UNMAP,
};
use vduse_blkd::sim::device::FREE_IOVA;
use vduse_blkd::sim::memory::{PROT_NONE, PROT_RO, PROT_RW};
use vduse_blkd::sim::{
    Chain, Completion, Desc, Indirect, SimDevice, SimDeviceConfig, SimError, SimQueue, SimRng,
};
use vduse_blkd::worker::WorkerError;

use crate::model::{self, Regions, Walk};
use crate::request::{Content, Flags, Len};
use crate::wire::{Reader, Wire, Writer};

/// Any wait longer than this is a hang.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Device capacity.
pub const CAPACITY: u64 = 1 << 20;
const CAP_SECTORS: u64 = CAPACITY >> 9;

/// Items per batch at most (one buffer area each).
pub const MAX_ITEMS: u8 = 8;
/// Batches per input at most.
pub const MAX_BATCHES: u8 = 6;

// ---- memory layout (all above FREE_IOVA, which the simulator leaves to tests) -----------

/// Buffer area `k`: two adjacent read-write regions of 32 KiB, then 64 KiB unmapped.
pub fn area(k: usize) -> u64 {
    FREE_IOVA + 0x2_0000 * k as u64
}
/// Bytes of one half of an area.
pub const HALF: u64 = 0x8000;
/// Indirect table slot `k` (4 KiB each, read-write, unmapped after the last).
pub fn itable(k: usize) -> u64 {
    FREE_IOVA + 0x10_0000 + 0x1000 * k as u64
}
/// Bytes of one read-only or no-access sub-area: room for the largest piece a request moves
/// there (a 16-byte header plus 16 sectors in one descriptor), so items never overlap.
pub const SUB: u64 = 0x4000;
/// Device-read-only sub-area `k`.
pub fn ro(k: usize) -> u64 {
    FREE_IOVA + 0x20_0000 + SUB * k as u64
}
/// No-access sub-area `k`.
pub fn noacc(k: usize) -> u64 {
    FREE_IOVA + 0x30_0000 + SUB * k as u64
}
/// Unmapped memory.
pub const UNMAPPED: u64 = FREE_IOVA + 0x40_0000;
/// Every region this harness adds ends below this.
const LAYOUT_END: u64 = FREE_IOVA + 0x100_0000;

fn add_regions(dev: &SimDevice) -> Result<(), SimError> {
    for k in 0..usize::from(MAX_ITEMS) {
        dev.mem.add_region(area(k), HALF, PROT_RW)?;
        dev.mem.add_region(area(k) + HALF, HALF, PROT_RW)?;
    }
    dev.mem
        .add_region(itable(0), 0x1000 * u64::from(MAX_ITEMS), PROT_RW)?;
    dev.mem
        .add_region(ro(0), SUB * u64::from(MAX_ITEMS), PROT_RO)?;
    dev.mem
        .add_region(noacc(0), SUB * u64::from(MAX_ITEMS), PROT_NONE)?;
    Ok(())
}

/// A device configuration.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// Queue size.
    pub queue_size: u16,
    /// EVENT_IDX.
    pub event_idx: bool,
    /// Read-only backing.
    pub read_only: bool,
}

/// The configurations an input picks from.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        queue_size: 32,
        event_idx: false,
        read_only: false,
    },
    Variant {
        queue_size: 64,
        event_idx: true,
        read_only: false,
    },
    Variant {
        queue_size: 8,
        event_idx: true,
        read_only: true,
    },
];

// ---- the input --------------------------------------------------------------------------

/// Perturbations ("rarely" knobs) of a well-formed request.
pub mod pert {
    /// A request type the device does not know.
    pub const UNKNOWN_TYPE: u8 = 0;
    /// Sector (or first range) just past the capacity.
    pub const BEYOND: u8 = 1;
    /// Sector whose byte offset overflows u64.
    pub const OVERFLOW: u8 = 2;
    /// Data length not a multiple of 512 (GET_ID: short buffer; ranges: partial).
    pub const UNALIGNED: u8 = 3;
    /// Data in the wrong direction.
    pub const WRONG_DIR: u8 = 4;
    /// Header shorter than 16 bytes.
    pub const HDR_SHORT: u8 = 5;
    /// Header in a device-writable descriptor.
    pub const HDR_WRITABLE: u8 = 6;
    /// A device-readable descriptor after the status byte.
    pub const TRAILING_READABLE: u8 = 7;
    /// Status descriptor of length 0.
    pub const STATUS_EMPTY: u8 = 8;
    /// Status byte in device-read-only memory.
    pub const STATUS_RO: u8 = 9;
    /// Status byte unmapped.
    pub const STATUS_UNMAPPED: u8 = 10;
    /// Status byte in no-access memory.
    pub const STATUS_NOACC: u8 = 11;
    /// Data (or payload, or FLUSH's header) in device-read-only memory.
    pub const DATA_RO: u8 = 12;
    /// Data in no-access memory.
    pub const DATA_NOACC: u8 = 13;
    /// Data unmapped.
    pub const DATA_UNMAPPED: u8 = 14;
    /// Data running from mapped into unmapped memory.
    pub const DATA_CROSS_GAP: u8 = 15;
    /// Data running across two read-write regions (benign).
    pub const DATA_CROSS_RW: u8 = 16;
    /// Zero-length descriptors at unmapped IOVAs in both directions (benign).
    pub const ZERO_LEN: u8 = 17;
    /// Indirect table unmapped.
    pub const IND_UNMAPPED: u8 = 18;
    /// Range flags not allowed for the type.
    pub const DWZ_FLAGS: u8 = 19;
    /// A range of 0 or too many sectors.
    pub const DWZ_NUM: u8 = 20;
    /// More ranges than allowed.
    pub const DWZ_MANY: u8 = 21;
    /// GET_ID with a buffer longer than 20 bytes (benign).
    pub const BIG_ID: u8 = 22;
    /// Indirect table in no-access memory.
    pub const IND_NOACC: u8 = 23;
    /// How many there are.
    pub const COUNT: u8 = 24;
}

/// A request kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IN.
    Read,
    /// OUT.
    Write,
    /// FLUSH.
    Flush,
    /// GET_ID.
    GetId,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
}

const KINDS: [Kind; 6] = [
    Kind::Read,
    Kind::Write,
    Kind::Flush,
    Kind::GetId,
    Kind::Discard,
    Kind::WriteZeroes,
];

impl Kind {
    fn type_(self) -> u32 {
        match self {
            Kind::Read => T_IN,
            Kind::Write => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::GetId => T_GET_ID,
            Kind::Discard => T_DISCARD,
            Kind::WriteZeroes => T_WRITE_ZEROES,
        }
    }

    fn writes(self) -> bool {
        matches!(self, Kind::Write | Kind::Discard | Kind::WriteZeroes)
    }

    fn dwz(self) -> bool {
        matches!(self, Kind::Discard | Kind::WriteZeroes)
    }
}

/// A well-formed request and its knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReqSpec {
    /// `KINDS[i % 6]`.
    pub kind: u8,
    /// Sector (taken modulo what fits).
    pub sector: u16,
    /// Sectors of data, minus one (modulo 16).
    pub nsect: u8,
    /// 0: header alone then the payload; else split header + payload into pieces of this size.
    pub out_chunk: u16,
    /// 0: one data descriptor; else pieces of this size.
    pub in_chunk: u16,
    /// Status byte shares the last data descriptor.
    pub status_shared: bool,
    /// Posted through an indirect table.
    pub indirect: bool,
    /// DISCARD / WRITE_ZEROES ranges `(sector, sectors - 1, unmap)`, 1..=4 of them.
    pub ranges: Vec<(u16, u8, bool)>,
    /// Seed of the written data.
    pub seed: u8,
    /// `>= 0xe0`: perturbation `(p - 0xe0) % pert::COUNT`.
    pub perturb: u8,
    /// The perturbation's parameter.
    pub param: u16,
}

impl ReqSpec {
    /// The perturbation, if any.
    pub fn perturbation(&self) -> Option<u8> {
        (self.perturb >= 0xe0).then(|| (self.perturb - 0xe0) % pert::COUNT)
    }

    fn kind(&self) -> Kind {
        KINDS[usize::from(self.kind) % KINDS.len()]
    }
}

impl Wire for ReqSpec {
    fn decode(r: &mut Reader<'_>) -> Self {
        ReqSpec {
            kind: r.pick(6),
            sector: r.u16(),
            nsect: r.u8() % 16,
            out_chunk: r.u16(),
            in_chunk: r.u16(),
            status_shared: r.flag(),
            indirect: r.flag(),
            ranges: {
                let mut v = r.list(4, |r| (r.u16(), r.u8() % 8, r.flag()));
                if v.is_empty() {
                    v.push((0, 0, false));
                }
                v
            },
            seed: r.u8(),
            perturb: r.u8(),
            param: r.u16(),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(self.kind);
        w.u16(self.sector);
        w.u8(self.nsect);
        w.u16(self.out_chunk);
        w.u16(self.in_chunk);
        w.flag(self.status_shared);
        w.flag(self.indirect);
        w.list(&self.ranges, |w, &(s, n, u)| {
            w.u16(s);
            w.u8(n);
            w.flag(u);
        });
        w.u8(self.seed);
        w.u8(self.perturb);
        w.u16(self.param);
    }
}

/// Where a raw descriptor points (never into the rings or another item's buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawAddr {
    /// The item's own area, plus `off` (64 KiB: two regions; the end runs into unmapped).
    Own(u16),
    /// The item's read-only sub-area.
    Ro(u16),
    /// The item's no-access sub-area.
    NoAccess(u16),
    /// Unmapped memory.
    Unmapped(u16),
    /// `back` bytes before the end of the item's area.
    AreaEnd(u8),
    /// `back` bytes before the boundary between the area's two regions.
    Boundary(u8),
    /// The item's indirect table slot.
    Itable(u16),
    /// Any IOVA, moved out of the simulator's and this harness's regions.
    Raw(u64),
    /// `u64::MAX - back`.
    NearMax(u16),
}

impl RawAddr {
    /// The IOVA for item `k`.
    pub fn iova(self, k: usize) -> u64 {
        match self {
            RawAddr::Own(off) => area(k) + u64::from(off),
            RawAddr::Ro(off) => ro(k) + u64::from(off) % SUB,
            RawAddr::NoAccess(off) => noacc(k) + u64::from(off) % SUB,
            RawAddr::Unmapped(off) => UNMAPPED + u64::from(off),
            RawAddr::AreaEnd(back) => area(k) + 2 * HALF - u64::from(back),
            RawAddr::Boundary(back) => area(k) + HALF - u64::from(back),
            RawAddr::Itable(off) => itable(k) + u64::from(off) % 0x1000,
            RawAddr::Raw(a) => {
                if (vduse_blkd::sim::device::RING_BASE..LAYOUT_END).contains(&a) {
                    a | (1 << 62)
                } else {
                    a
                }
            }
            RawAddr::NearMax(back) => u64::MAX - u64::from(back),
        }
    }
}

impl Wire for RawAddr {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(9) {
            0 => RawAddr::Own(r.u16()),
            1 => RawAddr::Ro(r.u16()),
            2 => RawAddr::NoAccess(r.u16()),
            3 => RawAddr::Unmapped(r.u16()),
            4 => RawAddr::AreaEnd(r.u8()),
            5 => RawAddr::Boundary(r.u8()),
            6 => RawAddr::Itable(r.u16()),
            7 => RawAddr::Raw(r.u64()),
            _ => RawAddr::NearMax(r.u16()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            RawAddr::Own(o) => {
                w.u8(0);
                w.u16(o);
            }
            RawAddr::Ro(o) => {
                w.u8(1);
                w.u16(o);
            }
            RawAddr::NoAccess(o) => {
                w.u8(2);
                w.u16(o);
            }
            RawAddr::Unmapped(o) => {
                w.u8(3);
                w.u16(o);
            }
            RawAddr::AreaEnd(b) => {
                w.u8(4);
                w.u8(b);
            }
            RawAddr::Boundary(b) => {
                w.u8(5);
                w.u8(b);
            }
            RawAddr::Itable(o) => {
                w.u8(6);
                w.u16(o);
            }
            RawAddr::Raw(a) => {
                w.u8(7);
                w.u64(a);
            }
            RawAddr::NearMax(b) => {
                w.u8(8);
                w.u16(b);
            }
        }
    }
}

/// One raw descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer.
    pub addr: RawAddr,
    /// Length.
    pub len: Len,
    /// Flags (with `next: None`, NEXT is added to all but the last).
    pub flags: Flags,
    /// `None`: link to the following descriptor; `Some(n)`: exactly `flags` and `next = n`.
    pub next: Option<u16>,
}

impl Wire for RawDesc {
    fn decode(r: &mut Reader<'_>) -> Self {
        RawDesc {
            addr: RawAddr::decode(r),
            len: Len::decode(r),
            flags: Flags::decode(r),
            next: r.flag().then(|| r.u16()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        self.addr.encode(w);
        self.len.encode(w);
        self.flags.encode(w);
        w.flag(self.next.is_some());
        if let Some(n) = self.next {
            w.u16(n);
        }
    }
}

/// How a raw chain reaches the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawIndirect {
    /// Directly.
    Direct,
    /// Through a table in the item's indirect slot.
    Table,
    /// One indirect descriptor `{addr, len}` (the chain's descriptors are not written).
    Raw(RawAddr, u32),
}

/// A raw chain: descriptors and bytes in the item's own area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSpec {
    /// Descriptors (1..=12).
    pub descs: Vec<RawDesc>,
    /// Direct or indirect.
    pub indirect: RawIndirect,
    /// Bytes written at offsets of the item's area (headers, payloads).
    pub blobs: Vec<(u16, Content)>,
}

impl Wire for RawSpec {
    fn decode(r: &mut Reader<'_>) -> Self {
        let mut descs = r.list(12, RawDesc::decode);
        if descs.is_empty() {
            descs.push(RawDesc {
                addr: RawAddr::Own(0),
                len: Len::Fixed(0),
                flags: Flags::Combo(0),
                next: None,
            });
        }
        let indirect = match r.pick(3) {
            0 => RawIndirect::Direct,
            1 => RawIndirect::Table,
            _ => RawIndirect::Raw(RawAddr::decode(r), r.u32()),
        };
        RawSpec {
            descs,
            indirect,
            blobs: r.list(3, |r| (r.u16(), Content::decode(r))),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.list(&self.descs, |w, d| d.encode(w));
        match self.indirect {
            RawIndirect::Direct => w.u8(0),
            RawIndirect::Table => w.u8(1),
            RawIndirect::Raw(a, l) => {
                w.u8(2);
                a.encode(w);
                w.u32(l);
            }
        }
        w.list(&self.blobs, |w, (o, c)| {
            w.u16(*o);
            c.encode(w);
        });
    }
}

/// One chain of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemSpec {
    /// A well-formed (or perturbed) request.
    Req(ReqSpec),
    /// A raw chain.
    Raw(RawSpec),
}

impl Wire for ItemSpec {
    fn decode(r: &mut Reader<'_>) -> Self {
        // Three in four are requests.
        if r.pick(4) < 3 {
            ItemSpec::Req(ReqSpec::decode(r))
        } else {
            ItemSpec::Raw(RawSpec::decode(r))
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            ItemSpec::Req(s) => {
                w.u8(0);
                s.encode(w);
            }
            ItemSpec::Raw(s) => {
                w.u8(3);
                s.encode(w);
            }
        }
    }
}

/// A deliberate ring corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// None (most batches).
    None,
    /// An avail entry naming a head `>= size`.
    HeadOutOfRange(u16),
    /// The avail index moves by more than the queue size.
    AvailJump(u16),
    /// The avail index moves backwards.
    AvailBack(u8),
    /// The first item's head posted twice (only when it is a read or write still in flight).
    DupHead,
}

impl Wire for Edit {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.u8() {
            0..=0xef => Edit::None,
            0xf0..=0xf3 => Edit::HeadOutOfRange(r.u16()),
            0xf4..=0xf7 => Edit::AvailJump(r.u16()),
            0xf8..=0xfb => Edit::AvailBack(r.u8()),
            _ => Edit::DupHead,
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Edit::None => w.u8(0),
            Edit::HeadOutOfRange(h) => {
                w.u8(0xf0);
                w.u16(h);
            }
            Edit::AvailJump(j) => {
                w.u8(0xf4);
                w.u16(j);
            }
            Edit::AvailBack(b) => {
                w.u8(0xf8);
                w.u8(b);
            }
            Edit::DupHead => w.u8(0xfc),
        }
    }
}

/// Chains published together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The chains.
    pub items: Vec<ItemSpec>,
    /// Kick only when the device asks (`publish_and_notify`) instead of always.
    pub polite: bool,
    /// A ring corruption, applied before publishing.
    pub edit: Edit,
}

impl Wire for Batch {
    fn decode(r: &mut Reader<'_>) -> Self {
        Batch {
            items: r.list(MAX_ITEMS, ItemSpec::decode),
            polite: r.flag(),
            edit: Edit::decode(r),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.list(&self.items, |w, i| i.encode(w));
        w.flag(self.polite);
        self.edit.encode(w);
    }
}

/// One input of target `queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInput {
    /// `VARIANTS[i % 3]`.
    pub variant: u8,
    /// Sector of the closing write + read check.
    pub check_sector: u16,
    /// The batches.
    pub batches: Vec<Batch>,
}

impl Wire for QueueInput {
    fn decode(r: &mut Reader<'_>) -> Self {
        QueueInput {
            variant: r.pick(VARIANTS.len() as u8),
            check_sector: r.u16(),
            batches: r.list(MAX_BATCHES, Batch::decode),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(self.variant);
        w.u16(self.check_sector);
        w.list(&self.batches, |w, b| b.encode(w));
    }
}

// ---- building chains --------------------------------------------------------------------

/// What the driver must see for one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Status OK and this used length.
    Ok(u32),
    /// This status, used length 1.
    Status(u8),
    /// IOERR or UNSUPP, used length 1 (which one depends on the order of checks).
    Fail,
    /// Used length 0, status byte untouched.
    NoStatus,
    /// A raw chain: judged from the model's walk at publish time.
    Raw,
}

/// A chain to post, with what is known about it.
struct Built {
    chain: Chain,
    expect: Expect,
    /// Bytes of the backing file the request may change, if it is write-type.
    touches: Vec<(u64, u64)>,
    /// Read: `(offset, len)` to compare the returned data with the file.
    read: Option<(u64, u64)>,
    /// Write: `(offset, data)` the file must hold afterwards.
    wrote: Option<(u64, Vec<u8>)>,
    /// WRITE_ZEROES ranges that must read as zeros afterwards.
    zeroed: Vec<(u64, u64)>,
    get_id: bool,
    /// A read or write that is in flight when its duplicate arrives.
    async_io: bool,
}

/// One descriptor being laid out: where, how long, device-writable, what to put there.
struct Piece {
    addr: u64,
    len: u32,
    write: bool,
    bytes: Option<Vec<u8>>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SimRng::new(seed).fill(&mut v);
    v
}

/// Bump allocation inside an area, 16-byte aligned.
struct Bump(u64);
impl Bump {
    fn take(&mut self, len: u64) -> u64 {
        let a = self.0;
        self.0 += len.max(1).div_ceil(16) * 16;
        a
    }
}

fn chunks(total: usize, chunk: u16) -> usize {
    // At most 48 pieces per direction: stays within the smallest queue's indirect table and
    // keeps the descriptor count bounded.
    usize::from(chunk).max(total.div_ceil(48)).max(1)
}

fn build_req(spec: &ReqSpec, k: usize, var: Variant, serial_len: usize) -> (Vec<Piece>, Built) {
    let kind = spec.kind();
    let p = spec.perturbation();
    let param = u64::from(spec.param);
    let nsect = u64::from(spec.nsect) + 1;
    let mut sector = u64::from(spec.sector) % (CAP_SECTORS - 16);
    let mut len = nsect * 512;
    let mut ty = kind.type_();
    let mut in_len: u64 = match kind {
        Kind::Read => len,
        Kind::GetId => serial_len as u64,
        _ => 0,
    };
    // DISCARD / WRITE_ZEROES ranges.
    let mut ranges: Vec<DwzSeg> = spec
        .ranges
        .iter()
        .map(|&(s, n, u)| DwzSeg {
            sector: u64::from(s) % (CAP_SECTORS - 8),
            num_sectors: u32::from(n) + 1,
            flags: if kind == Kind::WriteZeroes && u {
                WZ_FLAG_UNMAP
            } else {
                0
            },
        })
        .collect();
    let normal = match kind {
        Kind::Read => Expect::Ok(len as u32 + 1),
        Kind::GetId => Expect::Ok(VIRTIO_BLK_ID_BYTES as u32 + 1),
        _ => Expect::Ok(1),
    };
    let mut expect = normal;
    let mut dwz_trunc = 0usize;
    match p {
        Some(pert::UNKNOWN_TYPE) => {
            ty = 14 + u32::from(spec.param);
            expect = Expect::Status(S_UNSUPP);
        }
        Some(pert::BEYOND) => match kind {
            Kind::Read | Kind::Write => {
                sector = CAP_SECTORS - nsect + 1 + param % 64;
                expect = Expect::Status(S_IOERR);
            }
            Kind::Discard | Kind::WriteZeroes => {
                ranges[0].sector = CAP_SECTORS - u64::from(ranges[0].num_sectors) + 1 + param % 64;
                expect = Expect::Status(S_IOERR);
            }
            _ => {}
        },
        Some(pert::OVERFLOW) => match kind {
            Kind::Read | Kind::Write => {
                sector = u64::MAX - param;
                expect = Expect::Status(S_IOERR);
            }
            Kind::Discard | Kind::WriteZeroes => {
                ranges[0].sector = u64::MAX - param;
                expect = Expect::Status(S_IOERR);
            }
            _ => {}
        },
        Some(pert::UNALIGNED) => {
            match kind {
                Kind::Read => {
                    len += 1 + param % 511;
                    in_len = len;
                }
                Kind::Write => len += 1 + param % 511,
                Kind::GetId => in_len = param % 20,
                Kind::Discard | Kind::WriteZeroes => dwz_trunc = 1 + (param % 15) as usize,
                Kind::Flush => {}
            }
            if kind != Kind::Flush {
                expect = Expect::Status(S_IOERR);
            }
        }
        Some(pert::WRONG_DIR) | Some(pert::HDR_SHORT) | Some(pert::HDR_WRITABLE) => {
            expect = Expect::Status(S_IOERR);
        }
        Some(pert::TRAILING_READABLE)
        | Some(pert::STATUS_EMPTY)
        | Some(pert::STATUS_RO)
        | Some(pert::STATUS_UNMAPPED)
        | Some(pert::STATUS_NOACC)
        | Some(pert::IND_UNMAPPED)
        | Some(pert::IND_NOACC) => expect = Expect::NoStatus,
        Some(pert::DATA_RO) => {
            if matches!(kind, Kind::Read | Kind::GetId) {
                expect = Expect::Status(S_IOERR);
            }
        }
        Some(pert::DATA_NOACC) | Some(pert::DATA_UNMAPPED) | Some(pert::DATA_CROSS_GAP) => {
            expect = Expect::Status(S_IOERR);
        }
        Some(pert::DWZ_FLAGS) if kind.dwz() => {
            ranges[0].flags = if kind == Kind::Discard {
                WZ_FLAG_UNMAP
            } else {
                2 << (param % 31)
            };
            expect = Expect::Status(S_UNSUPP);
        }
        Some(pert::DWZ_NUM) if kind.dwz() => {
            ranges[0].num_sectors = if param % 2 == 0 {
                0
            } else {
                MAX_DWZ_SECTORS + 1
            };
            expect = Expect::Status(S_IOERR);
        }
        Some(pert::DWZ_MANY) if kind.dwz() => {
            while ranges.len() < 17 {
                ranges.push(ranges[0]);
            }
            expect = Expect::Status(S_IOERR);
        }
        Some(pert::BIG_ID) if kind == Kind::GetId => in_len = 20 + param % 4096,
        _ => {}
    }
    // A device that refuses writes answers IOERR first for write-type requests (of a known
    // type); the order against other refusals is the parser's business.
    if var.read_only && kind.writes() && p != Some(pert::UNKNOWN_TYPE) {
        expect = match expect {
            Expect::Ok(_) | Expect::Status(S_IOERR) => Expect::Status(S_IOERR),
            Expect::Status(_) => Expect::Fail,
            e => e,
        };
    }
    let offset = sector.wrapping_mul(512);

    // Content.
    let out: Vec<u8> = match kind {
        Kind::Write => pattern(u64::from(spec.seed) << 32 | sector, len as usize),
        Kind::Discard | Kind::WriteZeroes => {
            let mut b = DwzSeg::payload(&ranges);
            b.truncate(b.len() - dwz_trunc);
            b
        }
        _ => Vec::new(),
    };

    // Layout: header + out pieces, in pieces, status.
    let mut bump = Bump(area(k));
    let mut pieces: Vec<Piece> = Vec::new();
    let hdr = header(ty, sector);
    let readable_piece = |bump: &mut Bump, bytes: Vec<u8>| Piece {
        addr: bump.take(bytes.len() as u64),
        len: bytes.len() as u32,
        write: false,
        bytes: Some(bytes),
    };
    if spec.out_chunk == 0 || out.is_empty() {
        pieces.push(readable_piece(&mut bump, hdr.to_vec()));
        if !out.is_empty() {
            pieces.push(readable_piece(&mut bump, out.clone()));
        }
    } else {
        let mut all = hdr.to_vec();
        all.extend_from_slice(&out);
        let c = chunks(all.len(), spec.out_chunk);
        for piece in all.chunks(c) {
            pieces.push(readable_piece(&mut bump, piece.to_vec()));
        }
    }
    let n_readable = pieces.len();
    // Perturbations that move the status byte or the data keep them in separate descriptors.
    let shared = spec.status_shared
        && in_len > 0
        && !matches!(
            p,
            Some(
                pert::STATUS_EMPTY
                    | pert::STATUS_RO
                    | pert::STATUS_UNMAPPED
                    | pert::STATUS_NOACC
                    | pert::DATA_RO
                    | pert::DATA_NOACC
                    | pert::DATA_UNMAPPED
                    | pert::DATA_CROSS_GAP
                    | pert::DATA_CROSS_RW
            )
        );
    if in_len > 0 {
        let c = if spec.in_chunk == 0 {
            in_len as usize
        } else {
            chunks(in_len as usize, spec.in_chunk)
        };
        let mut left = in_len as usize;
        while left > 0 {
            let take = left.min(c);
            left -= take;
            let l = take + usize::from(shared && left == 0);
            pieces.push(Piece {
                addr: bump.take(l as u64),
                len: l as u32,
                write: true,
                bytes: None,
            });
        }
    }
    if !shared {
        pieces.push(Piece {
            addr: bump.take(1),
            len: 1,
            write: true,
            bytes: None,
        });
    }
    // The piece holding the data (or payload; FLUSH: the header).
    let data_piece = match kind {
        Kind::Read | Kind::GetId => n_readable,
        Kind::Flush => 0,
        _ => n_readable - 1,
    };
    let last = pieces.len() - 1;
    match p {
        Some(pert::WRONG_DIR) => match kind {
            Kind::Read | Kind::GetId => {
                let bytes = vec![0x5a; if kind == Kind::GetId { 16 } else { 512 }];
                let pc = readable_piece(&mut bump, bytes);
                pieces.insert(n_readable, pc);
            }
            _ => {
                let at = bump.take(512);
                pieces.insert(
                    last,
                    Piece {
                        addr: at,
                        len: 512,
                        write: true,
                        bytes: None,
                    },
                );
            }
        },
        Some(pert::HDR_SHORT) if matches!(kind, Kind::Read | Kind::Flush | Kind::GetId) => {
            let l = (param % 16) as usize;
            pieces[0].len = l as u32;
            pieces[0].bytes.as_mut().expect("header bytes").truncate(l);
        }
        Some(pert::HDR_SHORT) | Some(pert::HDR_WRITABLE) => pieces[0].write = true,
        Some(pert::TRAILING_READABLE) => {
            let pc = readable_piece(&mut bump, vec![0u8; 16]);
            pieces.push(pc);
        }
        Some(pert::STATUS_EMPTY) => pieces[last].len = 0,
        Some(pert::STATUS_RO) => pieces[last].addr = ro(k) + SUB - 1,
        Some(pert::STATUS_UNMAPPED) => pieces[last].addr = UNMAPPED + param,
        Some(pert::STATUS_NOACC) => pieces[last].addr = noacc(k) + param % SUB,
        Some(pert::DATA_RO) => pieces[data_piece].addr = ro(k),
        Some(pert::DATA_NOACC) => pieces[data_piece].addr = noacc(k),
        Some(pert::DATA_UNMAPPED) => pieces[data_piece].addr = UNMAPPED + param,
        Some(pert::DATA_CROSS_GAP) => {
            let l = u64::from(pieces[data_piece].len);
            // Half in, half out (a one-byte piece lands just past the end).
            pieces[data_piece].addr = area(k) + 2 * HALF - l / 2;
        }
        Some(pert::DATA_CROSS_RW) => {
            let l = u64::from(pieces[data_piece].len);
            pieces[data_piece].addr = area(k) + HALF - (l / 2).min(param % 4096).max(1);
        }
        Some(pert::ZERO_LEN) => {
            let z = |write| Piece {
                addr: UNMAPPED + param,
                len: 0,
                write,
                bytes: None,
            };
            pieces.insert(last, z(true));
            pieces.insert(1, z(false));
        }
        _ => {}
    }
    let descs: Vec<Desc> = pieces
        .iter()
        .map(|pc| {
            if pc.write {
                Desc::writable(pc.addr, pc.len)
            } else {
                Desc::readable(pc.addr, pc.len)
            }
        })
        .collect();
    let indirect = match p {
        Some(pert::IND_UNMAPPED) => Indirect::Raw {
            addr: UNMAPPED + param,
            len: 16 * descs.len() as u32,
        },
        Some(pert::IND_NOACC) => Indirect::Raw {
            addr: noacc(k),
            len: 16 * descs.len() as u32,
        },
        _ if spec.indirect || descs.len() > usize::from(var.queue_size) => {
            Indirect::TableAt(itable(k))
        }
        _ => Indirect::Direct,
    };
    // A request that must succeed is benign whatever its perturbation: its data can be checked.
    let ok = matches!(expect, Expect::Ok(_));
    let mut touches = Vec::new();
    if kind.writes() && p != Some(pert::UNKNOWN_TYPE) {
        match kind {
            Kind::Write => touches.push((offset, len)),
            _ => {
                for r in &ranges {
                    touches.push((r.sector.wrapping_mul(512), u64::from(r.num_sectors) * 512))
                }
            }
        }
    }
    let built = Built {
        chain: Chain {
            descs,
            indirect,
            allocs: Vec::new(),
            tag: k as u64,
        },
        expect,
        touches,
        read: (ok && kind == Kind::Read).then_some((offset, len)),
        wrote: (ok && kind == Kind::Write).then(|| (offset, out.clone())),
        zeroed: if ok && kind == Kind::WriteZeroes {
            ranges
                .iter()
                .map(|r| (r.sector * 512, u64::from(r.num_sectors) * 512))
                .collect()
        } else {
            Vec::new()
        },
        get_id: ok && kind == Kind::GetId,
        async_io: p.is_none() && (kind == Kind::Read || (kind == Kind::Write && !var.read_only)),
    };
    (pieces, built)
}

fn build_raw(spec: &RawSpec, k: usize) -> (Vec<(u64, Vec<u8>)>, Built) {
    let descs: Vec<Desc> = spec
        .descs
        .iter()
        .map(|d| Desc {
            // The device never writes a descriptor table, so the model's walk at publish time
            // stays exact: a device-writable buffer aimed at the table slot moves to the area.
            addr: match d.addr {
                RawAddr::Itable(off) if d.flags.get() & crate::model::F_WRITE != 0 => {
                    RawAddr::Own(off).iova(k)
                }
                a => a.iova(k),
            },
            len: d.len.get(),
            flags: d.flags.get(),
            next: d.next,
        })
        .collect();
    let indirect = match spec.indirect {
        RawIndirect::Direct => Indirect::Direct,
        RawIndirect::Table => Indirect::TableAt(itable(k)),
        RawIndirect::Raw(a, len) => Indirect::Raw {
            addr: a.iova(k),
            len,
        },
    };
    let writes = spec
        .blobs
        .iter()
        .map(|(off, c)| (area(k) + u64::from(*off), c.bytes(CAPACITY)))
        .collect();
    (
        writes,
        Built {
            chain: Chain {
                descs,
                indirect,
                allocs: Vec::new(),
                tag: k as u64,
            },
            expect: Expect::Raw,
            touches: vec![(0, CAPACITY)],
            read: None,
            wrote: None,
            zeroed: Vec::new(),
            get_id: false,
            async_io: false,
        },
    )
}

// ---- the harness ------------------------------------------------------------------------

struct Dev {
    dev: SimDevice,
    var: Variant,
    regions: Regions,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    zeros: Vec<u8>,
}

impl Dev {
    fn new(var: Variant) -> Self {
        let mut cfg = SimDeviceConfig::new(CAPACITY);
        cfg.queue_size = var.queue_size;
        cfg.event_idx = var.event_idx;
        cfg.read_only = var.read_only;
        cfg.heap_len = 0x1_0000;
        cfg.fill_seed = Some(0xf022);
        if Path::new("/dev/shm").is_dir() {
            cfg.dir = Some("/dev/shm".into());
        }
        let serial = cfg.serial;
        let dev = SimDevice::new(cfg).expect("simulated device");
        add_regions(&dev).expect("fuzz regions");
        let regions = Regions::of(&dev.mem);
        Dev {
            dev,
            var,
            regions,
            serial,
            zeros: vec![0u8; (2 * HALF) as usize],
        }
    }

    fn q(&mut self) -> &mut SimQueue {
        &mut self.dev.queues[0]
    }

    /// The driver's view of the ring and the worker's last log lines, after a hang; then one
    /// more kick, to tell a lost wake-up from a stuck worker.
    fn diagnose(&mut self) -> String {
        let gone = self.dev.worker_gone(0);
        let q = &mut self.dev.queues[0];
        let mut s = format!(
            "worker gone: {gone}; driver: avail_idx {} last_used {} in_flight {} free {}; \
             ring: used_idx {:?} used_flags {:?} avail_event {:?}; kicks (sent, suppressed) \
             {:?}; interrupts {}\n",
            q.avail_idx(),
            q.last_used(),
            q.in_flight(),
            q.free_descs(),
            q.used_idx(),
            q.used_flags(),
            q.avail_event(),
            q.kick_counts(),
            q.irq().count(),
        );
        s += "worker log (last lines):\n";
        s += &crate::logring::dump();
        let _ = q.kick();
        std::thread::sleep(Duration::from_secs(1));
        s += &format!(
            "after one more kick and 1 s: worker gone {}, used_idx {:?}\n",
            self.dev.worker_gone(0),
            self.dev.queues[0].used_idx()
        );
        s
    }

    /// Replace a broken worker: fresh rings and driver state, a new worker at index 0.
    fn restart(&mut self) {
        let old = &self.dev.queues[0];
        let fresh = SimQueue::new(
            self.dev.mem.clone(),
            0,
            old.size(),
            old.layout(),
            self.var.event_idx,
        )
        .expect("fresh queue");
        self.dev.queues[0] = fresh;
        self.dev.start(0, 0, 0).expect("restart worker");
    }
}

thread_local! {
    static DEVS: RefCell<Vec<Option<Dev>>> = RefCell::new((0..VARIANTS.len()).map(|_| None).collect());
}

/// Decode `data` and run it.
pub fn fuzz(data: &[u8]) {
    run(&QueueInput::from_bytes(data));
}

/// Run one input and check every invariant (panics on a violation).
pub fn run(input: &QueueInput) {
    crate::logring::install();
    let v = usize::from(input.variant) % VARIANTS.len();
    DEVS.with(|d| {
        let mut devs = d.borrow_mut();
        let dev = devs[v].get_or_insert_with(|| Dev::new(VARIANTS[v]));
        for b in &input.batches {
            run_batch(dev, b);
        }
        check_serves(dev, input.check_sector);
    });
}

fn wait_used(d: &mut Dev, n: usize, what: &str) -> Vec<Completion> {
    match d.q().wait_used(n, DEADLINE) {
        Ok(v) => v,
        Err(e) => {
            let state = d.diagnose();
            panic!("hang: {what}: {n} used entries not seen within {DEADLINE:?}: {e}\n{state}")
        }
    }
}

fn assert_tracked(done: &[Completion]) {
    for c in done {
        assert!(
            c.tracked,
            "used entry for a head not in flight: head {} len {}",
            c.head, c.len
        );
    }
}

struct Posted {
    head: u16,
    /// The item's buffer area.
    k: usize,
    built: Built,
    /// The model's walk (raw chains).
    walk: Option<Walk>,
    /// The item shares device-writable bytes with another item of the batch (a raw chain's
    /// `next` reached into the other's descriptors): its status byte and data may be
    /// overwritten, and it may read bytes changed under it, so only what depends on the
    /// chain's structure alone is checked.
    clobbered: bool,
}

fn run_batch(d: &mut Dev, batch: &Batch) {
    let size = d.var.queue_size;
    let table = d.q().layout().desc;
    let published_before = d.q().avail_idx();
    let mut posted: Vec<Posted> = Vec::new();
    let mut raw = false;
    for (k, item) in batch.items.iter().enumerate() {
        // Deterministic memory: the item's area, table slot and sub-areas start zeroed.
        for (base, len) in [(area(k), 2 * HALF), (itable(k), 0x1000), (ro(k), SUB)] {
            d.dev
                .mem
                .write(base, &d.zeros[..len as usize])
                .expect("zero area");
        }
        let built = match item {
            ItemSpec::Req(spec) => {
                let (pieces, built) = build_req(spec, k, d.var, VIRTIO_BLK_ID_BYTES);
                for pc in &pieces {
                    let res = match &pc.bytes {
                        Some(b) => d.dev.mem.write(pc.addr, b),
                        None => d.dev.mem.fill(pc.addr, pc.len as usize, POISON),
                    };
                    // Pieces placed in unmapped memory on purpose stay unwritten.
                    let _ = res;
                }
                built
            }
            ItemSpec::Raw(spec) => {
                raw = true;
                let (writes, built) = build_raw(spec, k);
                for (a, b) in writes {
                    let _ = d.dev.mem.write(a, &b);
                }
                built
            }
        };
        let mut built = built;
        let q = d.q();
        if built.chain.indirect == Indirect::Direct && q.free_descs() < built.chain.descs.len() {
            // Not enough descriptors left: through the item's indirect table instead.
            built.chain.indirect = Indirect::TableAt(itable(k));
        }
        if q.free_descs() == 0 {
            continue;
        }
        let added = if built.expect == Expect::Raw {
            post_raw(q, &built.chain)
        } else {
            q.add(built.chain.clone())
        };
        match added {
            Ok(head) => posted.push(Posted {
                head,
                k,
                built,
                walk: None,
                clobbered: false,
            }),
            // A table that cannot be written (an unmapped TableAt) or no descriptors left.
            Err(_) => continue,
        }
    }

    // Deliberate corruption.
    let mut corrupt = false;
    let mut publish_raw: Option<u16> = None;
    match batch.edit {
        Edit::None => {}
        Edit::HeadOutOfRange(h) => {
            let head = size + h % (u16::MAX - size);
            d.q().add_head(head, None).expect("avail entry");
            corrupt = true;
        }
        Edit::AvailJump(j) => {
            let to = d.q().avail_idx().wrapping_add(size + 1 + j % 1000);
            publish_raw = Some(to);
            corrupt = true;
        }
        Edit::AvailBack(b) => {
            publish_raw = Some(published_before.wrapping_sub(1 + u16::from(b % 100)));
            corrupt = true;
        }
        Edit::DupHead => {
            if let Some(first) = posted.first().filter(|p| p.built.async_io) {
                let head = first.head;
                d.q().add_head(head, None).expect("avail entry");
                corrupt = true;
            }
        }
    }

    // The model's verdict on every raw chain, with every descriptor in place.
    for p in posted.iter_mut() {
        if p.built.expect == Expect::Raw {
            let w = model::walk(&d.dev.mem, &d.regions, table, size, p.head);
            if matches!(w, Walk::Corrupt(_)) {
                corrupt = true;
            }
            p.walk = Some(w);
        }
    }

    // Which items a raw chain's device-writable buffers reach.
    for i in 0..posted.len() {
        let Some(Walk::Ok(segs)) = &posted[i].walk else {
            continue;
        };
        let hits: Vec<usize> = posted
            .iter()
            .enumerate()
            .filter(|&(j, q)| {
                let own = (u128::from(area(q.k)), u128::from(area(q.k) + 2 * HALF));
                j != i
                    && segs.iter().any(|s| {
                        let (a, e) = (u128::from(s.addr), u128::from(s.addr) + u128::from(s.len));
                        s.write && a < own.1 && own.0 < e
                    })
            })
            .map(|(j, _)| j)
            .collect();
        // Both sides share bytes: the other item's writes can land on this chain's status
        // byte (and the other way round).
        if !hits.is_empty() {
            posted[i].clobbered = true;
        }
        for j in hits {
            posted[j].clobbered = true;
        }
    }

    let q = d.q();
    match publish_raw {
        Some(idx) => {
            q.set_avail_idx_raw(idx).expect("avail idx");
            q.kick().expect("kick");
        }
        None if batch.polite => {
            q.publish_and_notify().expect("publish");
        }
        None => {
            q.publish().expect("publish");
            q.kick().expect("kick");
        }
    }

    if corrupt {
        let exit = match d.dev.wait_exit(0, DEADLINE) {
            Ok(r) => r,
            Err(e) => {
                let walks: Vec<_> = posted.iter().map(|p| (p.head, &p.walk)).collect();
                let state = d.diagnose();
                panic!(
                    "hang: the ring was corrupted but the worker did not stop within \
                     {DEADLINE:?}: {e}\nbatch: {batch:?}\nmodel: {walks:?}\n{state}"
                )
            }
        };
        match exit {
            Err(WorkerError::Broken { .. }) => {}
            Err(e) => panic!("corrupt ring: worker failed with {e:?}, expected Broken"),
            Ok(x) => panic!("corrupt ring: worker exited cleanly ({x:?}), expected Broken"),
        }
        let late = d.q().reap().expect("reap");
        assert_tracked(&late);
        d.restart();
        count(|c| c.restarts += 1);
        return;
    }

    let n = posted.len();
    let done = wait_used(d, n, "batch");
    assert_tracked(&done);
    assert!(
        !d.dev.worker_gone(0),
        "worker ended on a batch that does not corrupt the ring: {batch:?}"
    );
    for c in &done {
        let p = posted
            .iter()
            .find(|p| u32::from(p.head) == c.head)
            .expect("tracked heads were posted in this batch");
        check_completion(d, p, c);
    }
    if !raw {
        check_data(d, &posted, &done);
    }
}

thread_local! {
    static COUNTS: RefCell<Counts> = RefCell::new(Counts::default());
}

/// What this thread's harness has checked so far (for tests of the harness itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Completions checked against an expectation.
    pub completions: u64,
    /// Workers seen ending `Broken` and restarted.
    pub restarts: u64,
    /// Requests whose data was compared with the backing file.
    pub data_checks: u64,
}

/// The counts so far.
pub fn counts() -> Counts {
    COUNTS.with(|c| *c.borrow())
}

fn count(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| f(&mut c.borrow_mut()));
}

fn check_completion(d: &Dev, p: &Posted, c: &Completion) {
    count(|c| c.completions += 1);
    let ctx = || {
        format!(
            "head {} {:?}: used len {}, status {:?}, {} data bytes",
            p.head,
            p.built.chain,
            c.len,
            c.status,
            c.data.len()
        )
    };
    if p.clobbered && p.built.expect != Expect::Raw {
        return;
    }
    match p.built.expect {
        Expect::Ok(len) => {
            assert_eq!((c.status, c.len), (Some(S_OK), len), "{}", ctx());
        }
        Expect::Status(s) => assert_eq!((c.status, c.len), (Some(s), 1), "{}", ctx()),
        Expect::Fail => {
            assert!(
                matches!(c.status, Some(S_IOERR | S_UNSUPP)) && c.len == 1,
                "{}",
                ctx()
            )
        }
        Expect::NoStatus => {
            assert_eq!(c.len, 0, "used length without a status byte: {}", ctx());
            assert!(
                c.status.is_none() || c.status == Some(POISON),
                "status byte written: {}",
                ctx()
            );
        }
        Expect::Raw => match p.walk.as_ref().expect("raw chains are walked") {
            Walk::Corrupt(_) => unreachable!("corrupt batches end early"),
            Walk::Unanswerable => assert_eq!(c.len, 0, "unreadable indirect table: {}", ctx()),
            Walk::Ok(segs) => {
                let status = model::status_addr(segs).filter(|&a| d.regions.writable(a, 1));
                match status {
                    None => assert_eq!(c.len, 0, "no writable status byte: {}", ctx()),
                    Some(a) => {
                        assert!(c.len >= 1, "writable status byte, used len 0: {}", ctx());
                        assert!(
                            u64::from(c.len) <= model::writable_len(segs),
                            "used len past the writable bytes: {}",
                            ctx()
                        );
                        let b = d.dev.mem.read_vec(a, 1).expect("status byte")[0];
                        assert!(p.clobbered || b <= S_UNSUPP, "status byte {b}: {}", ctx());
                    }
                }
            }
        },
    }
}

/// Post a raw chain through the queue's raw accessors (`SimQueue::add` computes the driver's
/// status address with unchecked arithmetic, which a descriptor ending past `u64::MAX`
/// overflows). Not published.
fn post_raw(q: &mut SimQueue, chain: &Chain) -> Result<u16, SimError> {
    use vduse_blkd::sim::queue::{DESC_F_INDIRECT, DESC_F_NEXT};
    let n = chain.descs.len();
    let link = |i: usize, d: &Desc, idx: &dyn Fn(usize) -> u16| match d.next {
        Some(next) => (d.flags, next),
        None if i + 1 < n => (d.flags | DESC_F_NEXT, idx(i + 1)),
        None => (d.flags, 0),
    };
    let descs = match chain.indirect {
        Indirect::Direct => {
            let descs = q.alloc_descs(n)?;
            for (i, d) in chain.descs.iter().enumerate() {
                let (flags, next) = link(i, d, &|j| descs[j]);
                q.write_desc(descs[i], d.addr, d.len, flags, next)?;
            }
            descs
        }
        Indirect::TableAt(table) | Indirect::Raw { addr: table, .. } => {
            let len = match chain.indirect {
                Indirect::Raw { len, .. } => len,
                _ => {
                    let mut raw = Vec::with_capacity(16 * n);
                    for (i, d) in chain.descs.iter().enumerate() {
                        let (flags, next) = link(i, d, &|j| j as u16);
                        raw.extend_from_slice(&Desc::encode(d.addr, d.len, flags, next));
                    }
                    q.mem().write(table, &raw)?;
                    raw.len() as u32
                }
            };
            let descs = q.alloc_descs(1)?;
            q.write_desc(descs[0], table, len, DESC_F_INDIRECT, 0)?;
            descs
        }
        Indirect::Table => return Err(SimError::Unexpected("heap tables unused".into())),
    };
    let head = descs[0];
    let posted = vduse_blkd::sim::Posted {
        descs,
        ..Default::default()
    };
    q.add_head(head, Some(posted))?;
    Ok(head)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

fn check_data(d: &Dev, posted: &[Posted], done: &[Completion]) {
    // Ranges touched by more than the one request being checked are left alone.
    let touched_by_others = |me: usize, r: (u64, u64)| {
        posted
            .iter()
            .enumerate()
            .any(|(i, p)| i != me && p.built.touches.iter().any(|&t| overlaps(t, r)))
    };
    for (i, p) in posted.iter().enumerate() {
        let c = done
            .iter()
            .find(|c| c.head == u32::from(p.head))
            .expect("every head completed");
        if let Some((off, len)) = p.built.read {
            if !touched_by_others(i, (off, len)) {
                let want = d.dev.backing_read(off, len as usize).expect("backing");
                assert!(c.data == want, "read at {off}+{len} returned other data");
                count(|c| c.data_checks += 1);
            }
        }
        if let Some((off, data)) = &p.built.wrote {
            if !touched_by_others(i, (*off, data.len() as u64)) {
                let have = d.dev.backing_read(*off, data.len()).expect("backing");
                assert!(
                    &have == data,
                    "write at {off}+{} not in the file",
                    data.len()
                );
            }
        }
        for &(off, len) in &p.built.zeroed {
            if !touched_by_others(i, (off, len))
                && p.built
                    .zeroed
                    .iter()
                    .filter(|&&z| overlaps(z, (off, len)))
                    .count()
                    == 1
            {
                let have = d.dev.backing_read(off, len as usize).expect("backing");
                assert!(
                    have.iter().all(|&b| b == 0),
                    "zeroed range {off}+{len} not zero"
                );
            }
        }
        if p.built.get_id {
            assert_eq!(&c.data[..VIRTIO_BLK_ID_BYTES], &d.serial[..], "GET_ID data");
        }
    }
}

/// The worker still serves: a write of a fresh pattern (IOERR on a read-only device) and a
/// read of it, checked against the file.
fn check_serves(d: &mut Dev, sector: u16) {
    let sector = u64::from(sector) % (CAP_SECTORS - 8);
    let data = pattern(0xc0ffee ^ sector, 4096);
    let ro = d.var.read_only;
    let w = vduse_blkd::sim::BlkRequest::write(sector, &data);
    let w = chain_at(&d.dev.mem, &w, 0);
    let c = d.dev.queues[0]
        .run(w, DEADLINE)
        .unwrap_or_else(|e| panic!("hang: follow-up write: {e}"));
    assert!(c.tracked, "follow-up write: {c:?}");
    let want = if ro { S_IOERR } else { S_OK };
    assert_eq!((c.status, c.len), (Some(want), 1), "follow-up write");
    let r = vduse_blkd::sim::BlkRequest::read(sector, 4096);
    let r = chain_at(&d.dev.mem, &r, 0);
    let c = d.dev.queues[0]
        .run(r, DEADLINE)
        .unwrap_or_else(|e| panic!("hang: follow-up read: {e}"));
    assert!(c.tracked, "follow-up read: {c:?}");
    assert_eq!((c.status, c.len), (Some(S_OK), 4097), "follow-up read");
    let file = d.dev.backing_read(sector * 512, 4096).expect("backing");
    assert!(c.data == file, "follow-up read differs from the file");
    if !ro {
        assert!(
            c.data == data,
            "follow-up read differs from what was written"
        );
    }
    let extra = d.dev.queues[0].reap().expect("reap");
    assert!(
        extra.is_empty(),
        "used entries nobody waited for: {extra:?}"
    );
}

/// Lay a `BlkRequest` out in area `k` (header, payload, in buffer, status), without the heap.
fn chain_at(mem: &vduse_blkd::sim::SimMemory, r: &vduse_blkd::sim::BlkRequest, k: usize) -> Chain {
    let mut bump = Bump(area(k));
    let mut descs = Vec::new();
    let hdr = header(r.type_, r.sector);
    let a = bump.take(16);
    mem.write(a, &hdr).expect("header");
    descs.push(Desc::readable(a, 16));
    if !r.out.is_empty() {
        let a = bump.take(r.out.len() as u64);
        mem.write(a, &r.out).expect("payload");
        descs.push(Desc::readable(a, r.out.len() as u32));
    }
    if r.in_len > 0 {
        let a = bump.take(u64::from(r.in_len));
        mem.fill(a, r.in_len as usize, POISON).expect("in buffer");
        descs.push(Desc::writable(a, r.in_len));
    }
    let a = bump.take(1);
    mem.fill(a, 1, POISON).expect("status");
    descs.push(Desc::writable(a, 1));
    Chain {
        descs,
        ..Default::default()
    }
}
