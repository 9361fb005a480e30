//! The virtio-blk configuration space and the feature bits we offer.

use crate::uapi::virtio as vf;

pub use super::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};

/// The largest data segment (`size_max`) we advertise, in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// The most segments one DISCARD or WRITE_ZEROES request may carry.
pub const MAX_DWZ_SEGMENTS: u32 = 16;
/// The most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// Size of the configuration space we expose (up to and including the write-zeroes fields).
pub const CONFIG_SIZE: usize = 60;

/// The geometry of the device as the driver will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Size of each virtqueue (a power of two).
    pub queue_size: u16,
    /// Whether the device refuses writes.
    pub read_only: bool,
}

/// The virtio-blk configuration space plus the device feature bits derived from a geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// The geometry this configuration was built from.
    pub geometry: BlkGeometry,
    /// `seg_max`: most data segments per request.
    pub seg_max: u32,
}

impl BlkConfig {
    /// Build the configuration for `geometry`.
    pub fn new(geometry: BlkGeometry) -> Self {
        // The driver needs two descriptors for header and status; the rest can carry data.
        let seg_max = u32::from(geometry.queue_size)
            .saturating_sub(2)
            .clamp(1, 128);
        Self { geometry, seg_max }
    }

    /// The device feature bits we offer (transport and virtio-blk).
    ///
    /// Never CONFIG_WCE (VDUSE rejects it), never NOTIFICATION_DATA (VDUSE cannot deliver
    /// it), never RING_PACKED (the queue layer is split-ring only).
    pub fn features(&self) -> u64 {
        let mut f = bit(vf::VIRTIO_F_VERSION_1)
            | bit(vf::VIRTIO_F_ACCESS_PLATFORM)
            | bit(vf::VIRTIO_F_EVENT_IDX)
            | bit(vf::VIRTIO_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_MQ);
        if self.geometry.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space bytes (`struct virtio_blk_config`, little endian).
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let g = &self.geometry;
        let mut b = [0u8; CONFIG_SIZE];
        let sectors_per_block = g.block_size / 512;
        put(&mut b, 0, &g.capacity_sectors.to_le_bytes());
        put(&mut b, 8, &SIZE_MAX.to_le_bytes());
        put(&mut b, 12, &self.seg_max.to_le_bytes());
        // geometry (16..20) left zero: VIRTIO_BLK_F_GEOMETRY is not offered.
        put(&mut b, 20, &g.block_size.to_le_bytes());
        // topology: physical_block_exp 0, alignment_offset 0, min_io_size 1 block, opt_io_size 0.
        put(&mut b, 26, &1u16.to_le_bytes());
        // wce (32) stays 0: no CONFIG_WCE.
        put(&mut b, 34, &g.num_queues.to_le_bytes());
        if !g.read_only {
            put(&mut b, 36, &MAX_DWZ_SECTORS.to_le_bytes());
            put(&mut b, 40, &MAX_DWZ_SEGMENTS.to_le_bytes());
            put(&mut b, 44, &sectors_per_block.to_le_bytes());
            put(&mut b, 48, &MAX_DWZ_SECTORS.to_le_bytes());
            put(&mut b, 52, &MAX_DWZ_SEGMENTS.to_le_bytes());
            b[56] = 1; // write_zeroes_may_unmap
        }
        b
    }
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

fn put(buf: &mut [u8], off: usize, v: &[u8]) {
    buf[off..off + v.len()].copy_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::bindings::virtio_blk::virtio_blk_config as C;

    fn geom(ro: bool) -> BlkGeometry {
        BlkGeometry {
            capacity_sectors: 2048,
            block_size: 4096,
            num_queues: 2,
            queue_size: 256,
            read_only: ro,
        }
    }

    #[test]
    fn offsets_match_the_kernel_struct() {
        assert_eq!(offset_of!(C, capacity), 0);
        assert_eq!(offset_of!(C, size_max), 8);
        assert_eq!(offset_of!(C, seg_max), 12);
        assert_eq!(offset_of!(C, blk_size), 20);
        assert_eq!(offset_of!(C, min_io_size), 26);
        assert_eq!(offset_of!(C, num_queues), 34);
        assert_eq!(offset_of!(C, max_discard_sectors), 36);
        assert_eq!(offset_of!(C, max_discard_seg), 40);
        assert_eq!(offset_of!(C, discard_sector_alignment), 44);
        assert_eq!(offset_of!(C, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(C, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(C, max_secure_erase_sectors), CONFIG_SIZE);
    }

    #[test]
    fn config_bytes_carry_the_geometry() {
        let b = BlkConfig::new(geom(false)).to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn features_never_include_wce_and_follow_read_only() {
        let rw = BlkConfig::new(geom(false)).features();
        let ro = BlkConfig::new(geom(true)).features();
        assert_eq!(rw & bit(VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_eq!(ro & bit(VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_ne!(rw & bit(vf::VIRTIO_F_ACCESS_PLATFORM), 0);
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let b = BlkConfig::new(geom(true)).to_bytes();
        assert_eq!(&b[36..60], &[0u8; 24]);
    }

    #[test]
    fn seg_max_is_at_least_one_for_tiny_queues() {
        let mut g = geom(false);
        g.queue_size = 1;
        assert_eq!(BlkConfig::new(g).seg_max, 1);
    }
}
