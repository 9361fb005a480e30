//! What this host can tell about the kernel pieces vduse-blkd needs, and advice that works
//! on this host when one is missing.
//!
//! Owns: reading the kernel configuration (`/proc/config.gz`, `/boot/config-RELEASE`), the
//! module index (`/lib/modules/RELEASE/modules.dep` and `modules.builtin`), whether
//! `modprobe` is on `PATH`, and turning those facts into one line of advice per module.
//! Must not touch: the VDUSE fds, netlink, or anything that changes the system.
//!
//! The advice never tells a user to run something that cannot work here: `modprobe M` only
//! when the module file exists and `modprobe` is on `PATH`; a kernel built without the
//! option is named as such; without `/lib/modules/RELEASE` (a container, a minimal host) the
//! module has to be loaded by whoever owns the kernel.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use log::warn;
use serde::Serialize;

/// Where the running kernel's configuration may be, in the order they are tried.
pub const PROC_CONFIG: &str = "/proc/config.gz";

/// A kernel module vduse-blkd may need, with the Kconfig symbol that builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// Module name, as in `/sys/module/NAME` and `modprobe NAME`.
    pub name: &'static str,
    /// The Kconfig symbol, e.g. `CONFIG_VDPA_USER`.
    pub symbol: &'static str,
}

/// Every module vduse-blkd uses, bottom up.
pub const MODULES: [Module; 5] = [
    Module {
        name: "vdpa",
        symbol: "CONFIG_VDPA",
    },
    Module {
        name: "vduse",
        symbol: "CONFIG_VDPA_USER",
    },
    Module {
        name: "virtio_vdpa",
        symbol: "CONFIG_VIRTIO_VDPA",
    },
    Module {
        name: "vhost_vdpa",
        symbol: "CONFIG_VHOST_VDPA",
    },
    Module {
        name: "virtio_blk",
        symbol: "CONFIG_VIRTIO_BLK",
    },
];

/// The Kconfig symbol of a module vduse-blkd knows.
pub fn symbol_of(module: &str) -> Option<&'static str> {
    MODULES.iter().find(|m| m.name == module).map(|m| m.symbol)
}

/// A tristate Kconfig value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tristate {
    /// Built in.
    Y,
    /// Built as a module.
    M,
    /// Not built (`# CONFIG_X is not set`, or absent because its dependencies are not).
    N,
}

impl fmt::Display for Tristate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tristate::Y => "y",
            Tristate::M => "m",
            Tristate::N => "n",
        })
    }
}

/// A kernel configuration text and where it came from.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The file it was read from.
    pub source: String,
    text: String,
}

impl KernelConfig {
    /// A configuration read from `source`.
    pub fn new(source: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            text: text.into(),
        }
    }

    /// The value of `symbol`. A symbol that is absent is not built: Kconfig leaves out
    /// options whose dependencies are not met (e.g. everything under an unset CONFIG_VDPA).
    pub fn get(&self, symbol: &str) -> Tristate {
        for line in self.text.lines().map(str::trim) {
            if let Some(value) = line
                .strip_prefix(symbol)
                .and_then(|rest| rest.strip_prefix('='))
            {
                return match value {
                    "y" => Tristate::Y,
                    "m" => Tristate::M,
                    _ => Tristate::N,
                };
            }
        }
        Tristate::N
    }
}

/// Read the running kernel's configuration: `/proc/config.gz` (gzip), else
/// `/boot/config-RELEASE`. `None` when neither is there or readable.
pub fn read_kernel_config(release: &str) -> Option<KernelConfig> {
    match fs::File::open(PROC_CONFIG) {
        Ok(f) => {
            let mut text = String::new();
            match flate2::read::GzDecoder::new(f).read_to_string(&mut text) {
                Ok(_) => return Some(KernelConfig::new(PROC_CONFIG, text)),
                Err(e) => warn!("cannot decompress {PROC_CONFIG}: {e}"),
            }
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!("cannot read {PROC_CONFIG}: {e}")
        }
        Err(_) => {}
    }
    let boot = boot_config_path(release);
    fs::read_to_string(&boot)
        .ok()
        .map(|text| KernelConfig::new(boot.display().to_string(), text))
}

/// `/boot/config-RELEASE`.
pub fn boot_config_path(release: &str) -> PathBuf {
    PathBuf::from(format!("/boot/config-{release}"))
}

/// `/lib/modules/RELEASE`.
pub fn modules_dir(release: &str) -> PathBuf {
    Path::new("/lib/modules").join(release)
}

/// The module index of `/lib/modules/RELEASE`.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// `modules.dep`, if readable.
    pub dep: Option<String>,
    /// `modules.builtin`, if readable.
    pub builtin: Option<String>,
}

impl ModuleIndex {
    /// Read the index under `dir`.
    pub fn read(dir: &Path) -> Self {
        Self {
            dep: fs::read_to_string(dir.join("modules.dep")).ok(),
            builtin: fs::read_to_string(dir.join("modules.builtin")).ok(),
        }
    }

    /// Whether `module` is a module file or built in; `None` when there is no index.
    pub fn has(&self, module: &str) -> Option<bool> {
        if self.dep.is_none() && self.builtin.is_none() {
            return None;
        }
        let listed = |text: &Option<String>| {
            text.as_deref().is_some_and(|t| {
                t.lines()
                    .any(|line| module_of_index_line(line).is_some_and(|m| m == module))
            })
        };
        Some(listed(&self.dep) || listed(&self.builtin))
    }
}

/// The module a `modules.dep` / `modules.builtin` line names: `kernel/drivers/vdpa/
/// vdpa_user/vduse.ko.xz: kernel/...` is `vduse`. File names may use `-` for `_`.
fn module_of_index_line(line: &str) -> Option<String> {
    let path = line.split(':').next()?.trim();
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next().filter(|_| file.contains(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// Whether `program` is an executable file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether `/sys/module/NAME` exists (a loaded module, or a built-in one with parameters).
pub fn sys_module(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// What this host can tell about its kernel.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `uname -r`.
    pub release: String,
    /// The kernel configuration, if found.
    pub config: Option<KernelConfig>,
    /// The module index; `None` when `/lib/modules/RELEASE` does not exist.
    pub modules: Option<ModuleIndex>,
    /// `modprobe` is on `PATH`.
    pub modprobe: bool,
}

impl HostFacts {
    /// Look at the running host.
    pub fn gather() -> Self {
        let release = kernel_release();
        let dir = modules_dir(&release);
        Self {
            config: read_kernel_config(&release),
            modules: dir.is_dir().then(|| ModuleIndex::read(&dir)),
            modprobe: on_path("modprobe"),
            release,
        }
    }

    /// The configured value of `symbol`, if the configuration was found.
    pub fn config_value(&self, symbol: &str) -> Option<Tristate> {
        self.config.as_ref().map(|c| c.get(symbol))
    }

    /// Whether `module` exists under `/lib/modules/RELEASE` (as a file or built in);
    /// `None` when that directory or its index is not there.
    pub fn module_available(&self, module: &str) -> Option<bool> {
        self.modules.as_ref().and_then(|m| m.has(module))
    }

    /// One line of advice for a missing `module` that works on this host.
    pub fn advice(&self, module: &str) -> String {
        let r = &self.release;
        let symbol = symbol_of(module);
        match symbol.and_then(|s| self.config_value(s)) {
            Some(Tristate::N) => {
                let s = symbol.unwrap_or_default();
                let bus =
                    if module != "vdpa" && self.config_value("CONFIG_VDPA") == Some(Tristate::N) {
                        " (nor CONFIG_VDPA, which it needs)"
                    } else {
                        ""
                    };
                return format!(
                    "this kernel ({r}) was built without {s}{bus}: boot a kernel built with {s}=m or =y"
                );
            }
            Some(Tristate::Y) => {
                let s = symbol.unwrap_or_default();
                let dev = if module == "vduse" {
                    " and that devtmpfs is mounted on /dev"
                } else {
                    ""
                };
                return format!(
                    "{s}=y (built in) but {module} is not there: check /sys/module/{module}{dev}"
                );
            }
            Some(Tristate::M) | None => {}
        }
        let dir = modules_dir(r);
        let dir = dir.display();
        if self.modules.is_none() {
            return format!(
                "there is no {dir} here (a container?): {module} must be loaded by the host (modprobe {module} there)"
            );
        }
        let configured = self.config.is_some(); // and so =m: =n and =y returned above
        let loadable = match self.module_available(module) {
            Some(found) => found,
            None => configured, // no index to look in: trust the config
        };
        if loadable && self.modprobe {
            format!("run: modprobe {module}")
        } else if loadable {
            format!(
                "modprobe is not on PATH: install kmod, or load {module} from {dir} with insmod"
            )
        } else if configured {
            format!(
                "this kernel has {}=m but {dir} has no {module} module: install this kernel's modules package",
                symbol.unwrap_or("it")
            )
        } else {
            format!(
                "cannot tell: no kernel config found at {PROC_CONFIG} or {}; check /sys/module/{module}",
                boot_config_path(r).display()
            )
        }
    }
}

/// The running kernel's release (`uname -r`), empty if unknown.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Advice for a missing `module`, for this host (reads the host's files).
pub fn module_advice(module: &str) -> String {
    HostFacts::gather().advice(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
# Automatically generated file; DO NOT EDIT.
CONFIG_VDPA=m
CONFIG_VDPA_USER=m
CONFIG_VIRTIO_VDPA=y
# CONFIG_VHOST_VDPA is not set
CONFIG_VDPA_USER_EXTRA=y
";

    #[test]
    fn config_values() {
        let c = KernelConfig::new("test", CONFIG);
        assert_eq!(c.get("CONFIG_VDPA_USER"), Tristate::M);
        assert_eq!(c.get("CONFIG_VIRTIO_VDPA"), Tristate::Y);
        assert_eq!(c.get("CONFIG_VHOST_VDPA"), Tristate::N, "is not set");
        assert_eq!(c.get("CONFIG_VIRTIO_BLK"), Tristate::N, "absent");
        // A longer symbol with the same prefix is not the one asked for.
        let only_longer = KernelConfig::new("t", "CONFIG_VDPA_USER_EXTRA=y\n");
        assert_eq!(only_longer.get("CONFIG_VDPA_USER"), Tristate::N);
        let y = KernelConfig::new("t", "CONFIG_VDPA_USER=y\n");
        assert_eq!(y.get("CONFIG_VDPA_USER"), Tristate::Y);
    }

    #[test]
    fn tristates_serialize_as_kconfig_letters() {
        let v = [
            Some(Tristate::Y),
            Some(Tristate::M),
            Some(Tristate::N),
            None,
        ];
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"["y","m","n",null]"#);
    }

    #[test]
    fn module_index_lines() {
        let idx = ModuleIndex {
            dep: Some(
                "kernel/drivers/vdpa/vdpa_user/vduse.ko.xz: kernel/drivers/vdpa/vdpa.ko.xz\n\
                 kernel/drivers/vdpa/vdpa.ko.xz:\n\
                 kernel/drivers/virtio/virtio-vdpa.ko.zst:\n"
                    .into(),
            ),
            builtin: Some("kernel/drivers/block/virtio_blk.ko\n".into()),
        };
        assert_eq!(idx.has("vduse"), Some(true));
        assert_eq!(idx.has("vdpa"), Some(true));
        assert_eq!(idx.has("virtio_vdpa"), Some(true), "'-' in the file name");
        assert_eq!(idx.has("virtio_blk"), Some(true), "built in");
        assert_eq!(idx.has("vhost_vdpa"), Some(false));
        assert_eq!(ModuleIndex::default().has("vduse"), None);
    }

    fn facts(config: Option<&str>, dep: Option<&str>, modprobe: bool) -> HostFacts {
        HostFacts {
            release: "6.12.0-test".into(),
            config: config.map(|t| KernelConfig::new("/boot/config-6.12.0-test", t)),
            modules: dep.map(|d| ModuleIndex {
                dep: Some(d.into()),
                builtin: None,
            }),
            modprobe,
        }
    }

    const DEP: &str = "kernel/drivers/vdpa/vdpa_user/vduse.ko.xz: kernel/drivers/vdpa/vdpa.ko.xz\n";

    #[test]
    fn advice_says_modprobe_only_where_it_works() {
        let a = facts(Some(CONFIG), Some(DEP), true).advice("vduse");
        assert_eq!(a, "run: modprobe vduse");
        let a = facts(None, Some(DEP), true).advice("vduse");
        assert_eq!(a, "run: modprobe vduse", "the module file is enough");
        let a = facts(Some(CONFIG), Some(DEP), false).advice("vduse");
        assert!(a.contains("modprobe is not on PATH"), "{a}");
        let a = facts(Some(CONFIG), None, true).advice("vduse");
        assert!(
            a.contains("/lib/modules/6.12.0-test") && a.contains("host"),
            "{a}"
        );
        assert!(!a.starts_with("run:"), "{a}");
    }

    #[test]
    fn advice_names_the_missing_config() {
        let a = facts(Some("# CONFIG_VDPA_USER is not set\n"), Some(DEP), true).advice("vduse");
        assert!(
            a.contains("built without CONFIG_VDPA_USER") && !a.contains("run: modprobe"),
            "{a}"
        );
        let a = facts(Some(""), None, true).advice("vduse");
        assert!(a.contains("built without CONFIG_VDPA_USER"), "absent: {a}");
        assert!(a.contains("nor CONFIG_VDPA,"), "the bus is absent too: {a}");
        let a = facts(Some(CONFIG), None, true).advice("vhost_vdpa");
        assert!(a.contains("built without CONFIG_VHOST_VDPA:"), "{a}");
        let a = facts(Some("CONFIG_VDPA_USER=y\n"), Some(DEP), true).advice("vduse");
        assert!(a.contains("built in"), "{a}");
        let a = facts(Some(CONFIG), Some(""), true).advice("vduse");
        assert!(a.contains("modules package"), "{a}");
    }

    #[test]
    fn advice_without_any_config_says_so() {
        let a = facts(None, Some(""), true).advice("vduse");
        assert_eq!(
            a,
            "cannot tell: no kernel config found at /proc/config.gz or \
             /boot/config-6.12.0-test; check /sys/module/vduse"
        );
    }

    #[test]
    fn every_module_has_a_symbol() {
        for m in ["vduse", "vdpa", "virtio_vdpa", "vhost_vdpa", "virtio_blk"] {
            assert!(symbol_of(m).is_some(), "{m}");
        }
        assert_eq!(symbol_of("vduse"), Some("CONFIG_VDPA_USER"));
    }
}
