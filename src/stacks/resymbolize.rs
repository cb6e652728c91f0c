//! `inspect ARCHIVE --resymbolize`: unwind and name every thread again from the raw
//! snapshot in the archive ([`super::native::raw`]), with the debug info that exists
//! now, and say which modules still lack it and which package would provide it.
//!
//! Debug files are looked up by build-id and `.gnu_debuglink` under the debug dirs, then,
//! only here and only when `DEBUGINFOD_URLS` is set, with `debuginfod-find` (a
//! subprocess: elfutils' client owns the cache, the URL list and its verification, and
//! a capture never runs it). Names the capture had that nothing provides now (a binary
//! upgraded since, no debug file) are kept from `stacks/threads.json`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::dbgsym;
use super::native::modules::DebugSearch;
use super::native::raw::{self, ModuleSource, RawError};
use super::native::{analyze, module_infos, render_text, AnalyzeOptions, StacksReport};
use crate::archive::Evidence;
use crate::cancel::Cancel;
use crate::exec::{self, Spec};
use crate::exit::Exit;

/// How long one `debuginfod-find` may take (a debug file can be hundreds of MB).
const DEBUGINFOD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ResymbolizeError {
    #[error("the archive has no raw stack snapshot (stacks/raw/snapshot.json): it was taken with the gdb method or by a version before 0.2; only the recorded stacks can be shown")]
    NoRawSnapshot,
    #[error(transparent)]
    Raw(#[from] RawError),
}

impl ResymbolizeError {
    /// Exit class: an archive without (readable) raw stacks is bad input, like an
    /// unreadable archive.
    pub fn exit(&self) -> Exit {
        Exit::BadInput
    }
}

/// Options of a re-symbolization.
#[derive(Debug, Clone, Default)]
pub struct ResymbolizeOptions {
    pub debug_dirs: Vec<PathBuf>,
    /// `DEBUGINFOD_URLS`, when set and not empty.
    pub debuginfod_urls: Option<String>,
}

impl ResymbolizeOptions {
    /// The debug dirs given, with debuginfod enabled exactly when `DEBUGINFOD_URLS` is set.
    pub fn from_env(debug_dirs: Vec<PathBuf>) -> Self {
        ResymbolizeOptions { debug_dirs, debuginfod_urls: super::dbgsym::debuginfod_urls() }
    }
}

/// A module still without symbols and line tables, and what would provide them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MissingDebug {
    pub module: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// The package that ships its debug info, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Frames of the report that lie in this module.
    pub frames: usize,
}

/// The result: a fresh report plus where its names came from.
#[derive(Debug, Clone, Serialize)]
pub struct Resymbolized {
    pub report: StacksReport,
    pub modules: Vec<ModuleSource>,
    /// Modules that frames lie in and that still have no line tables.
    pub missing: Vec<MissingDebug>,
    /// Frames named now with file:line, and frames with a name at all.
    pub frames_with_lines: usize,
    pub frames_named: usize,
    pub notes: Vec<String>,
}

/// Re-unwinds and re-names the raw snapshot of `ev`.
pub fn resymbolize(ev: &dyn Evidence, opts: &ResymbolizeOptions) -> Result<Resymbolized, ResymbolizeError> {
    let json = ev.read(raw::JSON_PATH).ok_or(ResymbolizeError::NoRawSnapshot)?;
    let data = ev.read(raw::DATA_PATH).ok_or(ResymbolizeError::NoRawSnapshot)?;
    let doc = raw::parse(&json)?;
    let threads = raw::threads(&doc, &data)?;
    let search = DebugSearch { dirs: opts.debug_dirs.clone() };
    let mut notes = Vec::new();
    let fetched = std::cell::RefCell::new(Vec::new());
    let fetch = |id: &str| -> Option<PathBuf> {
        let urls = opts.debuginfod_urls.as_ref()?;
        let r = debuginfod_find(id, urls);
        if let Err(e) = &r {
            fetched.borrow_mut().push(format!("debuginfod {id}: {e}"));
        }
        r.ok()
    };
    let (mods, sources) = raw::modules(&doc, &data, &search, Some(&fetch));
    notes.append(&mut fetched.into_inner());
    // Labels and the names recorded at capture time, from the original report.
    let original: Option<StacksReport> =
        ev.read_json("stacks/threads.json").and_then(|v| serde_json::from_value(v).ok());
    let labels: BTreeMap<i32, String> =
        original.iter().flat_map(|r| r.threads.iter()).filter_map(|t| Some((t.tid, t.label.clone()?))).collect();
    let mut report_threads = analyze(&threads, &mods, &AnalyzeOptions { lines: true, max_depth: 256, labels: &labels });
    if let Some(orig) = &original {
        let names: BTreeMap<(String, u64), (String, Option<u64>)> = orig
            .threads
            .iter()
            .flat_map(|t| t.frames.iter())
            .filter_map(|f| Some(((f.module.clone()?, f.module_offset?), (f.symbol.clone()?, f.offset))))
            .collect();
        for f in report_threads.iter_mut().flat_map(|t| t.frames.iter_mut()).filter(|f| f.symbol.is_none()) {
            if let (Some(m), Some(o)) = (&f.module, f.module_offset) {
                if let Some((s, off)) = names.get(&(m.clone(), o)) {
                    f.symbol = Some(s.clone());
                    f.offset = *off;
                }
            }
        }
    }
    let report = StacksReport {
        method: "native (re-symbolized offline)".into(),
        pid: doc.pid,
        arch: doc.arch.clone(),
        freeze_us: doc.freeze_us,
        stopping_us: doc.stopping_us,
        total_us: 0,
        threads: report_threads,
        modules: module_infos(&mods),
        notes: Vec::new(),
    };
    let qemu_package =
        ev.read_json("qmp/query-version.json").and_then(|v| v["return"]["package"].as_str().map(str::to_string));
    let mut per_module: BTreeMap<&str, usize> = BTreeMap::new();
    for f in report.threads.iter().flat_map(|t| t.frames.iter()) {
        if let Some(m) = &f.module {
            *per_module.entry(m.as_str()).or_default() += 1;
        }
    }
    let missing = sources
        .iter()
        .filter(|s| !s.has_lines && s.name != "[vdso]")
        .filter_map(|s| {
            let frames = *per_module.get(s.name.as_str())?;
            Some(MissingDebug {
                module: s.name.clone(),
                build_id: s.build_id.clone(),
                package: dbgsym::for_module(&s.name, qemu_package.as_deref()),
                frames,
            })
        })
        .collect();
    let frames = || report.threads.iter().flat_map(|t| t.frames.iter());
    let frames_with_lines = frames().filter(|f| f.line.is_some()).count();
    let frames_named = frames().filter(|f| f.symbol.is_some()).count();
    Ok(Resymbolized { modules: sources, missing, frames_with_lines, frames_named, notes, report })
}

/// `debuginfod-find debuginfo BUILD-ID`: the path of the cached debug file.
fn debuginfod_find(build_id: &str, urls: &str) -> Result<PathBuf, String> {
    if !build_id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("not a build-id".into());
    }
    let mut spec = Spec::new(vec!["debuginfod-find".into(), "debuginfo".into(), build_id.into()], DEBUGINFOD_TIMEOUT);
    spec.env.push(("DEBUGINFOD_URLS".into(), urls.into()));
    let out = exec::run(&spec, &Cancel::new()).map_err(|e| match e {
        exec::ExecError::NotFound(_) => {
            "DEBUGINFOD_URLS is set but debuginfod-find is not installed (apt install debuginfod)".to_string()
        }
        other => other.to_string(),
    })?;
    if out.timed_out {
        return Err(format!("no answer within {} s", DEBUGINFOD_TIMEOUT.as_secs()));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.success() || path.is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("not found").to_string());
    }
    Ok(PathBuf::from(path))
}

/// The text form: the stacks, then where names came from and what is still missing.
pub fn render(r: &Resymbolized) -> String {
    let mut out = render_text(&r.report);
    writeln!(
        out,
        "\nre-symbolized offline: {} of {} frames named, {} with file:line",
        r.frames_named,
        r.report.frame_count(),
        r.frames_with_lines
    )
    .unwrap();
    for m in &r.modules {
        if let Some(d) = &m.debug_file {
            writeln!(out, "  debug info: {} <- {d}", m.name).unwrap();
        }
    }
    if r.missing.is_empty() {
        writeln!(out, "every module with frames has line tables").unwrap();
    } else {
        writeln!(out, "still without debug info (frames show function names at best, no file:line):").unwrap();
        for m in &r.missing {
            write!(out, "  {} ({} frames", m.module, m.frames).unwrap();
            if let Some(id) = &m.build_id {
                write!(out, ", build-id {id}").unwrap();
            }
            out.push(')');
            match &m.package {
                Some(p) => writeln!(out, ": install {p}").unwrap(),
                None => writeln!(out).unwrap(),
            }
        }
    }
    for n in &r.notes {
        writeln!(out, "note: {n}").unwrap();
    }
    out
}
