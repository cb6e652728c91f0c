//! One autopsy (and restart) per VM at a time.
//!
//! In: the output directory and a VMID. Out: a [`VmLock`] that holds an exclusive
//! `flock(2)` on `<out>/locks/<VMID>.lock` until it is dropped. The lock is taken after
//! the target is proven and before the first capture, and released after the restart
//! (if any) has ended, so two on-call engineers cannot capture and shoot the same VM
//! at once. The kernel drops a flock when its holder dies, so a crashed run never
//! leaves the VM locked; the holder's pid, user and start time are written into the
//! file so the loser can say who holds it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::Exit;
use crate::target::VmId;

/// Who holds a VM's lock, as written into the lock file by the holder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub user: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub vmid: u32,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} (user {}, since {})", self.pid, self.user, self.started_at.format("%Y-%m-%d %H:%M:%S UTC"))
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("VM {vmid} is already being autopsied by {}: wait for it to finish{}; lock {path}", holder_text(holder), holder.as_ref().map(|h| format!(" (see `ps -fp {}`)", h.pid)).unwrap_or_default())]
    Busy { vmid: VmId, holder: Option<Holder>, path: String },
    #[error("cannot write to output directory {dir} (for the VM lock {path}): {source}; pass a writable directory with --out")]
    Io {
        dir: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn holder_text(h: &Option<Holder>) -> String {
    // The holder writes its name right after taking the lock; an instant later it is there.
    h.as_ref().map(Holder::to_string).unwrap_or_else(|| "another run that has not written its name yet".into())
}

impl LockError {
    /// Exit class: another run holds the VM (busy), or `--out` is unusable (bad input).
    pub fn exit(&self) -> Exit {
        match self {
            LockError::Busy { .. } => Exit::Busy,
            LockError::Io { .. } => Exit::BadInput,
        }
    }
}

/// An exclusive per-VM lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct VmLock {
    file: File,
    path: PathBuf,
    pub holder: Holder,
}

/// `<out>/locks/<VMID>.lock`.
pub fn lock_path(out: &Path, vmid: VmId) -> PathBuf {
    out.join("locks").join(format!("{vmid}.lock"))
}

impl VmLock {
    /// Takes the lock without waiting: a second run must learn at once that it is
    /// second, not queue up behind a capture that may take a minute.
    pub fn acquire(out: &Path, vmid: VmId) -> Result<VmLock, LockError> {
        let path = lock_path(out, vmid);
        let io = |source| LockError::Io { dir: out.display().to_string(), path: path.display().to_string(), source };
        // Same private mode as the archive directory.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(out.join("locks")).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = serde_json::from_str::<Holder>(text.trim()).ok();
                return Err(LockError::Busy { vmid, holder, path: path.display().to_string() });
            }
            return Err(io(err));
        }
        let holder = Holder {
            pid: std::process::id() as i32,
            user: current_user(),
            started_at: chrono::Utc::now(),
            vmid: vmid.get(),
        };
        let text = serde_json::to_string(&holder).expect("holder serializes") + "\n";
        (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })()
        .map_err(io)?;
        Ok(VmLock { file, path, holder })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Leave the file (removing it would race with a waiter that opened it); clear
        // the holder so a stale name is never shown, then unlock.
        let _ = self.file.set_len(0);
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The invoking user (through sudo if so), for the lock file.
fn current_user() -> String {
    if let Ok(u) = std::env::var("SUDO_USER") {
        if !u.is_empty() {
            return format!("{u} (via sudo)");
        }
    }
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_busy_and_names_the_holder_then_free_after_drop() {
        let out = tempfile::tempdir().unwrap();
        let vmid: VmId = "102".parse().unwrap();
        let first = VmLock::acquire(out.path(), vmid).unwrap();
        let e = VmLock::acquire(out.path(), vmid).unwrap_err();
        match &e {
            LockError::Busy { holder: Some(h), .. } => assert_eq!(h.pid, std::process::id() as i32),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(matches!(crate::error::Error::from(e).exit(), crate::error::Exit::Busy));
        // Another VM is independent.
        let _other = VmLock::acquire(out.path(), "103".parse().unwrap()).unwrap();
        drop(first);
        let again = VmLock::acquire(out.path(), vmid).unwrap();
        assert_eq!(again.holder.vmid, 102);
    }

    #[test]
    fn unwritable_out_is_bad_input_naming_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = VmLock::acquire(&file.join("out"), "102".parse().unwrap()).unwrap_err();
        assert!(matches!(e, LockError::Io { .. }));
        let msg = e.to_string();
        assert!(msg.contains("cannot write to output directory") && msg.contains("--out"), "{msg}");
    }
}
