//! Constants of the vdpa generic-netlink family (`<linux/vdpa.h>`).
//!
//! Owns: the family name and version, the command numbers and the attribute numbers 1–20.
//! Must not touch: sockets or message encoding (that is `control::netlink`).
//!
//! Attribute numbers **21 and above are not stable across kernels** and are deliberately not
//! defined here: in 6.1-era headers 21 was `VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES` (later folded
//! into `VDPA_ATTR_DEV_FEATURES`), while 7.2 uses 21 for `VDPA_ATTR_DEV_BLK_CFG_CAPACITY` and
//! 22–36 for the other block config attributes. Only parse 21+ from a reply on a kernel whose
//! header you have checked. Since "vdpa: Enable strict validation for netlinks ops" the kernel
//! rejects unknown attributes, so never send them either.
//!
//! Values checked against Debian linux-libc-dev 7.2.13 `linux/vdpa.h`.

/// Generic netlink family name (`VDPA_GENL_NAME`).
pub const VDPA_GENL_NAME: &str = "vdpa";
/// Generic netlink family version (`VDPA_GENL_VERSION`).
pub const VDPA_GENL_VERSION: u8 = 1;

/// `VDPA_CMD_UNSPEC`.
pub const VDPA_CMD_UNSPEC: u8 = 0;
/// `VDPA_CMD_MGMTDEV_NEW`.
pub const VDPA_CMD_MGMTDEV_NEW: u8 = 1;
/// `VDPA_CMD_MGMTDEV_GET` (can dump).
pub const VDPA_CMD_MGMTDEV_GET: u8 = 2;
/// `VDPA_CMD_DEV_NEW`: add a vdpa device (needs CAP_NET_ADMIN).
pub const VDPA_CMD_DEV_NEW: u8 = 3;
/// `VDPA_CMD_DEV_DEL`: delete a vdpa device (needs CAP_NET_ADMIN).
pub const VDPA_CMD_DEV_DEL: u8 = 4;
/// `VDPA_CMD_DEV_GET` (can dump).
pub const VDPA_CMD_DEV_GET: u8 = 5;
/// `VDPA_CMD_DEV_CONFIG_GET` (can dump).
pub const VDPA_CMD_DEV_CONFIG_GET: u8 = 6;
/// `VDPA_CMD_DEV_VSTATS_GET`.
pub const VDPA_CMD_DEV_VSTATS_GET: u8 = 7;
/// `VDPA_CMD_DEV_ATTR_SET` (newer kernels).
pub const VDPA_CMD_DEV_ATTR_SET: u8 = 8;

/// `VDPA_ATTR_UNSPEC`.
pub const VDPA_ATTR_UNSPEC: u16 = 0;
/// `VDPA_ATTR_PAD` (alias of `VDPA_ATTR_UNSPEC`, used for 64-bit alignment).
pub const VDPA_ATTR_PAD: u16 = VDPA_ATTR_UNSPEC;
/// `VDPA_ATTR_MGMTDEV_BUS_NAME` (string). Omit it for the bus-less `vduse` management device.
pub const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
/// `VDPA_ATTR_MGMTDEV_DEV_NAME` (string): `"vduse"` for VDUSE.
pub const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
/// `VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES` (u64).
pub const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
/// `VDPA_ATTR_DEV_NAME` (string).
pub const VDPA_ATTR_DEV_NAME: u16 = 4;
/// `VDPA_ATTR_DEV_ID` (u32).
pub const VDPA_ATTR_DEV_ID: u16 = 5;
/// `VDPA_ATTR_DEV_VENDOR_ID` (u32).
pub const VDPA_ATTR_DEV_VENDOR_ID: u16 = 6;
/// `VDPA_ATTR_DEV_MAX_VQS` (u32).
pub const VDPA_ATTR_DEV_MAX_VQS: u16 = 7;
/// `VDPA_ATTR_DEV_MAX_VQ_SIZE` (u16).
pub const VDPA_ATTR_DEV_MAX_VQ_SIZE: u16 = 8;
/// `VDPA_ATTR_DEV_MIN_VQ_SIZE` (u16).
pub const VDPA_ATTR_DEV_MIN_VQ_SIZE: u16 = 9;
/// `VDPA_ATTR_DEV_NET_CFG_MACADDR` (binary).
pub const VDPA_ATTR_DEV_NET_CFG_MACADDR: u16 = 10;
/// `VDPA_ATTR_DEV_NET_STATUS` (u8).
pub const VDPA_ATTR_DEV_NET_STATUS: u16 = 11;
/// `VDPA_ATTR_DEV_NET_CFG_MAX_VQP` (u16).
pub const VDPA_ATTR_DEV_NET_CFG_MAX_VQP: u16 = 12;
/// `VDPA_ATTR_DEV_NET_CFG_MTU` (u16).
pub const VDPA_ATTR_DEV_NET_CFG_MTU: u16 = 13;
/// `VDPA_ATTR_DEV_NEGOTIATED_FEATURES` (u64).
pub const VDPA_ATTR_DEV_NEGOTIATED_FEATURES: u16 = 14;
/// `VDPA_ATTR_DEV_MGMTDEV_MAX_VQS` (u32).
pub const VDPA_ATTR_DEV_MGMTDEV_MAX_VQS: u16 = 15;
/// `VDPA_ATTR_DEV_SUPPORTED_FEATURES` (u64): features the management device supports.
pub const VDPA_ATTR_DEV_SUPPORTED_FEATURES: u16 = 16;
/// `VDPA_ATTR_DEV_QUEUE_INDEX` (u32).
pub const VDPA_ATTR_DEV_QUEUE_INDEX: u16 = 17;
/// `VDPA_ATTR_DEV_VENDOR_ATTR_NAME` (string).
pub const VDPA_ATTR_DEV_VENDOR_ATTR_NAME: u16 = 18;
/// `VDPA_ATTR_DEV_VENDOR_ATTR_VALUE` (u64).
pub const VDPA_ATTR_DEV_VENDOR_ATTR_VALUE: u16 = 19;
/// `VDPA_ATTR_DEV_FEATURES` (u64): features provisioned to the vdpa device.
pub const VDPA_ATTR_DEV_FEATURES: u16 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family() {
        assert_eq!(VDPA_GENL_NAME, "vdpa");
        assert_eq!(VDPA_GENL_VERSION, 1);
    }

    /// `enum vdpa_command` in linux/vdpa.h 7.2.
    #[test]
    fn commands() {
        assert_eq!(
            [
                VDPA_CMD_UNSPEC,
                VDPA_CMD_MGMTDEV_NEW,
                VDPA_CMD_MGMTDEV_GET,
                VDPA_CMD_DEV_NEW,
                VDPA_CMD_DEV_DEL,
                VDPA_CMD_DEV_GET,
                VDPA_CMD_DEV_CONFIG_GET,
                VDPA_CMD_DEV_VSTATS_GET,
                VDPA_CMD_DEV_ATTR_SET,
            ],
            [0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    /// `enum vdpa_attr` 0..=20 in linux/vdpa.h 7.2.
    #[test]
    fn attributes() {
        let attrs = [
            VDPA_ATTR_UNSPEC,
            VDPA_ATTR_MGMTDEV_BUS_NAME,
            VDPA_ATTR_MGMTDEV_DEV_NAME,
            VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES,
            VDPA_ATTR_DEV_NAME,
            VDPA_ATTR_DEV_ID,
            VDPA_ATTR_DEV_VENDOR_ID,
            VDPA_ATTR_DEV_MAX_VQS,
            VDPA_ATTR_DEV_MAX_VQ_SIZE,
            VDPA_ATTR_DEV_MIN_VQ_SIZE,
            VDPA_ATTR_DEV_NET_CFG_MACADDR,
            VDPA_ATTR_DEV_NET_STATUS,
            VDPA_ATTR_DEV_NET_CFG_MAX_VQP,
            VDPA_ATTR_DEV_NET_CFG_MTU,
            VDPA_ATTR_DEV_NEGOTIATED_FEATURES,
            VDPA_ATTR_DEV_MGMTDEV_MAX_VQS,
            VDPA_ATTR_DEV_SUPPORTED_FEATURES,
            VDPA_ATTR_DEV_QUEUE_INDEX,
            VDPA_ATTR_DEV_VENDOR_ATTR_NAME,
            VDPA_ATTR_DEV_VENDOR_ATTR_VALUE,
            VDPA_ATTR_DEV_FEATURES,
        ];
        let want: Vec<u16> = (0..=20).collect();
        assert_eq!(attrs.to_vec(), want);
        assert_eq!(VDPA_ATTR_PAD, 0);
    }
}
