//! Target `request`: descriptor tables and request bytes written into a fixed set of memory
//! regions, then `worker::chain::walk_chain` and `blk::parse_request` over an `IovaSpace`, as
//! the worker calls them. Pure and single-threaded.
//!
//! Checked on every input:
//! - nothing panics;
//! - the walk agrees with [`crate::model::walk`]: the same segments, or an error on exactly the
//!   chains the model calls corrupt (`corrupts_ring`) or unanswerable;
//! - the status address is the last byte of the chain's last descriptor when that is
//!   device-writable and not empty, and absent otherwise, whether parsing succeeds or not;
//! - an `Ok` request is consistent with the header bytes read independently: its kind, its
//!   offset, its data segments exactly tile the right part of the chain in chain order (and so
//!   lie inside its descriptors), it is within capacity, 512-aligned, not a write to a read-only
//!   device, and DISCARD / WRITE_ZEROES ranges match the payload bytes;
//! - parsing into a `Request` left dirty by the previous input gives the same result as parsing
//!   into a fresh one.

use std::cell::RefCell;

use vduse_blkd::blk::config::{MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS};
use vduse_blkd::blk::request::{DeviceLimits, GuestRead};
use vduse_blkd::blk::{parse_request, Request, RequestKind, Segment};
use vduse_blkd::memory::IovaSpace;
use vduse_blkd::sim::memory::{PROT_NONE, PROT_RO, PROT_RW};
use vduse_blkd::sim::SimMemory;
use vduse_blkd::worker::chain::walk_chain;

use crate::model::{self, Regions, Walk, F_INDIRECT, F_NEXT, F_WRITE};
use crate::wire::{Reader, Wire, Writer};

// ---- the memory layout ----------------------------------------------------------------

/// Main read-write region (64 KiB): the descriptor table, an indirect table, buffer slots.
pub const MAIN: u64 = 0x1_0000;
const MAIN_LEN: u64 = 0x1_0000;
/// The default descriptor table.
pub const TABLE: u64 = MAIN;
/// The indirect table.
pub const ITABLE: u64 = MAIN + 0x1000;
/// Buffer slot 0; slot `k` is `SLOT_SIZE * k` further.
pub const SLOTS: u64 = MAIN + 0x2000;
/// Bytes per buffer slot.
pub const SLOT_SIZE: u64 = 0x400;
/// Number of buffer slots.
pub const NSLOTS: u8 = 16;
/// A read-write page right after [`MAIN`] (a buffer may cross from one into the other).
pub const NEXT: u64 = MAIN + MAIN_LEN;
/// A device-read-only page.
pub const RO: u64 = 0x3_0000;
/// A no-access page right after [`RO`].
pub const NOACC: u64 = RO + 0x1000;
/// Nothing is mapped from here on (up to the top of the IOVA space).
pub const UNMAPPED: u64 = 0x4_0000;

const PAGE: u64 = 0x1000;

fn memory() -> SimMemory {
    let m = SimMemory::new();
    m.add_region(MAIN, MAIN_LEN, PROT_RW).expect("main region");
    m.add_region(NEXT, PAGE, PROT_RW).expect("next region");
    m.add_region(RO, PAGE, PROT_RO).expect("read-only region");
    m.add_region(NOACC, PAGE, PROT_NONE)
        .expect("no-access region");
    m
}

// ---- the input --------------------------------------------------------------------------

/// Where a descriptor, blob or table points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    /// Buffer slot `k % NSLOTS`, plus `off`.
    Slot(u8, u8),
    /// The read-only page, plus `off % 4096`.
    Ro(u16),
    /// The no-access page, plus `off % 4096`.
    NoAccess(u16),
    /// Unmapped memory.
    Unmapped(u16),
    /// `back` bytes before the end of [`MAIN`] (crossing into [`NEXT`]).
    MainEnd(u8),
    /// `back` bytes before the end of [`NEXT`] (crossing into unmapped memory).
    NextEnd(u8),
    /// `back` bytes before the end of the read-only page (crossing into no-access).
    RoEnd(u8),
    /// Any IOVA.
    Raw(u64),
    /// `u64::MAX - back`.
    NearMax(u16),
    /// The indirect table, plus `off % 4096`.
    Itable(u16),
    /// The descriptor table, plus `off % 4096`.
    Table(u16),
}

impl Addr {
    /// The IOVA.
    pub fn iova(self) -> u64 {
        match self {
            Addr::Slot(k, off) => SLOTS + u64::from(k % NSLOTS) * SLOT_SIZE + u64::from(off),
            Addr::Ro(off) => RO + u64::from(off) % PAGE,
            Addr::NoAccess(off) => NOACC + u64::from(off) % PAGE,
            Addr::Unmapped(off) => UNMAPPED + u64::from(off),
            Addr::MainEnd(back) => NEXT - u64::from(back),
            Addr::NextEnd(back) => NEXT + PAGE - u64::from(back),
            Addr::RoEnd(back) => NOACC - u64::from(back),
            Addr::Raw(a) => a,
            Addr::NearMax(back) => u64::MAX - u64::from(back),
            Addr::Itable(off) => ITABLE + u64::from(off) % PAGE,
            Addr::Table(off) => TABLE + u64::from(off) % PAGE,
        }
    }
}

impl Wire for Addr {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(11) {
            0 => Addr::Slot(r.u8(), r.u8()),
            1 => Addr::Ro(r.u16()),
            2 => Addr::NoAccess(r.u16()),
            3 => Addr::Unmapped(r.u16()),
            4 => Addr::MainEnd(r.u8()),
            5 => Addr::NextEnd(r.u8()),
            6 => Addr::RoEnd(r.u8()),
            7 => Addr::Raw(r.u64()),
            8 => Addr::NearMax(r.u16()),
            9 => Addr::Itable(r.u16()),
            _ => Addr::Table(r.u16()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Addr::Slot(k, off) => {
                w.u8(0);
                w.u8(k);
                w.u8(off);
            }
            Addr::Ro(o) => {
                w.u8(1);
                w.u16(o);
            }
            Addr::NoAccess(o) => {
                w.u8(2);
                w.u16(o);
            }
            Addr::Unmapped(o) => {
                w.u8(3);
                w.u16(o);
            }
            Addr::MainEnd(b) => {
                w.u8(4);
                w.u8(b);
            }
            Addr::NextEnd(b) => {
                w.u8(5);
                w.u8(b);
            }
            Addr::RoEnd(b) => {
                w.u8(6);
                w.u8(b);
            }
            Addr::Raw(a) => {
                w.u8(7);
                w.u64(a);
            }
            Addr::NearMax(b) => {
                w.u8(8);
                w.u16(b);
            }
            Addr::Itable(o) => {
                w.u8(9);
                w.u16(o);
            }
            Addr::Table(o) => {
                w.u8(10);
                w.u16(o);
            }
        }
    }
}

/// Interesting descriptor lengths.
pub const LENS: [u32; 20] = [
    0,
    1,
    15,
    16,
    17,
    20,
    21,
    31,
    32,
    48,
    272,
    512,
    513,
    528,
    1024,
    4096,
    65536,
    0x8000_0000,
    u32::MAX - 15,
    u32::MAX,
];

/// A descriptor length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    /// `LENS[i % LENS.len()]`.
    Fixed(u8),
    /// A small length.
    Small(u8),
    /// Any length.
    Raw(u32),
}

impl Len {
    /// The length.
    pub fn get(self) -> u32 {
        match self {
            Len::Fixed(i) => LENS[usize::from(i) % LENS.len()],
            Len::Small(n) => u32::from(n),
            Len::Raw(n) => n,
        }
    }
}

impl Wire for Len {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(3) {
            0 => Len::Fixed(r.u8()),
            1 => Len::Small(r.u8()),
            _ => Len::Raw(r.u32()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Len::Fixed(i) => {
                w.u8(0);
                w.u8(i);
            }
            Len::Small(n) => {
                w.u8(1);
                w.u8(n);
            }
            Len::Raw(n) => {
                w.u8(2);
                w.u32(n);
            }
        }
    }
}

/// Descriptor flag combinations (the last choice is any 16 bits).
const FLAGS: [u16; 8] = [
    0,
    F_NEXT,
    F_WRITE,
    F_NEXT | F_WRITE,
    F_INDIRECT,
    F_INDIRECT | F_NEXT,
    F_INDIRECT | F_WRITE,
    F_INDIRECT | F_NEXT | F_WRITE,
];

/// Descriptor flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// `FLAGS[i % 8]`.
    Combo(u8),
    /// Any flags.
    Raw(u16),
}

impl Flags {
    /// The flags.
    pub fn get(self) -> u16 {
        match self {
            Flags::Combo(i) => FLAGS[usize::from(i) % FLAGS.len()],
            Flags::Raw(f) => f,
        }
    }
}

impl Wire for Flags {
    fn decode(r: &mut Reader<'_>) -> Self {
        let v = r.u8();
        if v < 0xf0 {
            Flags::Combo(v % 8)
        } else {
            Flags::Raw(r.u16())
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Flags::Combo(i) => w.u8(i % 8),
            Flags::Raw(f) => {
                w.u8(0xf0);
                w.u16(f);
            }
        }
    }
}

/// A descriptor's `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The following entry of the same table.
    Seq,
    /// Any index.
    Raw(u16),
    /// Itself.
    Same,
}

impl Wire for Next {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(3) {
            0 => Next::Seq,
            1 => Next::Raw(r.u16()),
            _ => Next::Same,
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Next::Seq => w.u8(0),
            Next::Raw(n) => {
                w.u8(1);
                w.u16(n);
            }
            Next::Same => w.u8(2),
        }
    }
}

/// One descriptor table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescSpec {
    /// Buffer.
    pub addr: Addr,
    /// Length.
    pub len: Len,
    /// Flags.
    pub flags: Flags,
    /// Next.
    pub next: Next,
}

impl DescSpec {
    /// Entry `i` of a table, encoded.
    pub fn raw(&self, i: u16) -> [u8; 16] {
        let next = match self.next {
            Next::Seq => i.wrapping_add(1),
            Next::Raw(n) => n,
            Next::Same => i,
        };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.iova().to_le_bytes());
        b[8..12].copy_from_slice(&self.len.get().to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.get().to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        b
    }
}

impl Wire for DescSpec {
    fn decode(r: &mut Reader<'_>) -> Self {
        DescSpec {
            addr: Addr::decode(r),
            len: Len::decode(r),
            flags: Flags::decode(r),
            next: Next::decode(r),
        }
    }

    fn encode(&self, w: &mut Writer) {
        self.addr.encode(w);
        self.len.encode(w);
        self.flags.encode(w);
        self.next.encode(w);
    }
}

/// A sector number, some relative to the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sector {
    /// A small sector.
    Small(u8),
    /// `capacity / 512 - back` (wrapping).
    FromEnd(u8),
    /// `u64::MAX / 512 - back + 1`: where `sector * 512` starts to overflow.
    Overflow(u8),
    /// `u64::MAX - back`.
    NearMax(u8),
    /// Any sector.
    Raw(u64),
}

impl Sector {
    /// The sector for a device of `capacity` bytes.
    pub fn get(self, capacity: u64) -> u64 {
        match self {
            Sector::Small(s) => u64::from(s),
            Sector::FromEnd(b) => (capacity >> 9).wrapping_sub(u64::from(b)),
            Sector::Overflow(b) => (u64::MAX >> 9).wrapping_sub(u64::from(b)).wrapping_add(1),
            Sector::NearMax(b) => u64::MAX - u64::from(b),
            Sector::Raw(s) => s,
        }
    }
}

impl Wire for Sector {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(5) {
            0 => Sector::Small(r.u8()),
            1 => Sector::FromEnd(r.u8()),
            2 => Sector::Overflow(r.u8()),
            3 => Sector::NearMax(r.u8()),
            _ => Sector::Raw(r.u64()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Sector::Small(v) => {
                w.u8(0);
                w.u8(v);
            }
            Sector::FromEnd(v) => {
                w.u8(1);
                w.u8(v);
            }
            Sector::Overflow(v) => {
                w.u8(2);
                w.u8(v);
            }
            Sector::NearMax(v) => {
                w.u8(3);
                w.u8(v);
            }
            Sector::Raw(v) => {
                w.u8(4);
                w.u64(v);
            }
        }
    }
}

/// Request types (the last choice is any type).
pub const TYPES: [u32; 6] = [0, 1, 4, 8, 11, 13];

/// A request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `TYPES[i % 6]`.
    Known(u8),
    /// Any type.
    Raw(u32),
}

impl Type {
    /// The type.
    pub fn get(self) -> u32 {
        match self {
            Type::Known(i) => TYPES[usize::from(i) % TYPES.len()],
            Type::Raw(t) => t,
        }
    }
}

impl Wire for Type {
    fn decode(r: &mut Reader<'_>) -> Self {
        let v = r.u8();
        if v < 0xf0 {
            Type::Known(v % 6)
        } else {
            Type::Raw(r.u32())
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Type::Known(i) => w.u8(i % 6),
            Type::Raw(t) => {
                w.u8(0xf0);
                w.u32(t);
            }
        }
    }
}

/// A DISCARD / WRITE_ZEROES sector count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Num {
    /// A small count.
    Small(u8),
    /// The largest allowed.
    Max,
    /// One more than allowed.
    MaxPlus1,
    /// Any count.
    Raw(u32),
}

impl Num {
    /// The count.
    pub fn get(self) -> u32 {
        match self {
            Num::Small(n) => u32::from(n),
            Num::Max => MAX_DWZ_SECTORS,
            Num::MaxPlus1 => MAX_DWZ_SECTORS + 1,
            Num::Raw(n) => n,
        }
    }
}

impl Wire for Num {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(4) {
            0 => Num::Small(r.u8()),
            1 => Num::Max,
            2 => Num::MaxPlus1,
            _ => Num::Raw(r.u32()),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match *self {
            Num::Small(n) => {
                w.u8(0);
                w.u8(n);
            }
            Num::Max => w.u8(1),
            Num::MaxPlus1 => w.u8(2),
            Num::Raw(n) => {
                w.u8(3);
                w.u32(n);
            }
        }
    }
}

/// One DISCARD / WRITE_ZEROES range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwzSpec {
    /// First sector.
    pub sector: Sector,
    /// Sectors.
    pub num: Num,
    /// Flags: 0, UNMAP, 2, or any (`flags >= 3` is taken as raw bits of `raw_flags`).
    pub flags: u8,
    /// The flags when `flags >= 3`.
    pub raw_flags: u32,
}

impl DwzSpec {
    /// The 16-byte wire form.
    pub fn bytes(&self, capacity: u64) -> [u8; 16] {
        let flags = match self.flags % 4 {
            f @ 0..=2 => u32::from(f),
            _ => self.raw_flags,
        };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.get(capacity).to_le_bytes());
        b[8..12].copy_from_slice(&self.num.get().to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    }
}

impl Wire for DwzSpec {
    fn decode(r: &mut Reader<'_>) -> Self {
        let sector = Sector::decode(r);
        let num = Num::decode(r);
        let flags = r.u8() % 4;
        let raw_flags = if flags == 3 { r.u32() } else { 0 };
        DwzSpec {
            sector,
            num,
            flags,
            raw_flags,
        }
    }

    fn encode(&self, w: &mut Writer) {
        self.sector.encode(w);
        self.num.encode(w);
        w.u8(self.flags % 4);
        if self.flags % 4 == 3 {
            w.u32(self.raw_flags);
        }
    }
}

/// What a blob holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A request header.
    Header {
        /// Type.
        ty: Type,
        /// The reserved / ioprio field.
        ioprio: u32,
        /// Sector.
        sector: Sector,
    },
    /// A DISCARD / WRITE_ZEROES payload (0..=17 ranges).
    Dwz(Vec<DwzSpec>),
    /// Raw bytes (at most 64).
    Bytes(Vec<u8>),
}

impl Content {
    /// The bytes written for a device of `capacity` bytes.
    pub fn bytes(&self, capacity: u64) -> Vec<u8> {
        match self {
            Content::Header { ty, ioprio, sector } => {
                let mut b = Vec::with_capacity(16);
                b.extend_from_slice(&ty.get().to_le_bytes());
                b.extend_from_slice(&ioprio.to_le_bytes());
                b.extend_from_slice(&sector.get(capacity).to_le_bytes());
                b
            }
            Content::Dwz(segs) => segs.iter().flat_map(|s| s.bytes(capacity)).collect(),
            Content::Bytes(b) => b.clone(),
        }
    }
}

impl Wire for Content {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.pick(3) {
            0 => Content::Header {
                ty: Type::decode(r),
                ioprio: r.u32(),
                sector: Sector::decode(r),
            },
            1 => Content::Dwz(r.list(MAX_DWZ_SEGMENTS as u8 + 1, DwzSpec::decode)),
            _ => Content::Bytes(r.list(64, |r| r.u8())),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Content::Header { ty, ioprio, sector } => {
                w.u8(0);
                ty.encode(w);
                w.u32(*ioprio);
                sector.encode(w);
            }
            Content::Dwz(segs) => {
                w.u8(1);
                w.list(segs, |w, s| s.encode(w));
            }
            Content::Bytes(b) => {
                w.u8(2);
                w.list(b, |w, &v| w.u8(v));
            }
        }
    }
}

/// Bytes written somewhere before the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Where (written through the driver's view, so read-only pages can hold them too).
    pub at: Addr,
    /// What.
    pub content: Content,
}

impl Wire for Blob {
    fn decode(r: &mut Reader<'_>) -> Self {
        Blob {
            at: Addr::decode(r),
            content: Content::decode(r),
        }
    }

    fn encode(&self, w: &mut Writer) {
        self.at.encode(w);
        self.content.encode(w);
    }
}

/// Queue sizes.
pub const SIZES: [u16; 8] = [1, 2, 4, 8, 16, 32, 128, 256];
/// Capacities.
pub const CAPACITIES: [u64; 6] = [0, 512, 4096, 1 << 20, 1 << 40, !511];

/// One input of target `request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInput {
    /// `SIZES[i % 8]`.
    pub size: u8,
    /// Where the descriptor table is.
    pub table: Addr,
    /// Head index.
    pub head: u16,
    /// `CAPACITIES[i % 6]`.
    pub capacity: u8,
    /// The device refuses writes.
    pub read_only: bool,
    /// Bytes written first (at most 8).
    pub blobs: Vec<Blob>,
    /// Entries of the indirect table at [`ITABLE`] (at most 32), written second.
    pub indirect: Vec<DescSpec>,
    /// Entries of the descriptor table (at most 32), written last.
    pub direct: Vec<DescSpec>,
}

impl RequestInput {
    /// The queue size.
    pub fn queue_size(&self) -> u16 {
        SIZES[usize::from(self.size) % SIZES.len()]
    }

    /// The device limits.
    pub fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity: CAPACITIES[usize::from(self.capacity) % CAPACITIES.len()],
            read_only: self.read_only,
        }
    }
}

impl Wire for RequestInput {
    fn decode(r: &mut Reader<'_>) -> Self {
        RequestInput {
            size: r.pick(SIZES.len() as u8),
            table: Addr::decode(r),
            head: r.u16(),
            capacity: r.pick(CAPACITIES.len() as u8),
            read_only: r.flag(),
            blobs: r.list(8, Blob::decode),
            indirect: r.list(32, DescSpec::decode),
            direct: r.list(32, DescSpec::decode),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(self.size);
        self.table.encode(w);
        w.u16(self.head);
        w.u8(self.capacity);
        w.flag(self.read_only);
        w.list(&self.blobs, |w, b| b.encode(w));
        w.list(&self.indirect, |w, d| d.encode(w));
        w.list(&self.direct, |w, d| d.encode(w));
    }
}

// ---- the harness ------------------------------------------------------------------------

/// The worker's view of memory, as its private `MemView` adapts it.
struct View<'a> {
    space: &'a mut IovaSpace,
    src: &'a mut SimMemory,
}

impl GuestRead for View<'_> {
    fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.space.read(self.src, addr, buf).map_err(|e| e.iova())
    }
}

struct State {
    mem: SimMemory,
    regions: Regions,
    zeros: Vec<u8>,
    segs: Vec<Segment>,
    /// Reused across inputs, as the worker reuses its `Request`.
    dirty: Request,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Decode `data` and run it.
pub fn fuzz(data: &[u8]) {
    run(&RequestInput::from_bytes(data));
}

/// Run one input and check every invariant (panics on a violation).
pub fn run(input: &RequestInput) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(|| {
            let mem = memory();
            let regions = Regions::of(&mem);
            State {
                mem,
                regions,
                zeros: vec![0u8; MAIN_LEN as usize],
                segs: Vec::new(),
                dirty: Request::default(),
            }
        });
        run_in(s, input);
    });
}

fn run_in(s: &mut State, input: &RequestInput) {
    let limits = input.limits();
    // Fresh memory contents: every input starts from zeroed pages.
    for &(base, len, _) in &s.regions.0 {
        s.mem
            .write(base, &s.zeros[..len as usize])
            .expect("zero region");
    }
    // Writes that land outside the regions are the input's business: ignore them.
    for b in &input.blobs {
        let _ = s.mem.write(b.at.iova(), &b.content.bytes(limits.capacity));
    }
    for (i, d) in input.indirect.iter().enumerate() {
        let _ = s.mem.write(ITABLE + 16 * i as u64, &d.raw(i as u16));
    }
    let table = input.table.iova();
    for (i, d) in input.direct.iter().enumerate() {
        if let Some(at) = table.checked_add(16 * i as u64) {
            let _ = s.mem.write(at, &d.raw(i as u16));
        }
    }
    let size = input.queue_size();

    // A fresh IOVA space per input, as a (re)started worker has.
    let mut space = IovaSpace::new();
    let mut src = s.mem.clone();
    let mut view = View {
        space: &mut space,
        src: &mut src,
    };
    let walked = walk_chain(&mut view, table, size, input.head, &mut s.segs);
    let expected = model::walk(&s.mem, &s.regions, table, size, input.head);
    match (&walked, &expected) {
        (Ok(()), Walk::Ok(segs)) => assert_eq!(&s.segs, segs, "walked segments"),
        (Err(e), Walk::Corrupt(why)) => assert!(
            e.corrupts_ring(),
            "{e:?} does not corrupt the ring, the model says {why}"
        ),
        (Err(e), Walk::Unanswerable) => {
            assert!(!e.corrupts_ring(), "{e:?} corrupts the ring, expected not")
        }
        _ => panic!(
            "walk gave {walked:?} ({:?}), the model {expected:?}",
            s.segs
        ),
    }
    if walked.is_err() {
        return;
    }

    let mut req = Request::default();
    let res = parse_request(&s.segs, &mut view, &limits, &mut req);
    let again = parse_request(&s.segs, &mut view, &limits, &mut s.dirty);
    assert_eq!(
        res, again,
        "parse result depends on the Request's previous state"
    );
    assert_eq!(
        req.status_addr, s.dirty.status_addr,
        "status address depends on the Request's previous state"
    );
    // On an error only the status address is meant for the caller (the worker answers from
    // it); `kind` may keep an older value there, which the worker never reads.
    if res.is_ok() {
        assert_eq!(
            (
                req.kind,
                req.offset,
                &req.data,
                req.data_len,
                &req.dwz,
                req.status_addr
            ),
            (
                s.dirty.kind,
                s.dirty.offset,
                &s.dirty.data,
                s.dirty.data_len,
                &s.dirty.dwz,
                s.dirty.status_addr
            ),
            "parse output depends on the Request's previous state"
        );
    }
    check_parse(&s.mem, &s.regions, &s.segs, &limits, &req, res.is_ok());
}

/// Bytes `[from, from+len)` of the concatenation of `segs`, through the driver's view.
fn chain_bytes(mem: &SimMemory, segs: &[Segment], from: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = 0u64;
    for s in segs {
        let slen = u64::from(s.len);
        let lo = from.max(pos);
        let hi = (from + len as u64).min(pos + slen);
        if lo < hi {
            let mut b = vec![0u8; (hi - lo) as usize];
            mem.read(s.addr + (lo - pos), &mut b)
                .expect("parsed bytes are mapped");
            out.extend_from_slice(&b);
        }
        pos += slen;
    }
    assert_eq!(out.len(), len, "chain shorter than the parsed span");
    out
}

/// The data segments must be exactly bytes `[from, from + len)` of `part`, in order, each
/// inside one descriptor and none empty.
fn check_tiling(part: &[Segment], data: &[vduse_blkd::blk::DataSeg], from: u64, len: u64) {
    // Positions of each descriptor's first byte in the concatenation.
    let mut starts = Vec::with_capacity(part.len());
    let mut pos = 0u64;
    for s in part {
        starts.push(pos);
        pos += u64::from(s.len);
    }
    let mut at = from;
    for d in data {
        assert!(d.len > 0, "empty data segment {d:?}");
        // The descriptor holding position `at` (skipping empty ones).
        let i = (0..part.len())
            .find(|&i| starts[i] <= at && at < starts[i] + u64::from(part[i].len))
            .unwrap_or_else(|| panic!("data position {at} is outside the chain"));
        let off = at - starts[i];
        assert_eq!(
            u128::from(d.addr),
            u128::from(part[i].addr) + u128::from(off),
            "data segment {d:?} is not chain byte {at} ({:?})",
            part[i]
        );
        assert!(
            u64::from(d.len) <= u64::from(part[i].len) - off,
            "data segment {d:?} runs past its descriptor {:?}",
            part[i]
        );
        at += u64::from(d.len);
    }
    assert_eq!(
        at,
        from + len,
        "data segments cover {from}..{at}, not {len} bytes"
    );
}

fn check_parse(
    mem: &SimMemory,
    regions: &Regions,
    segs: &[Segment],
    limits: &DeviceLimits,
    req: &Request,
    ok: bool,
) {
    assert_eq!(
        req.status_addr,
        model::status_addr(segs),
        "status address of {segs:?}"
    );
    if !ok {
        return;
    }
    let n_read = segs.iter().take_while(|s| !s.write).count();
    let (readable, writable) = segs.split_at(n_read);
    assert!(
        writable.iter().all(|s| s.write),
        "accepted a device-readable descriptor after a device-writable one: {segs:?}"
    );
    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
    let status = u64::from(req.status_addr.is_some());
    assert!(readable_len >= 16, "accepted without a header: {segs:?}");
    let hdr = chain_bytes(mem, readable, 0, 16);
    // Parsing succeeded, so the header was readable by the device.
    let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let kind = match ty {
        0 => RequestKind::Read,
        1 => RequestKind::Write,
        4 => RequestKind::Flush,
        8 => RequestKind::GetId,
        11 => RequestKind::Discard,
        13 => RequestKind::WriteZeroes,
        t => panic!("accepted request type {t}"),
    };
    assert_eq!(req.kind, kind, "kind of type {ty}");
    let writes = matches!(
        kind,
        RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes
    );
    assert!(
        !(writes && limits.read_only),
        "{kind:?} on a read-only device"
    );
    match kind {
        RequestKind::Read | RequestKind::Write => {
            let offset = sector
                .checked_mul(512)
                .expect("accepted an overflowing sector");
            assert_eq!(req.offset, offset);
            assert_eq!(req.data_len % 512, 0, "unaligned length accepted");
            let end = offset
                .checked_add(req.data_len)
                .expect("accepted an overflowing range");
            assert!(
                end <= limits.capacity,
                "beyond capacity: {offset}+{}",
                req.data_len
            );
            if kind == RequestKind::Read {
                assert_eq!(readable_len, 16, "IN with device-readable data");
                assert_eq!(writable_len - status, req.data_len, "IN data length");
                check_tiling(writable, &req.data, 0, req.data_len);
            } else {
                assert_eq!(writable_len, status, "OUT with device-writable data");
                assert_eq!(readable_len - 16, req.data_len, "OUT data length");
                check_tiling(readable, &req.data, 16, req.data_len);
            }
        }
        RequestKind::Flush => {
            assert_eq!(
                (readable_len, writable_len),
                (16, status),
                "FLUSH with data"
            );
            assert!(req.data.is_empty() && req.data_len == 0);
        }
        RequestKind::GetId => {
            assert_eq!(readable_len, 16, "GET_ID with device-readable data");
            assert!(writable_len - status >= 20, "short GET_ID buffer accepted");
            assert_eq!(req.data_len, 20);
            check_tiling(writable, &req.data, 0, 20);
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            assert_eq!(
                writable_len, status,
                "DISCARD/WRITE_ZEROES with device-writable data"
            );
            let payload = readable_len - 16;
            assert!(payload.is_multiple_of(16), "partial range accepted");
            let n = payload / 16;
            assert!(
                (1..=u64::from(MAX_DWZ_SEGMENTS)).contains(&n),
                "{n} ranges accepted"
            );
            assert_eq!(req.dwz.len() as u64, n);
            let raw = chain_bytes(mem, readable, 16, payload as usize);
            for (d, b) in req.dwz.iter().zip(raw.chunks(16)) {
                let sector = u64::from_le_bytes(b[0..8].try_into().unwrap());
                let num = u32::from_le_bytes(b[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(b[12..16].try_into().unwrap());
                let allowed = if kind == RequestKind::Discard { 0 } else { 1 };
                assert_eq!(
                    flags & !allowed,
                    0,
                    "flags {flags:#x} accepted for {kind:?}"
                );
                assert!(
                    (1..=MAX_DWZ_SECTORS).contains(&num),
                    "{num} sectors accepted"
                );
                assert_eq!(d.offset, sector * 512);
                assert_eq!(d.len, u64::from(num) * 512);
                assert_eq!(d.unmap, flags & 1 != 0);
                assert!(d.offset + d.len <= limits.capacity, "range beyond capacity");
            }
        }
    }
    // Data the device reads or writes must be inside the descriptors it came from: checked by
    // the tiling. Whether those bytes are mapped is the worker's translation's job, not the
    // parser's; but the header and payload it did read must be readable.
    assert!(
        readable_bytes_readable(regions, readable, 16),
        "parsed a header the device cannot read"
    );
}

fn readable_bytes_readable(regions: &Regions, readable: &[Segment], len: u64) -> bool {
    let mut left = len;
    for s in readable {
        if left == 0 {
            break;
        }
        let take = u64::from(s.len).min(left);
        if take > 0 && !regions.readable(s.addr, take) {
            return false;
        }
        left -= take;
    }
    true
}
