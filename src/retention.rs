//! Retention: keep `<out>` from filling the hypervisor's disk.
//!
//! Only sealed archives (`autopsy-*.tar.zst`, regular files, directly in `<out>`) and
//! their sidecars (`.sha256`, `.restart.json`, `.summary.md`) are ever considered;
//! staging dirs, temp files and anything else an operator put there are left alone.
//! Archives are ranked newest first (by the UTC time in their name, else mtime) and kept
//! while every limit holds; from the first one that breaks a limit, it and everything
//! older go. The newest archive is never pruned. Then, if the filesystem is below the
//! `min_free` floor, the oldest survivors go until it is not (or only the newest is left).
//!
//! [`plan`] is pure (entries, limits, clock and free space in; decisions out) so the
//! policy is tested without a disk; [`prune`] applies it to a directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::exit::Exit;
pub use crate::units::human_bytes;

/// Retention limits; `None` / `0` means "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many archives.
    pub keep: Option<usize>,
    /// No archive older than this.
    pub max_age: Option<Duration>,
    /// All archives with their sidecars together at most this many bytes.
    pub max_bytes: Option<u64>,
    /// Free bytes the filesystem must keep; a capture is refused below it.
    pub min_free: u64,
}

impl Default for Limits {
    /// Bounded by space only: evidence is deleted to protect the disk, never just for
    /// being old or many, unless the operator says so.
    fn default() -> Self {
        Limits { keep: None, max_age: None, max_bytes: Some(10 << 30), min_free: 1 << 30 }
    }
}

/// One sealed archive and the sidecars that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub archive: PathBuf,
    pub sidecars: Vec<PathBuf>,
    /// When it was captured (from its name; mtime if the name has no time).
    pub time: DateTime<Utc>,
    /// Archive plus sidecars.
    pub bytes: u64,
}

impl Entry {
    pub fn name(&self) -> String {
        self.archive.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Why an archive is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Keep(usize),
    MaxAge(Duration),
    MaxBytes(u64),
    MinFree(u64),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Keep(n) => write!(f, "beyond keep {n}"),
            Reason::MaxAge(d) => write!(f, "older than max_age {}", humantime::format_duration(*d)),
            Reason::MaxBytes(b) => write!(f, "over max_bytes {}", human_bytes(*b)),
            Reason::MinFree(b) => write!(f, "below min_free {}", human_bytes(*b)),
        }
    }
}

/// What [`plan`] decided: `keep` newest first, `remove` newest first.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub keep: Vec<Entry>,
    pub remove: Vec<(Entry, Reason)>,
}

impl Plan {
    pub fn freed(&self) -> u64 {
        self.remove.iter().map(|(e, _)| e.bytes).sum()
    }
}

/// Decides which of `entries` (any order) to remove under `limits` at `now`, given the
/// filesystem's current free bytes. `protect` (the archive just sealed) is never removed.
pub fn plan(
    mut entries: Vec<Entry>,
    limits: &Limits,
    now: DateTime<Utc>,
    free: Option<u64>,
    protect: Option<&Path>,
) -> Plan {
    entries.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.archive.cmp(&a.archive)));
    let protected = |e: &Entry| protect.is_some_and(|p| p == e.archive);
    let mut out = Plan::default();
    let mut total = 0u64;
    let mut cut: Option<Reason> = None;
    for (i, e) in entries.into_iter().enumerate() {
        total += e.bytes;
        if cut.is_none() && i > 0 && !protected(&e) {
            let age = (now - e.time).to_std().unwrap_or_default();
            cut = if limits.keep.is_some_and(|k| i >= k) {
                limits.keep.map(Reason::Keep)
            } else if limits.max_age.is_some_and(|m| age > m) {
                limits.max_age.map(Reason::MaxAge)
            } else if limits.max_bytes.is_some_and(|m| total > m) {
                limits.max_bytes.map(Reason::MaxBytes)
            } else {
                None
            };
        }
        match cut {
            Some(r) if !protected(&e) => out.remove.push((e, r)),
            _ => out.keep.push(e),
        }
    }
    if let (Some(free), true) = (free, limits.min_free > 0) {
        let mut free = free + out.freed();
        // Oldest survivors first; index 0 (the newest) and the protected one stay.
        while free < limits.min_free && out.keep.len() > 1 {
            let Some(idx) = (1..out.keep.len()).rev().find(|&i| !protected(&out.keep[i])) else { break };
            let e = out.keep.remove(idx);
            free += e.bytes;
            out.remove.push((e, Reason::MinFree(limits.min_free)));
        }
    }
    out.remove.sort_by_key(|(e, _)| std::cmp::Reverse(e.time));
    out
}

const SIDECARS: &[&str] = &[".sha256", ".restart.json", ".summary.md"];

/// Whether `name` is a sealed archive's file name (`autopsy-*.tar.zst`).
pub fn is_archive_name(name: &str) -> bool {
    name.starts_with("autopsy-") && name.ends_with(".tar.zst") && name.len() > "autopsy-.tar.zst".len()
}

/// The capture time written into an archive name `autopsy-<vmid>-<%Y%m%dT%H%M%SZ>-<host>.tar.zst`.
pub fn time_from_name(name: &str) -> Option<DateTime<Utc>> {
    let rest = name.strip_prefix("autopsy-")?;
    let (_vmid, rest) = rest.split_once('-')?;
    let stamp = rest.get(..16)?;
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").ok().map(|t| t.and_utc())
}

/// The sealed archives directly in `dir` with their sidecars, in no particular order.
/// Symlinks and non-regular files are ignored. A missing `dir` has no archives.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for d in rd {
        let d = d?;
        let name = d.file_name().to_string_lossy().into_owned();
        if !is_archive_name(&name) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(d.path()) else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let stem = name.strip_suffix(".tar.zst").unwrap_or(&name);
        let mut bytes = meta.len();
        let mut sidecars = Vec::new();
        for base in [name.as_str(), stem] {
            for suffix in SIDECARS {
                let p = dir.join(format!("{base}{suffix}"));
                if let Ok(m) = std::fs::symlink_metadata(&p) {
                    if m.file_type().is_file() && !sidecars.contains(&p) {
                        bytes += m.len();
                        sidecars.push(p);
                    }
                }
            }
        }
        let time = time_from_name(&name)
            .or_else(|| meta.modified().ok().map(DateTime::<Utc>::from))
            .unwrap_or_else(|| DateTime::<Utc>::from(SystemTime::UNIX_EPOCH));
        out.push(Entry { archive: d.path(), sidecars, time, bytes });
    }
    Ok(out)
}

/// Free bytes for an unprivileged writer on the filesystem holding `path` (or its
/// nearest existing ancestor, since `<out>` may not exist yet).
// The casts are no-ops on 64-bit targets only; statvfs fields are 32-bit elsewhere.
#[allow(clippy::unnecessary_cast)]
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    loop {
        match nix::sys::statvfs::statvfs(p) {
            Ok(s) => return Ok(s.blocks_available() as u64 * s.fragment_size() as u64),
            Err(nix::errno::Errno::ENOENT) => match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => return Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            },
            Err(e) => return Err(std::io::Error::from_raw_os_error(e as i32)),
        }
    }
}

/// Why a capture may not start: `<out>` is (or cannot be shown not to be) below the
/// free-space floor. Before an autopsy this is a seal failure: no archive can be written.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("{dir} has {} free, below the min_free floor of {}; run `wedge-autopsy prune --dry-run` to see what retention would remove, or capture elsewhere with --out DIR", human_bytes(*.free), human_bytes(*.floor))]
    BelowFloor { dir: String, free: u64, floor: u64 },
    #[error("cannot check free space under {dir}: {source}; pass an existing --out DIR")]
    Stat {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl FloorError {
    /// Exit class: the archive could not be written.
    pub fn exit(&self) -> Exit {
        Exit::SealFailed
    }
}

/// Why [`prune`] could not look at `<out>`: the directory given is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("cannot check free space under {dir}: {source}; pass an existing --out DIR")]
    Stat {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list archives in {dir}: {source}; check the path given to --out")]
    Scan {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl PruneError {
    /// Exit class: bad input (the `--out` directory).
    pub fn exit(&self) -> Exit {
        Exit::BadInput
    }
}

/// Refuses (before anything is captured) when `out`'s filesystem is already below the
/// floor: the capture can only lower it further.
pub fn check_floor(out: &Path, min_free: u64) -> Result<u64, FloorError> {
    let dir = out.display().to_string();
    let free = free_bytes(out).map_err(|source| FloorError::Stat { dir: dir.clone(), source })?;
    if min_free > 0 && free < min_free {
        return Err(FloorError::BelowFloor { dir, free, floor: min_free });
    }
    Ok(free)
}

/// What [`prune`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone)]
pub struct Pruned {
    pub plan: Plan,
    /// Files that could not be removed, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    pub dry_run: bool,
}

/// Applies `limits` to the archives in `out`. `protect` (the archive just sealed) is
/// never removed. Sidecars go before their archive, so a crash in between leaves an
/// archive without a sidecar (still verifiable) rather than an orphaned sidecar.
pub fn prune(out: &Path, limits: &Limits, protect: Option<&Path>, dry_run: bool) -> Result<Pruned, PruneError> {
    let dir = out.display().to_string();
    let entries = scan(out).map_err(|source| PruneError::Scan { dir: dir.clone(), source })?;
    let free = if limits.min_free > 0 && !entries.is_empty() {
        Some(free_bytes(out).map_err(|source| PruneError::Stat { dir, source })?)
    } else {
        None
    };
    let plan = plan(entries, limits, Utc::now(), free, protect);
    let mut failed = Vec::new();
    if !dry_run {
        for (e, reason) in &plan.remove {
            for p in e.sidecars.iter().chain(std::iter::once(&e.archive)) {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => failed.push((p.clone(), err.to_string())),
                }
            }
            tracing::info!(target: "wedge_autopsy::retention", archive = %e.archive.display(), bytes = e.bytes, reason = %reason, "pruned");
        }
    }
    Ok(Pruned { plan, failed, dry_run })
}

/// Applies `limits` after a sealed run; the new archive (`sealed`) is never a candidate.
/// A failure is reported, never fatal: the evidence is already safe.
pub fn after_run(out: &Path, limits: &Limits, sealed: &Path, show: bool) {
    match prune(out, limits, Some(sealed), false) {
        Ok(p) if !p.plan.remove.is_empty() && show => {
            let names: Vec<String> = p.plan.remove.iter().map(|(e, _)| e.name()).collect();
            eprintln!(
                "retention: removed {} old archive(s), {} freed ({}): {}",
                names.len(),
                human_bytes(p.plan.freed()),
                p.plan.remove[0].1,
                names.join(", ")
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("retention not applied: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + secs, 0).unwrap()
    }

    fn entry(name: &str, age_days: i64, bytes: u64) -> Entry {
        Entry { archive: PathBuf::from(name), sidecars: vec![], time: at(-age_days * DAY), bytes }
    }

    fn removed(p: &Plan) -> Vec<String> {
        p.remove.iter().map(|(e, _)| e.name()).collect()
    }

    fn none() -> Limits {
        Limits { keep: None, max_age: None, max_bytes: None, min_free: 0 }
    }

    #[test]
    fn newest_kept_first_and_everything_older_than_a_break_goes() {
        let es = vec![entry("c", 2, 10), entry("a", 0, 10), entry("b", 1, 10), entry("d", 3, 1)];
        let p = plan(es.clone(), &Limits { keep: Some(2), ..none() }, at(0), None, None);
        assert_eq!(removed(&p), ["c", "d"]);
        assert_eq!(p.remove[0].1, Reason::Keep(2));
        // 10+10 fits, +10 breaks 25: c goes, and d goes too although it would fit.
        let p = plan(es.clone(), &Limits { max_bytes: Some(25), ..none() }, at(0), None, None);
        assert_eq!(removed(&p), ["c", "d"]);
        let p = plan(es, &Limits { max_age: Some(Duration::from_secs(36 * 3600)), ..none() }, at(0), None, None);
        assert_eq!(removed(&p), ["c", "d"]);
    }

    #[test]
    fn the_newest_and_the_protected_archive_are_never_removed() {
        let es = vec![entry("a", 400, 100), entry("b", 500, 100)];
        let p = plan(
            es.clone(),
            &Limits { keep: Some(1), max_age: Some(Duration::from_secs(1)), max_bytes: Some(1), min_free: 0 },
            at(0),
            None,
            None,
        );
        assert_eq!(removed(&p), ["b"]);
        let p = plan(es, &Limits { keep: Some(1), ..none() }, at(0), None, Some(Path::new("b")));
        assert!(p.remove.is_empty());
    }

    #[test]
    fn min_free_removes_oldest_survivors_until_the_floor_holds() {
        let es = vec![entry("a", 0, 100), entry("b", 1, 100), entry("c", 2, 100), entry("d", 3, 100)];
        let p = plan(es.clone(), &Limits { min_free: 1000, ..none() }, at(0), Some(850), None);
        assert_eq!(removed(&p), ["c", "d"]);
        assert_eq!(p.remove[0].1, Reason::MinFree(1000));
        // Never below one archive, even if the floor cannot be reached.
        let p = plan(es, &Limits { min_free: 1 << 40, ..none() }, at(0), Some(0), None);
        assert_eq!(removed(&p), ["b", "c", "d"]);
    }

    #[test]
    fn names() {
        assert!(is_archive_name("autopsy-102-20260611T164700Z-pve1.tar.zst"));
        assert!(!is_archive_name("autopsy-102.tar.zst.sha256"));
        assert!(!is_archive_name(".autopsy-102-x.tar.zst.123.tmp"));
        assert!(!is_archive_name("notes.tar.zst"));
        assert_eq!(
            time_from_name("autopsy-102-20260611T164700Z-pve1.tar.zst").unwrap().to_rfc3339(),
            "2026-06-11T16:47:00+00:00"
        );
        assert_eq!(time_from_name("autopsy-x.tar.zst"), None);
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }

    fn write(dir: &Path, name: &str, len: usize) {
        std::fs::write(dir.join(name), vec![0u8; len]).unwrap();
    }

    /// Real files: only archives and their sidecars go; everything else stays.
    #[test]
    fn prune_touches_only_archives_and_their_sidecars() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let names: Vec<String> = (1..=4).map(|i| format!("autopsy-102-2026061{i}T120000Z-pve1")).collect();
        for n in &names {
            write(dir, &format!("{n}.tar.zst"), 1000);
            write(dir, &format!("{n}.tar.zst.sha256"), 80);
        }
        write(dir, &format!("{}.restart.json", names[0]), 10);
        write(dir, &format!("{}.tar.zst.summary.md", names[0]), 10);
        // Not ours to delete: a staging dir, a temp file, a look-alike, an operator's file,
        // a symlink named like an archive, a directory named like one.
        std::fs::create_dir(dir.join(format!(".{}.999.staging", names[0]))).unwrap();
        write(dir, &format!(".{}.tar.zst.999.tmp", names[0]), 5);
        write(dir, "autopsy-notes.txt", 5);
        write(dir, "keep-me.tar.zst", 5);
        std::os::unix::fs::symlink(dir.join("keep-me.tar.zst"), dir.join("autopsy-999-20200101T000000Z-x.tar.zst"))
            .unwrap();
        std::fs::create_dir(dir.join("autopsy-998-20200101T000000Z-x.tar.zst")).unwrap();

        let limits = Limits { keep: Some(2), ..none() };
        let dry = prune(dir, &limits, None, true).unwrap();
        assert_eq!(removed(&dry.plan), [format!("{}.tar.zst", names[1]), format!("{}.tar.zst", names[0])]);
        assert_eq!(dry.plan.remove[1].0.bytes, 1000 + 80 + 10 + 10);
        assert!(dir.join(format!("{}.tar.zst", names[0])).exists(), "dry run removed something");

        let done = prune(dir, &limits, None, false).unwrap();
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        let mut left: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut want = vec![
            format!(".{}.999.staging", names[0]),
            format!(".{}.tar.zst.999.tmp", names[0]),
            "autopsy-998-20200101T000000Z-x.tar.zst".to_string(),
            "autopsy-999-20200101T000000Z-x.tar.zst".to_string(),
            "autopsy-notes.txt".to_string(),
            format!("{}.tar.zst", names[2]),
            format!("{}.tar.zst.sha256", names[2]),
            format!("{}.tar.zst", names[3]),
            format!("{}.tar.zst.sha256", names[3]),
            "keep-me.tar.zst".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn missing_out_dir_has_nothing_to_prune_and_floor_checks_the_parent() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("not/yet");
        assert!(prune(&out, &Limits::default(), None, false).unwrap().plan.remove.is_empty());
        assert!(check_floor(&out, 1).is_ok());
        let err = check_floor(&out, u64::MAX).unwrap_err();
        assert!(matches!(err, FloorError::BelowFloor { .. }));
        assert!(err.to_string().contains("wedge-autopsy prune --dry-run"), "{err}");
    }

    /// The floor on a real small filesystem: a 16 MiB tmpfs, filled past a 8 MiB floor.
    /// Needs mount(2) (root with CAP_SYS_ADMIN, as on CI); fails naming it otherwise.
    #[test]
    fn floor_on_a_small_tmpfs() {
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(mnt)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        assert!(
            o.status.success(),
            "mount -t tmpfs refused ({}): this test needs root with CAP_SYS_ADMIN",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _guard = Unmount(mnt);
        let floor = 8 << 20;
        assert!(check_floor(mnt, floor).is_ok());
        for i in 0..3 {
            write(mnt, &format!("autopsy-102-2026061{i}T120000Z-pve1.tar.zst"), 3 << 20);
        }
        let err = check_floor(mnt, floor).unwrap_err();
        assert!(matches!(err, FloorError::BelowFloor { .. }), "{err}");
        let limits = Limits { min_free: floor, ..none() };
        let pruned = prune(mnt, &limits, None, false).unwrap();
        assert_eq!(pruned.plan.remove.len(), 1, "{:?}", removed(&pruned.plan));
        assert!(check_floor(mnt, floor).is_ok());
    }
}
