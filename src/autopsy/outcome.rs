//! An autopsy and what followed it (the optional restart), as one result: the lock, the
//! capture, the gated restart, and the exit code, JSON and summary derived from them.
//! The CLI and the service both go through here.

use serde_json::Value;

use super::{Progress, Report, Request};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::error::{Error, Exit};
use crate::lock::VmLock;
use crate::restart::{self, RestartOutcome};
use crate::summary::Summary;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: Report,
    pub restart: Option<RestartOutcome>,
}

impl Outcome {
    /// A failed or refused restart after a good seal decides the code; else the capture's.
    pub fn exit(&self) -> Exit {
        match self.restart.as_ref().and_then(|r| r.exit()) {
            Some(e) if self.report.sealed.is_some() => e,
            _ => self.report.exit(),
        }
    }

    /// The `--json` object: the capture's fields plus `restart` when one was requested,
    /// with every secret value the seal pass learned replaced.
    pub fn json(&self) -> Value {
        let mut json = report_json(&self.report);
        if let Some(r) = &self.restart {
            json["restart"] = serde_json::to_value(r).unwrap_or_default();
        }
        self.report.secrets.scrub_json(&mut json);
        json
    }

    /// The summary as printed after the run ([`Outcome::summary`] rendered), redacted
    /// like the archive's copy: the printed text may end up in a ticket too.
    pub fn summary_markdown(&self) -> String {
        self.report.secrets.scrub_text(&crate::summary::markdown(&self.summary()))
    }

    /// The summary as printed after the run: the sealed copy plus the archive's own hash
    /// and the restart outcome, which the copy inside the archive cannot contain.
    pub fn summary(&self) -> Summary {
        self.report.final_summary(self.restart.as_ref().and_then(|r| serde_json::to_value(r).ok()))
    }

    /// One-line errors worth repeating at the end of the run.
    pub fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.report.seal_error {
            out.push(format!("VM {}: the archive could not be sealed: {e}", self.report.vmid));
        }
        if let Some(e) = self.restart.as_ref().and_then(|r| r.error.as_ref()) {
            out.push(format!("VM {}: restart: {e}", self.report.vmid));
        }
        out
    }
}

/// Whether the evidence allows the restart this gate asks for; `Err` says why not.
pub fn gate(gate: super::RestartGate, d: &crate::diagnose::Diagnosis, force: bool) -> Result<(), String> {
    use crate::diagnose::RestartAdvice;
    match gate {
        super::RestartGate::Automatic { allow_suspected } => d.automatic_restart(allow_suspected),
        super::RestartGate::Operator => match d.restart_advice() {
            RestartAdvice::WontHelp(why) if !force => {
                Err(format!("{why}. Nothing was stopped; re-run with --force to restart anyway"))
            }
            _ => Ok(()),
        },
    }
}

/// Takes the VM's lock, captures and seals, then (if `restart` is given) restarts after
/// the verified seal. The lock is held from the first capture to the end of the restart.
pub async fn run_with_restart(
    req: &Request,
    settings: &Settings,
    target: Target,
    restart: Option<restart::RestartParams>,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Outcome, Error> {
    let _lock = VmLock::acquire(&settings.out, req.vmid)?;
    let report = super::run(req, settings, target, progress, cancel).await?;
    let restart = match restart {
        Some(mut r) => {
            r.spec = req.runbook.target.clone();
            let (old, sealed, c) = (report.target.clone(), report.sealed.clone(), cancel.clone());
            match gate(req.restart_gate, &report.diagnosis, r.opts.force) {
                Err(why) => Some(restart::refuse(&r, &old, sealed.as_ref(), restart::RestartError::NotAdvised(why))),
                Ok(()) => {
                    let run = tokio::task::spawn_blocking(move || restart::run(&r, &old, sealed.as_ref(), &c));
                    Some(run.await.map_err(anyhow::Error::from)?)
                }
            }
        }
        None => None,
    };
    Ok(Outcome { report, restart })
}

/// The `--json` object of an autopsy run.
fn report_json(r: &Report) -> serde_json::Value {
    serde_json::json!({
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
        "steps": r.steps.iter().map(|s| serde_json::json!({
            "id": s.id, "status": s.status, "duration_ms": s.duration_ms, "error": s.error,
        })).collect::<Vec<_>>(),
    })
}
