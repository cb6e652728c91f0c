//! The `inflight` step: the same instant's evidence at both ends of the window.
//!
//! Each sample reads, as close together as they can be: `query-blockstats` (raw, as
//! `qmp/query-blockstats.N.json`), every request queue of every virtio block device,
//! QEMU's threads, rings and sockets from /proc, and the guest agent when it has a
//! socket. The first sample is taken inline; later ones in the background while the
//! other steps run, through the same loop as a sampled QMP step (`sampling`). Each source has its own deadline and a
//! source that fails is recorded in the sample as unavailable: the sample is still
//! written, because the other sources may be exactly what proves the wedge.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use super::qmp_lane::{Lane, LaneError};
use super::sampling::{later_samples, Ctx, Ended, Ran, Sampled};
use crate::inflight::{self, procs, AgentView, Sample, VirtioDevice, Vq};
use crate::qga::{self, Qga};
use crate::runbook::Step;
use crate::step::{StepOutcome, StepSink};

/// Deadline of one QMP query inside a sample.
const QMP_QUERY: Duration = Duration::from_secs(2);
/// The guest agent answers from inside the guest; a wedged guest never does.
const AGENT_BUDGET: Duration = Duration::from_millis(1500);
/// Past the agent's own deadline, before its thread is given up on.
const AGENT_SLACK: Duration = Duration::from_millis(500);
/// /proc of a process with a D-state thread can block; past this the sample goes on.
const PROC_BUDGET: Duration = Duration::from_secs(3);

/// Which virtio devices carry block requests (queues of the others are not sampled).
const BLOCK_VIRTIO: &[&str] = &["virtio-scsi", "virtio-blk"];

pub async fn run(
    ctx: &mut Ctx<'_>,
    step: &Step,
    samples: u32,
    interval: Option<Duration>,
    timeout: Duration,
    sink: StepSink,
) -> Ran {
    let start = Utc::now();
    let t0 = Instant::now();
    let sources = Sources {
        lane: ctx.qmp.clone(),
        pid: ctx.target.pid,
        agent: ctx.target.qmp_socket.with_extension("qga"),
        same: {
            let t = ctx.target.clone();
            std::sync::Arc::new(move || t.still_same())
        },
    };
    // Which devices have queues, and how many: once, before the first sample.
    let devices = std::sync::Arc::new(sources.virtio_devices(&sink).await);
    let first_at = Instant::now();
    let first = sources.sample(1, first_at, &devices, &sink).await;
    let interval = interval.unwrap_or(ctx.settings.sample_interval);
    let s = Sampled { step, start, t0, first: first_at, samples, interval, timeout, sink: sink.clone() };
    let sources = std::sync::Arc::new(sources);
    later_samples(ctx, s, first, move |n| {
        let (sources, devices, sink) = (sources.clone(), devices.clone(), sink.clone());
        async move { sources.sample(n, first_at, &devices, &sink).await }
    })
}

struct Sources {
    lane: Lane,
    pid: i32,
    agent: PathBuf,
    /// Re-proves the target before /proc is read (pids get reused).
    same: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Sources {
    /// `(name, path, queue count)` of the virtio block devices, from `x-query-virtio`
    /// and `x-query-virtio-status` (QEMU 7.2+; older QEMUs answer CommandNotFound).
    async fn virtio_devices(&self, sink: &StepSink) -> Vec<(String, String, u32)> {
        let list = match self.lane.execute("x-query-virtio", None, QMP_QUERY).await {
            Ok(r) => {
                let _ = sink.write("qmp/x-query-virtio.json", &r.raw);
                r.value
            }
            Err(e) => {
                sink.note(format!("x-query-virtio: {}", lane_err(&e)));
                return vec![];
            }
        };
        let mut out = Vec::new();
        for d in list.as_array().into_iter().flatten() {
            let (Some(name), Some(path)) = (d["name"].as_str(), d["path"].as_str()) else { continue };
            if !BLOCK_VIRTIO.contains(&name) {
                continue;
            }
            match self.lane.execute("x-query-virtio-status", Some(json!({ "path": path })), QMP_QUERY).await {
                Ok(r) => {
                    let vqs = r.value["num-vqs"].as_u64().unwrap_or(0).min(1024) as u32;
                    out.push((name.to_string(), path.to_string(), vqs));
                }
                Err(e) => sink.note(format!("x-query-virtio-status {path}: {}", lane_err(&e))),
            }
        }
        out
    }

    async fn sample(&self, n: u32, t0: Instant, devices: &[(String, String, u32)], sink: &StepSink) -> Ended {
        let mut s = Sample { n, at: Some(Utc::now()), t_ms: t0.elapsed().as_millis() as u64, ..Default::default() };
        // /proc and the agent on their own threads, QMP meanwhile: one instant, roughly.
        let pid = self.pid;
        let same = self.same.clone();
        let procs_job = blocking(PROC_BUDGET, move || same().then(|| procs::sample(pid)));
        let agent_path = self.agent.clone();
        // The agent's own deadline reports first, with why; this one only catches a
        // thread that is not scheduled at all.
        // Where the guest's disks sit is asked once, with the first sample: it does not
        // change within a run, and `inspect` maps the later samples through it.
        let agent_job = agent_path
            .exists()
            .then(|| blocking(AGENT_BUDGET + AGENT_SLACK, move || agent_sample(&agent_path, n == 1)));

        let path = inflight::sample_path(n).replace("inflight/sample.", "qmp/query-blockstats.");
        match self.lane.execute("query-blockstats", None, QMP_QUERY).await {
            Ok(r) => {
                if let Err(e) = sink.write(&path, &r.raw) {
                    s.unavailable.push(format!("{path}: {e}"));
                }
            }
            Err(LaneError::Qmp(e)) if matches!(e, crate::qmp::QmpError::Timeout { .. }) => {
                s.unavailable.push(format!("query-blockstats: {e}"));
                self.write(&s, sink);
                return Ended::Timeout;
            }
            Err(e) => s.unavailable.push(format!("query-blockstats: {}", lane_err(&e))),
        }
        for (name, path, vqs) in devices {
            let mut dev = VirtioDevice { path: path.clone(), name: name.clone(), ..Default::default() };
            for q in 0..*vqs {
                let args = json!({ "path": path, "queue": q });
                match self.lane.execute("x-query-virtio-queue-status", Some(args), QMP_QUERY).await {
                    Ok(r) => dev.queues.push(vq(q, &r.value)),
                    Err(e) => {
                        dev.error = Some(format!("queue {q}: {}", lane_err(&e)));
                        break;
                    }
                }
            }
            s.virtio.push(dev);
        }
        match procs_job.await {
            Some(Some(p)) => {
                s.threads = p.threads;
                s.rings = p.rings;
                s.sockets = p.sockets;
                s.unavailable.extend(p.unavailable);
            }
            Some(None) => s.unavailable.push("/proc: the process is no longer the proven QEMU; not read".into()),
            None => s
                .unavailable
                .push(format!("/proc: no answer within {} ms (a D-state thread?)", PROC_BUDGET.as_millis())),
        }
        if let Some(job) = agent_job {
            s.agent = Some(job.await.unwrap_or_else(|| AgentView {
                error: Some(format!(
                    "the guest agent did not answer within {} ms (its client thread did not finish)",
                    (AGENT_BUDGET + AGENT_SLACK).as_millis()
                )),
                ..Default::default()
            }));
        }
        self.write(&s, sink)
    }

    fn write(&self, s: &Sample, sink: &StepSink) -> Ended {
        let bytes = serde_json::to_vec_pretty(s).unwrap_or_default();
        match sink.write(&inflight::sample_path(s.n), &bytes) {
            Ok(()) => Ended::Done(StepOutcome::Ok),
            Err(e) => Ended::Done(StepOutcome::Failed(e.to_string())),
        }
    }
}

fn vq(index: u32, v: &Value) -> Vq {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Vq {
        index,
        inuse: n("inuse") as u32,
        last_avail_idx: n("last-avail-idx") as u16,
        shadow_avail_idx: n("shadow-avail-idx") as u16,
        used_idx: n("used-idx") as u16,
    }
}

/// The agent's diskstats, and with `addresses` also `guest-get-disks` (after the
/// diskstats, so a failure of the second never costs the first).
fn agent_sample(path: &std::path::Path, addresses: bool) -> AgentView {
    let deadline = Instant::now() + AGENT_BUDGET;
    let mut q = match Qga::connect(path, deadline).and_then(|mut q| q.execute("guest-ping", None).map(|_| q)) {
        Ok(q) => q,
        Err(e) => return AgentView { error: Some(e.to_string()), ..Default::default() },
    };
    let mut view = match q.execute("guest-get-diskstats", None) {
        Ok(v) => AgentView { disks: qga::parse_diskstats(&v), ..Default::default() },
        Err(e) => return AgentView { error: Some(e.to_string()), ..Default::default() },
    };
    if addresses {
        match q.execute("guest-get-disks", None) {
            Ok(v) => view.addresses = qga::parse_disks(&v),
            Err(e) => view.addresses_error = Some(e.to_string()),
        }
    }
    view
}

fn lane_err(e: &LaneError) -> String {
    match e {
        LaneError::NotSent(why) => format!("not sent: {why}"),
        LaneError::Qmp(e) => format!("{e} ({})", e.classify()),
    }
}

/// Starts `job` on its own thread now; the returned future yields `None` when it has not
/// finished `budget` after the start (the thread is then abandoned: a /proc read stuck
/// behind a D-state thread must not hold the run).
fn blocking<T: Send + 'static>(
    budget: Duration,
    job: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Option<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let deadline = tokio::time::Instant::now() + budget;
    std::thread::spawn(move || {
        let _ = tx.send(job());
    });
    async move { tokio::time::timeout_at(deadline, rx).await.ok().and_then(Result::ok) }
}
