//! `audit`, per running QEMU: could a wedge here be pinned to a line today?
//!
//! In: the run dir (every `<VMID>.pid`, each proven by [`crate::target::resolve`]) and
//! the debug dirs. Out: per VM, the build-id of the running image (`/proc/PID/exe`, not
//! the path on disk), whether a matching debug file is installed and which package would
//! provide one, whether the file on disk is still that build (an upgrade with old VMs
//! still running is common), and whether the guest agent answers. Reads files and /proc,
//! sends one QMP `query-version` and one `guest-ping`, each under a short deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::qmp::{QmpClient, QmpConfig};
use crate::stacks::dbgsym::{self, Package};
use crate::stacks::native::modules::{self, DebugSearch, Elf};
use crate::target::{self, Layout, VmId};

/// Deadlines for the two questions sent to a VM.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTimeouts {
    /// Whole QMP session: connect, greeting, capabilities, `query-version`.
    pub qmp: Duration,
    /// `guest-ping`, connect to answer.
    pub agent: Duration,
}

impl Default for ProbeTimeouts {
    fn default() -> Self {
        ProbeTimeouts { qmp: Duration::from_secs(3), agent: Duration::from_secs(1) }
    }
}

/// One running QEMU, as far as it could be read.
#[derive(Debug, Clone, Serialize)]
pub struct RunningQemu {
    pub vmid: String,
    pub pid: Option<i32>,
    /// Why the pidfile did not lead to a proven QEMU; everything else is empty then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub binary: Option<Binary>,
    pub debug: Option<DebugFile>,
    pub package: Option<Package>,
    pub agent: Option<Agent>,
    /// The answer: how far a stack of this QEMU resolves with what is installed now.
    pub pin: Option<Pin>,
    /// What to do, in order.
    pub advice: Vec<String>,
}

/// The running image and the file on disk.
#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    /// The path the process was started from (`/proc/PID/exe`, without ` (deleted)`).
    pub path: String,
    /// The build-id of the running image, hex.
    pub build_id: Option<String>,
    /// The image carries a full symbol table (`.symtab`) / DWARF itself.
    pub symtab: bool,
    pub dwarf: bool,
    pub on_disk: OnDisk,
}

/// Whether the file at [`Binary::path`] is still the running build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum OnDisk {
    /// Same build-id (the same file, or a reinstall of the same build).
    Same,
    /// Another build is installed there now; the running one is deleted.
    Replaced {
        build_id: Option<String>,
    },
    /// Nothing at the path any more.
    Missing,
    Unreadable {
        detail: String,
    },
}

/// The separate debug file for the running build-id.
#[derive(Debug, Clone, Serialize)]
pub struct DebugFile {
    /// Where it was found, if it was.
    pub found: Option<String>,
    /// It carries DWARF (file:line) / a full symbol table.
    pub dwarf: bool,
    pub symtab: bool,
    /// Every path looked at, in order.
    pub searched: Vec<String>,
}

/// The guest agent's answer to `guest-ping`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Agent {
    /// No `<VMID>.qga` socket: the VM has no agent configured.
    NotConfigured,
    /// Round trip in milliseconds (0.1 ms resolution).
    Answers {
        ms: f64,
    },
    NoAnswer {
        detail: String,
    },
}

/// How far a captured stack of this QEMU would resolve today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pin {
    /// DWARF for the running build: function, file and line, inlined frames.
    Line,
    /// A full symbol table but no DWARF: every function named, no lines.
    Function,
    /// Exported symbols only (`.dynsym`): static functions unnamed, no lines.
    ExportedOnly,
}

/// Every `<VMID>.pid` in the run dir, in VMID order, each checked (concurrently).
pub async fn running(layout: &Layout, search: &DebugSearch, limits: ProbeTimeouts) -> Vec<RunningQemu> {
    let vmids = pidfile_vmids(&layout.run_dir);
    if vmids.is_empty() {
        return Vec::new();
    }
    let installed = tokio::task::spawn_blocking(|| installed_qemu(Duration::from_secs(5))).await.ok().flatten();
    let mut set = tokio::task::JoinSet::new();
    for (i, vmid) in vmids.into_iter().enumerate() {
        let (layout, search, installed) = (layout.clone(), search.clone(), installed.clone());
        set.spawn(async move { (i, one(vmid, &layout, &search, limits, installed).await) });
    }
    let mut out: Vec<(usize, RunningQemu)> = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(pair) = r {
            out.push(pair);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// VMIDs with a pidfile in `run_dir`, sorted. Files whose stem is not a VMID are skipped.
fn pidfile_vmids(run_dir: &Path) -> Vec<VmId> {
    let mut ids: Vec<VmId> = std::fs::read_dir(run_dir)
        .map(|rd| {
            rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".pid")?.parse::<VmId>().ok()).collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

async fn one(
    vmid: VmId,
    layout: &Layout,
    search: &DebugSearch,
    limits: ProbeTimeouts,
    installed: Option<(String, String)>,
) -> RunningQemu {
    let mut r = RunningQemu {
        vmid: vmid.to_string(),
        pid: None,
        error: None,
        binary: None,
        debug: None,
        package: None,
        agent: None,
        pin: None,
        advice: Vec::new(),
    };
    let t = match target::resolve(vmid, layout) {
        Ok(t) => t,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    r.pid = Some(t.pid);
    let qga = layout.run_dir.join(format!("{vmid}.qga"));
    let (files, agent) = {
        let (pid, search) = (t.pid, search.clone());
        let files = tokio::task::spawn_blocking(move || read_binary(pid, &search));
        let agent = tokio::task::spawn_blocking(move || ping_agent(&qga, limits.agent));
        (files.await.ok(), agent.await.ok())
    };
    let version = if t.qmp_present { query_version(&t.qmp_socket, limits.qmp).await } else { None };
    r.agent = agent;
    r.package = Some(match version {
        Some((qemu, package)) => dbgsym::from_qmp(&package, Some(qemu)),
        None => package_from_dpkg(installed),
    });
    match files {
        Some(Ok((binary, debug))) => {
            r.pin = Some(pin_level(&binary, &debug));
            r.binary = Some(binary);
            r.debug = Some(debug);
        }
        Some(Err(e)) => r.error = Some(e),
        None => r.error = Some("reading the binary panicked".into()),
    }
    r.advice = advice(&r);
    r
}

/// The running image's build-id and symbols, the file on disk, and the debug file.
pub(crate) fn read_binary(pid: i32, search: &DebugSearch) -> Result<(Binary, DebugFile), String> {
    let exe = format!("/proc/{pid}/exe");
    let link = std::fs::read_link(&exe).map_err(|e| format!("{exe}: {e}; run as root"))?;
    let link = link.to_string_lossy();
    let deleted = link.ends_with(" (deleted)");
    let path = link.trim_end_matches(" (deleted)").to_string();
    // The running image itself, even when its file was deleted or replaced.
    let image = Elf::open(Path::new(&exe))?;
    let build_id = image.build_id.as_deref().map(modules::hex);
    let on_disk = if !deleted {
        OnDisk::Same
    } else {
        // Through the process's own root, as the tool reads mapped files elsewhere.
        let on_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
        match Elf::open(&on_root) {
            Ok(now) if now.build_id == image.build_id => OnDisk::Same,
            Ok(now) => OnDisk::Replaced { build_id: now.build_id.as_deref().map(modules::hex) },
            Err(_) if !on_root.exists() => OnDisk::Missing,
            Err(e) => OnDisk::Unreadable { detail: e },
        }
    };
    let searched: Vec<String> = match &build_id {
        Some(h) => search.dirs.iter().map(|d| modules::build_id_path(d, h).display().to_string()).collect(),
        None => Vec::new(),
    };
    let dbg = image.build_id.as_deref().and_then(|id| modules::debug_file_by_build_id(id, search));
    let debug = DebugFile {
        found: dbg.as_ref().map(|d| d.path.display().to_string()),
        dwarf: dbg.as_ref().is_some_and(|d| d.has_dwarf),
        symtab: dbg.as_ref().is_some_and(|d| d.has_symtab),
        searched,
    };
    let binary = Binary { path, build_id, symtab: image.has_symtab, dwarf: image.has_dwarf, on_disk };
    Ok((binary, debug))
}

fn pin_level(b: &Binary, d: &DebugFile) -> Pin {
    if b.dwarf || d.dwarf {
        Pin::Line
    } else if b.symtab || d.symtab {
        Pin::Function
    } else {
        Pin::ExportedOnly
    }
}

fn ping_agent(socket: &Path, deadline: Duration) -> Agent {
    match crate::qga::ping(socket, deadline) {
        Ok(t) => Agent::Answers { ms: (t.as_secs_f64() * 10_000.0).round() / 10.0 },
        Err(crate::qga::QgaError::NoSocket(_)) => Agent::NotConfigured,
        Err(e) => Agent::NoAnswer { detail: e.to_string() },
    }
}

/// `query-version` → (`major.minor.micro`, `package`), or `None` when QMP does not
/// answer within `budget` (held by another client, or wedged).
async fn query_version(socket: &Path, budget: Duration) -> Option<(String, String)> {
    let cfg = QmpConfig {
        connect_budget: budget / 2,
        greeting_timeout: budget / 3,
        capabilities_timeout: budget / 3,
        ..QmpConfig::default()
    };
    let work = async {
        let mut c = QmpClient::connect(socket, &cfg).await.ok()?;
        let v = c.execute("query-version", None, budget / 3).await.ok()?.value;
        let q = &v["qemu"];
        let qemu = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
        Some((qemu, v["package"].as_str().unwrap_or("").trim().to_string()))
    };
    tokio::time::timeout(budget, work).await.ok().flatten()
}

fn package_from_dpkg(installed: Option<(String, String)>) -> Package {
    match installed {
        Some((name, v)) if name == "pve-qemu-kvm" => dbgsym::pve(&v, "dpkg", None),
        Some((_, v)) => dbgsym::debian(&v, "dpkg", None),
        None => Package {
            source: "dpkg",
            name: None,
            version: None,
            qemu: None,
            dbgsym: None,
            note: "QMP did not answer and neither pve-qemu-kvm nor qemu-system-x86 is installed (dpkg-query)".into(),
        },
    }
}

/// `(package, version)` of the installed QEMU: pve-qemu-kvm first, then Debian's; each
/// dpkg-query killed after `limit`.
pub(crate) fn installed_qemu(limit: Duration) -> Option<(String, String)> {
    let cancel = crate::cancel::Cancel::new();
    ["pve-qemu-kvm", "qemu-system-x86"].iter().find_map(|name| {
        let argv = ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", name].map(String::from).to_vec();
        let out = crate::exec::run(&crate::exec::Spec::new(argv, limit), &cancel).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = text.strip_prefix("installed ")?.trim();
        (out.success() && !version.is_empty()).then(|| (name.to_string(), crate::qmp::one_line(version, 80)))
    })
}

/// What to do, from what was found.
fn advice(r: &RunningQemu) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(b), Some(pin)) = (&r.binary, r.pin) else { return out };
    let id = b.build_id.as_deref().unwrap_or("(none)");
    match &b.on_disk {
        OnDisk::Replaced { build_id } => out.push(format!(
            "{} on disk is another build ({}) than the running one ({id}): symbols must match the running build-id; \
             only a full stop→start runs the installed build",
            b.path,
            build_id.as_deref().unwrap_or("no build-id")
        )),
        OnDisk::Missing => out.push(format!(
            "{} is gone from disk: the running build ({id}) is no longer installed; only a full stop→start runs an installed build",
            b.path
        )),
        _ => {}
    }
    if pin == Pin::Line {
        return out;
    }
    let pkg = r.package.as_ref();
    match pkg.and_then(|p| p.dbgsym.as_ref()) {
        Some(d) => {
            let stale = pkg.is_some_and(|p| p.source == "dpkg") && b.on_disk != OnDisk::Same;
            if stale {
                out.push(format!(
                    "installed {d} would match the installed binary, not the running one; the running version is unknown (QMP did not answer)"
                ));
            } else if matches!(b.on_disk, OnDisk::Replaced { .. } | OnDisk::Missing) {
                // The debug package depends on pve-qemu-kvm of exactly its version: apt
                // would downgrade the installed build or refuse. Unpack it beside instead.
                let deb = d.replace('=', "_");
                out.push(format!(
                    "the running build is no longer installed, so do not apt install {d} (it depends on that exact pve-qemu-kvm and would downgrade it): \
                     apt-get download {d}; dpkg-deb -x {deb}_amd64.deb /root/qemu-dbg; then pass --debug-dir /root/qemu-dbg/usr/lib/debug to audit and inspect --resymbolize (build-id {id})"
                ));
            } else {
                out.push(format!("apt install {d}   (then the debug file for build-id {id} appears under .build-id)"));
            }
        }
        None => out.push(format!(
            "no installable debug symbols for build-id {id}: {}",
            pkg.map(|p| p.note.as_str()).unwrap_or("the QEMU package is unknown")
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vmid_pidfiles_count() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["102.pid", "99.pid", "abc.pid", "103.qmp", "0101.pid", "1000.pid"] {
            std::fs::write(dir.path().join(f), "1").unwrap();
        }
        let ids: Vec<String> = pidfile_vmids(dir.path()).iter().map(|v| v.to_string()).collect();
        assert_eq!(ids, ["102", "1000"]);
    }

    fn stripped_pve(version: &str, on_disk: OnDisk) -> RunningQemu {
        RunningQemu {
            vmid: "102".into(),
            pid: Some(4242),
            error: None,
            binary: Some(Binary {
                path: "/usr/bin/qemu-system-x86_64".into(),
                build_id: Some("ab12".into()),
                symtab: false,
                dwarf: false,
                on_disk,
            }),
            debug: None,
            package: Some(crate::stacks::dbgsym::pve(version, "qmp", None)),
            agent: None,
            pin: Some(Pin::ExportedOnly),
            advice: vec![],
        }
    }

    /// The debug package depends on pve-qemu-kvm of exactly its version: installing it
    /// for a build that is no longer installed would downgrade pve-qemu-kvm, so the
    /// advice then unpacks it beside; for pre-8.0 builds it names pve-qemu-kvm-dbg.
    #[test]
    fn advice_names_the_right_package_and_never_downgrades() {
        let same = advice(&stripped_pve("9.2.0-5", OnDisk::Same));
        assert_eq!(same, ["apt install pve-qemu-kvm-dbgsym=9.2.0-5   (then the debug file for build-id ab12 appears under .build-id)"]);
        let replaced = advice(&stripped_pve("9.2.0-5", OnDisk::Replaced { build_id: Some("cd34".into()) })).join("\n");
        assert!(replaced.contains("another build (cd34)"), "{replaced}");
        assert!(replaced.contains("do not apt install pve-qemu-kvm-dbgsym=9.2.0-5"), "{replaced}");
        assert!(
            replaced.contains(
                "apt-get download pve-qemu-kvm-dbgsym=9.2.0-5; dpkg-deb -x pve-qemu-kvm-dbgsym_9.2.0-5_amd64.deb"
            ),
            "{replaced}"
        );
        assert!(!replaced.lines().any(|l| l.starts_with("apt install")), "{replaced}");
        let old = advice(&stripped_pve("7.2.0-8", OnDisk::Same));
        assert!(old[0].starts_with("apt install pve-qemu-kvm-dbg=7.2.0-8 "), "{old:?}");
    }
}
