//! `native`: every thread's user stack in one instant, without gdb (x86_64 Linux only).
//!
//! 1. Before anything is stopped: `/proc/PID/maps`, every mapped ELF (unwind tables,
//!    debug files), each thread's `stat`/`wchan`/`syscall`/`stack` ([`modules`]).
//! 2. The freeze ([`snapshot`]): PTRACE_SEIZE + PTRACE_INTERRUPT all threads, copy
//!    registers and 64 KiB of stack each, detach. About 1 ms for QEMU's 68 threads.
//! 3. After every thread runs again: unwinding from the copies ([`unwind`]), symbols
//!    and lines ([`symbols`]), then the report (`stacks/threads.json`, `threads.txt`).
//!
//! Works on any pid: [`snapshot_and_unwind`] is the library entry for
//! `wedge-autopsy stacks <PID>`; [`Native`] is the [`StackMethod`] for the runbook.

pub mod modules;
pub mod raw;
pub mod render;
pub mod snapshot;
pub mod symbols;
pub mod unwind;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{restore_stopped, StackError, StackMethod, StackRequest, ThreadStates};
use crate::cancel::Cancel;
use crate::procfs::Syscall;
pub use modules::{DebugSearch, DEFAULT_DEBUG_DIR};
pub use render::render_text;
pub use snapshot::FreezeOptions;
pub use symbols::Inlined;

/// Options of a native snapshot.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    pub freeze: FreezeOptions,
    pub debug: DebugSearch,
    /// Resolve file:line and inlined frames from DWARF when present. Off by default:
    /// Debian's debug files compress their DWARF, and inflating libc's alone costs
    /// ~100 ms of CPU, more than the whole snapshot (it happens after the freeze).
    /// The runbook method ([`Native::default`]) turns it on.
    pub lines: bool,
    pub max_depth: usize,
    /// Extra thread names (from QMP: `CPU 0`, `iothread0`), by TID.
    pub labels: BTreeMap<i32, String>,
}

impl Default for NativeOptions {
    fn default() -> Self {
        NativeOptions {
            freeze: FreezeOptions::default(),
            debug: DebugSearch::default(),
            lines: false,
            max_depth: 256,
            labels: BTreeMap::new(),
        }
    }
}

/// One frame. `pc` is the exact PC for frame 0 (and for a frame a signal interrupted),
/// the return address for the others; names are looked up at `pc − 1` for those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub pc: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Address relative to the module's load bias (the file's virtual address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inlined: Vec<Inlined>,
    /// `context` (frame 0), `cfi` or `frame_pointer`.
    pub via: unwind::Via,
    /// This frame is a signal trampoline: the next frame is the interrupted code.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signal_frame: bool,
}

/// One thread's stack and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadReport {
    pub tid: i32,
    /// `comm`, plus the label from QMP in brackets when there is one.
    pub name: String,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Scheduler state just before the freeze (`R`, `S`, `D`, `T`, …).
    pub state: char,
    /// `stopped`, `skipped_d`, `not_stopped`, `vanished`, `failed`.
    pub capture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wchan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<SyscallInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_stack: Option<Vec<String>>,
    pub frames: Vec<Frame>,
    /// Why the unwinder stopped (`outermost frame` is the normal end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// How long this thread was stopped (interrupt to detach, an upper bound), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A mapped ELF as used for the stacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    pub start: u64,
    pub end: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
}

/// The whole snapshot: `stacks/threads.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StacksReport {
    pub method: String,
    pub pid: i32,
    pub arch: String,
    /// First stop to last detach, µs: how long the process was frozen.
    pub freeze_us: u64,
    /// Part of `freeze_us` spent waiting for the last thread to stop, µs.
    #[serde(default)]
    pub stopping_us: u64,
    /// Time spent loading modules, freezing, unwinding and naming, µs.
    pub total_us: u64,
    pub threads: Vec<ThreadReport>,
    pub modules: Vec<ModuleInfo>,
    /// Non-fatal problems (an unloadable module, a post-check finding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl StacksReport {
    pub fn frame_count(&self) -> usize {
        self.threads.iter().map(|t| t.frames.len()).sum()
    }
}

/// `/proc/TID/syscall` as recorded (same JSON shape as [`crate::procfs::Syscall`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SyscallInfo {
    In { nr: i64, args: Vec<u64>, sp: u64, pc: u64 },
    Blocked { sp: u64, pc: u64 },
    Running,
}

impl From<&Syscall> for SyscallInfo {
    fn from(s: &Syscall) -> Self {
        match s {
            Syscall::In { nr, args, sp, pc } => SyscallInfo::In { nr: *nr, args: args.clone(), sp: *sp, pc: *pc },
            Syscall::Blocked { sp, pc } => SyscallInfo::Blocked { sp: *sp, pc: *pc },
            Syscall::Running => SyscallInfo::Running,
        }
    }
}

/// Functions where a thread's stack begins; nothing above them is a real caller.
const OUTERMOST: &[&str] = &["clone3", "__clone3", "clone", "__clone", "_start"];

fn starttime(pid: i32) -> Option<u64> {
    crate::procfs::parse_stat_file(&format!("/proc/{pid}/stat")).ok().map(|s| s.starttime)
}

/// The live half of a snapshot: what was read from the process (modules with their
/// files, the frozen register and stack copies). Everything after this works on
/// copies only ([`analyze`]), live or from an archive ([`raw`]).
pub struct Captured {
    pub pid: i32,
    pub modules: modules::Modules,
    pub snapshot: snapshot::Snapshot,
    /// Non-fatal problems of the capture (unloadable modules, post-check findings).
    pub notes: Vec<String>,
    started: Instant,
}

/// Loads the modules, freezes every thread of `pid` (running `during` while they are
/// stopped), and checks afterwards that none was left stopped or traced.
pub fn capture(
    pid: i32,
    opts: &NativeOptions,
    cancel: &Cancel,
    during: Option<snapshot::WhileFrozen>,
) -> Result<Captured, StackError> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Err(StackError::Unavailable("the native unwinder supports x86_64 Linux only".into()));
    }
    let t0 = Instant::now();
    let born = starttime(pid).ok_or(StackError::NoProcess(pid))?;
    let before = ThreadStates::read(pid).map_err(|_| StackError::NoProcess(pid))?;
    let maps_text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            StackError::Permission { pid, detail: format!("/proc/{pid}/maps: {e}") }
        }
        _ => StackError::NoProcess(pid),
    })?;
    let maps = modules::parse_maps(&maps_text);
    let (mods, mut notes) = modules::load(pid, &maps, &opts.debug);
    if cancel.is_cancelled() {
        return Err(StackError::Interrupted);
    }
    let (snap, tracer_tid) = snapshot::take_with(pid, &maps, &opts.freeze, cancel, during);
    // Post-checks run on every path, errors included.
    let still_target = || starttime(pid) == Some(born);
    let restore = restore_stopped(pid, &before, &still_target);
    let mut traced = snapshot::traced_threads(pid);
    for _ in 0..20 {
        // The ptrace thread's exit detaches what it still held; give the kernel a beat.
        if !traced.iter().any(|(_, tp)| *tp == tracer_tid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        traced = snapshot::traced_threads(pid);
    }
    let mut snap = snap?;
    notes.append(&mut snap.notes);
    if !restore.newly_stopped.is_empty() {
        notes.push(format!(
            "threads {:?} were left stopped; resumed: {}{}",
            restore.newly_stopped,
            restore.resumed,
            restore.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ));
    }
    for (tid, tp) in &traced {
        notes.push(format!("thread {tid} is still traced by pid {tp} after the snapshot"));
    }
    Ok(Captured { pid, modules: mods, snapshot: snap, notes, started: t0 })
}

/// How [`analyze`] unwinds and names: the offline half of [`NativeOptions`].
pub struct AnalyzeOptions<'a> {
    pub lines: bool,
    pub max_depth: usize,
    pub labels: &'a BTreeMap<i32, String>,
}

/// Unwinds and names every captured thread from its copied registers and stack, with
/// `mods` (live modules, or modules rebuilt from an archive). Never touches a process.
pub fn analyze(
    threads: &[snapshot::ThreadCapture],
    mods: &modules::Modules,
    opts: &AnalyzeOptions<'_>,
) -> Vec<ThreadReport> {
    let mut unwinder = unwind::Unwinder::new(mods);
    unwinder.max_depth = opts.max_depth;
    let mut symbolizer = symbols::Symbolizer::new();
    let mut out = Vec::with_capacity(threads.len());
    for cap in threads {
        let regs = match (&cap.regs, &cap.syscall) {
            (Some(r), _) => Some(unwind::Regs::from_user(r)),
            (None, Some(Syscall::In { sp, pc, .. } | Syscall::Blocked { sp, pc })) if !cap.stack.is_empty() => {
                Some(unwind::Regs::pc_sp(*pc, *sp))
            }
            _ => None,
        };
        let (mut frames, mut end) = (Vec::new(), None);
        if let Some(regs) = regs {
            let mem = unwind::stack_reader(cap.stack_base, &cap.stack);
            let (raw, why) = unwinder.unwind(regs, &mem);
            end = Some(why.to_string());
            for f in raw {
                let (idx, module) = match mods.list.iter().enumerate().find(|(_, m)| m.contains(f.lookup)) {
                    Some((i, m)) => (i, Some(m)),
                    None => (usize::MAX, None),
                };
                let mut fr = Frame {
                    pc: f.pc,
                    module: module.map(|m| m.name.clone()),
                    module_offset: module.map(|m| f.pc.wrapping_sub(m.bias)),
                    symbol: None,
                    offset: None,
                    file: None,
                    line: None,
                    inlined: Vec::new(),
                    via: f.via,
                    signal_frame: f.signal,
                };
                if let Some(m) = module {
                    // A signal trampoline is entered by "returning" to its first byte:
                    // name it at its PC (its CFI covers pc − 1 too, its symbol does not).
                    let at = if f.signal { f.pc } else { f.lookup };
                    let r = symbolizer.resolve(idx, m, f.pc, at, opts.lines);
                    fr.symbol = r.symbol;
                    fr.offset = r.offset;
                    fr.file = r.file;
                    fr.line = r.line;
                    fr.inlined = r.inlined;
                }
                let last = fr.symbol.as_deref().is_some_and(|s| OUTERMOST.contains(&s));
                frames.push(fr);
                if last {
                    end = Some("outermost frame".into());
                    break;
                }
            }
        }
        let label = opts.labels.get(&cap.tid).cloned();
        let name = match &label {
            Some(l) if l != &cap.comm => format!("{} [{l}]", cap.comm),
            _ => cap.comm.clone(),
        };
        let capture =
            serde_json::to_value(cap.capture).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        out.push(ThreadReport {
            tid: cap.tid,
            name,
            comm: cap.comm.clone(),
            label,
            state: cap.state,
            capture,
            wchan: cap.wchan.clone(),
            syscall: cap.syscall.as_ref().map(SyscallInfo::from),
            kernel_stack: cap.kernel_stack.clone(),
            frames,
            end,
            freeze_us: cap.stopped_us,
            errors: cap.errors.clone(),
        });
    }
    out
}

/// The modules as listed in a report.
pub fn module_infos(mods: &modules::Modules) -> Vec<ModuleInfo> {
    mods.list
        .iter()
        .map(|m| ModuleInfo {
            name: m.name.clone(),
            start: m.start,
            end: m.end,
            build_id: m.build_id_hex(),
            debug_file: m.debug.as_ref().map(|d| d.path.display().to_string()),
        })
        .collect()
}

impl Captured {
    /// The report of this capture: [`analyze`] plus the capture's own facts.
    pub fn report(&self, opts: &NativeOptions) -> StacksReport {
        let aopts = AnalyzeOptions { lines: opts.lines, max_depth: opts.max_depth, labels: &opts.labels };
        let threads = analyze(&self.snapshot.threads, &self.modules, &aopts);
        StacksReport {
            method: "native".into(),
            pid: self.pid,
            arch: "x86_64".into(),
            freeze_us: self.snapshot.freeze_us,
            stopping_us: self.snapshot.stopping_us,
            total_us: self.started.elapsed().as_micros() as u64,
            threads,
            modules: module_infos(&self.modules),
            notes: self.notes.clone(),
        }
    }
}

/// Snapshots and unwinds every thread of `pid` (any process, not only QEMU).
///
/// The process is frozen only for the register and stack copies; afterwards every
/// thread is checked: none left stopped that was not stopped before, no tracer left.
pub fn snapshot_and_unwind(pid: i32, opts: &NativeOptions, cancel: &Cancel) -> Result<StacksReport, StackError> {
    Ok(capture(pid, opts, cancel, None)?.report(opts))
}

/// The `native` [`StackMethod`]. Its default resolves file:line too: in an archive the
/// extra CPU after the freeze is worth it.
#[derive(Debug, Clone)]
pub struct Native {
    pub opts: NativeOptions,
}

impl Default for Native {
    fn default() -> Self {
        Native { opts: NativeOptions { lines: true, ..NativeOptions::default() } }
    }
}

impl StackMethod for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn capture(&self, req: &StackRequest<'_>) -> Result<String, StackError> {
        let mut opts = self.opts.clone();
        opts.labels.extend(req.labels.iter().map(|(k, v)| (*k, v.clone())));
        // Never wait for stops longer than the step has left.
        let left = req.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StackError::Timeout(0));
        }
        opts.freeze.stop_timeout = opts.freeze.stop_timeout.min(left / 2);
        if !req.debug_dirs.is_empty() {
            opts.debug = DebugSearch { dirs: req.debug_dirs.clone() };
        }
        let captured = capture(req.pid, &opts, req.cancel, None)?;
        let report = captured.report(&opts);
        let json = serde_json::to_vec_pretty(&report).map_err(|e| StackError::Failed(e.to_string()))?;
        let fail = |e: crate::step::SinkError| StackError::Failed(e.to_string());
        req.sink.write("stacks/threads.json", &json).map_err(fail)?;
        // The raw snapshot, so the stacks can be unwound and named again offline.
        let (doc, data) = raw::encode(&captured);
        let doc = serde_json::to_vec(&doc).map_err(|e| StackError::Failed(e.to_string()))?;
        req.sink.write(raw::DATA_PATH, &data).map_err(fail)?;
        req.sink.write(raw::JSON_PATH, &doc).map_err(fail)?;
        req.sink.write("stacks/threads.txt", render_text(&report).as_bytes()).map_err(fail)?;
        for n in &report.notes {
            req.sink.note(format!("stacks: {n}"));
        }
        for t in &report.threads {
            for e in &t.errors {
                req.sink.note(format!("stacks: thread {} ({}): {e}", t.tid, t.name));
            }
        }
        let unstopped = report.threads.iter().filter(|t| t.capture != "stopped").count();
        Ok(format!(
            "{} threads, {} frames, frozen {} µs{}",
            report.threads.len(),
            report.frame_count(),
            report.freeze_us,
            if unstopped > 0 { format!(", {unstopped} not stopped") } else { String::new() }
        ))
    }
}
