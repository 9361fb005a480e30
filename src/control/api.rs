//! VDUSE API-version and optional-feature negotiation on `/dev/vduse/control`.
//!
//! Owns: choosing the API version and probing optional kernel features, the way the kernel
//! discussion settled it:
//! - always set the version explicitly: on 7.x a bare `VDUSE_GET_API_VERSION` on a fresh fd
//!   switches that fd to v1, and a v0-style `CREATE_DEV` then fails with EINVAL;
//! - use the highest version both sides speak, found by trying `SET_API_VERSION` from our
//!   highest downwards (a kernel answers EINVAL for versions it does not know);
//! - optional features as Linux 7.3 merged them ("if userspace can handle all failures
//!   easily, just add an ioctl": no API version 2, no `vduse_features` field in
//!   `vduse_dev_config`): call `VDUSE_GET_FEATURES` and read EINVAL/ENOTTY as "no optional
//!   features" (what 6.12 and 7.2 answer), never a failed start; where it answers, enable
//!   with `VDUSE_SET_FEATURES` exactly the subset we implement ([`SUPPORTED_FEATURES`]),
//!   before any device is created.
//!
//! The kernel side is behind [`ControlOps`] so tests can play Linux 6.12 (v0 only), 7.2 (v1;
//! GET switches the default) and 7.3 (v1 + GET/SET_FEATURES offering QUEUE_READY and
//! SUSPEND) as they behave, error codes included. Must not touch: device creation or
//! anything on a device fd.

use crate::uapi::vduse as u;
use nix::errno::Errno;
use serde::Serialize;
use thiserror::Error;

/// The API versions this program speaks, highest last. Code paths key on [`ApiVersion`].
pub const SUPPORTED_VERSIONS: [u64; 2] = [0, 1];
/// The highest version a probe asks the kernel about (to report what it offers).
pub const PROBE_MAX_VERSION: u64 = 4;
/// The optional VDUSE features (bits of `VDUSE_GET_FEATURES`) this program implements and
/// so enables: `VDUSE_F_QUEUE_READY` (the message loop starts and stops one queue on
/// `VDUSE_SET_VQ_READY`) and `VDUSE_F_SUSPEND` (it completes every in-flight request and
/// parks the queues on `VDUSE_SUSPEND`). See [`crate::control::device`].
pub const SUPPORTED_FEATURES: u64 = (1 << u::VDUSE_F_QUEUE_READY) | (1 << u::VDUSE_F_SUSPEND);

/// A negotiated VDUSE API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ApiVersion {
    /// API 0: one address space, no vq groups (every kernel since 5.15).
    V0,
    /// API 1: vq groups and address spaces (`ngroups`/`nas` required in CREATE_DEV).
    V1,
}

impl ApiVersion {
    /// The number the kernel uses.
    pub fn number(self) -> u64 {
        match self {
            ApiVersion::V0 => 0,
            ApiVersion::V1 => 1,
        }
    }

    fn from_number(v: u64) -> Option<Self> {
        match v {
            0 => Some(ApiVersion::V0),
            1 => Some(ApiVersion::V1),
            _ => None,
        }
    }
}

/// The control-fd ioctls negotiation needs.
pub trait ControlOps {
    /// `VDUSE_SET_API_VERSION`.
    fn set_api_version(&mut self, version: u64) -> Result<(), Errno>;
    /// `VDUSE_GET_API_VERSION`.
    fn get_api_version(&mut self) -> Result<u64, Errno>;
    /// `VDUSE_GET_FEATURES` (optional; absent kernels answer EINVAL or ENOTTY).
    fn get_features(&mut self) -> Result<u64, Errno>;
    /// `VDUSE_SET_FEATURES` (only called where `VDUSE_GET_FEATURES` answered).
    fn set_features(&mut self, features: u64) -> Result<(), Errno>;
}

/// Why negotiation failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NegotiateError {
    /// The kernel accepted none of the versions we speak.
    #[error("the kernel's VDUSE speaks none of the API versions {SUPPORTED_VERSIONS:?}")]
    NoCommonVersion,
    /// An ioctl failed in a way that is not "unsupported".
    #[error("{op} failed: {errno}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The kernel reports a different version than the one just set.
    #[error("kernel reports API version {got} after we set {set}")]
    Mismatch {
        /// What we set.
        set: u64,
        /// What GET returned.
        got: u64,
    },
}

/// The outcome of negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    /// The version in force on this control fd.
    pub version: ApiVersion,
    /// Optional VDUSE feature bits the kernel offers (0 when it has no `VDUSE_GET_FEATURES`).
    pub features: u64,
    /// The subset enabled with `VDUSE_SET_FEATURES` (offered ∩ [`SUPPORTED_FEATURES`]).
    pub enabled: u64,
    /// Whether `VDUSE_GET_FEATURES` exists at all.
    pub features_ioctl: bool,
}

fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EINVAL | Errno::ENOTTY)
}

/// Probe optional features: EINVAL/ENOTTY mean "none".
pub fn probe_features(ops: &mut dyn ControlOps) -> Result<(u64, bool), NegotiateError> {
    match ops.get_features() {
        Ok(f) => Ok((f, true)),
        Err(e) if unsupported(e) => Ok((0, false)),
        Err(errno) => Err(NegotiateError::Ioctl {
            op: "VDUSE_GET_FEATURES",
            errno,
        }),
    }
}

/// Probe the optional features and, where the kernel has the ioctls, enable the ones we
/// implement. A kernel that answers GET must answer SET too: its failure is an error.
fn settle_features(
    ops: &mut dyn ControlOps,
    version: ApiVersion,
) -> Result<Negotiated, NegotiateError> {
    let (features, features_ioctl) = probe_features(ops)?;
    let enabled = features & SUPPORTED_FEATURES;
    if features_ioctl {
        ops.set_features(enabled)
            .map_err(|errno| NegotiateError::Ioctl {
                op: "VDUSE_SET_FEATURES",
                errno,
            })?;
    }
    Ok(Negotiated {
        version,
        features,
        enabled,
        features_ioctl,
    })
}

/// Set the highest common version explicitly, confirm it, and probe features.
pub fn negotiate(ops: &mut dyn ControlOps) -> Result<Negotiated, NegotiateError> {
    let mut chosen = None;
    for &v in SUPPORTED_VERSIONS.iter().rev() {
        match ops.set_api_version(v) {
            Ok(()) => {
                chosen = ApiVersion::from_number(v);
                break;
            }
            Err(e) if unsupported(e) => continue,
            Err(errno) => {
                return Err(NegotiateError::Ioctl {
                    op: "VDUSE_SET_API_VERSION",
                    errno,
                })
            }
        }
    }
    let version = chosen.ok_or(NegotiateError::NoCommonVersion)?;
    // Safe now: the version is set, so GET cannot switch it.
    let got = ops
        .get_api_version()
        .map_err(|errno| NegotiateError::Ioctl {
            op: "VDUSE_GET_API_VERSION",
            errno,
        })?;
    if got != version.number() {
        return Err(NegotiateError::Mismatch {
            set: version.number(),
            got,
        });
    }
    settle_features(ops, version)
}

/// Set exactly `version` (for `--api-version`); fails if the kernel or we do not speak it.
pub fn negotiate_exact(
    ops: &mut dyn ControlOps,
    version: u64,
) -> Result<Negotiated, NegotiateError> {
    let v = ApiVersion::from_number(version).ok_or(NegotiateError::NoCommonVersion)?;
    ops.set_api_version(version)
        .map_err(|errno| NegotiateError::Ioctl {
            op: "VDUSE_SET_API_VERSION",
            errno,
        })?;
    settle_features(ops, v)
}

/// Which versions the kernel accepts, from 0 to [`PROBE_MAX_VERSION`]. Leaves the fd set to
/// the last accepted version: call [`negotiate`] afterwards.
pub fn kernel_versions(ops: &mut dyn ControlOps) -> Result<Vec<u64>, NegotiateError> {
    let mut out = Vec::new();
    for v in 0..=PROBE_MAX_VERSION {
        match ops.set_api_version(v) {
            Ok(()) => out.push(v),
            Err(e) if unsupported(e) => {}
            Err(errno) => {
                return Err(NegotiateError::Ioctl {
                    op: "VDUSE_SET_API_VERSION",
                    errno,
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control fd as a given kernel implements it.
    struct FakeKernel {
        max: u64,
        /// 7.x: an fd that was never asked starts at "not asked"; GET switches it to 1.
        not_asked_default: bool,
        version: Option<u64>,
        features: Option<u64>,
        /// What SET_FEATURES enabled (7.3 only).
        enabled: Option<u64>,
        /// errno for an unknown ioctl on the control fd (EINVAL in every kernel so far).
        unknown_ioctl: Errno,
        log: Vec<String>,
    }

    impl FakeKernel {
        fn linux_6_12() -> Self {
            FakeKernel {
                max: 0,
                not_asked_default: false,
                version: Some(0),
                features: None,
                enabled: None,
                unknown_ioctl: Errno::EINVAL,
                log: vec![],
            }
        }
        fn linux_7_2() -> Self {
            FakeKernel {
                max: 1,
                not_asked_default: true,
                version: None,
                features: None,
                enabled: None,
                unknown_ioctl: Errno::EINVAL,
                log: vec![],
            }
        }
        /// 7.3: API 1 as 7.2, plus GET/SET_FEATURES offering QUEUE_READY and SUSPEND.
        fn linux_7_3() -> Self {
            FakeKernel {
                features: Some(0b11),
                ..FakeKernel::linux_7_2()
            }
        }
        /// What CREATE_DEV would see: the version in force.
        fn create_version(&self) -> u64 {
            self.version.unwrap_or(0)
        }
    }

    impl ControlOps for FakeKernel {
        fn set_api_version(&mut self, v: u64) -> Result<(), Errno> {
            self.log.push(format!("set {v}"));
            if v > self.max {
                return Err(Errno::EINVAL);
            }
            self.version = Some(v);
            Ok(())
        }
        fn get_api_version(&mut self) -> Result<u64, Errno> {
            self.log.push("get".into());
            if self.version.is_none() && self.not_asked_default {
                self.version = Some(1);
            }
            Ok(self.version.unwrap_or(0))
        }
        fn get_features(&mut self) -> Result<u64, Errno> {
            self.log.push("features".into());
            self.features.ok_or(self.unknown_ioctl)
        }
        fn set_features(&mut self, f: u64) -> Result<(), Errno> {
            self.log.push(format!("set features {f:#x}"));
            match self.features {
                // 7.3 refuses bits it did not offer.
                Some(offered) if f & !offered == 0 => {
                    self.enabled = Some(f);
                    Ok(())
                }
                Some(_) => Err(Errno::EINVAL),
                None => Err(self.unknown_ioctl),
            }
        }
    }

    #[test]
    fn linux_6_12_gets_v0_and_no_features() {
        let mut k = FakeKernel::linux_6_12();
        let n = negotiate(&mut k).unwrap();
        assert_eq!(n.version, ApiVersion::V0);
        assert_eq!((n.features, n.features_ioctl), (0, false));
        assert_eq!(k.log[0], "set 1", "tries the highest first");
        assert_eq!(k.create_version(), 0);
    }

    #[test]
    fn linux_7_2_gets_v1_set_before_any_get() {
        let mut k = FakeKernel::linux_7_2();
        let n = negotiate(&mut k).unwrap();
        assert_eq!(n.version, ApiVersion::V1);
        let first_get = k.log.iter().position(|l| l == "get").unwrap();
        let first_set = k.log.iter().position(|l| l.starts_with("set")).unwrap();
        assert!(first_set < first_get, "{:?}", k.log);
        assert_eq!(k.create_version(), 1);
    }

    #[test]
    fn linux_7_3_reads_the_offer_and_enables_what_we_implement() {
        let mut k = FakeKernel::linux_7_3();
        let n = negotiate(&mut k).unwrap();
        assert_eq!(n.version, ApiVersion::V1);
        assert_eq!((n.features, n.features_ioctl), (0b11, true));
        assert_eq!(n.enabled, 0b11 & SUPPORTED_FEATURES);
        assert_eq!(k.enabled, Some(n.enabled), "SET_FEATURES was called");
        let set = k
            .log
            .iter()
            .position(|l| l.starts_with("set features"))
            .unwrap();
        let get = k.log.iter().position(|l| l == "features").unwrap();
        assert!(get < set, "{:?}", k.log);
        assert_eq!(kernel_versions(&mut k).unwrap(), vec![0, 1]);
    }

    #[test]
    fn kernels_before_7_3_get_no_set_features_call() {
        for mut k in [FakeKernel::linux_6_12(), FakeKernel::linux_7_2()] {
            let n = negotiate(&mut k).unwrap();
            assert_eq!((n.features, n.enabled, n.features_ioctl), (0, 0, false));
            assert!(
                !k.log.iter().any(|l| l.starts_with("set features")),
                "{:?}",
                k.log
            );
        }
    }

    #[test]
    fn a_failing_set_features_is_an_error() {
        let mut k = FakeKernel::linux_7_3();
        k.features = Some(0);
        // A kernel that offers nothing but then refuses even the empty set.
        struct Refuses(FakeKernel);
        impl ControlOps for Refuses {
            fn set_api_version(&mut self, v: u64) -> Result<(), Errno> {
                self.0.set_api_version(v)
            }
            fn get_api_version(&mut self) -> Result<u64, Errno> {
                self.0.get_api_version()
            }
            fn get_features(&mut self) -> Result<u64, Errno> {
                self.0.get_features()
            }
            fn set_features(&mut self, _: u64) -> Result<(), Errno> {
                Err(Errno::EPERM)
            }
        }
        assert!(matches!(
            negotiate(&mut Refuses(k)),
            Err(NegotiateError::Ioctl {
                op: "VDUSE_SET_FEATURES",
                errno: Errno::EPERM
            })
        ));
    }

    #[test]
    fn enotty_for_features_means_none() {
        let mut k = FakeKernel::linux_7_2();
        k.unknown_ioctl = Errno::ENOTTY;
        assert!(!negotiate(&mut k).unwrap().features_ioctl);
    }

    #[test]
    fn other_errors_are_not_swallowed() {
        /// A control fd whose `VDUSE_SET_API_VERSION` fails with the given errno.
        struct SetVersionFails(Errno);
        impl ControlOps for SetVersionFails {
            fn set_api_version(&mut self, _: u64) -> Result<(), Errno> {
                Err(self.0)
            }
            fn get_api_version(&mut self) -> Result<u64, Errno> {
                Ok(0)
            }
            fn get_features(&mut self) -> Result<u64, Errno> {
                Err(Errno::EINVAL)
            }
            fn set_features(&mut self, _: u64) -> Result<(), Errno> {
                Err(Errno::EINVAL)
            }
        }
        assert!(matches!(
            negotiate(&mut SetVersionFails(Errno::EPERM)),
            Err(NegotiateError::Ioctl {
                errno: Errno::EPERM,
                ..
            })
        ));
        // An ancient kernel without SET_API_VERSION answers EINVAL.
        assert_eq!(
            negotiate(&mut SetVersionFails(Errno::EINVAL)),
            Err(NegotiateError::NoCommonVersion)
        );
    }

    #[test]
    fn probing_versions_on_6_12() {
        let mut k = FakeKernel::linux_6_12();
        assert_eq!(kernel_versions(&mut k).unwrap(), vec![0]);
    }
}
