//! The autopsy: resolve and prove the target, run the runbook step by step under
//! deadlines, and seal whatever was captured, whatever happened.
//!
//! Steps run in the runbook's order. Each has its own deadline and the runbook a global
//! one; a step that overruns is abandoned (its output sink closed) and the next starts.
//! Blocking collectors run on their own threads; QMP steps share one session. A sampled
//! QMP step takes its later samples in the background while other steps run. SIGINT,
//! SIGTERM and SIGHUP stop the run, mark what did not finish as interrupted, and seal.

mod inflight_step;
mod outcome;
mod parallel;
mod progress;
mod qmp_lane;
mod redaction;
mod sampling;
mod steps;
pub mod sweep;

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

pub use outcome::{run_with_restart, Outcome};
pub use parallel::run_bounded;
pub use progress::{Prefixed, Progress, Silent};
pub use sampling::Pacing;

use crate::archive::manifest::{self, Manifest, RunbookRef, Trigger};
use crate::archive::{self, Sealed, Staging};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::diagnose::{self, Diagnosis, Rules};
use crate::error::{Error, Exit};
use crate::runbook::{Runbook, StepKind, Vars};
use crate::step::{StepRecord, StepStatus};
use crate::summary::{self, Summary};
use crate::target::{self, Layout, Target, VmId};

/// What the caller asks for, beyond the settings.
#[derive(Debug, Clone)]
pub struct Request {
    pub vmid: VmId,
    pub runbook: Runbook,
    /// `--stacks`: replaces every stacks step's methods; empty = `none` (step skipped).
    pub stacks: Option<Vec<String>>,
    /// `--no-qmp`: capture without QMP (socket missing or deliberately avoided).
    pub no_qmp: bool,
    pub trigger: Trigger,
    pub command_line: Vec<String>,
    /// Who asked for the restart, which decides how much evidence it needs.
    pub restart_gate: RestartGate,
}

/// How much evidence a requested restart needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartGate {
    /// The operator named the VM: their decision, except that a stall below QEMU or in a
    /// network backend needs `--force` (a new QEMU on stuck storage does not help).
    #[default]
    Operator,
    /// Nobody named the VM (`--all-wedged`, a serve policy): only a proven wedge inside
    /// QEMU, or a suspected one when `allow_suspected`.
    Automatic { allow_suspected: bool },
}

/// The result of a run that got as far as an archive attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub vmid: VmId,
    pub diagnosis: Diagnosis,
    /// The summary as sealed in the archive (without the archive's own hash).
    pub summary: Summary,
    pub pid: i32,
    pub target: Target,
    pub steps: Vec<StepRecord>,
    pub sealed: Option<Sealed>,
    pub seal_error: Option<String>,
    pub interrupted: bool,
    pub started_at: chrono::DateTime<Utc>,
    pub duration_ms: u64,
    /// The secret values the seal pass learned: whatever of this report is shown outside
    /// the archive (the printed summary, `--json`) goes through it. Never serialized.
    #[serde(skip)]
    pub secrets: crate::redact::Redactor,
}

impl Report {
    /// The summary as shown after the run (printed, or POSTed by `serve`): the sealed copy
    /// plus the archive's own hash, the seal's error and the restart outcome, which the
    /// copy inside the archive cannot contain.
    pub fn final_summary(&self, restart: Option<serde_json::Value>) -> Summary {
        let mut s = self.summary.clone();
        s.archive = self.sealed.as_ref().map(crate::summary::ArchiveFacts::from);
        s.seal_error = self.seal_error.clone();
        s.restart = restart;
        s
    }

    /// The exit code this run deserves (before any restart).
    pub fn exit(&self) -> Exit {
        if self.sealed.is_none() {
            Exit::SealFailed
        } else if self.steps.iter().any(|s| s.status.is_problem() && !s.optional) {
            Exit::Partial
        } else {
            Exit::Ok
        }
    }
}

/// Resolves the target for `req`, checking everything a run needs before touching it.
pub fn prepare(req: &Request, settings: &Settings) -> Result<Target, Error> {
    let layout =
        Layout { run_dir: settings.run_dir.clone(), pve_dir: settings.pve_dir.clone(), node: settings.node.clone() };
    let target = target::resolve_with(req.vmid, &layout, &req.runbook.target)?;
    // Through virsh the socket is libvirtd's business; otherwise we need it.
    if !target.qmp_present && !req.no_qmp && target.monitor == target::Monitor::Socket {
        return Err(target::TargetError::SocketMissing {
            vmid: req.vmid,
            pid: target.pid,
            path: target.qmp_socket.display().to_string(),
        }
        .into());
    }
    Ok(target)
}

/// One step of the plan `--dry-run` shows.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStep {
    pub id: String,
    pub timeout_ms: u64,
    pub optional: bool,
    pub what: String,
}

/// The resolved steps, for `--dry-run`: what each would do, nothing touched.
pub fn plan_steps(req: &Request, settings: &Settings, target: Option<&Target>) -> Vec<PlanStep> {
    let vars = vars(req.vmid, target, settings);
    let mut out = Vec::new();
    for s in &req.runbook.steps {
        let what = match &s.kind {
            StepKind::Qmp { command, arguments, samples, interval, .. } => {
                let iv = interval.unwrap_or(settings.sample_interval);
                let args = arguments.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
                if *samples > 1 {
                    format!("QMP {command}{args}, {samples} samples {}ms apart", iv.as_millis())
                } else {
                    format!("QMP {command}{args}")
                }
            }
            StepKind::Stacks { methods, .. } => {
                let m = req.stacks.as_ref().unwrap_or(methods);
                if m.is_empty() {
                    "stacks: none (skipped)".into()
                } else {
                    format!("stacks: first that works of {}", m.join(", "))
                }
            }
            StepKind::File { path, output, .. } => format!("copy {} -> {}", path.render(&vars), output.render(&vars)),
            StepKind::Command { argv, output, .. } => {
                format!(
                    "run {:?} -> {}",
                    argv.iter().map(|a| a.render(&vars)).collect::<Vec<_>>(),
                    output.render(&vars)
                )
            }
            StepKind::Core { output, min_free } => {
                format!("core dump via gdb gcore -> {} (needs {} MiB free)", output.render(&vars), min_free >> 20)
            }
            StepKind::Minicore { output, min_free } => format!(
                "QEMU core without guest RAM -> {} (threads frozen ~ms; refused below {} MiB free)",
                output.render(&vars),
                min_free >> 20
            ),
            StepKind::PveTasks { output, log_cap } => format!(
                "the VM's tasks in {}/pve/tasks/active + their logs (last {} KiB each) -> {}",
                vars.log_dir,
                log_cap >> 10,
                output.render(&vars)
            ),
            StepKind::Proc => "process and per-thread /proc files".into(),
            StepKind::Host => "host /proc files and kernel log".into(),
            StepKind::HostInfo => {
                "versions, each disk's storage backend and backing device, host I/O over the window".into()
            }
            StepKind::QomThrottle { .. } => "QMP qom-list /objects + qom-get limits of each throttle group".into(),
            StepKind::Inflight { samples, interval } => format!(
                "in flight: blockstats, virtio queues, I/O threads, rings, sockets, guest agent; {samples} samples {}ms apart",
                interval.unwrap_or(settings.sample_interval).as_millis()
            ),
        };
        out.push(PlanStep { id: s.id.clone(), timeout_ms: s.timeout.as_millis() as u64, optional: s.optional, what });
    }
    out
}

/// Where the archive of `vmid` will be written, with its time and host still open.
pub fn archive_pattern(vmid: VmId, settings: &Settings) -> String {
    format!("{}/autopsy-{vmid}-<UTC>-<host>.tar.zst", settings.out.display())
}

fn vars(vmid: VmId, target: Option<&Target>, s: &Settings) -> Vars {
    Vars {
        vmid: vmid.to_string(),
        pid: target.map(|t| t.pid.to_string()).unwrap_or_else(|| "<pid>".into()),
        run_dir: s.run_dir.display().to_string(),
        pve_dir: s.pve_dir.display().to_string(),
        qmp: target
            .map(|t| t.qmp_socket.display().to_string())
            .unwrap_or_else(|| s.run_dir.join(format!("{vmid}.qmp")).display().to_string()),
        domain: target.and_then(|t| t.domain.clone()).unwrap_or_default(),
        log_dir: s.log_dir.display().to_string(),
    }
}

/// Installs handlers so SIGINT/SIGTERM/SIGHUP set `cancel` instead of killing us.
pub fn cancel_on_signals(cancel: &Cancel) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
        let mut s = signal(kind)?;
        let c = cancel.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                c.cancel();
            }
        });
    }
    Ok(())
}

/// Runs the autopsy of a proven `target` and seals the archive.
///
/// Errors only when nothing could be staged (unwritable `--out`); every later failure is
/// a step status or `seal_error` in the report.
pub async fn run(
    req: &Request,
    settings: &Settings,
    target: Target,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Report, Error> {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let host = crate::config::local_node_name();
    let name = archive::archive_name(req.vmid.get(), started_at, &host);
    let stale = archive::cleanup_stale(&settings.out);
    let staging = Staging::create(&settings.out, &name)?;
    let mut records = capture_paced(req, settings, &target, &staging, progress, cancel, Pacing::default()).await;
    mark_vanished(&staging, &mut records);
    let interrupted = cancel.is_cancelled();
    let mut manifest = Manifest {
        schema: manifest::SCHEMA,
        tool: Default::default(),
        host,
        node: settings.node.clone(),
        vmid: Some(req.vmid.get()),
        pid: Some(target.pid),
        command_line: req.command_line.clone(),
        trigger: redaction::trigger(&req.trigger),
        started_at,
        ended_at: Utc::now(),
        utc_offset: manifest::local_offset(),
        runbook: RunbookRef { name: req.runbook.name.clone(), source: req.runbook.source.clone() },
        target: serde_json::to_value(&target).ok(),
        interrupted,
        redaction: None,
        steps: records,
        files: Vec::new(),
    };
    // Nothing secret leaves the host: one pass over every staged file and the manifest,
    // before the diagnosis and the summary read them, so no secret reaches a rendering
    // that escapes or cuts text (where it could no longer be found).
    let (learned, learn_note) = redaction::learn_target_bounded(&target).await;
    let (redaction, secrets) = redaction::seal_pass(&staging.dir, learned, &mut manifest);
    manifest.redaction = Some(redaction);
    if let Some(note) = learn_note {
        if let Some(first) = manifest.steps.first_mut() {
            first.notes.push(note);
        }
    }
    if !stale.is_empty() {
        if let Some(first) = manifest.steps.first_mut() {
            first.notes.push(format!("removed leftovers of an earlier run that died: {}", stale.join(", ")));
        }
    }
    let diagnosis =
        diagnose::diagnose(&staging, &manifest.steps, &Rules { min_idle_secs: settings.min_idle.as_secs_f64() });
    let summary = Summary {
        vmid: Some(req.vmid.get()),
        name: target.name(),
        host: manifest.host.clone(),
        node: manifest.node.clone(),
        pid: Some(target.pid),
        proof: Some(match target.proof {
            crate::target::Proof::Pidfile => format!("pidfile {}", target.pidfile.display()),
            crate::target::Proof::QmpSocket => format!("QMP socket {}", target.qmp_socket.display()),
        }),
        trigger: manifest.trigger.clone(),
        started_at,
        ended_at: manifest.ended_at,
        utc_offset: manifest.utc_offset.clone(),
        diagnosis: diagnosis.clone(),
        min_idle_secs: settings.min_idle.as_secs_f64(),
        steps: manifest.steps.clone(),
        host_info: crate::hostinfo::load(&staging),
        archive: None,
        seal_error: None,
        restart: None,
    };
    {
        // Written after the pass, from evidence it already scrubbed; scrubbed once more
        // (the render adds nothing secret, but nothing is written unscrubbed).
        let sink = staging.sink();
        let clean = |bytes: Vec<u8>| secrets.scrub(&bytes).0;
        let _ = sink.write("summary.json", &clean(serde_json::to_vec_pretty(&summary).unwrap_or_default()));
        // The signature set the matches were computed with, so `inspect` elsewhere can
        // say whether it recomputes against the same one.
        let set = crate::signatures::record(crate::signatures::active());
        let _ = sink.write(crate::signatures::RECORD_PATH, &serde_json::to_vec_pretty(&set).unwrap_or_default());
        let _ = sink.write("summary.md", &clean(summary::markdown(&summary).into_bytes()));
        sink.close();
    }
    progress.started("seal");
    let seal_start = Instant::now();
    let result = tokio::task::spawn_blocking({
        let manifest = manifest.clone();
        let staging = staging.clone();
        move || staging.seal(manifest)
    })
    .await;
    let (sealed, seal_error) = match result {
        Ok(Ok(s)) => (Some(s), None),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(e) => (None, Some(format!("seal task failed: {e}"))),
    };
    // Unsealed evidence is not thrown away: say where it is (the next run removes it).
    let seal_error = seal_error.map(|e| {
        if staging.dir.exists() {
            format!("{e}; the unsealed files are kept in {} until the next run", staging.dir.display())
        } else {
            e
        }
    });
    progress.sealed(sealed.as_ref(), seal_error.as_deref(), seal_start.elapsed());
    Ok(Report {
        vmid: req.vmid,
        diagnosis,
        summary,
        pid: target.pid,
        target,
        steps: manifest.steps,
        sealed,
        seal_error,
        interrupted,
        started_at,
        duration_ms: t0.elapsed().as_millis() as u64,
        secrets,
    })
}

/// A step whose files disappeared from the staging dir before sealing (someone deleted
/// or cleaned `--out` mid-run) must not claim success: the archive would lack them.
fn mark_vanished(staging: &Staging, records: &mut [crate::step::StepRecord]) {
    for rec in records.iter_mut() {
        let gone: Vec<String> = rec.files.iter().filter(|f| !staging.dir.join(f).exists()).cloned().collect();
        if gone.is_empty() {
            continue;
        }
        rec.files.retain(|f| !gone.contains(f));
        let what = format!(
            "{} file(s) it wrote vanished from the staging dir before sealing (was --out deleted?): {}",
            gone.len(),
            gone.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
        if rec.status.is_problem() {
            rec.notes.push(what);
        } else {
            rec.status = StepStatus::Failed;
            rec.error = Some(what);
        }
    }
}

/// Runs every step of `req.runbook` against `target`, writing into `staging`. Never
/// fails: each step's outcome is in the returned records, in runbook order. `pacing`:
/// [`Pacing::default`] for one VM alone; a sweep's shared one makes later samples wait
/// for the sweep's window, every step and sample take one of its slots, and QMP run in
/// short sessions if asked.
pub async fn capture_paced(
    req: &Request,
    settings: &Settings,
    target: &Target,
    staging: &Staging,
    progress: &dyn Progress,
    cancel: &Cancel,
    pacing: Pacing,
) -> Vec<StepRecord> {
    let t0 = Instant::now();
    let vars = vars(req.vmid, Some(target), settings);
    let deadline = t0 + req.runbook.deadline;

    let mut ctx = sampling::Ctx {
        target,
        settings,
        vars: &vars,
        staging,
        cancel,
        stacks_override: req.stacks.clone(),
        qmp: qmp_lane::Lane::new(target, req.no_qmp, pacing.short_sessions),
        window: pacing.window,
        slots: pacing.slots,
        arrival: pacing.arrival,
    };
    // A sampled step's record is only final when its last sample is in.
    enum Slot {
        Done(StepRecord),
        Sampling(tokio::task::JoinHandle<StepRecord>, StepRecord),
    }
    let mut slots: Vec<Slot> = Vec::new();
    for step in &req.runbook.steps {
        let is_qmp =
            matches!(step.kind, StepKind::Qmp { .. } | StepKind::QomThrottle { .. } | StepKind::Inflight { .. });
        if is_qmp && !ctx.qmp.attempted() && !cancel.is_cancelled() {
            progress.started("qmp-connect");
            let turn = ctx.slots.take().await;
            let rec = ctx.qmp.connect(deadline, cancel).await;
            drop(turn);
            progress.finished(&rec);
            slots.push(Slot::Done(rec));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let slot = if cancel.is_cancelled() {
            Slot::Done(steps::not_run(step, StepStatus::Interrupted, "not started: the run was interrupted"))
        } else if left.is_zero() {
            Slot::Done(steps::not_run(step, StepStatus::Timeout, "not started: the runbook's deadline was reached"))
        } else {
            progress.started(&step.id);
            let turn = ctx.slots.take().await;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let ran = steps::run(&mut ctx, step, step.timeout.min(left)).await;
            drop(turn);
            match ran {
                sampling::Ran::Done(rec) => Slot::Done(rec),
                sampling::Ran::Sampling(handle) => {
                    let fallback = steps::not_run(step, StepStatus::Failed, "sampling task failed");
                    Slot::Sampling(handle, fallback)
                }
            }
        };
        if let Slot::Done(rec) = &slot {
            progress.finished(rec);
        }
        slots.push(slot);
    }
    // No sampled step (or none got to its first sample): nobody waits for this VM.
    drop(ctx.arrival.take());
    let mut records = Vec::with_capacity(slots.len());
    for slot in slots {
        records.push(match slot {
            Slot::Done(rec) => rec,
            Slot::Sampling(handle, fallback) => {
                let rec = handle.await.unwrap_or(fallback);
                progress.finished(&rec);
                rec
            }
        });
    }
    ctx.qmp.finish(staging).await;
    records
}

/// `diagnose <VMID>`: the diagnosis runbook into a private temp dir, the verdict, and
/// nothing kept. Same executor, same proofs, same read-only QMP.
pub async fn diagnose_live(
    req: &Request,
    settings: &Settings,
    target: &Target,
    cancel: &Cancel,
) -> Result<(Diagnosis, Vec<StepRecord>), Error> {
    let c = sweep::diagnose_one(req, settings, target, cancel, Pacing::default()).await?;
    Ok((c.diagnosis, c.steps))
}

/// Waits until `cancel` is set (polling; the flag is set from a signal task).
pub(crate) async fn cancelled(cancel: &Cancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
