//! A host-wide sweep: the verdict of every VM in about one window, not one per VM.
//!
//! Every VM runs the `diagnose` runbook at once, but paced (see `sampling`): at most
//! `parallel` of them touch QMP or /proc at any moment (one slot per step and per later
//! sample), QMP in short sessions (a connection per command, so pvestatd never finds a
//! socket held for longer than one short command), and every VM's second sample waits
//! until the first sample of every VM is in. So the sweep takes the first samples, waits
//! one window, takes the second ones and decides. A VM whose QMP is held or slow keeps
//! the others waiting at most until the gate's latest opening (a third of the runbook's
//! deadline); each of its steps has its own deadline as always.
//!
//! Used by `diagnose --all`, `--all-wedged` (which then captures what it found) and the
//! watch of `serve` (every round).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::sampling::{Gate, Pacing, Slots, Window};
use super::{capture_paced, prepare, Request, Silent};
use crate::archive::manifest::Trigger;
use crate::archive::{Evidence, Staging};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::diagnose::{self, Diagnosis, Rules};
use crate::error::Error;
use crate::step::StepRecord;
use crate::target::{Target, VmId};

/// VMs touched at once by default. A sweep's slot is one QMP command or one /proc read,
/// cheap next to a capture: sized for a hypervisor's dozens of VMs, not for a laptop.
pub const DEFAULT_PARALLEL: usize = 16;

/// Proving a process reads a few /proc files; past this the VM is reported, not waited on.
const PROVE_BUDGET: Duration = Duration::from_secs(15);

/// VMIDs with a `<VMID>.pid` file in `run_dir`, ascending.
pub fn running_vms(run_dir: &std::path::Path) -> Vec<VmId> {
    let mut out: Vec<VmId> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pid")?.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// When one sample of the `inflight` step started, as recorded in the sample.
#[derive(Debug, Clone, Serialize)]
pub struct SampleTime {
    pub n: u32,
    pub at: DateTime<Utc>,
}

/// One VM's verdict from a sweep (or from `diagnose VMID`).
#[derive(Debug, Clone)]
pub struct Checked {
    pub vmid: VmId,
    pub pid: i32,
    pub diagnosis: Diagnosis,
    pub steps: Vec<StepRecord>,
    /// The in-flight samples, in order: the window the verdict rests on.
    pub samples: Vec<SampleTime>,
}

/// Who asks, for the (unsealed) records.
#[derive(Debug, Clone)]
pub struct Options {
    pub parallel: usize,
    /// Proofs stuck in the kernel: a VM whose last proof has not returned is reported at
    /// once, not given another thread (a service sweeps every round).
    pub stuck: std::sync::Arc<crate::stuck::Stuck>,
    pub trigger: Trigger,
    pub command_line: Vec<String>,
}

/// Diagnoses `vmids` in one sweep; results in the order of `vmids`. Errors only when the
/// `diagnose` runbook cannot be loaded; a VM that cannot be proven or diagnosed is an
/// `Err` in its own row.
pub async fn sweep(
    vmids: &[VmId],
    settings: &Settings,
    opts: &Options,
    cancel: &Cancel,
) -> Result<Vec<(VmId, Result<Checked, Error>)>, Error> {
    let runbook = crate::runbook::load("diagnose", &settings.runbook_dir)?;
    let latest = Instant::now() + runbook.deadline / 3;
    let (gate, arrivals) = Gate::new(vmids.len(), latest);
    let slots = Slots::new(opts.parallel);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (&vmid, arrival)) in vmids.iter().zip(arrivals).enumerate() {
        let req = Request {
            vmid,
            runbook: runbook.clone(),
            stacks: None,
            no_qmp: false,
            trigger: opts.trigger.clone(),
            command_line: opts.command_line.clone(),
            restart_gate: Default::default(),
        };
        let (settings, cancel, slots, gate) = (settings.clone(), cancel.clone(), slots.clone(), gate.clone());
        let stuck = opts.stuck.clone();
        tasks.spawn(async move {
            let target = {
                let _turn = slots.take().await;
                prove(&req, &settings, &stuck).await
            };
            let result = match target {
                Ok(target) => {
                    let pacing =
                        Pacing { window: Window::gated(gate), slots, arrival: Some(arrival), short_sessions: true };
                    diagnose_one(&req, &settings, &target, &cancel, pacing).await
                }
                Err(e) => {
                    drop(arrival);
                    Err(e)
                }
            };
            (i, vmid, result)
        });
    }
    let mut rows: Vec<(usize, VmId, Result<Checked, Error>)> = Vec::with_capacity(vmids.len());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(row) => rows.push(row),
            Err(e) => tracing::warn!("a sweep task failed: {e}"),
        }
    }
    // A task that panicked still has a row: nothing is silently dropped.
    for (i, &vmid) in vmids.iter().enumerate() {
        if !rows.iter().any(|r| r.0 == i) {
            rows.push((i, vmid, Err(anyhow::anyhow!("diagnosing VM {vmid} failed (task panicked)").into())));
        }
    }
    rows.sort_by_key(|r| r.0);
    Ok(rows.into_iter().map(|(_, v, r)| (v, r)).collect())
}

/// Proves `req.vmid`'s process off the async threads, under [`PROVE_BUDGET`], admitted
/// through `stuck` (no second thread for a VM whose earlier proof is still stuck).
async fn prove(
    req: &Request,
    settings: &Settings,
    stuck: &std::sync::Arc<crate::stuck::Stuck>,
) -> Result<Target, Error> {
    let (r, s) = (req.clone(), settings.clone());
    let key = format!("vm {}", req.vmid);
    match crate::stuck::bounded(stuck, &key, PROVE_BUDGET, move || prepare(&r, &s)).await {
        Ok(result) => result,
        Err(crate::stuck::Bounded::Timeout(_)) => Err(anyhow::anyhow!(
            "proving VM {}'s process did not finish within {} s (/proc blocked?)",
            req.vmid,
            PROVE_BUDGET.as_secs()
        )
        .into()),
        Err(e) => Err(anyhow::anyhow!("proving VM {} failed: {e}", req.vmid).into()),
    }
}

/// The `diagnose` runbook for one proven VM into a private temp dir, the verdict, and
/// nothing kept.
pub(super) async fn diagnose_one(
    req: &Request,
    settings: &Settings,
    target: &Target,
    cancel: &Cancel,
    pacing: Pacing,
) -> Result<Checked, Error> {
    let tmp = std::env::temp_dir().join(format!("wedge-autopsy-diagnose-{}-{}", std::process::id(), req.vmid));
    let staging = Staging::create(&tmp, &format!("diagnose-{}", req.vmid))?;
    let steps = capture_paced(req, settings, target, &staging, &Silent, cancel, pacing).await;
    let diagnosis = diagnose::diagnose(&staging, &steps, &Rules { min_idle_secs: settings.min_idle.as_secs_f64() });
    let samples = sample_times(&staging);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(Checked { vmid: req.vmid, pid: target.pid, diagnosis, steps, samples })
}

/// When each in-flight sample was taken, from the samples themselves.
fn sample_times(ev: &dyn Evidence) -> Vec<SampleTime> {
    (1..)
        .map_while(|n| ev.read_json(&crate::inflight::sample_path(n)))
        .filter_map(|v| Some(SampleTime { n: v["n"].as_u64()? as u32, at: v["at"].as_str()?.parse().ok()? }))
        .collect()
}

/// Running VMs on this node that a sweep finds wedged (`block-path-frozen`, proven or
/// suspected, or `main-loop-wedged`), with the diagnosis that decides whether a restart
/// may follow. VMs that cannot be proven are skipped.
pub async fn wedged(settings: &Settings, parallel: usize, cancel: &Cancel) -> Result<Vec<(VmId, Diagnosis)>, Error> {
    let opts = Options {
        parallel,
        stuck: crate::stuck::process().clone(),
        trigger: Trigger::manual(Some("--all-wedged sweep".into())),
        command_line: std::env::args().collect(),
    };
    let rows = sweep(&running_vms(&settings.run_dir), settings, &opts, cancel).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(vmid, r)| r.ok().filter(|c| c.diagnosis.is_wedged()).map(|c| (vmid, c.diagnosis)))
        .collect())
}
