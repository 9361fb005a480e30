//! Walking a split-ring descriptor chain, with every malformation reported.
//!
//! virtio-queue's own chain iterator ends silently on a bad descriptor (a loop, an unreadable
//! indirect table, a nested table all look like a short chain), so a malformed chain cannot be
//! told from a short one. This walker reads the same `Descriptor` layout but returns an explicit
//! [`ChainError`], split into errors that corrupt the ring (the device must stop using it) and
//! errors that only doom the one request.

use thiserror::Error;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::ByteValued;

use crate::blk::request::GuestRead;
use crate::blk::Segment;

const DESC_SIZE: u64 = 16;
const VIRTQ_DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const VIRTQ_DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const VIRTQ_DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A malformed descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChainError {
    /// The avail ring names a head outside the descriptor table.
    #[error("head index {0} is outside the descriptor table")]
    HeadOutOfRange(u16),
    /// A `next` field points outside its table.
    #[error("descriptor next index {0} is outside its table")]
    NextOutOfRange(u16),
    /// More descriptors than the table holds: the chain loops.
    #[error("descriptor chain is longer than its table (a loop)")]
    Loop,
    /// An indirect descriptor inside an indirect table.
    #[error("indirect table inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor whose length is zero, not a multiple of 16, or too large.
    #[error("indirect table length {0} is invalid")]
    BadIndirectLen(u32),
    /// The descriptor table (direct) cannot be read.
    #[error("descriptor table unreadable at IOVA {0:#x}")]
    TableUnreadable(u64),
    /// An indirect table cannot be read.
    #[error("indirect table unreadable at IOVA {0:#x}")]
    IndirectUnreadable(u64),
}

impl ChainError {
    /// Whether the ring itself is corrupt (the device must be marked broken), as opposed to
    /// one request being unanswerable.
    pub fn corrupts_ring(&self) -> bool {
        match self {
            ChainError::HeadOutOfRange(_)
            | ChainError::NextOutOfRange(_)
            | ChainError::Loop
            | ChainError::NestedIndirect
            | ChainError::BadIndirectLen(_)
            | ChainError::TableUnreadable(_) => true,
            ChainError::IndirectUnreadable(_) => false,
        }
    }
}

/// Read the descriptor at `addr` through `mem`: virtio-queue's `Descriptor` is `ByteValued`
/// (little-endian fields), so this is the one decoder of the 16-byte layout.
pub fn read_descriptor(mem: &mut impl GuestRead, addr: u64) -> Option<Descriptor> {
    let mut desc = Descriptor::default();
    mem.read_at(addr, desc.as_mut_slice()).ok()?;
    Some(desc)
}

/// Indirect tables of at most this many descriptors are read in one copy (into a buffer
/// on the walker's stack); larger ones descriptor by descriptor.
const ONE_COPY_TABLE: usize = 16;
const ONE_COPY_BYTES: usize = ONE_COPY_TABLE * DESC_SIZE as usize;

/// Entry `i` of a table copied into `bytes` (the caller keeps `i` below its length).
fn copied_descriptor(bytes: &[u8; ONE_COPY_BYTES], i: u32) -> Descriptor {
    let mut desc = Descriptor::default();
    let at = i as usize * DESC_SIZE as usize;
    desc.as_mut_slice()
        .copy_from_slice(&bytes[at..at + DESC_SIZE as usize]);
    desc
}

/// Walk the chain starting at `head` of the table at `table` (`size` entries), appending one
/// [`Segment`] per data descriptor to `out` (cleared first).
pub fn walk_chain(
    mem: &mut impl GuestRead,
    table: u64,
    size: u16,
    head: u16,
    out: &mut Vec<Segment>,
) -> Result<(), ChainError> {
    out.clear();
    if head >= size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let mut table = table;
    let mut table_len = u32::from(size);
    let mut index = u32::from(head);
    let mut ttl = table_len;
    let mut indirect = false;
    // Small: zeroing it per walk costs less than the reads it saves.
    let mut table_copy = [0u8; ONE_COPY_BYTES];
    let mut copied = false;
    loop {
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        ttl -= 1;
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(if indirect {
                ChainError::IndirectUnreadable(table)
            } else {
                ChainError::TableUnreadable(table)
            })?;
        let desc = if copied {
            copied_descriptor(&table_copy, index)
        } else {
            read_descriptor(mem, addr).ok_or(if indirect {
                ChainError::IndirectUnreadable(addr)
            } else {
                ChainError::TableUnreadable(addr)
            })?
        };
        let flags = desc.flags();
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || u64::from(len) / DESC_SIZE > 65536 {
                return Err(ChainError::BadIndirectLen(len));
            }
            indirect = true;
            table = desc.addr().0;
            table_len = (u64::from(len) / DESC_SIZE) as u32;
            let n = table_len as usize * DESC_SIZE as usize;
            copied = n <= ONE_COPY_BYTES;
            if copied {
                mem.read_at(table, &mut table_copy[..n])
                    .map_err(|_| ChainError::IndirectUnreadable(table))?;
            }
            index = 0;
            ttl = table_len;
            continue;
        }
        out.push(Segment {
            addr: desc.addr().0,
            len: desc.len(),
            write: flags & VIRTQ_DESC_F_WRITE != 0,
        });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        let next = desc.next();
        if u32::from(next) >= table_len {
            return Err(ChainError::NextOutOfRange(next));
        }
        index = u32::from(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Table(HashMap<u64, Descriptor>);
    impl Table {
        fn set(&mut self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
            self.0
                .insert(table + i * 16, Descriptor::new(addr, len, flags, next));
        }
    }
    impl GuestRead for Table {
        /// Whole descriptors only: one, or a run of them (an indirect table's one copy).
        fn read_at(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), u64> {
            for (i, piece) in buf.chunks_mut(16).enumerate() {
                let at = addr + i as u64 * 16;
                let d = self.0.get(&at).ok_or(at)?;
                piece.copy_from_slice(d.as_slice());
            }
            Ok(())
        }
    }

    #[test]
    fn direct_and_indirect_chains() {
        let mut t = Table::default();
        t.set(0x1000, 0, 0xa000, 16, VIRTQ_DESC_F_NEXT, 3);
        t.set(
            0x1000,
            3,
            0xb000,
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        t.set(0x1000, 1, 0xc000, 1, VIRTQ_DESC_F_WRITE, 0);
        let mut out = Vec::new();
        walk_chain(&mut t, 0x1000, 4, 0, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[1].write && !out[0].write);

        t.set(0x1000, 2, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        t.set(0x2000, 0, 0xa000, 16, VIRTQ_DESC_F_NEXT, 1);
        t.set(0x2000, 1, 0xc000, 1, VIRTQ_DESC_F_WRITE, 0);
        walk_chain(&mut t, 0x1000, 4, 2, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Segment {
                    addr: 0xa000,
                    len: 16,
                    write: false
                },
                Segment {
                    addr: 0xc000,
                    len: 1,
                    write: true
                },
            ]
        );
    }

    #[test]
    fn malformations_are_named() {
        let mut t = Table::default();
        let mut out = Vec::new();
        // loop 0 -> 1 -> 0
        t.set(0x1000, 0, 0xa000, 16, VIRTQ_DESC_F_NEXT, 1);
        t.set(0x1000, 1, 0xa000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 0, &mut out),
            Err(ChainError::Loop)
        );
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 2, &mut out),
            Err(ChainError::HeadOutOfRange(2))
        );
        t.set(0x1000, 0, 0xa000, 16, VIRTQ_DESC_F_NEXT, 7);
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 0, &mut out),
            Err(ChainError::NextOutOfRange(7))
        );
        // nested indirect
        t.set(0x1000, 0, 0x2000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        t.set(0x2000, 0, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 0, &mut out),
            Err(ChainError::NestedIndirect)
        );
        // indirect loop
        t.set(0x2000, 0, 0xa000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 0, &mut out),
            Err(ChainError::Loop)
        );
        // bad lengths, unreadable tables
        t.set(0x1000, 0, 0x2000, 24, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&mut t, 0x1000, 2, 0, &mut out),
            Err(ChainError::BadIndirectLen(24))
        );
        t.set(0x1000, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        let e = walk_chain(&mut t, 0x1000, 2, 0, &mut out).unwrap_err();
        assert_eq!(e, ChainError::IndirectUnreadable(0x9000));
        assert!(!e.corrupts_ring());
        let e = walk_chain(&mut t, 0x5000, 2, 0, &mut out).unwrap_err();
        assert!(e.corrupts_ring());
    }
}
