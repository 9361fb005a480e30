//! `vduse-blkd probe`: what this host's kernel offers, and what it lacks.
//!
//! Owns: the probe report (text and JSON), asking `/dev/vduse/control` for API versions and
//! features, the throwaway device that tells the bounce size and whether umem exists, and the
//! list of missing pieces with advice (from [`super::host`]). A probe reports; it does not
//! fail because something is missing: whatever it could not find is in `missing`.
//! Must not touch: `serve`'s lifecycle (see [`super::daemon`]).

use std::io::{self, Write};
use std::path::Path;

use log::warn;
use nix::errno::Errno;
use serde::Serialize;
use thiserror::Error;

use super::api::{self, kernel_versions, negotiate, ApiVersion, NegotiateError};
use super::device;
use super::fd::{ControlFd, DeviceFd, CONTROL_PATH};
use super::host::{self, HostFacts, Tristate, MODULES};
use super::netlink::VdpaNetlink;
use super::sysfs;
use crate::blk::{BlkConfig, BlkGeometry};
use crate::uapi::vduse as u;
use crate::uapi::virtio as vf;

/// Why asking the control device failed (reported in `missing`, not as the exit code).
#[derive(Debug, Error)]
pub enum ProbeError {
    /// No permission on the control device.
    #[error("permission denied opening {CONTROL_PATH}: run as root")]
    Permission,
    /// The control device could not be opened.
    #[error("cannot open {CONTROL_PATH}: {0}")]
    Open(#[source] io::Error),
    /// API negotiation failed.
    #[error("VDUSE API negotiation failed: {0}")]
    Negotiate(#[from] NegotiateError),
    /// A VDUSE ioctl failed.
    #[error("{op} failed: {errno}")]
    Ioctl {
        /// What.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The throwaway device could not be described.
    #[error("{0}")]
    Device(String),
}

/// What is known about VDUSE itself.
#[derive(Debug, Clone, Serialize)]
pub struct VduseStatus {
    /// `/dev/vduse/control` exists.
    pub control_device: bool,
    /// `/sys/module/vduse` exists.
    pub module_loaded: bool,
    /// The vduse module is under `/lib/modules/RELEASE` (as a file or built in); `null` when
    /// that directory or its index is not there (a container, a minimal host).
    pub module_available: Option<bool>,
    /// The Kconfig symbols vduse-blkd depends on: `"y"`, `"m"`, `"n"`, or `null` when no
    /// kernel configuration was found.
    pub kernel_config: std::collections::BTreeMap<&'static str, Option<Tristate>>,
    /// Where the kernel configuration was read from, if anywhere.
    pub config_source: Option<String>,
}

/// One piece the kernel lacks, with advice that works on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    /// The module or resource, e.g. `vduse`.
    pub what: String,
    /// Which commands need it.
    pub needed_for: &'static str,
    /// What to do about it, in one line.
    pub advice: String,
}

/// What the kernel's VDUSE answers (only when the control device could be used).
#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    /// Versions the kernel accepts.
    pub api_versions: Vec<u64>,
    /// The version negotiation chose.
    pub api_version_chosen: u64,
    /// Optional VDUSE features the kernel offers (0 when none).
    pub features: u64,
    /// The subset we enable with `VDUSE_SET_FEATURES`.
    pub features_enabled: u64,
    /// `VDUSE_GET_FEATURES` exists.
    pub features_ioctl: bool,
    /// `VDUSE_IOTLB_GET_INFO` (and so REG_UMEM) exists.
    pub umem_ioctl: bool,
    /// Default bounce buffer size in bytes, if the kernel reports it.
    pub bounce_size: Option<u64>,
}

/// What `probe` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Kernel release.
    pub kernel: String,
    /// `/dev/vduse/control` exists.
    pub control_device: bool,
    /// VDUSE's module and kernel configuration.
    pub vduse: VduseStatus,
    /// `virtio_vdpa` is registered on the vdpa bus.
    pub virtio_vdpa: bool,
    /// `vhost_vdpa` is registered on the vdpa bus.
    pub vhost_vdpa: bool,
    /// `virtio_blk` is registered on the virtio bus.
    pub virtio_blk: bool,
    /// The vdpa netlink family answers and lists the vduse management device.
    pub vdpa_mgmtdev_vduse: bool,
    /// The kernel's answers; absent when the control device could not be used.
    #[serde(flatten)]
    pub api: Option<ApiReport>,
    /// Everything missing, one entry each (empty when nothing is).
    pub missing: Vec<Missing>,
}

/// Look at this host: VDUSE's answers when the control device is there, and otherwise (or
/// also) what is missing and what to do about it. Never fails: what it cannot find or ask is
/// reported in `missing`.
pub fn probe() -> ProbeReport {
    let facts = HostFacts::gather();
    let control_device = Path::new(CONTROL_PATH).exists();
    let (api, api_error) = if control_device {
        match probe_api() {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let virtio_vdpa = sysfs::vdpa_driver_loaded("virtio_vdpa");
    let vhost_vdpa = sysfs::vdpa_driver_loaded("vhost_vdpa");
    let virtio_blk = sysfs::virtio_blk_loaded();
    let mut missing = Vec::new();
    if !control_device {
        missing.push(missing_vduse(&facts));
    }
    if let Some(e) = api_error {
        missing.push(Missing {
            what: format!("access to {CONTROL_PATH}"),
            needed_for: "serve, list, del",
            advice: e.to_string(),
        });
    }
    for (present, module, needed_for) in [
        (
            virtio_vdpa,
            "virtio_vdpa",
            "serve --attach virtio, the default",
        ),
        (
            virtio_blk,
            "virtio_blk",
            "serve --attach virtio, the default",
        ),
        (vhost_vdpa, "vhost_vdpa", "serve --attach vhost"),
    ] {
        if !present {
            missing.push(Missing {
                what: module.into(),
                needed_for,
                advice: facts.advice(module),
            });
        }
    }
    ProbeReport {
        kernel: facts.release.clone(),
        control_device,
        vduse: vduse_status(&facts, control_device),
        virtio_vdpa,
        vhost_vdpa,
        virtio_blk,
        vdpa_mgmtdev_vduse: VdpaNetlink::connect()
            .and_then(|nl| nl.mgmtdev_has_vduse())
            .unwrap_or(false),
        api,
        missing,
    }
}

fn vduse_status(facts: &HostFacts, control_device: bool) -> VduseStatus {
    VduseStatus {
        control_device,
        module_loaded: host::sys_module("vduse"),
        module_available: facts.module_available("vduse"),
        kernel_config: MODULES
            .iter()
            .map(|m| (m.symbol, facts.config_value(m.symbol)))
            .collect(),
        config_source: facts.config.as_ref().map(|c| c.source.clone()),
    }
}

/// The missing control device: the module, or (module loaded) the device node.
fn missing_vduse(facts: &HostFacts) -> Missing {
    let advice = if host::sys_module("vduse") {
        format!(
            "the vduse module is loaded but {CONTROL_PATH} is missing: mount devtmpfs on /dev (in a container, the host must pass the device in)"
        )
    } else {
        facts.advice("vduse")
    };
    Missing {
        what: "vduse".into(),
        needed_for: "serve, list, del",
        advice,
    }
}

/// Ask the control device for versions and features, and learn the bounce size and umem
/// support from a throwaway device.
fn probe_api() -> Result<ApiReport, ProbeError> {
    let mut control = ControlFd::open().map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => ProbeError::Permission,
        _ => ProbeError::Open(e),
    })?;
    let versions = kernel_versions(&mut control)?;
    let n = negotiate(&mut control)?;
    let (umem_ioctl, bounce_size) = probe_device(&control, n.version).unwrap_or_else(|e| {
        warn!("probe device: {e}");
        (false, None)
    });
    Ok(ApiReport {
        api_versions: versions,
        api_version_chosen: n.version.number(),
        features: n.features,
        features_enabled: n.enabled,
        features_ioctl: n.features_ioctl,
        umem_ioctl,
        bounce_size,
    })
}

/// The names of the VDUSE feature bits in `f` ("QUEUE_READY SUSPEND", "none").
fn feature_names(f: u64) -> String {
    let known = [
        (crate::uapi::vduse::VDUSE_F_QUEUE_READY, "QUEUE_READY"),
        (crate::uapi::vduse::VDUSE_F_SUSPEND, "SUSPEND"),
    ];
    let mut names: Vec<String> = known
        .iter()
        .filter(|(bit, _)| f & (1 << bit) != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    let rest = known.iter().fold(f, |r, (bit, _)| r & !(1 << bit));
    if rest != 0 {
        names.push(format!("unknown {rest:#x}"));
    }
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
#[test]
fn feature_bits_are_named() {
    assert_eq!(feature_names(0), "none");
    assert_eq!(feature_names(0b11), "QUEUE_READY SUSPEND");
    assert_eq!(feature_names(0b101), "QUEUE_READY unknown 0x4");
}

/// Destroys the throwaway device on every exit path.
struct Throwaway<'a> {
    control: &'a ControlFd,
    name: [u8; u::VDUSE_NAME_MAX],
}

impl Throwaway<'_> {
    fn destroy(&self) -> Result<(), ProbeError> {
        match device::destroy_dev(self.control, &self.name) {
            Ok(()) | Err(Errno::EINVAL) => Ok(()), // EINVAL: already gone
            Err(errno) => Err(ProbeError::Ioctl {
                op: "VDUSE_DESTROY_DEV",
                errno,
            }),
        }
    }
}

impl Throwaway<'_> {
    /// Destroy now and report the result (instead of a warning from `drop`).
    fn finish(self) -> Result<(), ProbeError> {
        let result = self.destroy();
        std::mem::forget(self); // nothing left to undo; holds no resources of its own
        result
    }
}

impl Drop for Throwaway<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            warn!("cleanup of the probe device: {e}");
        }
    }
}

fn probe_device(control: &ControlFd, v: ApiVersion) -> Result<(bool, Option<u64>), ProbeError> {
    let name = format!("vduse-blkd-probe-{}", std::process::id());
    let name_buf = u::vduse_name(&name).map_err(|e| ProbeError::Device(e.to_string()))?;
    let blk = BlkConfig::new(BlkGeometry {
        capacity_sectors: 8,
        block_size: 512,
        num_queues: 1,
        queue_size: 16,
        read_only: true,
    });
    let (ngroups, nas) = if v == ApiVersion::V1 { (1, 1) } else { (0, 0) };
    let header = u::VduseDevConfig {
        name: name_buf,
        device_id: vf::VIRTIO_ID_BLOCK,
        features: blk.features(),
        vq_num: 1,
        vq_align: 4096,
        ngroups,
        nas,
        config_size: blk.to_bytes().len() as u32,
        ..Default::default()
    };
    let buf = u::DevConfigBuf::new(&header, &blk.to_bytes())
        .map_err(|e| ProbeError::Device(e.to_string()))?;
    control
        .create_dev(&buf)
        .map_err(|errno| ProbeError::Ioctl {
            op: "VDUSE_CREATE_DEV",
            errno,
        })?;
    let device = Throwaway {
        control,
        name: name_buf,
    };
    let bounce = sysfs::bounce_size(&name);
    let umem = match DeviceFd::open(&name) {
        Ok(dev) => !matches!(dev.iotlb_info(0), Err(Errno::ENOTTY)),
        Err(_) => false,
    };
    device.finish()?;
    Ok((umem, bounce))
}

/// Print the probe report: JSON, or one `key: value` line per fact and one line per missing
/// piece.
pub fn print_probe(r: &ProbeReport, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, r)?;
    }
    out.flush()
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The text form of the report.
pub fn write_text(out: &mut dyn Write, r: &ProbeReport) -> io::Result<()> {
    writeln!(out, "kernel:              {}", r.kernel)?;
    writeln!(
        out,
        "control device:      {} ({CONTROL_PATH})",
        yn(r.control_device)
    )?;
    writeln!(
        out,
        "vduse module:        {}",
        if r.vduse.module_loaded {
            "loaded"
        } else {
            "not loaded"
        }
    )?;
    let available = match r.vduse.module_available {
        Some(b) => yn(b).to_string(),
        None => format!("unknown (no {})", host::modules_dir(&r.kernel).display()),
    };
    writeln!(out, "vduse module file:   {available}")?;
    let config = match &r.vduse.config_source {
        Some(src) => {
            let values: Vec<String> = r
                .vduse
                .kernel_config
                .iter()
                .map(|(k, v)| format!("{k}={}", v.unwrap_or(Tristate::N)))
                .collect();
            format!("{} ({src})", values.join(" "))
        }
        None => format!(
            "not found ({} or {})",
            host::PROC_CONFIG,
            host::boot_config_path(&r.kernel).display()
        ),
    };
    writeln!(out, "kernel config:       {config}")?;
    if let Some(a) = &r.api {
        write_api(out, a)?;
    }
    writeln!(out, "virtio_vdpa loaded:  {}", yn(r.virtio_vdpa))?;
    writeln!(out, "vhost_vdpa loaded:   {}", yn(r.vhost_vdpa))?;
    writeln!(out, "virtio_blk loaded:   {}", yn(r.virtio_blk))?;
    writeln!(out, "vdpa mgmtdev vduse:  {}", yn(r.vdpa_mgmtdev_vduse))?;
    if r.missing.is_empty() {
        writeln!(out, "missing:             nothing")?;
    }
    for m in &r.missing {
        writeln!(
            out,
            "missing:             {} (for {}): {}",
            m.what, m.needed_for, m.advice
        )?;
    }
    Ok(())
}

fn write_api(out: &mut dyn Write, a: &ApiReport) -> io::Result<()> {
    writeln!(
        out,
        "API versions:        {:?} (kernel accepts)",
        a.api_versions
    )?;
    writeln!(
        out,
        "API version chosen:  {} (we speak {:?})",
        a.api_version_chosen,
        api::SUPPORTED_VERSIONS
    )?;
    if a.features_ioctl {
        writeln!(
            out,
            "VDUSE features:      {:#x} offered ({}), {:#x} enabled",
            a.features,
            feature_names(a.features),
            a.features_enabled
        )?;
    } else {
        writeln!(out, "VDUSE features:      none (no VDUSE_GET_FEATURES)")?;
    }
    writeln!(out, "umem (REG_UMEM):     {}", yn(a.umem_ioctl))?;
    match a.bounce_size {
        Some(b) => writeln!(out, "default bounce size: {} MiB", b >> 20),
        None => writeln!(out, "default bounce size: unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(api: Option<ApiReport>, missing: Vec<Missing>) -> ProbeReport {
        ProbeReport {
            kernel: "6.12.0-test".into(),
            control_device: api.is_some(),
            vduse: VduseStatus {
                control_device: api.is_some(),
                module_loaded: api.is_some(),
                module_available: None,
                kernel_config: MODULES.iter().map(|m| (m.symbol, None)).collect(),
                config_source: None,
            },
            virtio_vdpa: false,
            vhost_vdpa: false,
            virtio_blk: true,
            vdpa_mgmtdev_vduse: false,
            api,
            missing,
        }
    }

    #[test]
    fn json_without_vduse_has_the_missing_pieces_and_no_api_fields() {
        let r = report(
            None,
            vec![Missing {
                what: "vduse".into(),
                needed_for: "serve, list, del",
                advice: "run: modprobe vduse".into(),
            }],
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["vduse"]["control_device"], false);
        assert!(v["vduse"]["module_available"].is_null());
        assert!(v["vduse"]["kernel_config"]["CONFIG_VDPA_USER"].is_null());
        assert_eq!(v["missing"][0]["advice"], "run: modprobe vduse");
        assert!(v.get("api_version_chosen").is_none(), "{v}");
    }

    #[test]
    fn json_with_vduse_keeps_the_api_fields_at_the_top() {
        let api = ApiReport {
            api_versions: vec![0, 1],
            api_version_chosen: 1,
            features: 0,
            features_enabled: 0,
            features_ioctl: false,
            umem_ioctl: true,
            bounce_size: Some(64 << 20),
        };
        let v = serde_json::to_value(report(Some(api), vec![])).unwrap();
        assert_eq!(v["api_version_chosen"], 1);
        assert_eq!(v["bounce_size"], 64 << 20);
        assert_eq!(v["missing"], serde_json::json!([]));
    }

    #[test]
    fn text_names_each_missing_piece_on_one_line() {
        let missing = vec![
            Missing {
                what: "vduse".into(),
                needed_for: "serve, list, del",
                advice: "cannot tell: no kernel config found".into(),
            },
            Missing {
                what: "vhost_vdpa".into(),
                needed_for: "serve --attach vhost",
                advice: "run: modprobe vhost_vdpa".into(),
            },
        ];
        let mut out = Vec::new();
        write_text(&mut out, &report(None, missing)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("missing:")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("vduse") && lines[0].contains("cannot tell"));
        assert!(lines[1].contains("modprobe vhost_vdpa"));
        assert!(text.contains("kernel config:       not found"), "{text}");
        assert!(!text.contains("API version chosen"), "{text}");
    }
}
