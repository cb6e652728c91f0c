//! `inspect ARCHIVE --qemu-state`: QEMU's own state from the archived minicore, read by
//! gdb with QEMU's gdb scripts (`scripts/qemu-gdb.py`: `qemu bt` shows a coroutine's
//! backtrace under the thread running it, `qemu timers` the timer lists).
//!
//! The core is extracted (hash-checked) into a private temp dir that is removed
//! afterwards. gdb runs as an argv in batch mode under a deadline, with the debug dirs as
//! its `debug-file-directory` and debuginfod off unless `DEBUGINFOD_URLS` is set. The
//! scripts need QEMU's debug symbols (its types and globals); without them, and without
//! the scripts, the threads' backtraces are still printed and the report says exactly
//! what is missing. Debian's QEMU packages do not ship the scripts: they are in the QEMU
//! source tree (`apt-get source qemu`, then `--qemu-gdb-script qemu-*/scripts/qemu-gdb.py`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::archive::{self, ArchiveReader, Evidence};
use crate::cancel::Cancel;
use crate::exec::{self, Spec};
use crate::exit::Exit;
use crate::stacks::dbgsym;
use crate::stacks::native::modules::{find_debug, hex, DebugSearch, Elf};

/// Where the scripts are looked for when `--qemu-gdb-script` is not given.
pub const DEFAULT_SCRIPT: &str = "/usr/share/wedge-autopsy/qemu-gdb/qemu-gdb.py";
const GDB_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum QemuStateError {
    #[error("the archive has no minicore (core/minicore.json): capture with --runbook qemu-wedge-core")]
    NoCore,
    #[error("{0}")]
    Archive(#[from] archive::ArchiveError),
    /// The QEMU binary on this host is missing or another build than the one that ran.
    #[error("{0}")]
    OtherBuild(String),
    /// gdb or the temp dir for the extracted core could not be used.
    #[error("{0}")]
    Tool(String),
}

impl QemuStateError {
    /// Exit class: an archive without a core, or one from another QEMU build than this
    /// host has, is bad input for this command; a missing gdb or temp dir is internal.
    pub fn exit(&self) -> Exit {
        match self {
            QemuStateError::NoCore | QemuStateError::OtherBuild(_) => Exit::BadInput,
            QemuStateError::Archive(e) => e.exit(),
            QemuStateError::Tool(_) => Exit::Internal,
        }
    }
}

/// Options of `--qemu-state`.
#[derive(Debug, Clone)]
pub struct Options {
    pub debug_dirs: Vec<PathBuf>,
    pub script: PathBuf,
    pub gdb: String,
    pub debuginfod: bool,
}

impl Options {
    pub fn new(debug_dirs: Vec<PathBuf>, script: Option<PathBuf>) -> Self {
        Options {
            debug_dirs,
            script: script.unwrap_or_else(|| DEFAULT_SCRIPT.into()),
            gdb: "gdb".into(),
            debuginfod: crate::stacks::dbgsym::debuginfod_urls().is_some(),
        }
    }
}

/// What `--qemu-state` found and printed.
#[derive(Debug, Clone, Serialize)]
pub struct QemuState {
    pub binary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// What is missing for coroutines and timers, each with what to do.
    pub missing: Vec<String>,
    /// Threads gdb saw in the core.
    pub threads: usize,
    pub gdb_argv: Vec<String>,
    pub gdb_output: String,
}

/// The fields of `core/minicore.json` this reader needs.
#[derive(serde::Deserialize)]
struct CoreMeta {
    archive_path: String,
    exe: String,
    #[serde(default)]
    exe_build_id: Option<String>,
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let p = std::env::temp_dir().join(format!("wedge-autopsy-core.{}.{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs gdb on the archived core and reports what it printed and what is missing.
pub fn run(archive_path: &Path, reader: &ArchiveReader, opts: &Options) -> Result<QemuState, QemuStateError> {
    let meta: CoreMeta = reader
        .read_json("core/minicore.json")
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or(QemuStateError::NoCore)?;
    let entry =
        reader.manifest.files.iter().find(|f| f.path == meta.archive_path).cloned().ok_or(QemuStateError::NoCore)?;
    let mut missing = Vec::new();
    // The binary on this host must be the one that ran (same build-id).
    let elf = Elf::open(Path::new(&meta.exe)).ok();
    let host_id = elf.as_ref().and_then(|e| e.build_id.as_deref().map(hex));
    if host_id.is_none() || host_id != meta.exe_build_id {
        return Err(QemuStateError::OtherBuild(format!(
            "{} on this host {} the one that ran (build-id {}): run --qemu-state on a host with the same QEMU build",
            meta.exe,
            if host_id.is_none() { "is missing, so it cannot be" } else { "is not" },
            meta.exe_build_id.as_deref().unwrap_or("unknown")
        )));
    }
    let elf = elf.expect("checked above");
    let search = DebugSearch { dirs: opts.debug_dirs.clone() };
    let debug = if elf.has_dwarf { None } else { find_debug(&elf, &meta.exe, &search) };
    let has_symbols = elf.has_dwarf || debug.as_ref().is_some_and(|d| d.has_dwarf);
    if !has_symbols {
        let qemu_package = reader
            .read_json("qmp/query-version.json")
            .and_then(|v| v["return"]["package"].as_str().map(str::to_string));
        missing.push(format!(
            "debug symbols of {} (build-id {}) under {}: install {} (or pass --debug-dir)",
            meta.exe,
            meta.exe_build_id.as_deref().unwrap_or("?"),
            opts.debug_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
            dbgsym::for_module(&meta.exe, qemu_package.as_deref()).unwrap_or_else(|| "its -dbgsym package".into())
        ));
    }
    let script_ok = opts.script.is_file() && opts.script.parent().is_some_and(|d| d.join("qemugdb").is_dir());
    if !script_ok {
        missing.push(format!(
            "QEMU's gdb scripts at {} (with its qemugdb/ directory beside it): `apt-get source qemu`, then pass --qemu-gdb-script qemu-*/scripts/qemu-gdb.py",
            opts.script.display()
        ));
    }
    let tmp = TempDir::new().map_err(|e| QemuStateError::Tool(format!("cannot create a private temp dir: {e}")))?;
    let core = tmp.0.join("qemu.core");
    archive::extract_entry(archive_path, &entry, &core)?;
    let mut argv: Vec<String> = vec![opts.gdb.clone(), "-batch".into(), "-nx".into()];
    if !opts.debuginfod {
        argv.extend(["-iex".into(), "set debuginfod enabled off".into()]);
    }
    let dirs = opts.debug_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    argv.extend(["-iex".into(), format!("set debug-file-directory {dirs}")]);
    argv.extend(["-ex".into(), "set pagination off".into(), "-ex".into(), "set print thread-events off".into()]);
    argv.extend([meta.exe.clone(), core.display().to_string()]);
    argv.extend(["-ex".into(), "info threads".into(), "-ex".into(), "thread apply all bt".into()]);
    if has_symbols && script_ok {
        argv.extend(["-ex".into(), format!("source {}", opts.script.display())]);
        argv.extend(["-ex".into(), "thread apply all qemu bt".into(), "-ex".into(), "qemu timers".into()]);
    }
    let mut spec = Spec::new(argv.clone(), GDB_TIMEOUT);
    if !opts.debuginfod {
        spec.env_remove.push("DEBUGINFOD_URLS".into());
    }
    let out = exec::run(&spec, &Cancel::new()).map_err(|e| match e {
        exec::ExecError::NotFound(_) => QemuStateError::Tool("gdb is not installed (apt install gdb)".into()),
        other => QemuStateError::Tool(other.to_string()),
    })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        text.push_str("\n--- gdb stderr ---\n");
        text.push_str(&err);
    }
    if out.timed_out {
        text.push_str(&format!("\n(gdb killed at the {} s deadline)\n", GDB_TIMEOUT.as_secs()));
    }
    let threads = text.lines().filter(|l| l.starts_with("Thread ") && l.contains("(LWP ")).count();
    Ok(QemuState {
        binary: meta.exe,
        build_id: meta.exe_build_id,
        debug_file: debug.map(|d| d.path.display().to_string()),
        script: script_ok.then(|| opts.script.display().to_string()),
        missing,
        threads,
        gdb_argv: argv,
        gdb_output: text,
    })
}

/// The text form: what is missing first, then gdb's output.
pub fn render(s: &QemuState) -> String {
    let mut out = String::new();
    out.push_str(&format!("QEMU {} (build-id {})\n", s.binary, s.build_id.as_deref().unwrap_or("?")));
    if s.missing.is_empty() {
        out.push_str("coroutines (qemu bt) and timers (qemu timers) below\n");
    } else {
        out.push_str("coroutines and timers need what is missing; thread backtraces only:\n");
        for m in &s.missing {
            out.push_str(&format!("  missing: {m}\n"));
        }
    }
    out.push('\n');
    out.push_str(&s.gdb_output);
    out
}
