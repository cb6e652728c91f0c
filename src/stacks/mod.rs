//! Thread stacks of a live process, behind one trait per method.
//!
//! Methods: `native` (ptrace SEIZE+INTERRUPT snapshot, unwound after detach) and `gdb`
//! (external `gdb -batch`). Every method runs blocking on the calling thread and must
//! leave the target as it found it: [`ThreadStates`] is taken before and checked after,
//! and a thread that a method left stopped is resumed (and reported).

pub mod dbgsym;
pub mod gdb;
pub mod native;
pub mod resymbolize;

use std::collections::BTreeMap;
use std::time::Instant;

use crate::cancel::Cancel;
use crate::exit::Exit;
use crate::step::StepSink;

/// Everything a method needs. `labels` maps TIDs to names from QMP (`CPU 0`, `iothread0`).
pub struct StackRequest<'a> {
    pub pid: i32,
    pub sink: &'a StepSink,
    pub deadline: Instant,
    pub cancel: &'a Cancel,
    pub labels: BTreeMap<i32, String>,
    /// Where separate debug files are looked up at capture time (`--debug-dir`).
    pub debug_dirs: Vec<std::path::PathBuf>,
}

/// Why a method produced no stacks. `Unavailable` lets the caller try the next method.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    Unavailable(String),
    #[error("needs CAP_SYS_PTRACE to trace pid {pid}: run as root ({detail})")]
    Permission { pid: i32, detail: String },
    #[error("process {0} is gone")]
    NoProcess(i32),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Failed(String),
}

impl StackError {
    /// Exit class when a command ends with it: a missing process is bad input, a missing
    /// privilege a refusal, anything else internal.
    pub fn exit(&self) -> Exit {
        match self {
            StackError::NoProcess(_) => Exit::BadInput,
            StackError::Permission { .. } => Exit::Refused,
            _ => Exit::Internal,
        }
    }
}

/// A stack capture method (`native`, `gdb`).
pub trait StackMethod: Send + Sync {
    fn name(&self) -> &'static str;
    /// Captures the stacks of every thread of `req.pid` into `req.sink` (files under
    /// `stacks/`). Returns a one-line summary for the progress output.
    fn capture(&self, req: &StackRequest<'_>) -> Result<String, StackError>;
}

/// Looks a method up by its runbook/CLI name.
pub fn method(name: &str) -> Option<Box<dyn StackMethod>> {
    match name {
        "gdb" => Some(Box::new(gdb::Gdb::default())),
        "native" => Some(Box::new(native::Native::default())),
        _ => None,
    }
}

/// Scheduler state of every thread (`R`, `S`, `D`, `T`, `t`, …), from `/proc/PID/task/*/stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadStates(pub BTreeMap<i32, char>);

impl ThreadStates {
    pub fn read(pid: i32) -> std::io::Result<Self> {
        let mut map = BTreeMap::new();
        for tid in crate::procfs::tids(pid)? {
            if let Ok(stat) = crate::procfs::parse_stat_file(&format!("/proc/{pid}/task/{tid}/stat")) {
                map.insert(tid, stat.state);
            }
        }
        Ok(ThreadStates(map))
    }

    fn stopped(&self) -> impl Iterator<Item = i32> + '_ {
        self.0.iter().filter(|(_, s)| matches!(s, 'T' | 't')).map(|(t, _)| *t)
    }
}

/// What [`restore_stopped`] found and did, for the step's notes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Threads stopped now that were not stopped before.
    pub newly_stopped: Vec<i32>,
    /// Whether SIGCONT was sent (only if no thread was stopped before we started).
    pub resumed: bool,
    pub error: Option<String>,
}

impl RestoreReport {
    /// What happened, for a step's notes: nothing when every thread was as found.
    pub fn notes(&self, who: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !self.newly_stopped.is_empty() {
            let what = if self.resumed { "resumed with SIGCONT" } else { "NOT resumed" };
            out.push(format!("threads {:?} were left stopped by {who}; {what}", self.newly_stopped));
        }
        out.extend(self.error.clone());
        out
    }
}

/// Runs `f` (anything that may stop the target's threads: a stack method, gdb) between
/// a reading of the thread states and [`restore_stopped`], so every caller leaves the
/// VM as it found it the same way.
pub fn leaving_as_found<T>(pid: i32, still_target: &dyn Fn() -> bool, f: impl FnOnce() -> T) -> (T, RestoreReport) {
    let before = ThreadStates::read(pid).unwrap_or_default();
    let result = f();
    (result, restore_stopped(pid, &before, still_target))
}

/// After a method ran: finds threads left stopped that were running before and resumes
/// them with SIGCONT, but only when nothing was stopped before (SIGCONT resumes the whole
/// thread group, and a VM that someone else stopped must stay stopped). The identity
/// of `pid` is re-checked by the caller-provided `still_target` just before signalling.
pub fn restore_stopped(pid: i32, before: &ThreadStates, still_target: &dyn Fn() -> bool) -> RestoreReport {
    let mut report = RestoreReport::default();
    // A tracer that just exited can leave a thread in `t` for a moment; give it a beat.
    let mut after = ThreadStates::read(pid).unwrap_or_default();
    for _ in 0..5 {
        report.newly_stopped = after.stopped().filter(|t| !matches!(before.0.get(t), Some('T' | 't'))).collect();
        if report.newly_stopped.is_empty() {
            return report;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        after = ThreadStates::read(pid).unwrap_or_default();
    }
    if before.stopped().next().is_some() {
        report.error = Some(format!(
            "threads {:?} were left stopped, but the process had stopped threads before the capture, so it was not resumed",
            report.newly_stopped
        ));
        return report;
    }
    if !still_target() {
        report.error = Some(format!("pid {pid} is no longer the proven target; not signalled"));
        return report;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT) {
        Ok(()) => report.resumed = true,
        Err(e) => report.error = Some(format!("SIGCONT to {pid} failed: {e}")),
    }
    report
}
