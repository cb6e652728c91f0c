//! The verdict: what the evidence shows, computed from captured files alone so it gives
//! the same answer on a live run (staging dir) and on a sealed archive.
//!
//! In: an [`Evidence`] reader and the run's step records. Out: a [`Diagnosis`] with one
//! [`Verdict`], the facts it rests on (with numbers), and findings (threads, per-device
//! I/O deltas, throttle limits, the config's risk stack).

pub mod audit;
pub mod config;
mod findings;
pub mod pinnable;

use serde::Serialize;
use serde_json::Value;

pub use findings::{DeviceDelta, Findings, ThreadFinding};

use crate::archive::Evidence;
use crate::step::{StepRecord, StepStatus};

/// Default idle time beyond which frozen counters alone count as a frozen block path.
/// Linux guests flush the journal and dirty pages within seconds to a minute, so a disk
/// with no completion for longer than this while the guest runs is not plausibly idle.
pub const DEFAULT_MIN_IDLE_SECS: f64 = 30.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    BlockPathFrozen,
    MainLoopWedged,
    QmpUnreachable,
    Paused,
    IoError,
    ProcessStopped,
    Healthy,
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::BlockPathFrozen => "block-path-frozen",
            Verdict::MainLoopWedged => "main-loop-wedged",
            Verdict::QmpUnreachable => "qmp-unreachable",
            Verdict::Paused => "paused",
            Verdict::IoError => "io-error",
            Verdict::ProcessStopped => "process-stopped",
            Verdict::Healthy => "healthy",
            Verdict::Inconclusive => "inconclusive",
        }
    }

    /// Exit code of `wedge-autopsy diagnose`, for alert rules and cron checks.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Inconclusive => 10,
            Verdict::BlockPathFrozen => 11,
            Verdict::MainLoopWedged => 12,
            Verdict::QmpUnreachable => 13,
            Verdict::Paused => 14,
            Verdict::IoError => 15,
            Verdict::ProcessStopped => 16,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Knobs of the verdict rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub min_idle_secs: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { min_idle_secs: DEFAULT_MIN_IDLE_SECS }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    pub verdict: Verdict,
    /// The facts the verdict rests on, each a sentence with its numbers.
    pub facts: Vec<String>,
    pub findings: Findings,
}

/// Computes the verdict. `steps` are the run's step records (from the manifest when
/// reading an archive).
pub fn diagnose(ev: &dyn Evidence, steps: &[StepRecord], rules: &Rules) -> Diagnosis {
    let mut findings = findings::collect(ev, steps);
    let mut facts = Vec::new();
    let verdict = decide(ev, steps, &findings, rules, &mut facts);
    // The one hook of known-bug signatures: pure over the evidence and the verdict.
    findings.signatures = crate::signatures::matches(ev, verdict.as_str(), None, crate::signatures::active());
    Diagnosis { verdict, facts, findings }
}

fn step<'a>(steps: &'a [StepRecord], id: &str) -> Option<&'a StepRecord> {
    steps.iter().find(|s| s.id == id)
}

fn decide(ev: &dyn Evidence, steps: &[StepRecord], f: &Findings, rules: &Rules, facts: &mut Vec<String>) -> Verdict {
    // 1. A stopped process explains everything else (no greeting, frozen counters).
    if let Some(state) = &f.process_state {
        if state.starts_with('T') || state.starts_with('t') {
            facts.push(format!("the QEMU process is in state {state} (stopped by a signal or a tracer)"));
            let stopped = f.threads.iter().filter(|t| matches!(t.state, 'T' | 't')).count();
            facts.push(format!("{stopped} of {} threads are stopped", f.threads.len()));
            return Verdict::ProcessStopped;
        }
    }
    // 2. QMP reachability, from the connect step.
    if let Some(c) = step(steps, "qmp-connect") {
        if c.status != StepStatus::Ok && c.status != StepStatus::Skipped {
            let err = c.error.clone().unwrap_or_default();
            if err.contains("capabilities-unanswered") {
                facts.push(format!("QMP greeted but did not answer qmp_capabilities: {err}"));
                facts.push("in-band commands run on the main loop, so the main loop is not running".into());
                return Verdict::MainLoopWedged;
            }
            facts.push(format!("no QMP session: {err}"));
            match f.main_thread.as_ref() {
                Some(m) if m.state == 'S' && m.wchan.contains("poll") => facts.push(format!(
                    "the main thread is sleeping in {} (its event loop is alive), so another client most likely holds the socket (pvestatd, a stuck `qm monitor`)",
                    m.wchan
                )),
                Some(m) => facts.push(format!(
                    "the main thread is in state {} in {}: the process may be frozen",
                    m.state,
                    if m.wchan.is_empty() { "?" } else { &m.wchan }
                )),
                None => facts.push("no /proc evidence of the main thread to tell a held socket from a frozen process".into()),
            }
            return Verdict::QmpUnreachable;
        }
    }
    if let Some(t) = steps.iter().find(|s| s.kind == "qmp" && s.status == StepStatus::Timeout) {
        facts.push(format!("QMP command step {} timed out after {} ms while the session was up", t.id, t.duration_ms));
        facts.push("in-band commands run on the main loop, so the main loop is stuck".into());
        return Verdict::MainLoopWedged;
    }
    // 3. Run state.
    let status = ev.read_json("qmp/query-status.json").and_then(|v| v["return"]["status"].as_str().map(str::to_string));
    let Some(status) = status else {
        facts.push("no query-status reply was captured".into());
        return Verdict::Inconclusive;
    };
    facts.push(format!("query-status: {status}"));
    if status == "io-error" || !f.io_status_errors.is_empty() {
        for d in &f.io_status_errors {
            facts.push(format!("query-block: {d}"));
        }
        return Verdict::IoError;
    }
    if !matches!(status.as_str(), "running" | "prelaunch") {
        facts.push(format!("the guest is not running (status {status}); I/O does not move while it is"));
        return Verdict::Paused;
    }
    // 4. Block path: counters across the two blockstats samples.
    if f.devices.is_empty() {
        facts.push("no two query-blockstats samples to compare".into());
        return Verdict::Inconclusive;
    }
    let window = f.sample_window_ms;
    let moving: Vec<&DeviceDelta> = f.devices.iter().filter(|d| d.ops_delta() > 0).collect();
    let frozen: Vec<&DeviceDelta> = f
        .devices
        .iter()
        .filter(|d| d.ops_delta() == 0 && d.ever_completed())
        // QMP has no in-flight counter, and on QEMU 7.2 wr_highest_offset moves only on
        // completion (measured in the lab), so a stuck queue and an idle disk differ only
        // in how long nothing has completed.
        .filter(|d| d.idle_secs().is_some_and(|s| s >= rules.min_idle_secs))
        .collect();
    if !frozen.is_empty() {
        for d in &frozen {
            let mut fact = format!(
                "{}: 0 I/O operations completed across {} ms (wr_operations {}, rd_operations {}, flush_operations {})",
                d.device, window, d.wr_ops.1, d.rd_ops.1, d.flush_ops.1
            );
            if let Some(idle) = d.idle_secs() {
                fact.push_str(&format!(
                    "; last completion {idle:.1} s ago (idle_time_ns {})",
                    d.idle_ns.1.unwrap_or(0)
                ));
            }
            facts.push(fact);
        }
        facts.push(format!("QEMU answered {} QMP commands during the capture: its main loop is alive", f.qmp_replies));
        if !moving.is_empty() {
            facts.push(format!(
                "other devices still complete I/O: {}",
                moving.iter().map(|d| format!("{} (+{} ops)", d.device, d.ops_delta())).collect::<Vec<_>>().join(", ")
            ));
        }
        return Verdict::BlockPathFrozen;
    }
    if !moving.is_empty() {
        for d in &moving {
            facts.push(format!("{}: +{} operations completed in {} ms", d.device, d.ops_delta(), window));
        }
        return Verdict::Healthy;
    }
    let idle: Vec<String> = f
        .devices
        .iter()
        .map(|d| match d.idle_secs() {
            Some(s) => format!("{} idle {s:.1} s", d.device),
            None => format!("{} no I/O since start", d.device),
        })
        .collect();
    facts.push(format!(
        "no I/O completed in the {window} ms window ({}), but the disks have been idle for less than {:.0} s: an idle guest looks the same; diagnose again in a minute or check guest activity",
        idle.join(", "),
        rules.min_idle_secs
    ));
    Verdict::Inconclusive
}

/// Parses a QMP reply file's `return` value.
pub(crate) fn ret(ev: &dyn Evidence, path: &str) -> Option<Value> {
    ev.read_json(path).map(|v| v["return"].clone())
}

#[cfg(test)]
mod tests;
