//! The `host-info` step: what runs (versions), where each disk's data lives (storage
//! backend and backing device), and what the host's I/O looked like over the capture
//! window (in-flight I/O of those devices, I/O pressure, hung-task messages).
//!
//! In: the evidence captured earlier in the run (`qmp/query-block.json`,
//! `proc/cmdline`, `config/<vmid>.conf`, the host step's `host/diskstats` and
//! `host/pressure_io`, `host/kmsg.txt`, `host/journal.txt`) plus a few live, read-only
//! reads (`/proc/PID/exe`, `storage.cfg`, `stat` of each image, `/sys/dev/block`,
//! `/proc/self/mountinfo`, `/proc/diskstats`, `/proc/pressure/io`). Out: one typed
//! [`HostInfo`] at [`PATH`], which the summary renders (live and from an archive alike).
//! A source that cannot be read is a line in `unavailable`, never a failure of the step.

pub mod io;
pub mod storage;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use io::{DeviceIo, DiskCounters, HostIo, Pressure};
pub use storage::{BlockDev, DiskStorage, StorageEntry, StorageKind};

use crate::archive::Evidence;

/// Archive path of the record.
pub const PATH: &str = "host/info.json";

/// Everything the step found. Missing pieces are `None`/empty, with the reason in
/// `unavailable`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostInfo {
    pub collected_at: Option<DateTime<Utc>>,
    pub versions: Versions,
    pub disks: Vec<DiskStorage>,
    pub io: HostIo,
    /// Sources that could not be read, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

/// Versions of what runs: the host and the QEMU image. QMP's `query-version` and
/// `pveversion` are captured by their own steps and read from there.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Versions {
    pub hostname: Option<String>,
    /// `PRETTY_NAME` of `/etc/os-release`.
    pub os: Option<String>,
    /// `uname -r` and `uname -v`.
    pub kernel: Option<String>,
    pub kernel_build: Option<String>,
    /// The running QEMU image (`/proc/PID/exe`) and its GNU build-id.
    pub qemu_binary: Option<String>,
    pub qemu_build_id: Option<String>,
    /// `same`, `replaced by <build-id>`, `missing`: whether the file on disk is still
    /// the running build (an upgrade with old VMs still running is common).
    pub qemu_on_disk: Option<String>,
    /// Debug file found for the running build-id, if any.
    pub qemu_debug_file: Option<String>,
    /// The QEMU package installed (dpkg), `name version`; may be newer than what runs.
    pub qemu_installed: Option<String>,
}

/// What the collector needs besides the evidence.
#[derive(Debug, Clone)]
pub struct Input {
    pub pid: i32,
    pub vmid: String,
    /// Proxmox's config dir (`storage.cfg` lives there).
    pub pve_dir: PathBuf,
    /// Where separate debug files are searched (the `debug_dirs` setting).
    pub debug_dirs: Vec<PathBuf>,
    /// Budget of all `stat`s of images together (a hung NFS mount blocks them).
    pub stat_budget: Duration,
}

/// Collects the record. `same` re-proves the target before `/proc/PID` is read.
pub fn collect(input: &Input, ev: &dyn Evidence, same: &dyn Fn() -> bool) -> HostInfo {
    let mut info = HostInfo { collected_at: Some(Utc::now()), ..Default::default() };
    versions(input, same, &mut info);
    storage::collect(input, ev, &mut info);
    io::collect(ev, &mut info);
    info
}

/// Reads the record from an archive or staging dir.
pub fn load(ev: &dyn Evidence) -> Option<HostInfo> {
    serde_json::from_slice(&ev.read(PATH)?).ok()
}

fn versions(input: &Input, same: &dyn Fn() -> bool, info: &mut HostInfo) {
    let v = &mut info.versions;
    v.hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
    match std::fs::read_to_string("/etc/os-release") {
        Ok(t) => v.os = os_release_name(&t),
        Err(e) => info.unavailable.push(format!("/etc/os-release: {e}")),
    }
    match nix::sys::utsname::uname() {
        Ok(u) => {
            v.kernel = Some(u.release().to_string_lossy().into_owned());
            v.kernel_build = Some(u.version().to_string_lossy().into_owned());
        }
        Err(e) => info.unavailable.push(format!("uname: {e}")),
    }
    if same() {
        let search = crate::stacks::native::modules::DebugSearch { dirs: input.debug_dirs.clone() };
        match crate::diagnose::pinnable::read_binary(input.pid, &search) {
            Ok((b, d)) => {
                v.qemu_on_disk = Some(match &b.on_disk {
                    crate::diagnose::pinnable::OnDisk::Same => "same".into(),
                    crate::diagnose::pinnable::OnDisk::Replaced { build_id } => {
                        format!("replaced by build-id {}", build_id.as_deref().unwrap_or("none"))
                    }
                    crate::diagnose::pinnable::OnDisk::Missing => "missing".into(),
                    crate::diagnose::pinnable::OnDisk::Unreadable { detail } => format!("unreadable: {detail}"),
                });
                v.qemu_binary = Some(b.path);
                v.qemu_build_id = b.build_id;
                v.qemu_debug_file = d.found;
            }
            Err(e) => info.unavailable.push(format!("QEMU image: {e}")),
        }
    } else {
        info.unavailable.push(format!("QEMU image: pid {} is no longer the proven QEMU; not read", input.pid));
    }
    v.qemu_installed =
        crate::diagnose::pinnable::installed_qemu(Duration::from_secs(1)).map(|(n, ver)| format!("{n} {ver}"));
}

/// `PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"` → `Debian GNU/Linux 12 (bookworm)`.
fn os_release_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("PRETTY_NAME=")?;
        Some(crate::qmp::one_line(v.trim().trim_matches('"'), 120))
    })
}

/// Runs `f` on its own thread; `Err` when it has not returned within `budget` (the
/// thread is abandoned: a `stat` on a hung mount must not hold the step) or when an
/// earlier call for `key` is still stuck ([`crate::stuck`]: repeated captures, as
/// `serve` makes them, must not pile up one stuck thread each).
pub(crate) fn bounded<T: Send + 'static>(
    key: &str,
    budget: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    static STUCK: std::sync::OnceLock<std::sync::Arc<crate::stuck::Stuck>> = std::sync::OnceLock::new();
    crate::stuck::bounded_blocking(STUCK.get_or_init(|| crate::stuck::Stuck::new(16)), key, budget, f).map_err(|e| {
        match e {
            crate::stuck::Bounded::Timeout(_) => {
                format!("did not return within {} ms: the storage under it is not answering", budget.as_millis())
            }
            other => other.to_string(),
        }
    })
}

/// `major:minor` of a `dev_t`, as glibc's `gnu_dev_major`/`gnu_dev_minor` split it.
pub(crate) fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The trimmed contents of a small sysfs/proc file.
pub(crate) fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat stuck on a hung mount: the step goes on, and the next capture does not start
    /// a second stuck thread for the same path until the first returns.
    #[test]
    fn a_stuck_call_times_out_once_and_is_not_repeated() {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let r = bounded("test stuck", Duration::from_millis(50), move || {
            let _ = wait.recv();
            let _ = done_tx.send(());
        });
        assert!(r.unwrap_err().contains("did not return within 50 ms"));
        let again = bounded("test stuck", Duration::from_secs(5), || 1);
        assert!(again.unwrap_err().contains("has not returned"), "refused while the first is stuck");
        go.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).expect("the stuck call returned once released");
        // The key is free once the thread has ended (its guard drops right after `f`).
        let mut ok = Err(String::new());
        for _ in 0..100 {
            ok = bounded("test stuck", Duration::from_secs(5), || 2);
            if ok.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ok, Ok(2), "the key stayed stuck after its call returned");
    }

    #[test]
    fn os_release_and_dev_numbers() {
        let t = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(os_release_name(t).as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
        assert_eq!(os_release_name("NAME=x\n"), None);
        // 253:3 (a dm device) and 259:65537 (a large minor) as the kernel encodes them.
        assert_eq!(dev_split(0xfd03), (253, 3));
        let big = (259u64 << 8) | (65537u64 & 0xff) | ((65537u64 & !0xff) << 12);
        assert_eq!(dev_split(big), (259, 65537));
    }
}
