//! The seam to the restart: a trait the job runner calls after a sealed capture whose
//! verdict the policy names, and the gate that decides whether it may be called.
//!
//! The real restart is [`Wired`]: `crate::restart` with the same backends, lock,
//! cooldown and proofs as `wedge-autopsy <VMID> --then-restart`. It is injected through
//! [`Restarter`] so the runner can be tested with a double.

use std::path::PathBuf;

use serde::Serialize;

use super::config::{Action, Policy};
use crate::diagnose::{Diagnosis, Verdict};
use crate::target::{Target, VmId};

/// Everything a restart needs to act and to justify itself.
#[derive(Debug, Clone)]
pub struct RestartRequest {
    pub vmid: VmId,
    /// The process the archive was captured from. Re-prove it (`Target::still_same`)
    /// right before any signal: the VM may have been restarted by someone else meanwhile.
    pub target: Target,
    pub verdict: Verdict,
    pub archive: PathBuf,
    pub sha256: String,
    /// Why (alert name, API reason, watch streak), for the restart's own log and lock.
    pub reason: String,
}

/// What the restart did, as reported in the job, the completion POST and the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RestartReport {
    /// A restart was started (`false`: refused, cooling down, gated off).
    pub attempted: bool,
    /// The VM is running again under a new process.
    pub ok: bool,
    /// One line: what happened or why not.
    pub detail: String,
}

/// Restarts a VM. Called on a blocking thread, at most once per job, only after
/// [`decide`] said [`Decision::Go`]. Implementations enforce the restart cooldown and the
/// per-VM lock shared with the CLI, and report refusals as `attempted: false`.
pub trait Restarter: Send + Sync {
    fn restart(&self, req: &RestartRequest) -> RestartReport;
}

/// The real restart (`crate::restart`): the same backends, cooldown and proofs as
/// `wedge-autopsy <VMID> --then-restart`, configured by the same `[restart]` table.
pub struct Wired {
    pub settings: crate::config::Settings,
}

impl Restarter for Wired {
    fn restart(&self, req: &RestartRequest) -> RestartReport {
        let r = match crate::restart::RestartParams::new(&self.settings, crate::restart::Options::default(), true) {
            Ok(r) => r,
            Err(e) => return RestartReport { attempted: false, ok: false, detail: e.to_string() },
        };
        let size = std::fs::metadata(&req.archive).map(|m| m.len()).unwrap_or(0);
        let sealed = crate::archive::Sealed {
            sidecar: crate::archive::sidecar_path(&req.archive),
            path: req.archive.clone(),
            sha256: req.sha256.clone(),
            size,
            files: 0,
        };
        let o = crate::restart::run(&r, &req.target, Some(&sealed), &crate::cancel::Cancel::new());
        let detail = match (&o.error, o.performed) {
            (None, true) => format!(
                "restarted: pid {} -> {} via {} in {} ms{}",
                o.old_pid,
                o.new_pid.unwrap_or(0),
                o.method,
                o.duration_ms,
                if o.escalated { " (SIGKILL escalation)" } else { "" }
            ),
            (Some(e), _) => e.clone(),
            (None, false) => format!("not performed: VM state {}", o.vm_state),
        };
        RestartReport {
            attempted: o.old_stopped || o.performed || o.actions.iter().any(|a| a.action == "stop"),
            ok: o.performed,
            detail,
        }
    }
}

/// Whether a restart follows this capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Neither the policy nor the request asked for one.
    NotWanted,
    /// Wanted, but the evidence does not allow it; the reason is reported.
    Refused(String),
    Go,
}

/// The gate: a restart only when asked for (policy `capture-then-restart` or an API
/// request), only after a sealed archive, never on `healthy`, only on a verdict the
/// policy names, and only on evidence: a wedge proven inside QEMU (a suspected one only
/// with the policy's `restart_suspected`; a stall below QEMU or in a network backend
/// never, since a new QEMU on stuck storage wedges again or does not start).
pub fn decide(policy: &Policy, requested: bool, sealed: bool, d: &Diagnosis) -> Decision {
    let verdict = d.verdict;
    if policy.action != Action::CaptureThenRestart && !requested {
        return Decision::NotWanted;
    }
    if !sealed {
        return Decision::Refused("the archive was not sealed: no restart without evidence".into());
    }
    if verdict == Verdict::Healthy {
        return Decision::Refused("verdict healthy: a healthy VM is never restarted".into());
    }
    if !policy.restart_on.contains(&verdict) {
        let names: Vec<&str> = policy.restart_on.iter().map(|v| v.as_str()).collect();
        return Decision::Refused(format!(
            "verdict {verdict} is not one the policy restarts on ({})",
            names.join(", ")
        ));
    }
    if let Err(why) = d.automatic_restart(policy.restart_suspected) {
        return Decision::Refused(why);
    }
    Decision::Go
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restarting() -> Policy {
        Policy { action: Action::CaptureThenRestart, ..Policy::default() }
    }

    #[test]
    fn gate() {
        use crate::diagnose::{Layer, Strength};
        use Verdict::*;
        let d = |v, st, l| Diagnosis::bare(v, st, l);
        let proven = d(BlockPathFrozen, Some(Strength::Proven), Some(Layer::InsideQemu));
        assert_eq!(decide(&Policy::default(), false, true, &proven), Decision::NotWanted);
        assert_eq!(decide(&restarting(), false, true, &proven), Decision::Go);
        assert_eq!(decide(&restarting(), false, true, &d(MainLoopWedged, Some(Strength::Proven), None)), Decision::Go);
        assert!(
            matches!(decide(&restarting(), false, true, &d(Healthy, None, None)), Decision::Refused(r) if r.contains("healthy"))
        );
        assert!(
            matches!(decide(&restarting(), true, true, &d(Inconclusive, None, None)), Decision::Refused(r) if r.contains("inconclusive"))
        );
        assert!(matches!(decide(&restarting(), false, false, &proven), Decision::Refused(r) if r.contains("sealed")));
        // Suspected: only with the policy's opt-in. Below QEMU or network: never.
        let suspected = d(BlockPathFrozen, Some(Strength::Suspected), None);
        assert!(
            matches!(decide(&restarting(), false, true, &suspected), Decision::Refused(r) if r.contains("suspected"))
        );
        let opt_in = Policy { restart_suspected: true, ..restarting() };
        assert_eq!(decide(&opt_in, false, true, &suspected), Decision::Go);
        for l in [Layer::BelowQemu, Layer::NetworkBackend] {
            let below = d(BlockPathFrozen, Some(Strength::Proven), Some(l));
            assert!(matches!(decide(&opt_in, true, true, &below), Decision::Refused(r) if r.contains("recover first")));
        }
    }
}
