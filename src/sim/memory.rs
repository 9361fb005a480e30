//! The simulated driver's memory: memfd-backed regions placed at chosen IOVAs.
//!
//! Each region is one memfd mapped twice with `MAP_SHARED`: once read-write for the driver
//! (the test), once with the region's protection for the device (the worker). The device
//! mapping is what [`SimMemory::region_for`] hands out, the same `Arc<MmapRegion>` each time,
//! so the worker sees exactly the bytes the driver wrote, and a read-only region is read-only
//! to the worker's MMU just as a read-only VDUSE IOTLB entry is. The driver can always write
//! every region (as a guest can write memory the device may only read).
//!
//! A heap region serves the driver's buffer allocations ([`SimMemory::alloc`]), first fit
//! with coalescing on free.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SimError;
use crate::memory::umem::Umem;
use crate::memory::{IovaRegion, RegionSource};

/// Read and write access for the device (the default).
pub const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// Read-only access for the device.
pub const PROT_RO: i32 = libc::PROT_READ;
/// No access for the device (mapped, but every worker access is refused).
pub const PROT_NONE: i32 = libc::PROT_NONE;

/// One region as the simulator keeps it.
struct SimRegion {
    iova: u64,
    len: u64,
    prot: i32,
    /// The device's view, shared with every worker that maps this region.
    device: Arc<MmapRegion<()>>,
}

struct Heap {
    base: u64,
    len: u64,
    /// Free ranges: start -> length, never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    in_use: u64,
}

/// Heap allocations are made in multiples of this (and aligned at least to it), so that
/// small allocations leave no unusable fragments for first fit to walk over.
const HEAP_GRANULE: u64 = 16;

impl Heap {
    fn granular(len: u64) -> u64 {
        len.max(1).div_ceil(HEAP_GRANULE) * HEAP_GRANULE
    }

    fn new(base: u64, len: u64) -> Self {
        let mut free = BTreeMap::new();
        free.insert(base, len);
        Heap {
            base,
            len,
            free,
            in_use: 0,
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = Self::granular(len);
        let align = align.max(HEAP_GRANULE);
        let (start, flen, at) = self.free.iter().find_map(|(&start, &flen)| {
            let at = start.checked_add(align - 1)? / align * align;
            let end = at.checked_add(len)?;
            (end <= start + flen).then_some((start, flen, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let end = at + len;
        if end < start + flen {
            self.free.insert(end, start + flen - end);
        }
        self.in_use += len;
        Some(at)
    }

    fn free(&mut self, addr: u64, len: u64) {
        let mut start = addr;
        let mut len = Self::granular(len);
        debug_assert!(addr >= self.base && addr + len <= self.base + self.len);
        self.in_use -= len;
        if let Some((&prev, &plen)) = self.free.range(..start).next_back() {
            if prev + plen == start {
                self.free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nlen;
        }
        self.free.insert(start, len);
    }
}

struct Inner {
    regions: Vec<SimRegion>,
    /// The driver's read-write view of every region, keyed by IOVA.
    driver: GuestMemoryMmap<()>,
    heap: Option<Heap>,
    /// The region (by IOVA) offered to workers connected from now on as their zero-copy area.
    zero_copy: Option<u64>,
}

/// The driver's memory: a set of regions at chosen IOVAs, shared with the workers' edges.
///
/// Cloning is cheap and shares the regions (an `Arc` inside).
#[derive(Clone)]
pub struct SimMemory {
    inner: Arc<Mutex<Inner>>,
    lookups: Arc<AtomicU64>,
}

impl Default for SimMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl SimMemory {
    /// An empty IOVA space.
    pub fn new() -> Self {
        SimMemory {
            inner: Arc::new(Mutex::new(Inner {
                regions: Vec::new(),
                driver: GuestMemoryMmap::default(),
                heap: None,
                zero_copy: None,
            })),
            lookups: Arc::new(AtomicU64::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held left the state consistent (every update is a
        // single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Map `len` bytes (a multiple of the page size is advisable) at IOVA `iova`, with `prot`
    /// ([`PROT_RW`], [`PROT_RO`], [`PROT_NONE`]) for the device. The memory starts zeroed.
    pub fn add_region(&self, iova: u64, len: u64, prot: i32) -> Result<(), SimError> {
        if len == 0 || iova.checked_add(len - 1).is_none() {
            return Err(SimError::BadRegion(iova));
        }
        let ulen = usize::try_from(len).map_err(|_| SimError::BadRegion(iova))?;
        let fd = memfd_create("vduse-blkd-sim", MFdFlags::MFD_CLOEXEC)?;
        let file = File::from(fd);
        file.set_len(len)?;
        let map = |prot: i32| -> Result<Arc<MmapRegion<()>>, SimError> {
            let f = file.try_clone()?;
            MmapRegion::build(Some(FileOffset::new(f, 0)), ulen, prot, libc::MAP_SHARED)
                .map(Arc::new)
                .map_err(|e| SimError::Map(e.to_string()))
        };
        let driver = map(PROT_RW)?;
        let device = map(prot)?;
        let region = GuestRegionMmap::with_arc(driver, GuestAddress(iova))
            .ok_or(SimError::BadRegion(iova))?;
        let mut inner = self.lock();
        inner.driver = inner
            .driver
            .insert_region(Arc::new(region))
            .map_err(|_| SimError::Overlap(iova))?;
        let at = inner.regions.partition_point(|r| r.iova < iova);
        inner.regions.insert(
            at,
            SimRegion {
                iova,
                len,
                prot,
                device,
            },
        );
        Ok(())
    }

    /// Map a region at `iova` and serve [`SimMemory::alloc`] from it (one heap per memory).
    pub fn add_heap(&self, iova: u64, len: u64) -> Result<(), SimError> {
        self.add_region(iova, len, PROT_RW)?;
        self.lock().heap = Some(Heap::new(iova, len));
        Ok(())
    }

    /// Offer the region that starts at `iova` (or none) to workers connected from now on as
    /// their zero-copy area: what VDUSE's registered umem is to a real device.
    pub fn set_zero_copy(&self, iova: Option<u64>) {
        self.lock().zero_copy = iova;
    }

    /// The offered region's device mapping as a zero-copy area.
    pub fn zero_copy_area(&self) -> Option<Umem> {
        let inner = self.lock();
        let base = inner.zero_copy?;
        let r = inner.regions.iter().find(|r| r.iova == base)?;
        Some(Umem::over(Arc::clone(&r.device)))
    }

    /// The regions as `(iova, len, prot)`, sorted by IOVA.
    pub fn regions(&self) -> Vec<(u64, u64, i32)> {
        self.lock()
            .regions
            .iter()
            .map(|r| (r.iova, r.len, r.prot))
            .collect()
    }

    /// The driver's own mapping of each region, as `(iova, len, host address)` sorted by
    /// IOVA: what a vhost-vdpa client hands the kernel in its IOTLB updates. The addresses stay
    /// valid while this memory (any clone of it) lives; regions are never removed.
    pub fn driver_mappings(&self) -> Vec<(u64, u64, *mut u8)> {
        let inner = self.lock();
        inner
            .driver
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr()))
            .collect()
    }

    /// Whether `[iova, iova+len)` is entirely covered by regions (whatever their protection).
    pub fn is_mapped(&self, iova: u64, len: u64) -> bool {
        let Some(end) = iova.checked_add(len) else {
            return false;
        };
        let inner = self.lock();
        let mut at = iova;
        for r in &inner.regions {
            if at >= end {
                break;
            }
            if r.iova <= at && at - r.iova < r.len {
                at = r.iova + r.len;
            }
        }
        at >= end
    }

    /// How many times a worker asked for a region (its mapping misses).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Allocate `len` bytes (at least one) aligned to `align` (at least 16) from the heap.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, SimError> {
        let mut inner = self.lock();
        let heap = inner.heap.as_mut().ok_or(SimError::OutOfMemory(len))?;
        heap.alloc(len, align).ok_or(SimError::OutOfMemory(len))
    }

    /// Return an allocation made by [`SimMemory::alloc`] (same `len`).
    pub fn free(&self, addr: u64, len: u64) {
        if let Some(heap) = self.lock().heap.as_mut() {
            heap.free(addr, len);
        }
    }

    /// Bytes currently allocated from the heap (for leak checks).
    pub fn heap_in_use(&self) -> u64 {
        self.lock().heap.as_ref().map_or(0, |h| h.in_use)
    }

    /// Allocate a buffer holding `bytes` (16-byte aligned).
    pub fn alloc_bytes(&self, bytes: &[u8]) -> Result<u64, SimError> {
        let addr = self.alloc(bytes.len() as u64, 16)?;
        self.write(addr, bytes)?;
        Ok(addr)
    }

    /// Write `buf` at IOVA `iova` through the driver's (read-write) mapping.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), SimError> {
        self.lock()
            .driver
            .write_slice(buf, GuestAddress(iova))
            .map_err(|_| SimError::Unmapped(iova))
    }

    /// Read `buf.len()` bytes at IOVA `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), SimError> {
        self.lock()
            .driver
            .read_slice(buf, GuestAddress(iova))
            .map_err(|_| SimError::Unmapped(iova))
    }

    /// Read `len` bytes at IOVA `iova`.
    pub fn read_vec(&self, iova: u64, len: usize) -> Result<Vec<u8>, SimError> {
        let mut v = vec![0u8; len];
        self.read(iova, &mut v)?;
        Ok(v)
    }

    /// Fill `len` bytes at `iova` with `byte`.
    pub fn fill(&self, iova: u64, len: usize, byte: u8) -> Result<(), SimError> {
        self.write(iova, &vec![byte; len])
    }

    /// Atomically store a little-endian u16 (ring indices and flags).
    pub fn store_u16(&self, iova: u64, v: u16, order: Ordering) -> Result<(), SimError> {
        self.lock()
            .driver
            .store(v.to_le(), GuestAddress(iova), order)
            .map_err(|_| SimError::Unmapped(iova))
    }

    /// Atomically load a little-endian u16.
    pub fn load_u16(&self, iova: u64, order: Ordering) -> Result<u16, SimError> {
        self.lock()
            .driver
            .load(GuestAddress(iova), order)
            .map(u16::from_le)
            .map_err(|_| SimError::Unmapped(iova))
    }

    /// Read a little-endian u32.
    pub fn read_u32(&self, iova: u64) -> Result<u32, SimError> {
        let mut b = [0u8; 4];
        self.read(iova, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl RegionSource for SimMemory {
    fn region_for(&mut self, iova: u64) -> Option<IovaRegion> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let inner = self.lock();
        let r = inner
            .regions
            .iter()
            .find(|r| r.iova <= iova && iova - r.iova < r.len)?;
        GuestRegionMmap::with_arc(Arc::clone(&r.device), GuestAddress(r.iova))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_mappings_name_each_region_and_reach_its_bytes() {
        let m = SimMemory::new();
        m.add_region(0x4000, 0x2000, PROT_RO).unwrap();
        m.add_heap(0x10000, 0x1000).unwrap();
        let maps = m.driver_mappings();
        assert_eq!(
            maps.iter().map(|&(i, l, _)| (i, l)).collect::<Vec<_>>(),
            [(0x4000, 0x2000), (0x10000, 0x1000)]
        );
        m.write(0x10010, b"vhost").unwrap();
        let (_, _, host) = maps[1];
        // SAFETY: `host` is the driver's live mapping of the heap region (0x1000 bytes,
        // kept alive by `m`); bytes 0x10..0x15 are inside it.
        let got = unsafe { std::slice::from_raw_parts(host.add(0x10), 5) };
        assert_eq!(got, b"vhost");
    }

    #[test]
    fn heap_allocates_aligned_and_coalesces() {
        let mut h = Heap::new(0x1000, 0x1000);
        let a = h.alloc(10, 16).unwrap();
        let b = h.alloc(1, 512).unwrap();
        let c = h.alloc(1, 1).unwrap();
        assert_eq!(a, 0x1000);
        assert_eq!(b, 0x1200);
        assert_eq!(c, 0x1010, "first fit, granule aligned");
        h.free(c, 1);
        assert!(h.alloc(0x1000, 1).is_none());
        h.free(a, 10);
        h.free(b, 1);
        assert_eq!(h.free.len(), 1);
        assert_eq!(h.in_use, 0);
        assert_eq!(h.alloc(0x1000, 1), Some(0x1000));
    }

    #[test]
    fn driver_writes_are_seen_through_the_device_mapping() {
        let m = SimMemory::new();
        m.add_region(0x10000, 0x1000, PROT_RO).unwrap();
        m.add_region(0x11000, 0x1000, PROT_RW).unwrap();
        assert!(matches!(
            m.add_region(0x10800, 0x1000, PROT_RW),
            Err(SimError::Overlap(_))
        ));
        m.write(0x10ffe, &[1, 2, 3, 4]).unwrap();
        let mut src = m.clone();
        let mut space = crate::memory::IovaSpace::new();
        let mut b = [0u8; 4];
        space.read(&mut src, 0x10ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(
            space.write(&mut src, 0x10fff, &[0]).is_err(),
            "read-only for the device"
        );
        assert_eq!(m.lookups(), 2);
        assert!(matches!(
            m.read_vec(0x12000, 1),
            Err(SimError::Unmapped(0x12000))
        ));
    }
}
