//! Which package ships the debug symbols of a binary: QEMU's from what its
//! `query-version` names (Proxmox or Debian build), glibc's, or any file dpkg knows.
//! Used by `audit` (can a wedge be pinned to a line?) and by `inspect --resymbolize`
//! and `--qemu-state` (what is still missing).

use std::time::Duration;

use serde::Serialize;

use crate::cancel::Cancel;
use crate::exec::{self, Spec};

/// Which QEMU build runs, and which debug-symbol package would match it.
#[derive(Debug, Clone, Serialize)]
pub struct Package {
    /// `qmp` (query-version of the running process) or `dpkg` (what is installed, which
    /// may be newer than what runs).
    pub source: &'static str,
    /// `pve-qemu-kvm`, `qemu-system-x86`, or none when unrecognised.
    pub name: Option<String>,
    pub version: Option<String>,
    /// QEMU's own version (`major.minor.micro`), from QMP.
    pub qemu: Option<String>,
    /// An installable `name=version`, when one exists.
    pub dbgsym: Option<String>,
    pub note: String,
}

/// What `query-version`'s `package` says about the build: Proxmox writes
/// `pve-qemu-kvm_<version>`, Debian `Debian <version>`.
pub fn from_qmp(package: &str, qemu: Option<String>) -> Package {
    let package = crate::qmp::one_line(package, 120);
    if let Some(v) = package.strip_prefix("pve-qemu-kvm").and_then(|r| r.strip_prefix(['_', '-', ' ', '='])) {
        return pve(v.trim(), "qmp", qemu);
    }
    if let Some(v) = package.strip_prefix("Debian ") {
        return debian(v.trim(), "qmp", qemu);
    }
    Package {
        source: "qmp",
        name: None,
        version: (!package.is_empty()).then_some(package.clone()),
        qemu,
        dbgsym: None,
        note: format!(
            "not a Proxmox or Debian build (package {:?}): its debug symbols come from whoever built it",
            package
        ),
    }
}

/// The Proxmox build `version`: its debug package of the same version. Builds before
/// 8.0.0-1 shipped a hand-made `pve-qemu-kvm-dbg`; since then debhelper generates
/// `pve-qemu-kvm-dbgsym` (pve-qemu commit d0603ef, `--dbgsym-migration` `<<8.0.0-1~`).
/// Either depends on pve-qemu-kvm of exactly that version.
pub fn pve(version: &str, source: &'static str, qemu: Option<String>) -> Package {
    let before_8 = version.split(['.', ':']).next().and_then(|m| m.parse::<u32>().ok()).is_some_and(|m| m < 8);
    let name = if before_8 { "pve-qemu-kvm-dbg" } else { "pve-qemu-kvm-dbgsym" };
    Package {
        source,
        name: Some("pve-qemu-kvm".into()),
        version: Some(version.into()),
        qemu,
        dbgsym: Some(format!("{name}={version}")),
        note: format!("{name} from the same Proxmox repository as pve-qemu-kvm (before 8.0 the package was pve-qemu-kvm-dbg, since then pve-qemu-kvm-dbgsym)"),
    }
}

/// Debian's own build `version`: its debug symbols are not in the main archive.
pub fn debian(version: &str, source: &'static str, qemu: Option<String>) -> Package {
    Package {
        source,
        name: Some("qemu-system-x86".into()),
        version: Some(version.into()),
        qemu,
        dbgsym: None,
        note: format!(
            "Debian's own QEMU: no debug-symbol package is reachable from Debian's main archive \
             (qemu-system-x86-dbgsym={version} is only in the separate debian-debug archive)"
        ),
    }
}

/// `DEBUGINFOD_URLS`, when set and not blank: debuginfod is used exactly then.
pub fn debuginfod_urls() -> Option<String> {
    std::env::var("DEBUGINFOD_URLS").ok().filter(|u| !u.trim().is_empty())
}

/// Whether a mapped file (a path or a bare file name) is QEMU's image; Proxmox's `kvm`
/// is a link to it.
pub fn is_qemu_image(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.starts_with("qemu-system-") || file == "kvm"
}

/// The package that ships the debug info of `module` (a path as mapped), when known:
/// glibc's libraries → `libc6-dbg`; QEMU → what [`from_qmp`] says of the archived
/// `query-version` package (`pve-qemu-kvm-dbgsym=<version>` on Proxmox); any other file
/// that dpkg on this host knows → `<package>-dbgsym`.
pub fn for_module(module: &str, qemu_package: Option<&str>) -> Option<String> {
    let file = module.rsplit('/').next().unwrap_or(module);
    const GLIBC: &[&str] =
        &["libc.so", "ld-linux", "libm.so", "libpthread", "libdl.so", "librt.so", "libresolv", "libanl", "libutil"];
    if GLIBC.iter().any(|g| file.starts_with(g)) {
        return Some("libc6-dbg".into());
    }
    if is_qemu_image(file) {
        let p = qemu_package.map(|p| from_qmp(p, None));
        return Some(match p {
            Some(Package { dbgsym: Some(d), .. }) => d,
            Some(Package { name: Some(n), version: Some(v), .. }) => {
                format!("{n}-dbgsym={v} (only in Debian's separate debian-debug archive)")
            }
            _ => "pve-qemu-kvm-dbgsym on Proxmox, qemu-system-x86-dbgsym from debian-debug on Debian".into(),
        });
    }
    let spec = Spec::new(vec!["dpkg-query".into(), "-S".into(), module.into()], Duration::from_secs(5));
    let out = exec::run(&spec, &Cancel::new()).ok().filter(|o| o.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text.lines().next()?.split(':').next()?.trim();
    (!pkg.is_empty() && !pkg.contains(' ')).then(|| format!("{pkg}-dbgsym"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_field_names_the_build() {
        let p = from_qmp("pve-qemu-kvm_9.0.2-4", Some("9.0.2".into()));
        assert_eq!(p.dbgsym.as_deref(), Some("pve-qemu-kvm-dbgsym=9.0.2-4"));
        // Before 8.0.0-1 the debug package was the hand-made pve-qemu-kvm-dbg.
        let old = from_qmp("pve-qemu-kvm_7.2.0-8", None);
        assert_eq!(old.dbgsym.as_deref(), Some("pve-qemu-kvm-dbg=7.2.0-8"));
        assert_eq!(pve("8.0.2-3", "dpkg", None).dbgsym.as_deref(), Some("pve-qemu-kvm-dbgsym=8.0.2-3"));
        let d = from_qmp("Debian 1:7.2+dfsg-7+deb12u6", Some("7.2.11".into()));
        assert_eq!((d.name.as_deref(), d.dbgsym.as_deref()), (Some("qemu-system-x86"), None));
        assert!(d.note.contains("no debug-symbol package is reachable"), "{}", d.note);
        let own = from_qmp("", Some("10.0.0".into()));
        assert!(own.name.is_none() && own.dbgsym.is_none());
        // Outside text stays one line.
        assert!(!from_qmp("x\ny", None).note.contains('\n'));
    }

    #[test]
    fn packages_for_glibc_and_qemu() {
        assert_eq!(for_module("/usr/lib/x86_64-linux-gnu/libc.so.6", None).as_deref(), Some("libc6-dbg"));
        assert_eq!(for_module("/lib64/ld-linux-x86-64.so.2", None).as_deref(), Some("libc6-dbg"));
        assert_eq!(
            for_module("/usr/bin/qemu-system-x86_64", Some("pve-qemu-kvm_9.2.0-5")).as_deref(),
            Some("pve-qemu-kvm-dbgsym=9.2.0-5")
        );
        assert!(for_module("/usr/bin/qemu-system-x86_64", Some("Debian 1:7.2+dfsg-7"))
            .unwrap()
            .starts_with("qemu-system-x86-dbgsym=1:7.2+dfsg-7 "));
        assert!(for_module("/usr/bin/qemu-system-x86_64", None).unwrap().contains("pve-qemu-kvm-dbgsym"));
    }
}
