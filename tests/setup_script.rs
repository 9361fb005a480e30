//! `tools/setup` never removes or downgrades a package the machine has.
//!
//! The script runs for real, with fake `apt-get`, `dpkg-query` and `sudo` first on PATH:
//! the fakes answer `apt-get -s` with a recorded plan (the exact lines apt prints, taken
//! from this machine kind, where stable's QEMU removes the backports `qemu-utils`) and log
//! every call, so each test can assert which real install, if any, was attempted. Real
//! `dpkg --compare-versions` decides what a downgrade is.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

/// What apt-get -s printed on this machine kind for stable's qemu-system-x86.
const PLAN_REMOVES_QEMU_UTILS: &str = "\
NOTE: This is only a simulation!
The following packages will be REMOVED:
  qemu-utils
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst qemu-system-common (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b2 Debian:12.15/oldstable [amd64])
Conf qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b2 Debian:12.15/oldstable [amd64])
";

/// The same install from backports: nothing removed, an upgrade is harmless.
const PLAN_CLEAN: &str = "\
Inst libext2fs2 [1.47.0-2] (1.47.0-2+b2 Debian:12.15/oldstable [amd64])
Inst qemu-system-common (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
";

/// A plan that downgrades a package that did not come from backports.
const PLAN_DOWNGRADES_LOCAL: &str = "\
Inst libfoo1 [2.0-1local1] (1.9-3 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b2 Debian:12.15/oldstable [amd64])
";

const FAKE_APT_GET: &str = r#"#!/bin/sh
echo "apt-get $*" >>"$FAKE_DIR/log"
sim=0 bp=0
for a in "$@"; do
    case $a in
    -s) sim=1 ;;
    -t) bp=1 ;;
    esac
done
if [ "$sim" = 1 ]; then
    if [ "$bp" = 1 ]; then cat "$FAKE_DIR/plan-backports"; else cat "$FAKE_DIR/plan"; fi
fi
exit 0
"#;

const FAKE_DPKG_QUERY: &str = r#"#!/bin/sh
# dpkg-query -W -f=FORMAT PKG
pkg=$3
case $2 in
*Status*)
    if grep -qx "$pkg" "$FAKE_DIR/missing"; then exit 1; fi
    echo "install ok installed" ;;
*Version*)
    v=$(sed -n "s/^$pkg=//p" "$FAKE_DIR/versions")
    [ -n "$v" ] || exit 1
    printf '%s' "$v" ;;
esac
"#;

const FAKE_SUDO: &str = "#!/bin/sh\n[ \"$1\" = -n ] && shift\nexec \"$@\"\n";

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new(missing: &[&str], plan: &str, plan_backports: &str) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("bin");
        for (name, text) in [
            ("apt-get", FAKE_APT_GET),
            ("dpkg-query", FAKE_DPKG_QUERY),
            ("sudo", FAKE_SUDO),
        ] {
            let p = bin.join(name);
            fs::write(&p, text).expect("write fake");
            let mut perm = fs::metadata(&p).expect("stat").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            fs::set_permissions(&p, perm).expect("chmod");
        }
        let w = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
        w("missing", &(missing.join("\n") + "\n"));
        w("plan", plan);
        w("plan-backports", plan_backports);
        w(
            "versions",
            "qemu-utils=1:10.0.2+ds-2+deb13u1~bpo12+1\nlibfoo1=2.0-1local1\n",
        );
        w("log", "");
        Fake { dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("bash")
            .arg(root.join("tools/setup"))
            .args(args)
            .env("PATH", path)
            .env("FAKE_DIR", self.dir.path())
            .env("VDUSE_BLKD_CACHE", self.dir.path().join("cache"))
            .output()
            .expect("run tools/setup")
    }

    /// Run `tools/setup` with `args`, assert that it succeeds, and return its stdout.
    #[track_caller]
    fn run_ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run `tools/setup` and assert that it fails with exactly one line on stderr: that line.
    #[track_caller]
    fn fails_with_one_line(&self) -> String {
        let o = self.run(&[]);
        assert!(!o.status.success(), "setup must fail: {o:?}");
        let err: Vec<String> = String::from_utf8_lossy(&o.stderr)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(err.len(), 1, "one line on stderr: {err:?}");
        err[0].clone()
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("log"))
            .expect("log")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// apt-get calls that would change the machine: `install` without `-s`.
    fn real_installs(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.split(' ').any(|w| w == "install") && !c.split(' ').any(|w| w == "-s"))
            .collect()
    }

    /// No apt-get call that would change the machine was made.
    #[track_caller]
    fn assert_installed_nothing(&self) {
        assert_eq!(self.real_installs(), Vec::<String>::new());
    }

    /// The one apt-get call that would change the machine (there must be exactly one).
    #[track_caller]
    fn only_real_install(&self) -> String {
        let installs = self.real_installs();
        assert_eq!(installs.len(), 1, "{:?}", self.calls());
        installs[0].clone()
    }
}

/// The fakes need a Debian host's dpkg (for --compare-versions) and a release codename.
fn debian_host() -> bool {
    let has_dpkg = Command::new("dpkg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let codename = fs::read_to_string("/etc/os-release").is_ok_and(|t| {
        t.lines()
            .any(|l| l.starts_with("VERSION_CODENAME=") && l.len() > 17)
    });
    if !(has_dpkg && codename) {
        eprintln!("skipped: needs dpkg and a VERSION_CODENAME in /etc/os-release");
    }
    has_dpkg && codename
}

#[test]
fn stops_and_changes_nothing_when_every_plan_would_remove() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(
        &["qemu-system-x86"],
        PLAN_REMOVES_QEMU_UTILS,
        PLAN_REMOVES_QEMU_UTILS,
    );
    let err = f.fails_with_one_line();
    assert!(err.contains("qemu-utils (removed)"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    f.assert_installed_nothing();
}

#[test]
fn takes_backports_when_that_keeps_the_backports_package() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(&["qemu-system-x86"], PLAN_REMOVES_QEMU_UTILS, PLAN_CLEAN);
    let stdout = f.run_ok(&[]);
    let install = f.only_real_install();
    let words: Vec<&str> = install.split(' ').collect();
    assert!(words.contains(&"--no-remove"), "{install}");
    let t = words.iter().position(|w| *w == "-t").expect("-t SUITE");
    assert!(words[t + 1].ends_with("-backports"), "{install}");
    // The private index, not the machine's: its sources live in the cache.
    assert!(install.contains("Dir::Etc::SourceParts="), "{install}");
    assert!(stdout.contains("-backports"), "{stdout}");
}

#[test]
fn never_downgrades_a_package_that_is_not_from_backports() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(&["qemu-system-x86"], PLAN_DOWNGRADES_LOCAL, PLAN_CLEAN);
    let err = f.fails_with_one_line();
    assert!(err.contains("libfoo1 2.0-1local1 -> 1.9-3"), "{err}");
    f.assert_installed_nothing();
    assert!(
        !f.calls().iter().any(|c| c.contains("-t ")),
        "no backports plan for a local package: {:?}",
        f.calls()
    );
}

#[test]
fn installs_a_harmless_plan_from_the_machines_sources() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(&["fio", "cpio"], PLAN_CLEAN, PLAN_CLEAN);
    f.run_ok(&[]);
    let install = f.only_real_install();
    assert!(install.contains("--no-remove"), "{install}");
    assert!(install.ends_with("cpio fio"), "{install}");
    assert!(!install.contains("-t "), "{install}");
}

#[test]
fn check_reports_the_plan_and_installs_nothing() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(&["qemu-system-x86"], PLAN_REMOVES_QEMU_UTILS, PLAN_CLEAN);
    let stdout = f.run_ok(&["--check"]);
    assert!(
        stdout.contains("would install qemu-system-x86") && stdout.contains("-backports"),
        "{stdout}"
    );
    f.assert_installed_nothing();
}

#[test]
fn asks_apt_nothing_when_everything_is_installed() {
    if !debian_host() {
        return;
    }
    let f = Fake::new(&[], PLAN_CLEAN, PLAN_CLEAN);
    f.run_ok(&[]);
    assert_eq!(f.calls(), Vec::<String>::new());
}
