//! Attach and detach VDUSE devices on the vdpa bus over generic netlink — what
//! `vdpa dev add name NAME mgmtdev vduse` and `vdpa dev del NAME` (iproute2) do, without needing
//! the `vdpa` binary.
//!
//! Owns: one generic-netlink socket (a neli 0.7 [`NlRouter`], which runs its own receive thread)
//! resolved to the `"vdpa"` family, the encoding of the four requests we send (`DEV_NEW`,
//! `DEV_DEL`, `DEV_GET` dump, `MGMTDEV_GET` dump), and the translation of kernel errnos into
//! one-line messages. Must not touch: VDUSE file descriptors or the VDUSE message loop (the
//! caller must serve `/dev/vduse/$NAME` on another thread while [`VdpaNetlink::dev_add`] and
//! [`VdpaNetlink::dev_del`] block), sysfs driver binding (`driver_override`, `drivers_probe`), or
//! any provisioning attribute: the `vduse` management device accepts none, and since "vdpa:
//! Enable strict validation for netlinks ops" unknown attributes are rejected.
//!
//! Kernel facts this relies on (drivers/vdpa/vdpa.c): the family is registered by the `vdpa`
//! module with `netnsok = false`, so it is only visible from the initial network namespace;
//! `DEV_NEW` and `DEV_DEL` need CAP_NET_ADMIN (`GENL_ADMIN_PERM`); the `vduse` management device
//! has no bus, so `VDPA_ATTR_MGMTDEV_BUS_NAME` must be omitted (sending it makes the lookup fail
//! with ENODEV); names are read with `nla_data()` as C strings, so they are sent NUL-terminated.

use std::{fmt, io};

use log::debug;
use neli::{
    consts::{
        nl::{NlmF, NlmsgerrAttr},
        socket::NlFamily,
    },
    err::{Nlmsgerr, RouterError, SocketError},
    genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, NlattrBuilder},
    nl::NlPayload,
    router::synchronous::NlRouter,
    types::{Buffer, GenlBuffer},
    utils::Groups,
};
use nix::errno::Errno;

use crate::uapi::vdpa::{
    VDPA_ATTR_DEV_NAME, VDPA_ATTR_MGMTDEV_DEV_NAME, VDPA_CMD_DEV_DEL, VDPA_CMD_DEV_GET,
    VDPA_CMD_DEV_NEW, VDPA_CMD_MGMTDEV_GET, VDPA_GENL_NAME, VDPA_GENL_VERSION,
};

/// Name of the management device the `vduse` module registers on the vdpa bus.
pub const VDUSE_MGMTDEV_NAME: &str = "vduse";

/// Longest vdpa device name we send, in bytes. VDUSE names live in a `char[256]`
/// (`VDUSE_NAME_MAX`) with a terminating NUL, and the vdpa device takes the VDUSE name.
pub const VDPA_NAME_MAX_LEN: usize = 255;

const OP_RESOLVE: &str = "resolve the vdpa netlink family";
const OP_DEV_ADD: &str = "vdpa dev add";
const OP_DEV_DEL: &str = "vdpa dev del";
const OP_DEV_LIST: &str = "vdpa dev list";
const OP_MGMTDEV_LIST: &str = "vdpa mgmtdev list";

/// A vdpa generic-netlink message: raw `u8` commands and `u16` attribute types, whose values
/// come from [`crate::uapi::vdpa`]. Attributes the kernel adds in newer versions parse fine.
type VdpaGenl = Genlmsghdr<u8, u16>;

/// Errors from the vdpa netlink control path. Every variant displays as one line a user can act
/// on.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The `vdpa` generic netlink family does not exist (module not loaded, or we are not in the
    /// initial network namespace).
    #[error(
        "the vdpa generic netlink family is not registered: load the vdpa module (modprobe vdpa)"
    )]
    FamilyMissing,
    /// The kernel answered a request with an error.
    #[error("{}", kernel_message(.op, .name, *.errno))]
    Kernel {
        /// The operation, e.g. `"vdpa dev add"`.
        op: &'static str,
        /// The device name the request was about (empty for dumps).
        name: String,
        /// The errno the kernel returned.
        errno: Errno,
    },
    /// The netlink socket itself failed.
    #[error("netlink socket error: {0}")]
    Io(#[from] io::Error),
    /// The exchange did not follow the netlink protocol (a bug here or in the kernel).
    #[error("{op}: unexpected netlink exchange: {detail}")]
    Protocol {
        /// The operation that was under way.
        op: &'static str,
        /// What went wrong, from neli.
        detail: String,
    },
    /// The device name cannot be sent.
    #[error("invalid vdpa device name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

impl NetlinkError {
    /// The kernel errno behind this error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Io(e) => e.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

/// One-line text for a kernel errno, specialised for the errnos vdpa.c and vduse actually
/// return for each operation.
fn kernel_message(op: &str, name: &str, errno: Errno) -> String {
    let subject = if name.is_empty() {
        op.to_string()
    } else {
        format!("{op} {name}")
    };
    match (op, errno) {
        (_, Errno::EPERM) => format!("{subject}: permission denied (needs CAP_NET_ADMIN)"),
        (OP_DEV_ADD, Errno::EEXIST) => format!("vdpa device {name} already exists"),
        (OP_DEV_ADD, Errno::ENODEV) => {
            "no vduse management device: load the vduse module".to_string()
        }
        (OP_DEV_ADD, Errno::EINVAL) => format!(
            "{subject}: rejected by vduse (no VDUSE device with that name, \
             or not every virtqueue was set up)"
        ),
        (OP_DEV_ADD, Errno::EOPNOTSUPP) => {
            format!("{subject}: the vduse management device rejected an attribute")
        }
        (OP_DEV_DEL, Errno::ENOENT | Errno::ENODEV) => format!("no vdpa device named {name}"),
        (OP_DEV_DEL, Errno::EINVAL) => {
            format!("vdpa device {name} was not created by a management device; cannot delete it")
        }
        (_, errno) => format!("{subject}: {}", errno.desc()),
    }
}

/// The text of a kernel extended ACK (`NLMSGERR_ATTR_MSG`), if the kernel sent one.
fn ext_ack_message<M>(err: &Nlmsgerr<M>) -> Option<String> {
    err.ext_ack()
        .iter()
        .find(|a| *a.nla_type().nla_type() == NlmsgerrAttr::Msg)
        .map(|a| c_string(a.nla_payload().as_ref()))
}

/// Map a neli router error for `op` on device `name` to a [`NetlinkError`].
fn router_error<T, P>(op: &'static str, name: &str, err: RouterError<T, P>) -> NetlinkError
where
    T: fmt::Debug,
    P: fmt::Debug,
{
    match err {
        RouterError::Nlmsgerr(e) => {
            if let Some(msg) = ext_ack_message(&e) {
                debug!("{op} {name}: kernel says: {msg}");
            }
            NetlinkError::Kernel {
                op,
                name: name.to_string(),
                errno: Errno::from_raw(e.error().saturating_abs()),
            }
        }
        RouterError::Io(kind) => NetlinkError::Io(io::Error::from(kind)),
        RouterError::Socket(SocketError::Io(e)) => {
            NetlinkError::Io(io::Error::new(e.kind(), e.to_string()))
        }
        other => NetlinkError::Protocol {
            op,
            detail: other.to_string(),
        },
    }
}

/// Decode a NUL-terminated (or unterminated) attribute string.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn check_name(name: &str) -> Result<(), NetlinkError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > VDPA_NAME_MAX_LEN {
        "it is longer than 255 bytes"
    } else if name.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(NetlinkError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// Build a vdpa generic-netlink request carrying NUL-terminated string attributes.
fn vdpa_request(
    op: &'static str,
    cmd: u8,
    attrs: &[(u16, &str)],
) -> Result<VdpaGenl, NetlinkError> {
    let protocol = |e: &dyn fmt::Display| NetlinkError::Protocol {
        op,
        detail: e.to_string(),
    };
    let mut buf = GenlBuffer::<u16, Buffer>::new();
    for &(ty, value) in attrs {
        let nla_type = AttrTypeBuilder::default()
            .nla_type(ty)
            .build()
            .map_err(|e| protocol(&e))?;
        let attr = NlattrBuilder::default()
            .nla_type(nla_type)
            .nla_payload(value)
            .build()
            .map_err(|e| protocol(&e))?;
        buf.push(attr);
    }
    GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(VDPA_GENL_VERSION)
        .attrs(buf)
        .build()
        .map_err(|e| protocol(&e))
}

/// `VDPA_CMD_DEV_NEW` for a VDUSE device: `MGMTDEV_DEV_NAME = "vduse"`, `DEV_NAME = name`, and no
/// bus name.
fn dev_new_request(name: &str) -> Result<VdpaGenl, NetlinkError> {
    vdpa_request(
        OP_DEV_ADD,
        VDPA_CMD_DEV_NEW,
        &[
            (VDPA_ATTR_MGMTDEV_DEV_NAME, VDUSE_MGMTDEV_NAME),
            (VDPA_ATTR_DEV_NAME, name),
        ],
    )
}

/// `VDPA_CMD_DEV_DEL` with `DEV_NAME = name`.
fn dev_del_request(name: &str) -> Result<VdpaGenl, NetlinkError> {
    vdpa_request(OP_DEV_DEL, VDPA_CMD_DEV_DEL, &[(VDPA_ATTR_DEV_NAME, name)])
}

/// The string value of attribute `ty` in a reply, if present.
fn string_attr(msg: &VdpaGenl, ty: u16) -> Option<String> {
    msg.attrs()
        .iter()
        .find(|a| *a.nla_type().nla_type() == ty)
        .map(|a| c_string(a.nla_payload().as_ref()))
}

/// A connection to the kernel's vdpa generic-netlink family.
///
/// Each instance owns a netlink socket and the receive thread neli's [`NlRouter`] spawns for it;
/// both go away on drop. Requests are synchronous.
pub struct VdpaNetlink {
    router: NlRouter,
    family: u16,
}

impl fmt::Debug for VdpaNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdpaNetlink")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl VdpaNetlink {
    /// Open a generic-netlink socket and resolve the `"vdpa"` family.
    ///
    /// Returns [`NetlinkError::FamilyMissing`] when the family is not registered (the `vdpa`
    /// module is not loaded, or this process is outside the initial network namespace, where
    /// the family is invisible).
    pub fn connect() -> Result<Self, NetlinkError> {
        let (router, _multicast) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| router_error(OP_RESOLVE, "", e))?;
        // Extended ACKs carry the kernel's reason text; older kernels may refuse the option.
        if let Err(e) = router.enable_ext_ack(true) {
            debug!("netlink extended ACKs unavailable: {e}");
        }
        let family = router
            .resolve_genl_family(VDPA_GENL_NAME)
            .map_err(|e| match e {
                // nlctrl answers ENOENT for an unknown family; neli reports a message when the
                // reply lacks a family ID.
                RouterError::Nlmsgerr(ref m) if m.error().saturating_abs() == libc::ENOENT => {
                    NetlinkError::FamilyMissing
                }
                RouterError::Msg(_) => NetlinkError::FamilyMissing,
                other => router_error(OP_RESOLVE, VDPA_GENL_NAME, other),
            })?;
        debug!("vdpa generic netlink family id {family}");
        Ok(Self { router, family })
    }

    /// The numeric generic-netlink ID the kernel assigned to the `"vdpa"` family.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Send one request and collect the payloads of every reply message, up to the ACK (for
    /// `NLM_F_ACK` requests) or `NLMSG_DONE` (for dumps).
    fn exchange(
        &self,
        op: &'static str,
        name: &str,
        flags: NlmF,
        request: VdpaGenl,
    ) -> Result<Vec<VdpaGenl>, NetlinkError> {
        let replies = self
            .router
            .send::<u16, VdpaGenl, u16, VdpaGenl>(self.family, flags, NlPayload::Payload(request))
            .map_err(|e| router_error(op, name, e))?;
        let mut out = Vec::new();
        for reply in replies {
            let reply = reply.map_err(|e| router_error(op, name, e))?;
            match reply.nl_payload() {
                NlPayload::Payload(p) => out.push(p.clone()),
                NlPayload::Err(e) => {
                    return Err(router_error::<u16, VdpaGenl>(
                        op,
                        name,
                        RouterError::Nlmsgerr(e.clone()),
                    ))
                }
                NlPayload::DumpExtAck(e) if *e.error() != 0 => {
                    return Err(NetlinkError::Kernel {
                        op,
                        name: name.to_string(),
                        errno: Errno::from_raw(e.error().saturating_abs()),
                    })
                }
                NlPayload::Ack(_) | NlPayload::DumpExtAck(_) | NlPayload::Empty => {}
            }
        }
        Ok(out)
    }

    /// Attach the VDUSE device `name` to the vdpa bus (`VDPA_CMD_DEV_NEW` with
    /// `MGMTDEV_DEV_NAME = "vduse"` and `DEV_NAME = name`, `NLM_F_ACK`; no bus name).
    ///
    /// **Blocks until the kernel has probed the device.** The kernel registers the vdpa device
    /// and runs the bus driver's probe (virtio_vdpa → virtio-blk, or vhost_vdpa) synchronously
    /// inside this request, and that probe sends VDUSE control messages (`SET_STATUS` …) that
    /// wait for answers on `/dev/vduse/NAME`. The caller must therefore already be serving the
    /// device fd's message loop on another thread; otherwise this call stalls for the device's
    /// `msg_timeout` (30 s by default) and the VDUSE device is left permanently broken.
    /// Every virtqueue must have been set up with `VDUSE_VQ_SETUP` first (EINVAL otherwise).
    pub fn dev_add(&self, name: &str) -> Result<(), NetlinkError> {
        check_name(name)?;
        let request = dev_new_request(name)?;
        self.exchange(OP_DEV_ADD, name, NlmF::ACK, request)?;
        Ok(())
    }

    /// Detach the vdpa device `name` (`VDPA_CMD_DEV_DEL`, `NLM_F_ACK`).
    ///
    /// Like [`dev_add`](Self::dev_add) this blocks while the kernel removes the driver
    /// (virtio-blk flushes in-flight I/O, then resets the device with `SET_STATUS 0`), so the
    /// device's message loop and data path must keep running until it returns.
    pub fn dev_del(&self, name: &str) -> Result<(), NetlinkError> {
        check_name(name)?;
        let request = dev_del_request(name)?;
        self.exchange(OP_DEV_DEL, name, NlmF::ACK, request)?;
        Ok(())
    }

    /// Names of the vdpa devices created through a management device (`VDPA_CMD_DEV_GET` dump).
    pub fn dev_list(&self) -> Result<Vec<String>, NetlinkError> {
        let request = vdpa_request(OP_DEV_LIST, VDPA_CMD_DEV_GET, &[])?;
        let replies = self.exchange(OP_DEV_LIST, "", NlmF::DUMP, request)?;
        Ok(replies
            .iter()
            .filter_map(|m| string_attr(m, VDPA_ATTR_DEV_NAME))
            .collect())
    }

    /// Whether the `vduse` management device is registered (`VDPA_CMD_MGMTDEV_GET` dump
    /// contains one whose device name is `"vduse"`), i.e. the `vduse` module is loaded.
    pub fn mgmtdev_has_vduse(&self) -> Result<bool, NetlinkError> {
        let request = vdpa_request(OP_MGMTDEV_LIST, VDPA_CMD_MGMTDEV_GET, &[])?;
        let replies = self.exchange(OP_MGMTDEV_LIST, "", NlmF::DUMP, request)?;
        Ok(replies.iter().any(|m| {
            string_attr(m, VDPA_ATTR_MGMTDEV_DEV_NAME).as_deref() == Some(VDUSE_MGMTDEV_NAME)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use neli::{
        consts::nl::NlmF,
        nl::{NlPayload, NlmsghdrBuilder},
        ToBytes,
    };

    use super::*;

    /// Serialize `genl` as a complete netlink message, as the router would send it.
    fn encode(family: u16, seq: u32, flags: NlmF, genl: VdpaGenl) -> Vec<u8> {
        let msg = NlmsghdrBuilder::default()
            .nl_type(family)
            .nl_flags(flags)
            .nl_seq(seq)
            .nl_pid(0)
            .nl_payload(NlPayload::Payload(genl))
            .build()
            .unwrap();
        let mut c = Cursor::new(Vec::new());
        msg.to_bytes(&mut c).unwrap();
        c.into_inner()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The 48 bytes verified in research/crates.md §7 (family 0x1234 as a placeholder, seq 1,
    /// REQUEST|ACK): nlmsghdr | genlmsghdr | MGMTDEV_DEV_NAME "vduse\0"+pad |
    /// DEV_NAME "vduse-blk0\0"+pad.
    #[test]
    fn dev_new_bytes_match_verified_message() {
        let genl = dev_new_request("vduse-blk0").unwrap();
        let got = encode(0x1234, 1, NlmF::REQUEST | NlmF::ACK, genl);
        let mut want = hex("30000000 3412 0500 01000000 00000000 03 01 0000 0a00 0200");
        want.extend_from_slice(b"vduse\0\0\0");
        want.extend_from_slice(&hex("0f00 0400"));
        want.extend_from_slice(b"vduse-blk0\0\0");
        assert_eq!(want.len(), 48);
        assert_eq!(got, want);
    }

    #[test]
    fn dev_del_carries_only_the_device_name() {
        let genl = dev_del_request("d").unwrap();
        assert_eq!(*genl.cmd(), VDPA_CMD_DEV_DEL);
        assert_eq!(*genl.version(), VDPA_GENL_VERSION);
        let got = encode(0x20, 7, NlmF::REQUEST | NlmF::ACK, genl);
        let mut want = hex("1c000000 2000 0500 07000000 00000000 04 01 0000 0600 0400");
        want.extend_from_slice(b"d\0\0\0");
        assert_eq!(got, want);
    }

    #[test]
    fn dump_requests_have_no_attributes() {
        let genl = vdpa_request(OP_DEV_LIST, VDPA_CMD_DEV_GET, &[]).unwrap();
        let got = encode(0x20, 2, NlmF::REQUEST | NlmF::DUMP, genl);
        assert_eq!(got, hex("14000000 2000 0103 02000000 00000000 05 01 0000"));
    }

    #[test]
    fn reply_string_attributes_are_decoded() {
        let reply = vdpa_request(
            OP_DEV_LIST,
            VDPA_CMD_DEV_NEW,
            &[
                (VDPA_ATTR_MGMTDEV_DEV_NAME, VDUSE_MGMTDEV_NAME),
                (VDPA_ATTR_DEV_NAME, "blk1"),
            ],
        )
        .unwrap();
        assert_eq!(
            string_attr(&reply, VDPA_ATTR_DEV_NAME).as_deref(),
            Some("blk1")
        );
        assert_eq!(
            string_attr(&reply, VDPA_ATTR_MGMTDEV_DEV_NAME).as_deref(),
            Some("vduse")
        );
        assert_eq!(string_attr(&reply, 21), None);
        assert_eq!(c_string(b"abc"), "abc");
        assert_eq!(c_string(b"ab\0\0"), "ab");
    }

    #[test]
    fn names_are_validated() {
        assert!(matches!(
            check_name(""),
            Err(NetlinkError::InvalidName { .. })
        ));
        assert!(check_name(&"a".repeat(255)).is_ok());
        assert!(check_name(&"a".repeat(256)).is_err());
        assert!(check_name("a\0b").is_err());
    }

    #[test]
    fn kernel_errors_read_as_one_line() {
        let msg = |op, name: &str, errno| {
            NetlinkError::Kernel {
                op,
                name: name.to_string(),
                errno,
            }
            .to_string()
        };
        let eio = format!("vdpa dev list: {}", Errno::EIO.desc());
        let cases = [
            (
                OP_DEV_ADD,
                "blk0",
                Errno::EEXIST,
                "vdpa device blk0 already exists",
            ),
            (
                OP_DEV_ADD,
                "blk0",
                Errno::ENODEV,
                "no vduse management device: load the vduse module",
            ),
            (
                OP_DEV_DEL,
                "blk0",
                Errno::ENOENT,
                "no vdpa device named blk0",
            ),
            (
                OP_DEV_DEL,
                "blk0",
                Errno::ENODEV,
                "no vdpa device named blk0",
            ),
            (
                OP_DEV_ADD,
                "blk0",
                Errno::EPERM,
                "vdpa dev add blk0: permission denied (needs CAP_NET_ADMIN)",
            ),
            (OP_DEV_LIST, "", Errno::EIO, eio.as_str()),
        ];
        for (op, name, errno, want) in cases {
            assert_eq!(msg(op, name, errno), want, "{op} {name} {errno}");
        }
        for text in [
            msg(OP_DEV_ADD, "x", Errno::EINVAL),
            msg(OP_DEV_DEL, "x", Errno::EINVAL),
            NetlinkError::FamilyMissing.to_string(),
        ] {
            assert!(!text.contains('\n'), "{text}");
        }
        assert_eq!(
            NetlinkError::FamilyMissing.to_string(),
            "the vdpa generic netlink family is not registered: load the vdpa module \
             (modprobe vdpa)"
        );
        let e = NetlinkError::Kernel {
            op: OP_DEV_ADD,
            name: String::new(),
            errno: Errno::EBUSY,
        };
        assert_eq!(e.errno(), Some(Errno::EBUSY));
    }

    /// Exercise `exchange` (ACK handling, dump handling, kernel errors) against the always
    /// present `nlctrl` family, which speaks the same generic-netlink framing as vdpa.
    #[test]
    fn exchange_paths_against_nlctrl() {
        const GENL_ID_CTRL: u16 = 0x10;
        const CTRL_CMD_GETFAMILY: u8 = 3;
        const CTRL_ATTR_FAMILY_NAME: u16 = 2;
        let (router, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty()).unwrap();
        let nl = VdpaNetlink {
            router,
            family: GENL_ID_CTRL,
        };

        // doit + NLM_F_ACK: one reply, then the ACK.
        let req = vdpa_request(
            "get",
            CTRL_CMD_GETFAMILY,
            &[(CTRL_ATTR_FAMILY_NAME, "nlctrl")],
        )
        .unwrap();
        let replies = nl.exchange("get", "nlctrl", NlmF::ACK, req).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(
            string_attr(&replies[0], CTRL_ATTR_FAMILY_NAME).as_deref(),
            Some("nlctrl")
        );

        // dump: several replies, ended by NLMSG_DONE.
        let req = vdpa_request("dump", CTRL_CMD_GETFAMILY, &[]).unwrap();
        let replies = nl.exchange("dump", "", NlmF::DUMP, req).unwrap();
        assert!(replies
            .iter()
            .any(|m| string_attr(m, CTRL_ATTR_FAMILY_NAME).as_deref() == Some("nlctrl")));

        // A kernel error becomes NetlinkError::Kernel with the positive errno.
        let req = vdpa_request(
            "get",
            CTRL_CMD_GETFAMILY,
            &[(CTRL_ATTR_FAMILY_NAME, "nosuchfam")],
        )
        .unwrap();
        match nl.exchange("get", "nosuchfam", NlmF::ACK, req) {
            Err(NetlinkError::Kernel { errno, name, .. }) => {
                assert_eq!(errno, Errno::ENOENT);
                assert_eq!(name, "nosuchfam");
            }
            other => panic!("expected ENOENT, got {other:?}"),
        }
    }

    #[test]
    fn handle_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<VdpaNetlink>();
        assert_send_sync::<NetlinkError>();
    }

    /// This host has no vdpa module, so resolving the family must fail cleanly (and when a
    /// kernel with vdpa runs the tests, connecting must work).
    #[test]
    fn connect_without_vdpa_family_is_family_missing() {
        let vdpa_loaded = std::path::Path::new("/sys/bus/vdpa").exists();
        match VdpaNetlink::connect() {
            Ok(nl) => assert!(vdpa_loaded, "connected without a vdpa bus: {nl:?}"),
            // Also the answer outside the initial network namespace, even with vdpa loaded.
            Err(NetlinkError::FamilyMissing) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
