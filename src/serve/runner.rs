//! The job runner: one task per started job. It waits for a concurrency slot, proves the
//! target, runs the autopsy, seals, gates and calls the restart, then sends the results
//! (copy, hook, POSTs). Every outcome lands in the job record.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::config::ServeConfig;
use super::jobs::{Job, JobId, State, Store};
use super::log;
use super::notify::{self, Completion};
use super::restart::{self, Decision, RestartReport, RestartRequest, Restarter};
use super::watch_state::WatchState;
use crate::archive::manifest::Trigger;
use crate::archive::Sealed;
use crate::autopsy::{self, Report, Request, Silent};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::diagnose::Diagnosis;
use crate::error::Error;
use crate::redact::Redactor;
use crate::runbook;
use crate::summary;
use crate::target::{Target, TargetError};

/// Proving the target reads /proc/PID/cmdline, which can block on a wedged process's
/// memory lock; the target module bounds that read itself, this bounds the whole call.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(15);

/// The running service: configuration, job store and slots, shared by the HTTP
/// handlers, the runner and the watch.
pub struct Service {
    pub cfg: ServeConfig,
    pub settings: Settings,
    pub store: Store,
    pub slots: Arc<Semaphore>,
    pub restarter: Arc<dyn Restarter>,
    /// Set when the shutdown grace is over: running captures stop and seal what they have.
    pub hard_stop: Cancel,
    /// Job tasks not yet finished (capture, restart and notifications).
    pub in_flight: AtomicUsize,
    pub watch: Mutex<WatchState>,
    /// Open connections and what the connection cap did (for `/metrics`).
    pub conns: Arc<super::listen::ConnStats>,
    /// Proofs and cluster-list reads stuck past their deadline (one thread each at most).
    pub stuck: Arc<crate::stuck::Stuck>,
}

impl Service {
    /// Starts job `id` in the background.
    pub fn spawn(self: &Arc<Self>, id: JobId) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let ctx = self.clone();
        tokio::spawn(async move {
            run_job(&ctx, id).await;
            ctx.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn run_job(ctx: &Arc<Service>, id: JobId) {
    let Ok(_permit) = ctx.slots.clone().acquire_owned().await else { return };
    if !ctx.store.start(id) {
        return;
    }
    let Some(job) = ctx.store.get(id) else { return };
    wait_for_watch(ctx, job.vmid).await;
    log::info!("job {id} VM {}: started ({})", job.vmid, describe(&job));
    let t0 = Instant::now();
    // The lock the CLI takes too: a service autopsy and a hand-run one of the same VM
    // never overlap, and it is held from the capture to the end of any restart.
    let lock = {
        let out = ctx.settings.out.clone();
        let vmid = job.vmid;
        tokio::task::spawn_blocking(move || crate::lock::VmLock::acquire(&out, vmid)).await
    };
    let outcome = match lock {
        Ok(Ok(lock)) => capture(ctx, &job).await.map(|r| (r, lock)),
        Ok(Err(e)) => Err(Error::from(e)),
        Err(e) => Err(Error::Other(anyhow::anyhow!("lock task failed: {e}"))),
    };
    let took = t0.elapsed();
    let doc = match outcome {
        Ok(((report, target), _lock)) => {
            // Learned by the run's seal pass, before a restart replaces the process. The
            // job record and what the restart logs show the sender's text scrubbed from now.
            let secrets = report.secrets.clone();
            ctx.store.update(id, |j| j.origin.scrub(&secrets));
            let job = ctx.store.get(id).unwrap_or(job);
            finish_sealed(ctx, &job, report, target, took).await.map(|d| (d, secrets))
        }
        Err(e) => {
            let msg = e.to_string();
            log::warn_line!("job {id} VM {}: failed: {msg}", job.vmid);
            ctx.store.update(id, |j| j.error = Some(msg.clone()));
            ctx.store.finish(id, State::Failed, took);
            completion(ctx, id).map(|d| (d, Redactor::default()))
        }
    };
    let Some((mut doc, mut secrets)) = doc else { return };
    service_secrets(&ctx.cfg, &mut secrets);
    doc.redact(&mut secrets);
    // Also with the service's own secrets (a token quoted in an alert's annotation).
    ctx.store.update(id, |j| j.origin.scrub(&secrets));
    // Also marks the job delivered when there is nowhere to deliver to.
    deliver(ctx, id, &mut doc).await;
}

/// The service's own secrets: the bearer token, the HMAC secret, passwords in notify URLs.
fn service_secrets(cfg: &ServeConfig, r: &mut Redactor) {
    for s in [&cfg.token, &cfg.hmac_secret].into_iter().flatten() {
        r.learn([String::from_utf8_lossy(s).into_owned()]);
    }
    r.learn(crate::redact::argv(&cfg.notify).1);
}

/// Waits while the watch's sweep includes `vmid` (QMP serves one client at a time, and a
/// capture that found the socket held would record the VM as unreachable). The job is
/// already active, so the watch starts no new check of it; a check ends within its
/// runbook's deadline.
async fn wait_for_watch(ctx: &Service, vmid: crate::target::VmId) {
    let end = Instant::now() + Duration::from_secs(60);
    while ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).checking.contains(&vmid) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn describe(job: &Job) -> String {
    let mut s = job.origin.kind.clone();
    if let Some(r) = &job.origin.reason {
        s.push_str(": ");
        s.push_str(r);
    }
    s
}

/// Proves the target and runs the autopsy.
async fn capture(ctx: &Arc<Service>, job: &Job) -> Result<(Report, Target), Error> {
    let name = ctx.cfg.runbook.clone().or(ctx.settings.runbook.clone()).unwrap_or_else(|| runbook::DEFAULT.into());
    let rb = runbook::load(&name, &ctx.settings.runbook_dir)?;
    let mut req = Request {
        vmid: job.vmid,
        runbook: rb,
        stacks: None,
        no_qmp: false,
        trigger: Trigger { kind: job.origin.kind.clone(), user: None, tty: None, reason: job.origin.reason.clone() },
        command_line: vec!["wedge-autopsy".into(), "serve".into(), format!("job {}", job.id)],
        // The serve gate (`restart::decide`) applies the policy's evidence rules itself.
        restart_gate: Default::default(),
    };
    let target = match prepare(ctx, &req).await {
        // No QMP socket although the process is proven: capture the rest.
        Err(Error::Target(TargetError::SocketMissing { .. })) => {
            req.no_qmp = true;
            prepare(ctx, &req).await?
        }
        other => other?,
    };
    ctx.store.update(job.id, |j| j.pid = Some(target.pid));
    let report = autopsy::run(&req, &ctx.settings, target.clone(), &Silent, &ctx.hard_stop).await?;
    Ok((report, target))
}

async fn prepare(ctx: &Arc<Service>, req: &Request) -> Result<Target, Error> {
    let (r, s) = (req.clone(), ctx.settings.clone());
    let key = format!("vm {}", req.vmid);
    match crate::stuck::bounded(&ctx.stuck, &key, PREPARE_TIMEOUT, move || autopsy::prepare(&r, &s)).await {
        Ok(result) => result,
        Err(crate::stuck::Bounded::Failed(e)) => Err(Error::Other(anyhow::anyhow!("prepare task failed: {e}"))),
        Err(e) => Err(Error::Other(anyhow::anyhow!(
            "proving VM {}'s process: {e}: its pidfile or /proc files are stuck; capture by hand with `wedge-autopsy {}` once they answer",
            req.vmid,
            req.vmid
        ))),
    }
}

/// Records a finished capture, runs the gated restart, and builds the completion.
async fn finish_sealed(
    ctx: &Arc<Service>,
    job: &Job,
    report: Report,
    target: Target,
    took: Duration,
) -> Option<Completion> {
    let verdict = report.diagnosis.verdict;
    let restart = restart_step(ctx.restarter.clone(), job, &report.diagnosis, report.sealed.as_ref(), target).await;
    match &restart {
        None => {}
        Some(r) if r.ok => ctx.store.count_restart("ok"),
        Some(r) if r.attempted => ctx.store.count_restart("failed"),
        Some(_) => ctx.store.count_restart("not-attempted"),
    }
    let summary = report.final_summary(restart.as_ref().and_then(|r| serde_json::to_value(r).ok()));
    let markdown = summary::markdown(&summary);
    let state = if report.sealed.is_some() { State::Sealed } else { State::Failed };
    ctx.store.update(job.id, |j| {
        j.verdict = Some(verdict.to_string());
        j.archive = report.sealed.as_ref().map(|s| s.path.display().to_string());
        j.size = report.sealed.as_ref().map(|s| s.size);
        j.sha256 = report.sealed.as_ref().map(|s| s.sha256.clone());
        j.restart = restart.clone();
        j.error = report.seal_error.clone();
    });
    ctx.store.finish(job.id, state, took);
    log::info!(
        "job {} VM {}: {} {verdict}{}",
        job.id,
        job.vmid,
        state.as_str(),
        report.sealed.as_ref().map(|s| format!(" {} sha256 {}", s.path.display(), s.sha256)).unwrap_or_default()
    );
    let mut doc = completion(ctx, job.id)?;
    doc.facts = report.diagnosis.facts.clone();
    doc.summary_markdown = Some(markdown);
    Some(doc)
}

/// Applies the restart gate and, when it says go, calls the restarter on a blocking
/// thread. `None`: no restart was wanted.
pub async fn restart_step(
    restarter: Arc<dyn Restarter>,
    job: &Job,
    diagnosis: &Diagnosis,
    sealed: Option<&Sealed>,
    target: Target,
) -> Option<RestartReport> {
    let verdict = diagnosis.verdict;
    match restart::decide(&job.policy, job.origin.restart_requested, sealed.is_some(), diagnosis) {
        Decision::NotWanted => None,
        Decision::Refused(why) => Some(RestartReport { attempted: false, ok: false, detail: why }),
        Decision::Go => {
            let sealed = sealed?;
            let req = RestartRequest {
                vmid: job.vmid,
                target,
                verdict,
                archive: sealed.path.clone(),
                sha256: sealed.sha256.clone(),
                reason: format!("job {} ({}): verdict {verdict}", job.id, describe(job)),
            };
            let r = tokio::task::spawn_blocking(move || restarter.restart(&req)).await;
            Some(r.unwrap_or_else(|e| RestartReport {
                attempted: true,
                ok: false,
                detail: format!("restart task failed: {e}"),
            }))
        }
    }
}

/// The completion document from the job record as it stands.
fn completion(ctx: &Service, id: JobId) -> Option<Completion> {
    let j = ctx.store.get(id)?;
    Some(Completion {
        job: j.id,
        vmid: j.vmid.get(),
        node: ctx.settings.node.clone(),
        state: j.state.as_str().into(),
        verdict: j.verdict.clone(),
        facts: Vec::new(),
        summary_markdown: None,
        archive: j.archive.clone(),
        size: j.size,
        sha256: j.sha256.clone(),
        copy: None,
        restart: j.restart.clone(),
        error: j.error.clone(),
        trigger: j.origin.kind.clone(),
        reason: j.origin.reason.clone(),
        labels: j.origin.labels.clone(),
        annotations: j.origin.annotations.clone(),
        generator_url: j.origin.generator_url.clone(),
        started_at: j.started_at,
        finished_at: j.finished_at.unwrap_or_else(chrono::Utc::now),
        duration_ms: j.duration_ms.unwrap_or(0),
    })
}

/// Copy (so the document can name it), then hook, then POSTs.
async fn deliver(ctx: &Arc<Service>, id: JobId, doc: &mut Completion) {
    let mut results = Vec::new();
    if let (Some(dir), Some(archive), Some(sha)) = (&ctx.cfg.copy_to, &doc.archive, &doc.sha256) {
        let (dir, archive, sha) = (dir.clone(), std::path::PathBuf::from(archive), sha.clone());
        let r = tokio::task::spawn_blocking(move || notify::copy_verified(&archive, &sha, &dir)).await;
        match r {
            Ok(Ok(p)) => {
                doc.copy = Some(p.display().to_string());
                results.push(super::jobs::Delivery {
                    target: "copy_to".into(),
                    ok: true,
                    attempts: 1,
                    detail: p.display().to_string(),
                });
            }
            Ok(Err(e)) => {
                results.push(super::jobs::Delivery { target: "copy_to".into(), ok: false, attempts: 1, detail: e })
            }
            Err(e) => results.push(super::jobs::Delivery {
                target: "copy_to".into(),
                ok: false,
                attempts: 1,
                detail: e.to_string(),
            }),
        }
    }
    if let Some(argv) = &ctx.cfg.on_complete {
        let (argv, d, t) = (argv.clone(), doc.clone(), ctx.cfg.on_complete_timeout);
        if let Ok(r) = tokio::task::spawn_blocking(move || notify::run_hook(&argv, &d, t)).await {
            results.push(r);
        }
    }
    results.extend(
        notify::post_all(&ctx.cfg.notify, doc, ctx.cfg.notify_attempts, ctx.cfg.notify_timeout, &ctx.hard_stop).await,
    );
    for r in results.iter().filter(|r| !r.ok) {
        log::warn_line!("job {id}: could not deliver to {}: {} after {} attempt(s)", r.target, r.detail, r.attempts);
    }
    let copy = doc.copy.clone();
    ctx.store.update(id, |j| {
        j.copy = copy;
        j.notified = results;
        j.delivered = true;
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::diagnose::Verdict;
    use crate::serve::config::{Action, Policy};
    use crate::serve::jobs::{Origin, QueueLimits, Submit};
    use crate::target::Proof;

    /// Records every call; never touches a process.
    #[derive(Default)]
    struct FakeRestarter {
        calls: Mutex<Vec<RestartRequest>>,
    }

    impl Restarter for FakeRestarter {
        fn restart(&self, req: &RestartRequest) -> RestartReport {
            self.calls.lock().unwrap().push(req.clone());
            RestartReport { attempted: true, ok: true, detail: format!("fake restart of {}", req.vmid) }
        }
    }

    fn job(policy: Policy, requested: bool) -> Job {
        let store = Store::new(QueueLimits {
            repeat_window: Duration::from_secs(60),
            vm_cooldown: Duration::ZERO,
            max_queue: 9,
            keep_jobs: 9,
            max_firings_per_vm: 9,
        });
        let origin = Origin {
            kind: "alert".into(),
            reason: Some("VmDiskWritesFlat".into()),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            generator_url: None,
            firing: None,
            restart_requested: requested,
        };
        let (id, _) = store.submit(Submit { vmid: "102".parse().unwrap(), origin, policy }).unwrap();
        store.get(id).unwrap()
    }

    fn target() -> Target {
        Target {
            vmid: "102".parse().unwrap(),
            pid: 4242,
            starttime: 1,
            proof: Proof::Pidfile,
            pidfile: "/run/qemu-server/102.pid".into(),
            qmp_socket: "/run/qemu-server/102.qmp".into(),
            config_path: "/etc/pve/qemu-server/102.conf".into(),
            cmdline: vec![],
            qmp_present: true,
            node: "pve1".into(),
            domain: None,
            monitor: Default::default(),
        }
    }

    fn sealed() -> Sealed {
        Sealed {
            path: "/out/a.tar.zst".into(),
            sidecar: "/out/a.tar.zst.sha256".into(),
            sha256: "ab".into(),
            size: 1,
            files: 1,
        }
    }

    fn proven(v: Verdict) -> Diagnosis {
        let wedged = matches!(v, Verdict::BlockPathFrozen | Verdict::MainLoopWedged);
        let strength = wedged.then_some(crate::diagnose::Strength::Proven);
        Diagnosis::bare(v, strength, wedged.then_some(crate::diagnose::Layer::InsideQemu))
    }

    #[tokio::test]
    async fn restarter_is_called_only_when_the_gate_opens() {
        let fake = Arc::new(FakeRestarter::default());
        let r: Arc<dyn Restarter> = fake.clone();
        let restart = Policy { action: Action::CaptureThenRestart, ..Policy::default() };
        let s = sealed();

        // capture-only policy: nothing, not even a refusal.
        assert_eq!(
            restart_step(
                r.clone(),
                &job(Policy::default(), false),
                &proven(Verdict::BlockPathFrozen),
                Some(&s),
                target()
            )
            .await,
            None
        );
        // Healthy, unsealed, or a verdict the policy does not name: refused, never called.
        for (verdict, sealed) in
            [(Verdict::Healthy, Some(&s)), (Verdict::BlockPathFrozen, None), (Verdict::QmpUnreachable, Some(&s))]
        {
            let out = restart_step(r.clone(), &job(restart.clone(), false), &proven(verdict), sealed, target())
                .await
                .unwrap();
            assert!(!out.attempted, "{verdict}: {out:?}");
        }
        assert!(fake.calls.lock().unwrap().is_empty());
        // The policy's verdicts, sealed: called once each with the archive's facts.
        let out = restart_step(
            r.clone(),
            &job(restart.clone(), false),
            &proven(Verdict::BlockPathFrozen),
            Some(&s),
            target(),
        )
        .await
        .unwrap();
        assert!(out.ok && out.attempted, "{out:?}");
        let out = restart_step(
            r.clone(),
            &job(Policy::default(), true),
            &proven(Verdict::MainLoopWedged),
            Some(&s),
            target(),
        )
        .await
        .unwrap();
        assert!(out.ok, "an API request with restart=true uses the default verdict list: {out:?}");
        let calls = fake.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].sha256, "ab");
        assert_eq!(calls[0].target.pid, 4242);
        assert!(calls[0].reason.contains("block-path-frozen"));
    }
}
