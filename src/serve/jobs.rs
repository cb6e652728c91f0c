//! Jobs: which deliveries start an autopsy, which join an existing one, and the record
//! of each run the API and `/metrics` show.
//!
//! Rules, in order, under one lock:
//! 1. the same firing (fingerprint + startsAt) seen within `repeat_window` gets the job it
//!    started, running or finished (Alertmanager retries, an HA pair delivering twice);
//! 2. one autopsy per VM at a time: a new firing for a VM with a queued or running job
//!    joins that job;
//! 3. any request (alert, watch or API) for a VM whose last autopsy sealed less than
//!    `vm_cooldown` ago gets that job (an alert storm, or a loop of API calls, yields one
//!    archive; the CLI is the way to capture again at once);
//! 4. at most `max_queue` jobs wait for one of `max_concurrent` slots; beyond that the
//!    delivery gets 503, because a retry later would help.
//!
//! Memory is bounded: at most `keep_jobs` finished jobs, and per VM at most
//! `max_firings_per_vm` firing keys (each at most `alert::MAX_KEY` bytes), oldest of
//! that VM dropped first: a flood of firings for one VM cannot evict another VM's.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::config::Policy;
use super::restart::RestartReport;
use crate::target::VmId;

pub type JobId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Queued,
    Running,
    /// Archive sealed and verified.
    Sealed,
    /// No archive: the target was refused or the seal failed.
    Failed,
    /// Never started: the service stopped first.
    Cancelled,
}

impl State {
    pub fn is_active(self) -> bool {
        matches!(self, State::Queued | State::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Sealed => "sealed",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

/// What started a job.
#[derive(Debug, Clone, Serialize)]
pub struct Origin {
    /// `alert`, `api` or `watch` (the manifest's trigger kind).
    pub kind: String,
    pub reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub generator_url: Option<String>,
    /// Fingerprint@startsAt for alerts.
    pub firing: Option<String>,
    /// The API asked for a restart (subject to the policy's verdict list).
    pub restart_requested: bool,
}

impl Origin {
    /// The origin as kept and shown (job records, the archive's trigger reason, logs):
    /// URL user-info and `password=`-style options in the sender's text redacted, since
    /// an alert's labels, annotations and generator URL are whatever its sender put there.
    fn redacted(mut self) -> Origin {
        let text = |s: &mut String| *s = crate::redact::text(s).0;
        self.reason.iter_mut().for_each(text);
        self.firing.iter_mut().for_each(text);
        self.labels.values_mut().for_each(text);
        self.annotations.values_mut().for_each(text);
        if let Some(u) = self.generator_url.as_mut() {
            *u = crate::redact::url(u);
        }
        self
    }

    /// Replaces every value `secrets` learned (the VM's, the service's) in the sender's text.
    pub fn scrub(&mut self, secrets: &crate::redact::Redactor) {
        let scrub = |s: &mut String| *s = secrets.scrub_text(s);
        self.reason.iter_mut().for_each(scrub);
        self.firing.iter_mut().for_each(scrub);
        self.labels.values_mut().for_each(scrub);
        self.annotations.values_mut().for_each(scrub);
        self.generator_url.iter_mut().for_each(scrub);
    }
}

/// One delivery's notification result.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub target: String,
    pub ok: bool,
    pub attempts: u32,
    pub detail: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: JobId,
    pub vmid: VmId,
    pub state: State,
    pub origin: Origin,
    #[serde(skip)]
    pub policy: Policy,
    /// Deliveries that mapped to this job (1 + duplicates + joined firings).
    pub deliveries: u64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    pub pid: Option<i32>,
    pub verdict: Option<String>,
    pub archive: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub copy: Option<String>,
    pub restart: Option<RestartReport>,
    pub error: Option<String>,
    pub notified: Vec<Delivery>,
    /// Results were delivered (copy, hook, POSTs attempted): nothing more will change.
    pub delivered: bool,
    #[serde(skip)]
    finished_instant: Option<Instant>,
}

/// How a delivery was admitted: a new job, a duplicate, or joined to the VM's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// A new job; the caller starts it.
    Started,
    /// The same firing was seen before.
    Duplicate,
    /// Joined the VM's running or recent job.
    Joined,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0} autopsies are already waiting: retry later")]
    QueueFull(usize),
    #[error("the service is stopping: send this to the node's next instance")]
    ShuttingDown,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Finished runs by result (`sealed`, `failed`, `cancelled`).
    pub runs: BTreeMap<&'static str, u64>,
    /// Deliveries by outcome (`started`, `duplicate`, `joined`, `refused`, `rejected`).
    pub deliveries: BTreeMap<String, u64>,
    /// Restarts by outcome (`ok`, `failed`, `not-attempted`, `gated`).
    pub restarts: BTreeMap<String, u64>,
    /// Completed-run durations in seconds: bucket counts, sum, count.
    pub duration_buckets: Vec<u64>,
    pub duration_sum: f64,
    pub duration_count: u64,
}

/// Histogram bucket upper bounds (seconds) for run durations.
pub const DURATION_BUCKETS: [f64; 8] = [1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];

/// QueueLimits of the store.
#[derive(Debug, Clone)]
pub struct QueueLimits {
    pub repeat_window: Duration,
    pub vm_cooldown: Duration,
    pub max_queue: usize,
    pub keep_jobs: usize,
    pub max_firings_per_vm: usize,
}

#[derive(Debug, Default)]
struct Inner {
    next: JobId,
    jobs: BTreeMap<JobId, Job>,
    /// firing key -> (job, expiry); `order` holds each VM's keys by insertion (= expiry
    /// order: the window is fixed).
    dedup: HashMap<String, (JobId, Instant)>,
    order: HashMap<VmId, VecDeque<String>>,
    /// The last job per VM.
    last: HashMap<VmId, JobId>,
    shutting_down: bool,
    counters: Counters,
}

/// The job table. Every method holds the lock briefly and never across I/O.
#[derive(Debug)]
pub struct Store {
    limits: QueueLimits,
    inner: Mutex<Inner>,
}

/// A new job's request.
#[derive(Debug, Clone)]
pub struct Submit {
    pub vmid: VmId,
    pub origin: Origin,
    pub policy: Policy,
}

impl Store {
    pub fn new(limits: QueueLimits) -> Store {
        let inner = Inner {
            next: 1,
            counters: Counters { duration_buckets: vec![0; DURATION_BUCKETS.len()], ..Default::default() },
            ..Default::default()
        };
        Store { limits, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the rules in the module doc. `Started` means the caller must run the job.
    pub fn submit(&self, mut s: Submit) -> Result<(JobId, Admission), SubmitError> {
        s.origin = s.origin.redacted();
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        // Expire old firing keys of every VM; then make room among this VM's own keys.
        let per_vm = self.limits.max_firings_per_vm.max(1);
        for (vm, q) in inner.order.iter_mut() {
            let room = if *vm == s.vmid { per_vm - 1 } else { per_vm };
            while let Some(k) = q.front() {
                let expired = inner.dedup.get(k).is_none_or(|(_, exp)| *exp <= now);
                if !expired && q.len() <= room {
                    break;
                }
                if let Some(k) = q.pop_front() {
                    inner.dedup.remove(&k);
                }
            }
        }
        inner.order.retain(|_, q| !q.is_empty());
        if let Some(key) = &s.origin.firing {
            if let Some((id, _)) = inner.dedup.get(key) {
                let id = *id;
                if let Some(j) = inner.jobs.get_mut(&id) {
                    j.deliveries += 1;
                }
                *inner.counters.deliveries.entry("duplicate".into()).or_default() += 1;
                return Ok((id, Admission::Duplicate));
            }
        }
        if inner.shutting_down {
            *inner.counters.deliveries.entry("rejected".into()).or_default() += 1;
            return Err(SubmitError::ShuttingDown);
        }
        let join = inner.last.get(&s.vmid).and_then(|id| inner.jobs.get(id)).filter(|j| {
            j.state.is_active()
                || (j.state == State::Sealed
                    && j.finished_instant.is_some_and(|t| now.duration_since(t) < self.limits.vm_cooldown))
        });
        let (id, outcome) = if let Some(j) = join {
            (j.id, Admission::Joined)
        } else {
            let queued = inner.jobs.values().filter(|j| j.state == State::Queued).count();
            if queued >= self.limits.max_queue {
                *inner.counters.deliveries.entry("rejected".into()).or_default() += 1;
                return Err(SubmitError::QueueFull(queued));
            }
            let id = inner.next;
            inner.next += 1;
            inner.jobs.insert(
                id,
                Job {
                    id,
                    vmid: s.vmid,
                    state: State::Queued,
                    origin: s.origin.clone(),
                    policy: s.policy,
                    deliveries: 0,
                    created_at: Utc::now(),
                    started_at: None,
                    finished_at: None,
                    duration_ms: None,
                    pid: None,
                    verdict: None,
                    archive: None,
                    size: None,
                    sha256: None,
                    copy: None,
                    restart: None,
                    error: None,
                    notified: Vec::new(),
                    delivered: false,
                    finished_instant: None,
                },
            );
            inner.last.insert(s.vmid, id);
            prune(inner, self.limits.keep_jobs);
            (id, Admission::Started)
        };
        if let Some(j) = inner.jobs.get_mut(&id) {
            j.deliveries += 1;
        }
        if let Some(key) = s.origin.firing {
            if inner.dedup.insert(key.clone(), (id, now + self.limits.repeat_window)).is_none() {
                inner.order.entry(s.vmid).or_default().push_back(key);
            }
        }
        let name = if outcome == Admission::Started { "started" } else { "joined" };
        *inner.counters.deliveries.entry(name.into()).or_default() += 1;
        Ok((id, outcome))
    }

    /// Counts a delivery that was answered with a 4xx (auth, body, mapping).
    pub fn count_refused(&self, what: &str) {
        *self.lock().counters.deliveries.entry(what.into()).or_default() += 1;
    }

    pub fn get(&self, id: JobId) -> Option<Job> {
        self.lock().jobs.get(&id).cloned()
    }

    /// The most recent jobs first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Vec<Job> {
        self.lock().jobs.values().rev().take(limit).cloned().collect()
    }

    /// Runs `f` on a job (if it is still kept).
    pub fn update(&self, id: JobId, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.lock().jobs.get_mut(&id) {
            f(j);
        }
    }

    /// Moves a queued job to running; `false` if the service is stopping (the job is
    /// then cancelled and must not start).
    pub fn start(&self, id: JobId) -> bool {
        let mut g = self.lock();
        let stopping = g.shutting_down;
        let Some(j) = g.jobs.get_mut(&id) else { return false };
        if j.state != State::Queued {
            return false;
        }
        if stopping {
            j.state = State::Cancelled;
            j.error = Some("not started: the service was stopping".into());
            j.finished_at = Some(Utc::now());
            j.finished_instant = Some(Instant::now());
            *g.counters.runs.entry("cancelled").or_default() += 1;
            return false;
        }
        j.state = State::Running;
        j.started_at = Some(Utc::now());
        true
    }

    /// Ends a job in `state` (sealed or failed) and records its duration.
    pub fn finish(&self, id: JobId, state: State, took: Duration) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(j) = inner.jobs.get_mut(&id) {
            j.state = state;
            j.finished_at = Some(Utc::now());
            j.finished_instant = Some(Instant::now());
            j.duration_ms = Some(took.as_millis() as u64);
        }
        *inner.counters.runs.entry(state.as_str()).or_default() += 1;
        let secs = took.as_secs_f64();
        let c = &mut inner.counters;
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *b {
                c.duration_buckets[i] += 1;
            }
        }
        c.duration_sum += secs;
        c.duration_count += 1;
    }

    pub fn count_restart(&self, outcome: &str) {
        *self.lock().counters.restarts.entry(outcome.into()).or_default() += 1;
    }

    /// Stops accepting new jobs and cancels the queued ones; running ones go on.
    pub fn shut_down(&self) {
        let mut g = self.lock();
        g.shutting_down = true;
        let mut cancelled = 0;
        for j in g.jobs.values_mut().filter(|j| j.state == State::Queued) {
            j.state = State::Cancelled;
            j.error = Some("not started: the service was stopping".into());
            j.finished_at = Some(Utc::now());
            j.finished_instant = Some(Instant::now());
            cancelled += 1;
        }
        *g.counters.runs.entry("cancelled").or_default() += cancelled;
    }

    /// Whether `vmid` has a queued or running job.
    pub fn vm_active(&self, vmid: VmId) -> bool {
        let g = self.lock();
        g.last.get(&vmid).and_then(|id| g.jobs.get(id)).is_some_and(|j| j.state.is_active())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// (queued, running) job counts.
    pub fn active(&self) -> (usize, usize) {
        let g = self.lock();
        let q = g.jobs.values().filter(|j| j.state == State::Queued).count();
        let r = g.jobs.values().filter(|j| j.state == State::Running).count();
        (q, r)
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// (jobs kept, firing keys kept): for tests and `/metrics`.
    pub fn sizes(&self) -> (usize, usize) {
        let g = self.lock();
        (g.jobs.len(), g.dedup.len())
    }
}

/// Drops the oldest finished jobs beyond `keep`.
fn prune(inner: &mut Inner, keep: usize) {
    while inner.jobs.len() > keep {
        let Some(id) = inner.jobs.values().find(|j| !j.state.is_active()).map(|j| j.id) else { break };
        inner.jobs.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(QueueLimits {
            repeat_window: Duration::from_secs(3600),
            vm_cooldown: Duration::from_secs(600),
            max_queue: 2,
            keep_jobs: 3,
            max_firings_per_vm: 100,
        })
    }

    fn alert(vmid: &str, firing: &str) -> Submit {
        Submit {
            vmid: vmid.parse().unwrap(),
            origin: Origin {
                kind: "alert".into(),
                reason: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                generator_url: None,
                firing: Some(firing.into()),
                restart_requested: false,
            },
            policy: Policy::default(),
        }
    }

    /// An alert's text is the sender's: what `GET /v1/autopsies/N` shows (and what the
    /// archive's trigger reason becomes) has its credentials redacted, and the same
    /// firing still finds its job.
    #[test]
    fn origin_is_kept_redacted_and_still_deduplicates() {
        let s = store();
        let mut a = alert("102", "fp1@now password=F1ringS3cret");
        a.origin.reason = Some("Alertmanager alert DiskStuck db_password=Re4sonS3cret".into());
        a.origin.labels.insert("dsn".into(), "postgres://app:L4belS3cret@db/app".into());
        a.origin.annotations.insert("runbook".into(), "see https://wiki/x?token=Ann0tS3cret&a=1".into());
        a.origin.generator_url = Some("http://admin:G3nS3cret@prometheus:9090/graph?g0.expr=up".into());
        let again = Submit { origin: a.origin.clone(), ..alert("102", "") };
        let (id, adm) = s.submit(a).unwrap();
        assert_eq!(adm, Admission::Started);
        let shown = serde_json::to_string(&s.get(id).unwrap()).unwrap();
        for secret in ["F1ringS3cret", "Re4sonS3cret", "L4belS3cret", "Ann0tS3cret", "G3nS3cret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://app:<redacted>@db/app"), "{shown}");
        assert!(shown.contains("http://admin:<redacted>@prometheus:9090/graph?g0.expr=up"), "{shown}");
        assert!(shown.contains("db_password=<redacted>"), "{shown}");
        assert_eq!(s.submit(again).unwrap(), (id, Admission::Duplicate));
    }

    #[test]
    fn same_firing_gets_the_same_job_running_or_finished() {
        let s = store();
        let (id, o) = s.submit(alert("102", "fp@t0")).unwrap();
        assert_eq!(o, Admission::Started);
        for _ in 0..4 {
            assert_eq!(s.submit(alert("102", "fp@t0")).unwrap(), (id, Admission::Duplicate));
        }
        assert!(s.start(id));
        s.finish(id, State::Sealed, Duration::from_secs(3));
        assert_eq!(s.submit(alert("102", "fp@t0")).unwrap(), (id, Admission::Duplicate));
        assert_eq!(s.get(id).unwrap().deliveries, 6);
        assert_eq!(s.counters().runs["sealed"], 1);
    }

    #[test]
    fn one_job_per_vm_and_cooldown_for_alerts_and_api_alike() {
        let s = store();
        let (a, _) = s.submit(alert("102", "x@1")).unwrap();
        assert_eq!(s.submit(alert("102", "y@1")).unwrap(), (a, Admission::Joined));
        let (b, o) = s.submit(alert("103", "z@1")).unwrap();
        assert_ne!(a, b);
        assert_eq!(o, Admission::Started);
        s.start(a);
        s.finish(a, State::Sealed, Duration::from_secs(1));
        assert_eq!(s.submit(alert("102", "w@1")).unwrap(), (a, Admission::Joined), "within vm_cooldown");
        let mut api = alert("102", "");
        api.origin.kind = "api".into();
        api.origin.firing = None;
        assert_eq!(s.submit(api.clone()).unwrap(), (a, Admission::Joined), "API requests obey vm_cooldown too");
        let s0 = Store::new(QueueLimits { vm_cooldown: Duration::ZERO, ..s.limits.clone() });
        let (first, _) = s0.submit(api.clone()).unwrap();
        s0.start(first);
        s0.finish(first, State::Sealed, Duration::from_secs(1));
        assert_eq!(s0.submit(api).unwrap().1, Admission::Started, "after the cooldown, a new capture");
    }

    #[test]
    fn queue_is_bounded_and_shutdown_refuses_new_but_answers_duplicates() {
        let s = store();
        s.submit(alert("102", "a@1")).unwrap();
        s.submit(alert("103", "b@1")).unwrap();
        assert_eq!(s.submit(alert("104", "c@1")), Err(SubmitError::QueueFull(2)));
        s.shut_down();
        assert_eq!(s.submit(alert("105", "d@1")), Err(SubmitError::ShuttingDown));
        assert_eq!(s.submit(alert("102", "a@1")).unwrap().1, Admission::Duplicate);
        let (id, _) = s.submit(alert("102", "a@1")).unwrap();
        assert_eq!(s.get(id).unwrap().state, State::Cancelled, "queued jobs are cancelled at shutdown");
        assert!(!s.start(id), "and never start");
    }

    #[test]
    fn memory_is_bounded() {
        let s = Store::new(QueueLimits {
            repeat_window: Duration::from_secs(3600),
            vm_cooldown: Duration::ZERO,
            max_queue: 10_000,
            keep_jobs: 3,
            max_firings_per_vm: 50,
        });
        for i in 0..20u32 {
            let (id, _) = s.submit(alert(&(100 + i).to_string(), &format!("f{i}@1"))).unwrap();
            s.start(id);
            s.finish(id, State::Sealed, Duration::from_millis(10));
        }
        assert_eq!(s.sizes().0, 3, "only keep_jobs finished jobs are kept");
        let before = s.sizes().1;
        for i in 0..1000 {
            let _ = s.submit(alert("102", &format!("g{i}@1")));
        }
        assert!(s.sizes().1 <= before + 50, "{:?}", s.sizes());
    }

    /// The report: one payload of ~11k alerts flushed every remembered firing, so a real
    /// firing's redelivery started a second capture. Now a flood for one VM evicts only
    /// that VM's own oldest keys.
    #[test]
    fn a_flood_for_one_vm_cannot_evict_another_vms_firing() {
        let s = Store::new(QueueLimits {
            repeat_window: Duration::from_secs(3600),
            vm_cooldown: Duration::ZERO,
            max_queue: 10,
            keep_jobs: 10,
            max_firings_per_vm: 64,
        });
        let (real, o) = s.submit(alert("103", "real@t")).unwrap();
        assert_eq!(o, Admission::Started);
        s.start(real);
        s.finish(real, State::Sealed, Duration::from_secs(1));
        for i in 0..11_000 {
            let _ = s.submit(alert("102", &format!("flood-{i}@t")));
        }
        assert_eq!(s.submit(alert("103", "real@t")).unwrap(), (real, Admission::Duplicate), "still remembered");
        assert!(s.sizes().1 <= 64 + 1, "{:?}", s.sizes());
    }
}
