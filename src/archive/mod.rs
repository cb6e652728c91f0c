//! The evidence archive: a staging directory that steps write into, sealed into
//! `autopsy-<VMID>-<UTC to the microsecond>-<host>.tar.zst` with `manifest.json` at its root.
//!
//! Sealing writes a temp file, fsyncs it, moves it into place with
//! `renameat2(RENAME_NOREPLACE)` (a name that exists is never replaced: the next free
//! `-2`, `-3`… is taken instead), fsyncs the directory, then reads the archive back and
//! checks every file's SHA-256 against the manifest. Only then is it reported sealed and
//! its `sha256sum` sidecar written, also without replacing anything. The same reader
//! serves `inspect`, and [`Evidence`] lets the diagnosis run on a staging dir or an archive.

pub mod manifest;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub use manifest::{FileEntry, Manifest};

use crate::exit::Exit;
use crate::step::StepSink;

const STAGING_SUFFIX: &str = ".staging";
const TMP_SUFFIX: &str = ".tmp";
/// Entries larger than this are hashed but not loaded by [`ArchiveReader`] (core dumps).
const MAX_LOADED_ENTRY: u64 = 64 << 20;
/// What [`ArchiveReader`] loads in total, so a crafted archive (many entries that
/// decompress to 64 MiB each) cannot exhaust memory.
const MAX_LOADED_TOTAL: u64 = 512 << 20;
/// `manifest.json` larger than this is rejected (real ones are kilobytes).
const MAX_MANIFEST: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot write to output directory {dir}: {source}; pass a writable directory with --out")]
    OutDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing {path} failed: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("archive {path} failed verification: {detail}")]
    Verify { path: String, detail: String },
    #[error("cannot read archive {path}: {detail}")]
    Read { path: String, detail: String },
}

impl ArchiveError {
    /// Exit class: an unusable `--out` or an unreadable archive is bad input; an archive
    /// that could not be written or did not verify is a seal failure.
    pub fn exit(&self) -> Exit {
        match self {
            ArchiveError::OutDir { .. } | ArchiveError::Read { .. } => Exit::BadInput,
            ArchiveError::Write { .. } | ArchiveError::Verify { .. } => Exit::SealFailed,
        }
    }
}

/// Archive base name: `autopsy-<VMID>-<UTC %Y%m%dT%H%M%S.ffffffZ>-<host>`. Microseconds,
/// so back-to-back runs get their own names; [`Staging::seal`] still never replaces one.
pub fn archive_name(vmid: u32, at: DateTime<Utc>, host: &str) -> String {
    let host: String = host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("autopsy-{vmid}-{}-{host}", at.format("%Y%m%dT%H%M%S%.6fZ"))
}

/// How many `-N` suffixes [`Staging::seal`] tries before giving up on a free name.
const NAME_TRIES: u32 = 100;

/// Makes `<out>` exist as a private (0700) directory. Called before anything else that
/// looks at `<out>` (free space, locks), so an unusable `--out` is one clear error.
pub fn prepare_out(out: &Path) -> Result<(), ArchiveError> {
    let err = |source| ArchiveError::OutDir { dir: out.display().to_string(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(out).map_err(err)?;
    // Archives hold memory maps and environment: keep the directory private.
    let meta = std::fs::metadata(out).map_err(err)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// A run's working directory under `<out>`, named with our pid so a later run can tell
/// an abandoned one (its owner is dead) from a live one.
#[derive(Debug, Clone)]
pub struct Staging {
    pub out: PathBuf,
    pub name: String,
    pub dir: PathBuf,
}

impl Staging {
    /// Creates `<out>` (0700) if needed and the staging dir inside it.
    pub fn create(out: &Path, name: &str) -> Result<Staging, ArchiveError> {
        let err = |source| ArchiveError::OutDir { dir: out.display().to_string(), source };
        prepare_out(out)?;
        let dir = out.join(format!(".{name}.{}{STAGING_SUFFIX}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(err)?;
        Ok(Staging { out: out.to_path_buf(), name: name.to_string(), dir })
    }

    pub fn sink(&self) -> StepSink {
        StepSink::new(&self.dir)
    }

    /// The archive's path if its name is free (the first candidate [`Self::seal`] tries).
    pub fn archive_path(&self) -> PathBuf {
        self.out.join(format!("{}.tar.zst", self.name))
    }

    /// `<name>.tar.zst`, then `<name>-2.tar.zst`, `-3`…: the names [`Self::seal`] tries.
    fn candidate(&self, n: u32) -> PathBuf {
        match n {
            1 => self.archive_path(),
            n => self.out.join(format!("{}-{n}.tar.zst", self.name)),
        }
    }

    /// Hashes every staged file into `manifest.files`, writes and verifies the archive.
    /// The staging dir is removed only after verification succeeded.
    pub fn seal(&self, mut manifest: Manifest) -> Result<Sealed, ArchiveError> {
        let shown = self.archive_path().display().to_string();
        let werr = |source| ArchiveError::Write { path: shown.clone(), source };
        let staged = walk(&self.dir).map_err(werr)?;
        manifest.files.clear();
        for rel in &staged {
            let (size, sha256) = hash_file(&self.dir.join(rel)).map_err(werr)?;
            manifest.files.push(FileEntry { path: rel.clone(), size, sha256 });
        }
        let manifest_json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let tmp = self.out.join(format!(".{}.tar.zst.{}{TMP_SUFFIX}", self.name, std::process::id()));
        let mtime = manifest.started_at.timestamp().max(0) as u64;
        let result = (|| -> std::io::Result<PathBuf> {
            let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            let enc = zstd::stream::write::Encoder::new(file, 3)?;
            let mut tar = tar::Builder::new(enc);
            append(&mut tar, "manifest.json", &manifest_json[..], manifest_json.len() as u64, mtime)?;
            for entry in &manifest.files {
                let f = File::open(self.dir.join(&entry.path))?;
                append(&mut tar, &entry.path, f, entry.size, mtime)?;
            }
            let file = tar.into_inner()?.finish()?;
            file.sync_all()?;
            let path = self.place(&tmp)?;
            File::open(&self.out)?.sync_all()?;
            Ok(path)
        })();
        let final_path = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(werr(e));
            }
        };
        let shown = final_path.display().to_string();
        let werr = |source| ArchiveError::Write { path: shown.clone(), source };
        let report = verify(&final_path)?;
        let sidecar = sidecar_path(&final_path);
        let line = format!("{}  {}\n", report.sha256, file_name(&final_path));
        write_durable_new(&sidecar, line.as_bytes()).map_err(werr)?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(Sealed { path: final_path, sidecar, sha256: report.sha256, size: report.size, files: report.files })
    }

    /// Moves the finished temp file to the first free candidate name. Neither the archive
    /// nor its sidecar may exist under that name (a stray sidecar would describe another
    /// archive); the move itself refuses to replace, so a racing writer cannot be lost.
    fn place(&self, tmp: &Path) -> std::io::Result<PathBuf> {
        for n in 1..=NAME_TRIES {
            let path = self.candidate(n);
            if std::fs::symlink_metadata(sidecar_path(&path)).is_ok() {
                continue;
            }
            match rename_noreplace(tmp, &path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "{NAME_TRIES} archive names starting {} are all taken; move old archives away or pass another --out",
            file_name(&self.archive_path())
        )))
    }
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE).map_err(std::io::Error::from)
}

fn append<R: Read>(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    data: R,
    size: u64,
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    // A file that grew after hashing would break the size contract; take exactly `size`.
    tar.append_data(&mut h, path, data.take(size))
}

/// A sealed, verified archive.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sealed {
    pub path: PathBuf,
    pub sidecar: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub files: usize,
}

pub fn sidecar_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What [`verify`] checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub sha256: String,
    pub size: u64,
    pub files: usize,
}

/// Reads an archive back: every manifest entry present once, with its size and SHA-256,
/// and nothing in the archive that the manifest does not list.
pub fn verify(path: &Path) -> Result<VerifyReport, ArchiveError> {
    let shown = path.display().to_string();
    let fail = |detail: String| ArchiveError::Verify { path: shown.clone(), detail };
    let (size, sha256) = hash_file(path).map_err(|e| fail(e.to_string()))?;
    let mut manifest: Option<Manifest> = None;
    let mut seen: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for_each_entry(path, |name, reader| {
        if name == "manifest.json" {
            let mut buf = Vec::new();
            reader.take(MAX_MANIFEST).read_to_end(&mut buf)?;
            manifest =
                Some(serde_json::from_slice(&buf).map_err(|e| std::io::Error::other(format!("manifest.json: {e}")))?);
        } else {
            let (n, h) = hash_reader(reader)?;
            if seen.insert(name.to_string(), (n, h)).is_some() {
                return Err(std::io::Error::other(format!("{name} appears twice")));
            }
        }
        Ok(())
    })
    .map_err(|e| fail(e.to_string()))?;
    let manifest = manifest.ok_or_else(|| fail("no manifest.json".into()))?;
    for f in &manifest.files {
        match seen.remove(&f.path) {
            None => return Err(fail(format!("{} is in the manifest but not in the archive", f.path))),
            Some((n, h)) if n != f.size || h != f.sha256 => {
                return Err(fail(format!(
                    "{}: sha256 {h} (size {n}) but the manifest says {} (size {})",
                    f.path, f.sha256, f.size
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.keys().next() {
        return Err(fail(format!("{extra} is in the archive but not in the manifest")));
    }
    Ok(VerifyReport { sha256, size, files: manifest.files.len() })
}

fn for_each_entry(path: &Path, mut f: impl FnMut(&str, &mut dyn Read) -> std::io::Result<()>) -> std::io::Result<()> {
    let dec = zstd::stream::read::Decoder::new(File::open(path)?)?;
    let mut ar = tar::Archive::new(dec);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        f(&name, &mut entry)?;
    }
    Ok(())
}

/// Streams one archived file (any size: a core) to `dest` (created 0600, must not
/// exist), checking its SHA-256 against `expected` from the manifest. Returns its size.
pub fn extract_entry(archive: &Path, expected: &FileEntry, dest: &Path) -> Result<u64, ArchiveError> {
    let shown = archive.display().to_string();
    let rel = expected.path.as_str();
    let mut found = None;
    for_each_entry(archive, |name, reader| {
        if name != rel || found.is_some() {
            return Ok(());
        }
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest)?;
        found = Some(hash_copy(reader, &mut out)?);
        Ok(())
    })
    .map_err(|e| ArchiveError::Read { path: shown.clone(), detail: e.to_string() })?;
    match found {
        None => Err(ArchiveError::Read { path: shown, detail: format!("{rel} is not in the archive") }),
        Some((n, h)) if n != expected.size || h != expected.sha256 => {
            let _ = std::fs::remove_file(dest);
            Err(ArchiveError::Verify {
                path: shown,
                detail: format!("{rel}: sha256 {h} but the manifest says {}", expected.sha256),
            })
        }
        Some((n, _)) => Ok(n),
    }
}

/// An archive opened for reading: manifest and (bounded) file contents.
pub struct ArchiveReader {
    pub path: PathBuf,
    pub manifest: Manifest,
    files: BTreeMap<String, Vec<u8>>,
}

impl ArchiveReader {
    pub fn open(path: &Path) -> Result<ArchiveReader, ArchiveError> {
        let shown = path.display().to_string();
        let mut manifest = None;
        let mut files = BTreeMap::new();
        let mut loaded = 0u64;
        for_each_entry(path, |name, reader| {
            let mut buf = Vec::new();
            reader.take(MAX_LOADED_ENTRY).read_to_end(&mut buf)?;
            loaded += buf.len() as u64;
            if loaded > MAX_LOADED_TOTAL {
                return Err(std::io::Error::other(format!(
                    "more than {} MiB of entries to load; not a wedge-autopsy archive (extract it with tar)",
                    MAX_LOADED_TOTAL >> 20
                )));
            }
            if name == "manifest.json" {
                manifest = Some(
                    serde_json::from_slice(&buf).map_err(|e| std::io::Error::other(format!("manifest.json: {e}")))?,
                );
            } else {
                files.insert(name.to_string(), buf);
            }
            Ok(())
        })
        .map_err(|e| ArchiveError::Read { path: shown.clone(), detail: e.to_string() })?;
        let manifest = manifest.ok_or_else(|| ArchiveError::Read { path: shown, detail: "no manifest.json".into() })?;
        Ok(ArchiveReader { path: path.to_path_buf(), manifest, files })
    }
}

/// Read access to captured evidence, live (staging dir) or sealed (archive), so the
/// diagnosis gives the same answer on both.
pub trait Evidence {
    fn read(&self, path: &str) -> Option<Vec<u8>>;
    fn list(&self) -> Vec<String>;
    fn read_json(&self, path: &str) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.read(path)?).ok()
    }
    fn read_string(&self, path: &str) -> Option<String> {
        self.read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

impl Evidence for ArchiveReader {
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.files.get(path).cloned()
    }
    fn list(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }
}

/// Evidence held in memory, `path -> bytes`: files taken from an archive and edited
/// (what-if checks of signatures), or built by tests.
#[derive(Debug, Clone, Default)]
pub struct MemEvidence(pub std::collections::BTreeMap<String, Vec<u8>>);

impl MemEvidence {
    /// Every file of `ev`, copied.
    pub fn copy_of(ev: &dyn Evidence) -> MemEvidence {
        MemEvidence(ev.list().into_iter().filter_map(|p| Some((p.clone(), ev.read(&p)?))).collect())
    }
    /// This evidence with `path` set to `text`.
    pub fn with(mut self, path: &str, text: &str) -> MemEvidence {
        self.0.insert(path.into(), text.as_bytes().to_vec());
        self
    }
}

impl Evidence for MemEvidence {
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.0.get(path).cloned()
    }
    fn list(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

impl Evidence for Staging {
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(path)).ok()
    }
    fn list(&self) -> Vec<String> {
        walk(&self.dir).unwrap_or_default()
    }
}

/// Relative paths of all regular files under `root`, sorted.
pub fn walk(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(root).expect("under root").to_string_lossy().into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hash_reader(r: &mut dyn Read) -> std::io::Result<(u64, String)> {
    hash_copy(r, &mut std::io::sink())
}

/// Reads `r` to the end, writing every byte to `out`. Out: size and hex SHA-256.
fn hash_copy(r: &mut dyn Read, out: &mut dyn Write) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        n += k as u64;
    }
    Ok((n, format!("{:x}", h.finalize())))
}

/// Size and SHA-256 of everything `f` yields (an already opened file).
pub fn hash_reader_of(f: File) -> std::io::Result<(u64, String)> {
    hash_reader(&mut BufReader::new(f))
}

pub fn hash_file(p: &Path) -> std::io::Result<(u64, String)> {
    hash_reader(&mut BufReader::new(File::open(p)?))
}

/// Writes a small file durably: temp, fsync, rename, fsync the directory. Replaces
/// `path` if it exists (state files); evidence goes through [`write_durable_new`].
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durable_with(path, bytes, |tmp, path| std::fs::rename(tmp, path))
}

/// [`write_durable`] that never replaces: `AlreadyExists` if `path` exists (sidecars of
/// sealed archives: what describes one archive must not be overwritten by another run).
pub fn write_durable_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durable_with(path, bytes, rename_noreplace)
}

fn write_durable_with(
    path: &Path,
    bytes: &[u8],
    place: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.{}{TMP_SUFFIX}", file_name(path), std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = place(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Removes staging dirs and temp files left by runs that died (SIGKILL, power loss):
/// their owner pid, encoded in the name, no longer exists. Returns what was removed.
pub fn cleanup_stale(out: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return removed };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stem = if let Some(s) = name.strip_suffix(STAGING_SUFFIX) {
            s
        } else if let Some(s) = name.strip_suffix(TMP_SUFFIX) {
            s
        } else {
            continue;
        };
        if !name.starts_with('.') {
            continue;
        }
        let Some(owner) = stem.rsplit('.').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if owner == std::process::id() as i32 || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let p = e.path();
        let ok = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if ok.is_ok() {
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            schema: manifest::SCHEMA,
            tool: Default::default(),
            host: "h".into(),
            node: "h".into(),
            vmid: Some(102),
            pid: Some(1),
            command_line: vec![],
            trigger: Default::default(),
            started_at: Utc::now(),
            ended_at: Utc::now(),
            utc_offset: "+00:00".into(),
            runbook: Default::default(),
            target: None,
            interrupted: false,
            redaction: None,
            steps: vec![],
            files: vec![],
        }
    }

    #[test]
    fn seal_verifies_and_tampering_is_caught() {
        let out = tempfile::tempdir().unwrap();
        let st = Staging::create(&out.path().join("a"), "autopsy-102-x-h").unwrap();
        let sink = st.sink();
        sink.write("qmp/query-status.json", b"{\"return\":{}}").unwrap();
        sink.write("proc/task/7/stack", b"[<0>] do_sys_poll\n").unwrap();
        let sealed = st.seal(manifest()).unwrap();
        assert_eq!(sealed.files, 2);
        assert!(!st.dir.exists(), "staging removed after seal");
        let mode = std::fs::metadata(&sealed.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(out.path().join("a")).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let side = std::fs::read_to_string(&sealed.sidecar).unwrap();
        assert_eq!(side, format!("{}  autopsy-102-x-h.tar.zst\n", sealed.sha256));
        let r = ArchiveReader::open(&sealed.path).unwrap();
        assert_eq!(r.read("proc/task/7/stack").unwrap(), b"[<0>] do_sys_poll\n");
        assert_eq!(r.manifest.files.len(), 2);

        // Rewrite the archive with one byte of one file changed: verify must name it.
        let mut files: Vec<(String, Vec<u8>)> =
            r.list().into_iter().map(|p| (p.clone(), r.read(&p).unwrap())).collect();
        files[0].1[0] ^= 1;
        let bad = out.path().join("bad.tar.zst");
        let enc = zstd::stream::write::Encoder::new(File::create(&bad).unwrap(), 1).unwrap();
        let mut tar = tar::Builder::new(enc);
        let mj = serde_json::to_vec(&r.manifest).unwrap();
        append(&mut tar, "manifest.json", &mj[..], mj.len() as u64, 0).unwrap();
        for (p, b) in &files {
            append(&mut tar, p, &b[..], b.len() as u64, 0).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        let err = verify(&bad).unwrap_err().to_string();
        assert!(err.contains(&files[0].0), "{err}");
    }

    /// Two seals under one name (same microsecond, same VM): both archives and both
    /// sidecars survive, each with its own hash; a stray sidecar's name is skipped too.
    #[test]
    fn a_taken_name_is_never_replaced() {
        let out = tempfile::tempdir().unwrap();
        let seal = |body: &[u8]| {
            let st = Staging::create(out.path(), "autopsy-102-x-h").unwrap();
            st.sink().write("a.txt", body).unwrap();
            st.seal(manifest()).unwrap()
        };
        std::fs::write(out.path().join("autopsy-102-x-h-3.tar.zst.sha256"), "stray\n").unwrap();
        let (a, b, c) = (seal(b"one"), seal(b"two"), seal(b"three"));
        assert_eq!(file_name(&a.path), "autopsy-102-x-h.tar.zst");
        assert_eq!(file_name(&b.path), "autopsy-102-x-h-2.tar.zst");
        assert_eq!(file_name(&c.path), "autopsy-102-x-h-4.tar.zst");
        for s in [&a, &b, &c] {
            assert_eq!(verify(&s.path).unwrap().sha256, s.sha256);
            let side = std::fs::read_to_string(&s.sidecar).unwrap();
            assert_eq!(side, format!("{}  {}\n", s.sha256, file_name(&s.path)));
        }
        assert_ne!(a.sha256, b.sha256);
        assert_eq!(std::fs::read_to_string(out.path().join("autopsy-102-x-h-3.tar.zst.sha256")).unwrap(), "stray\n");
        let e = write_durable_new(&a.sidecar, b"x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(std::fs::read_to_string(&a.sidecar).unwrap().starts_with(&a.sha256));
    }

    #[test]
    fn names_carry_microseconds() {
        let at = DateTime::from_timestamp(1_781_196_420, 123_456_789).unwrap();
        assert_eq!(archive_name(102, at, "pve.1"), "autopsy-102-20260611T164700.123456Z-pve_1");
    }

    #[test]
    fn stale_staging_of_dead_owner_is_removed_live_one_kept() {
        let out = tempfile::tempdir().unwrap();
        let dead = out.path().join(".autopsy-102-x-h.999999999.staging");
        let mine = out.path().join(format!(".autopsy-102-y-h.{}.staging", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        let removed = cleanup_stale(out.path());
        assert_eq!(removed, vec![".autopsy-102-x-h.999999999.staging".to_string()]);
        assert!(!dead.exists());
        assert!(mine.exists());
    }
}
