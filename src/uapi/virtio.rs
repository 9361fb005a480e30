//! virtio constants the VDUSE control plane needs: device-status bits, transport feature bit
//! numbers and the block device ID.
//!
//! Owns: nothing but names — everything is re-exported from `virtio-bindings` (generated from the
//! Linux uAPI headers), plus `u8` copies of the status bits (the status travels as a `u8` in
//! `VDUSE_SET_STATUS`) and `VIRTIO_F_*` aliases for the two ring features that the headers call
//! `VIRTIO_RING_F_*`. Must not touch: feature *policy* (which bits we offer lives with the
//! virtio-blk device model) or any I/O.

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Feature bit 29: `used_event`/`avail_event` notification suppression (`VIRTIO_RING_F_EVENT_IDX`).
pub const VIRTIO_F_EVENT_IDX: u32 = VIRTIO_RING_F_EVENT_IDX;
/// Feature bit 28: indirect descriptor tables (`VIRTIO_RING_F_INDIRECT_DESC`).
pub const VIRTIO_F_INDIRECT_DESC: u32 = VIRTIO_RING_F_INDIRECT_DESC;

/// Device status bit: the guest noticed the device (`VIRTIO_CONFIG_S_ACKNOWLEDGE`).
pub const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
/// Device status bit: the guest has a driver for the device (`VIRTIO_CONFIG_S_DRIVER`).
pub const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
/// Device status bit: the driver is set up and ready to drive the device
/// (`VIRTIO_CONFIG_S_DRIVER_OK`).
pub const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
/// Device status bit: feature negotiation is complete (`VIRTIO_CONFIG_S_FEATURES_OK`).
pub const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
/// Device status bit: the device hit an error and needs a reset (`VIRTIO_CONFIG_S_NEEDS_RESET`).
pub const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// Device status bit: the driver gave up on the device (`VIRTIO_CONFIG_S_FAILED`).
pub const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// The feature mask (`1 << bit`) of a feature bit number.
pub const fn feature_mask(bit: u32) -> u64 {
    1u64 << bit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bits() {
        assert_eq!(
            [
                STATUS_ACKNOWLEDGE,
                STATUS_DRIVER,
                STATUS_DRIVER_OK,
                STATUS_FEATURES_OK,
                STATUS_NEEDS_RESET,
                STATUS_FAILED
            ],
            [1, 2, 4, 8, 0x40, 0x80]
        );
        assert_eq!(
            [
                VIRTIO_CONFIG_S_ACKNOWLEDGE,
                VIRTIO_CONFIG_S_DRIVER,
                VIRTIO_CONFIG_S_DRIVER_OK,
                VIRTIO_CONFIG_S_FEATURES_OK,
                VIRTIO_CONFIG_S_NEEDS_RESET,
                VIRTIO_CONFIG_S_FAILED
            ],
            [1, 2, 4, 8, 0x40, 0x80]
        );
    }

    #[test]
    fn feature_bits_and_ids() {
        assert_eq!(
            [
                VIRTIO_F_INDIRECT_DESC,
                VIRTIO_F_EVENT_IDX,
                VIRTIO_F_VERSION_1,
                VIRTIO_F_ACCESS_PLATFORM,
                VIRTIO_F_RING_PACKED,
                VIRTIO_F_IN_ORDER
            ],
            [28, 29, 32, 33, 34, 35]
        );
        assert_eq!(VIRTIO_ID_BLOCK, 2);
        assert_eq!(feature_mask(VIRTIO_F_ACCESS_PLATFORM), 0x2_0000_0000);
    }
}
