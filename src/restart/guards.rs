//! The checks that stand between a sealed archive and a stopped VM: the archive gate,
//! the HA listing, the proven kill (pidfd, re-proved right before the signal), waiting
//! for the old QEMU to go, and proving the new one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{human, RestartError, RestartParams};
use crate::archive::{self, Sealed};
use crate::qmp::{QmpClient, QmpConfig};
use crate::target::{self, Target, VmId};

/// The gate: the archive exists, and reading it back still matches the manifest and
/// the hash reported at sealing time.
pub fn gate(sealed: Option<&Sealed>) -> Result<archive::VerifyReport, RestartError> {
    let sealed = sealed.ok_or(RestartError::NotSealed)?;
    let report = archive::verify(&sealed.path).map_err(|e| RestartError::Verify(e.to_string()))?;
    if report.sha256 != sealed.sha256 {
        return Err(RestartError::Verify(format!(
            "{} now hashes to {}, not {} as sealed",
            sealed.path.display(),
            report.sha256,
            sealed.sha256
        )));
    }
    Ok(report)
}

/// `<pve-dir>/ha/resources.cfg`.
pub fn ha_resources_path(pve_dir: &Path) -> PathBuf {
    pve_dir.join("ha").join("resources.cfg")
}

/// Whether `vm: <vmid>` is a section header in HA's `resources.cfg`. A missing file
/// means no HA; an unreadable one is an error (we cannot prove the VM is not managed).
pub fn ha_managed(pve_dir: &Path, vmid: VmId) -> Result<bool, String> {
    let path = ha_resources_path(pve_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(ha_lists(&text, vmid))
}

pub(super) fn ha_lists(text: &str, vmid: VmId) -> bool {
    text.lines().any(|line| {
        // Section headers start at column 0; properties are indented.
        if line.starts_with(char::is_whitespace) {
            return false;
        }
        let Some((kind, id)) = line.split_once(':') else { return false };
        kind.trim() == "vm" && id.trim() == vmid.to_string()
    })
}

/// Whether any process (other than a zombie) has this pid.
pub(super) fn process_exists(pid: i32) -> bool {
    matches!(crate::procfs::parse_stat_file(&format!("/proc/{pid}/stat")), Ok(s) if s.state != 'Z' && s.state != 'X')
}

/// Waits until the old process (pid + start time) is gone or a zombie. `None` when
/// gone; otherwise its state letter and wchan.
pub(super) fn wait_gone(old: &Target, limit: Duration) -> Option<(char, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let st = crate::procfs::parse_stat_file(&format!("/proc/{}/stat", old.pid));
        match st {
            Ok(s) if s.starttime == old.starttime && s.state != 'Z' && s.state != 'X' => {
                if Instant::now() >= deadline {
                    let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", old.pid)).unwrap_or_default();
                    return Some((s.state, if wchan.is_empty() { "-".into() } else { wchan }));
                }
            }
            _ => return None,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) enum Kill {
    Sent(&'static str),
    NotSame,
    Gone,
    Error(String),
}

/// SIGKILL to the old QEMU, only if it is still proven to be it. The pidfd is opened
/// first, then the proof is repeated, then the signal goes through the pidfd: the
/// check and the kill refer to the same process even if the pid is reused meanwhile.
pub(super) fn kill_proven(old: &Target) -> Kill {
    // SAFETY: plain syscalls with integer arguments; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, old.pid, 0) } as i32;
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Kill::Gone,
            Some(libc::ENOSYS) => {
                // Kernel < 5.3: prove, then kill(2) at once (a small reuse window remains).
                if !old.still_same() {
                    return Kill::NotSame;
                }
                // SAFETY: kill(2) on a pid proven an instant ago.
                if unsafe { libc::kill(old.pid, libc::SIGKILL) } == 0 {
                    Kill::Sent("kill(2); no pidfd on this kernel")
                } else {
                    Kill::Error(std::io::Error::last_os_error().to_string())
                }
            }
            _ => Kill::Error(format!("pidfd_open: {err}")),
        };
    }
    let result = if !old.still_same() {
        Kill::NotSame
    } else {
        // SAFETY: fd is a pidfd we own; no siginfo; flags 0.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if r == 0 {
            Kill::Sent("pidfd_send_signal")
        } else {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                Kill::Gone
            } else {
                Kill::Error(format!("pidfd_send_signal: {err}"))
            }
        }
    };
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
}

/// Waits for a new QEMU proven by the same rule as the capture, other than `old`, and
/// (if configured) for its `query-status`. `Err` carries a new pid if one was seen.
pub(super) fn verify_new(req: &RestartParams, old: &Target) -> Result<(Target, Option<String>), (Option<i32>, String)> {
    let deadline = Instant::now() + req.cfg.verify_timeout;
    let mut last_err;
    let new = loop {
        match target::resolve_with(old.vmid, &req.layout, &req.spec) {
            Ok(t) if t.pid == old.pid && t.starttime == old.starttime => {
                last_err = format!("the pidfile still names the old QEMU (pid {})", old.pid)
            }
            Ok(t) => break t,
            Err(e) => last_err = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err((None, format!("no new proven QEMU within {}: {last_err}", human(req.cfg.verify_timeout))));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Through virsh (libvirt) the socket is libvirtd's: the proof is the verification.
    if !req.cfg.verify_qmp || new.monitor != target::Monitor::Socket {
        return Ok((new, None));
    }
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
    let socket = new.qmp_socket.clone();
    let fut = async move {
        let cfg = QmpConfig { connect_budget: left, ..QmpConfig::default() };
        let mut c = QmpClient::connect(&socket, &cfg).await.map_err(|e| e.to_string())?;
        let r = c.execute("query-status", None, left.min(Duration::from_secs(10))).await.map_err(|e| e.to_string())?;
        Ok::<String, String>(r.value.get("status").and_then(|s| s.as_str()).unwrap_or("?").to_string())
    };
    let status = match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(fut),
        Err(_) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(fut),
            Err(e) => Err(e.to_string()),
        },
    };
    match status {
        Ok(st) => Ok((new, Some(st))),
        Err(e) => Err((
            Some(new.pid),
            format!("new pid {} does not answer query-status on {}: {e}", new.pid, new.qmp_socket.display()),
        )),
    }
}
