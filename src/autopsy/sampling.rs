//! What every step runs with, and the one sampling loop of sampled steps.
//!
//! A sampled step (a QMP step with `samples > 1`, the `inflight` step) takes its first
//! sample inline and its later ones in the background while the other steps run. When a
//! later sample is due is the [`Window`]'s business: alone, `interval` after the first;
//! in a sweep, also not before every VM of the sweep has taken its first sample (the
//! [`Gate`]), so a host's VMs are all sampled once, the sweep waits one window, and all
//! are sampled again. The [`Pacing`] also bounds how many VMs touch QMP and /proc at
//! once (a slot per step and per later sample) and asks QMP for short sessions.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::qmp_lane::Lane;
use crate::archive::Staging;
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::runbook::{Step, StepKind, Vars};
use crate::step::{StepOutcome, StepRecord, StepSink, StepStatus};
use crate::target::Target;

pub struct Ctx<'a> {
    pub target: &'a Target,
    pub settings: &'a Settings,
    pub vars: &'a Vars,
    pub staging: &'a Staging,
    pub cancel: &'a Cancel,
    pub stacks_override: Option<Vec<String>>,
    pub qmp: Lane,
    pub window: Window,
    pub slots: Slots,
    /// This VM's place in its sweep's gate; given up at its first sample.
    pub arrival: Option<Arrival>,
}

pub enum Ran {
    Done(StepRecord),
    /// A sampled step whose later samples are still being taken.
    Sampling(tokio::task::JoinHandle<StepRecord>),
}

/// How a step's execution ended, before it becomes a record.
pub enum Ended {
    Done(StepOutcome),
    Timeout,
    Interrupted,
}

impl Ended {
    pub fn is_ok(&self) -> bool {
        matches!(self, Ended::Done(StepOutcome::Ok))
    }
}

pub(super) fn record(step: &Step, status: StepStatus, start: chrono::DateTime<Utc>, took: Duration) -> StepRecord {
    StepRecord {
        id: step.id.clone(),
        kind: step.kind.name().into(),
        status,
        start,
        duration_ms: took.as_millis() as u64,
        error: None,
        notes: vec![],
        files: vec![],
        optional: step.optional,
        qmp_failure: None,
    }
}

pub fn finish_record(
    step: &Step,
    start: chrono::DateTime<Utc>,
    took: Duration,
    ended: Ended,
    sink: &StepSink,
    timeout: Duration,
) -> StepRecord {
    let (files, notes) = sink.close();
    let (status, error) = match ended {
        Ended::Done(StepOutcome::Ok) => (StepStatus::Ok, None),
        Ended::Done(StepOutcome::Skipped(why)) => (StepStatus::Skipped, Some(why)),
        Ended::Done(StepOutcome::Failed(why)) => (StepStatus::Failed, Some(why)),
        Ended::Done(StepOutcome::Timeout(why)) => (StepStatus::Timeout, Some(why)),
        Ended::Done(StepOutcome::Interrupted(why)) => (StepStatus::Interrupted, Some(why)),
        Ended::Timeout => (
            StepStatus::Timeout,
            Some(format!("did not finish within {} ms; abandoned, output so far kept", timeout.as_millis())),
        ),
        Ended::Interrupted => (StepStatus::Interrupted, Some("interrupted by signal; output so far kept".into())),
    };
    let mut r = record(step, status, start, took);
    r.error = error;
    r.files = files;
    r.notes = notes;
    // Steps on the QMP lane time out only when QEMU does not answer in time.
    let on_lane = matches!(step.kind, StepKind::Qmp { .. } | StepKind::QomThrottle { .. } | StepKind::Inflight { .. });
    if on_lane && status == StepStatus::Timeout {
        r.qmp_failure = Some(crate::step::QmpFailure::Timeout);
    }
    r
}

/// Where a sampled step is, for [`later_samples`].
pub struct Sampled<'s> {
    pub step: &'s Step,
    pub start: chrono::DateTime<Utc>,
    /// When the step started (its duration runs from here).
    pub t0: Instant,
    /// When the first sample started: later samples are due `interval` apart from here.
    pub first: Instant,
    pub samples: u32,
    pub interval: Duration,
    pub timeout: Duration,
    pub sink: StepSink,
}

/// After a first sample that ended `first`: the record if that was all, else the
/// background task that takes samples `2..=samples` with `take(n)` when the window says
/// they are due, one slot each, and stops at the first that does not succeed.
pub fn later_samples<F, Fut>(ctx: &mut Ctx<'_>, s: Sampled<'_>, first: Ended, mut take: F) -> Ran
where
    F: FnMut(u32) -> Fut + Send + 'static,
    Fut: Future<Output = Ended> + Send + 'static,
{
    // A sampled step's first sample is in (or never will be): the sweep need not wait
    // for this VM any more. A one-sample step (`qmp-status`) is not the window's start.
    if s.samples > 1 {
        drop(ctx.arrival.take());
    }
    if s.samples <= 1 || !first.is_ok() {
        return Ran::Done(finish_record(s.step, s.start, s.t0.elapsed(), first, &s.sink, s.timeout));
    }
    let (cancel, window, slots) = (ctx.cancel.clone(), ctx.window.clone(), ctx.slots.clone());
    let step = s.step.clone();
    Ran::Sampling(tokio::spawn(async move {
        let mut ended = Ended::Done(StepOutcome::Ok);
        for n in 2..=s.samples {
            let due = s.first + s.interval * (n - 1);
            let slot = tokio::select! {
                slot = async { window.wait(due).await; slots.take().await } => slot,
                _ = super::cancelled(&cancel) => { ended = Ended::Interrupted; break; }
            };
            ended = take(n).await;
            drop(slot);
            if let Ended::Done(StepOutcome::Skipped(why)) = ended {
                // The first sample was taken: a later one that never went out leaves the
                // step half done, which is a failure, not a step that did not apply.
                ended = Ended::Done(StepOutcome::Failed(format!("sample {n} of {} {why}", s.samples)));
            }
            if !ended.is_ok() {
                break;
            }
        }
        finish_record(&step, s.start, s.t0.elapsed(), ended, &s.sink, s.timeout)
    }))
}

/// How a capture shares the host with the other VMs of a sweep. The default (a single
/// VM) waits for nobody, takes no slots and keeps one QMP session for the run.
#[derive(Default)]
pub struct Pacing {
    pub window: Window,
    pub slots: Slots,
    pub arrival: Option<Arrival>,
    /// One QMP connection per command (closed at once), so no VM's socket is held for
    /// longer than one short command: pvestatd polls it every 10 s.
    pub short_sessions: bool,
}

/// When later samples may be taken.
#[derive(Clone, Default)]
pub struct Window {
    gate: Option<Arc<Gate>>,
}

impl Window {
    pub fn gated(gate: Arc<Gate>) -> Window {
        Window { gate: Some(gate) }
    }

    /// Returns at `due`, and not before the gate (if any) is open.
    pub async fn wait(&self, due: Instant) {
        tokio::time::sleep_until(due.into()).await;
        if let Some(g) = &self.gate {
            g.wait_open().await;
        }
    }
}

/// Opens when every VM of a sweep has taken its first sample (each [`Arrival`] dropped),
/// or at `latest`, whichever comes first: a VM whose QMP is held cannot keep the others
/// waiting past that.
pub struct Gate {
    left: AtomicUsize,
    open: tokio::sync::watch::Sender<bool>,
    latest: Instant,
}

impl Gate {
    /// A gate for `n` VMs, and their arrivals.
    pub fn new(n: usize, latest: Instant) -> (Arc<Gate>, Vec<Arrival>) {
        let (open, _) = tokio::sync::watch::channel(n == 0);
        let gate = Arc::new(Gate { left: AtomicUsize::new(n), open, latest });
        let arrivals = (0..n).map(|_| Arrival(gate.clone())).collect();
        (gate, arrivals)
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    async fn wait_open(&self) {
        let mut rx = self.open.subscribe();
        let _ = tokio::time::timeout_at(self.latest.into(), rx.wait_for(|open| *open)).await;
    }
}

/// One VM's place in a [`Gate`]: dropping it says "my first sample is in" (or that the
/// VM will take none: refused, QMP unusable, interrupted).
pub struct Arrival(Arc<Gate>);

impl Drop for Arrival {
    fn drop(&mut self) {
        if self.0.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.open.send_replace(true);
        }
    }
}

/// The sweep's bound on VMs touching QMP and /proc at once; unbounded when alone.
#[derive(Clone, Default)]
pub struct Slots(Option<Arc<Semaphore>>);

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots(Some(Arc::new(Semaphore::new(n.max(1)))))
    }

    /// Waits for a slot (`None` when unbounded); the slot is freed when dropped.
    pub async fn take(&self) -> Option<OwnedSemaphorePermit> {
        match &self.0 {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_opens_on_the_last_arrival_or_at_its_latest() {
        let far = Instant::now() + Duration::from_secs(600);
        let (gate, mut arrivals) = Gate::new(3, far);
        drop(arrivals.pop());
        drop(arrivals.pop());
        assert!(!gate.is_open(), "two of three arrived");
        drop(arrivals.pop());
        assert!(gate.is_open(), "all arrived");
        Window::gated(gate).wait(Instant::now()).await;

        // Nobody arrives: a waiter is released at `latest`, not held forever.
        let (gate, _held) = Gate::new(1, Instant::now() + Duration::from_millis(50));
        tokio::time::timeout(Duration::from_secs(30), Window::gated(gate.clone()).wait(Instant::now()))
            .await
            .expect("released at the gate's latest opening");
        assert!(!gate.is_open());
    }
}
