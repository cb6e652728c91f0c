//! Proxmox task ids (UPIDs), as `PVE::Tools::upid_decode` reads them:
//! `UPID:<node>:<pid 8 hex>:<pstart 8-9 hex>:<starttime 8 hex>:<type>:<id>:<user>:`.
//! The task's log is `<log_dir>/pve/tasks/<last hex digit of starttime>/<UPID>`.

use std::path::{Path, PathBuf};

/// A parsed UPID. Every field is data from a file: it names a log path only after
/// [`Upid::log_path`] has checked it cannot leave the tasks directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    pub text: String,
    pub node: String,
    pub pid: u32,
    pub starttime: i64,
    pub kind: String,
    pub id: String,
    pub user: String,
    starttime_hex: String,
}

fn hex(s: &str, min: usize, max: usize) -> Option<u64> {
    (s.len() >= min && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

impl Upid {
    pub fn parse(text: &str) -> Option<Upid> {
        let body = text.strip_prefix("UPID:")?.strip_suffix(':')?;
        let f: Vec<&str> = body.split(':').collect();
        if f.len() != 7 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        let node_ok = !f[0].is_empty()
            && f[0].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !f[0].starts_with('-')
            && !f[0].ends_with('-');
        if !node_ok || f[4].is_empty() || f[6].is_empty() {
            return None;
        }
        let pid = hex(f[1], 8, 8)? as u32;
        hex(f[2], 8, 9)?;
        let starttime = hex(f[3], 8, 8)? as i64;
        Some(Upid {
            text: text.to_string(),
            node: f[0].into(),
            pid,
            starttime,
            kind: f[4].into(),
            id: f[5].into(),
            user: f[6].into(),
            starttime_hex: f[3].into(),
        })
    }

    /// `<tasks_dir>/<X>/<UPID>`, or `None` when a field would make the name leave the
    /// directory (a `/`, or `.`/`..` as a whole name).
    pub fn log_path(&self, tasks_dir: &Path) -> Option<PathBuf> {
        if self.text.contains('/') || self.text.contains('\0') {
            return None;
        }
        let sub = &self.starttime_hex[self.starttime_hex.len() - 1..];
        Some(tasks_dir.join(sub).join(&self.text))
    }

    /// A file name for the archive: the UPID with anything but `[A-Za-z0-9._-]` as `_`.
    pub fn file_name(&self) -> String {
        self.text.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
    }
}
