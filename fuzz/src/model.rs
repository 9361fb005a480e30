//! A reference model of what the device may and must do with a descriptor chain, written from
//! the virtio 1.x split-ring rules and the project's documented policy (ARCHITECTURE.md,
//! "Driver-controlled input"), independently of `worker::chain`.
//!
//! It reads the driver's view of memory (which ignores protection) and decides readability
//! from the simulator's region list, so it does not go through the production `IovaSpace`.

use std::collections::HashSet;

use vduse_blkd::blk::Segment;
use vduse_blkd::sim::SimMemory;

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// The most entries an indirect table may have (the walker's documented limit).
pub const MAX_INDIRECT: u64 = 65536;

/// The regions of a simulated memory as `(iova, len, prot)`, sorted by IOVA.
#[derive(Debug, Clone)]
pub struct Regions(pub Vec<(u64, u64, i32)>);

impl Regions {
    /// Snapshot the regions of `mem`.
    pub fn of(mem: &SimMemory) -> Self {
        Regions(mem.regions())
    }

    /// Whether every byte of `[addr, addr+len)` lies in regions with all of `prot`.
    pub fn allows(&self, addr: u64, len: u64, prot: i32) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        while at < end {
            let Some(&(base, rlen, rprot)) =
                self.0.iter().find(|&&(b, l, _)| b <= at && at - b < l)
            else {
                return false;
            };
            if rprot & prot != prot {
                return false;
            }
            at = base + rlen;
        }
        true
    }

    /// Readable by the device.
    pub fn readable(&self, addr: u64, len: u64) -> bool {
        self.allows(addr, len, libc::PROT_READ)
    }

    /// Writable by the device.
    pub fn writable(&self, addr: u64, len: u64) -> bool {
        self.allows(addr, len, libc::PROT_WRITE)
    }
}

/// What walking a chain must give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// The chain's data descriptors, in order.
    Ok(Vec<Segment>),
    /// The ring is corrupt: the worker must stop with `Broken`.
    Corrupt(&'static str),
    /// The ring is intact but the chain cannot be read (an unreadable indirect table): the
    /// request gets a used entry of length 0.
    Unanswerable,
}

/// Read the 16-byte descriptor at `addr` from the driver's view.
fn read_desc(mem: &SimMemory, addr: u64) -> (u64, u32, u16, u16) {
    let mut b = [0u8; 16];
    mem.read(addr, &mut b).expect("readable regions are mapped");
    (
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u16::from_le_bytes(b[12..14].try_into().unwrap()),
        u16::from_le_bytes(b[14..16].try_into().unwrap()),
    )
}

/// Walk the chain at `head` of the `size`-entry table at `table`.
///
/// Rules: the head must be in the table; each `next` must be in the table it indexes; a
/// descriptor may not be visited twice (a loop); an indirect descriptor switches to its table
/// (length a non-zero multiple of 16, at most [`MAX_INDIRECT`] entries) and may not appear inside
/// one; the ring's own table must be readable (else corrupt), an indirect table that cannot be
/// read only dooms its request.
pub fn walk(mem: &SimMemory, regions: &Regions, table: u64, size: u16, head: u16) -> Walk {
    if head >= size {
        return Walk::Corrupt("head out of range");
    }
    let mut table = table;
    let mut entries = u64::from(size);
    let mut index = u64::from(head);
    let mut indirect = false;
    let mut seen = HashSet::new();
    let mut segs = Vec::new();
    loop {
        if !seen.insert(index) {
            return Walk::Corrupt("loop");
        }
        let readable = table
            .checked_add(16 * index)
            .filter(|&a| regions.readable(a, 16));
        let Some(at) = readable else {
            return if indirect {
                Walk::Unanswerable
            } else {
                Walk::Corrupt("table unreadable")
            };
        };
        let (addr, len, flags, next) = read_desc(mem, at);
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Walk::Corrupt("nested indirect");
            }
            let n = u64::from(len) / 16;
            if len == 0 || len % 16 != 0 || n > MAX_INDIRECT {
                return Walk::Corrupt("bad indirect length");
            }
            indirect = true;
            table = addr;
            entries = n;
            index = 0;
            seen.clear();
            continue;
        }
        segs.push(Segment {
            addr,
            len,
            write: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Walk::Ok(segs);
        }
        if u64::from(next) >= entries {
            return Walk::Corrupt("next out of range");
        }
        index = u64::from(next);
    }
}

/// Bytes of a chain's device-writable descriptors (an upper bound for a used length).
pub fn writable_len(segs: &[Segment]) -> u64 {
    segs.iter()
        .filter(|s| s.write)
        .map(|s| u64::from(s.len))
        .sum()
}

/// Where the status byte of a walked chain is: the last byte of its last descriptor, if that
/// one is device-writable and not empty.
pub fn status_addr(segs: &[Segment]) -> Option<u64> {
    let last = segs.last()?;
    if !last.write || last.len == 0 {
        return None;
    }
    last.addr.checked_add(u64::from(last.len) - 1)
}
