//! Rendering: results are collected into structs elsewhere; this turns them into text
//! for people (stderr progress) and JSON for machines.

pub mod summary;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::archive::Sealed;
use crate::autopsy::{Progress, Report};
use crate::step::StepRecord;

/// One plain line per step on stderr: elapsed, id, status, duration, error.
pub struct StderrLines {
    t0: Instant,
}

impl StderrLines {
    pub fn new() -> Self {
        StderrLines { t0: Instant::now() }
    }
    fn line(&self, text: &str) {
        let _ = writeln!(std::io::stderr(), "[{:>6.2}s] {text}", self.t0.elapsed().as_secs_f64());
    }
}

impl Default for StderrLines {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for StderrLines {
    fn finished(&self, r: &StepRecord) {
        let err = r.error.as_deref().map(|e| format!("  {e}")).unwrap_or_default();
        self.line(&format!("{:<24} {:<11} {:>6} ms{err}", r.id, r.status.as_str(), r.duration_ms));
    }
    fn sealed(&self, sealed: Option<&Sealed>, error: Option<&str>, took: Duration) {
        match (sealed, error) {
            (Some(s), _) => {
                self.line(&format!("{:<24} {:<11} {:>6} ms  {} files, {} bytes, verified", "seal", "ok", took.as_millis(), s.files, s.size));
                self.line(&format!("archive {}", s.path.display()));
                self.line(&format!("sha256  {}", s.sha256));
            }
            (None, e) => self.line(&format!("{:<24} {:<11} {:>6} ms  {}", "seal", "failed", took.as_millis(), e.unwrap_or("unknown error"))),
        }
    }
}

/// The `--json` object of an autopsy run.
pub fn autopsy_json(r: &Report) -> serde_json::Value {
    json!({
        "archive": r.sealed.as_ref().map(|s| s.path.display().to_string()),
        "sha256": r.sealed.as_ref().map(|s| s.sha256.clone()),
        "size": r.sealed.as_ref().map(|s| s.size),
        "sealed": r.sealed.is_some(),
        "seal_error": r.seal_error,
        "vmid": r.vmid,
        "pid": r.pid,
        "interrupted": r.interrupted,
        "duration_ms": r.duration_ms,
        "verdict": r.diagnosis.verdict,
        "facts": r.diagnosis.facts,
        "steps": r.steps.iter().map(|s| json!({
            "id": s.id, "status": s.status, "duration_ms": s.duration_ms, "error": s.error,
        })).collect::<Vec<_>>(),
    })
}
