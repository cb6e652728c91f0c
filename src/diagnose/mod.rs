//! The verdict: what the evidence shows, computed from captured files alone so it gives
//! the same answer on a live run (staging dir) and on a sealed archive.
//!
//! In: an [`Evidence`] reader and the run's step records. Out: a [`Diagnosis`] with one
//! [`Verdict`], the facts it rests on (with numbers), and findings (threads, per-device
//! I/O deltas, throttle limits, the config's risk stack).

pub mod audit;
pub mod config;
mod findings;
mod guest_map;
pub mod inflight;
pub mod pinnable;

use serde::Serialize;
use serde_json::Value;

pub use findings::{DeviceDelta, Findings, ThreadFinding, UnnamedFrames};
pub use inflight::{DiskCondition, DiskState};

use crate::archive::Evidence;
use crate::step::{QmpFailure, StepRecord, StepStatus};

/// Default time without a completion before requests in flight count as stuck (and,
/// without an in-flight view, before frozen counters make a wedge *suspected*). Guests
/// time SCSI commands out after 30 s; a failover or a slow disk completes within it.
pub const DEFAULT_MIN_IDLE_SECS: f64 = 30.0;

/// How a verdict was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strength {
    /// Requests seen in flight without progress (virtqueues, blocked I/O threads, rings,
    /// the guest agent), or QMP itself not answering.
    Proven,
    /// Counters alone: nothing completed for long, but nothing shows what is in flight.
    Suspected,
}

/// Where stuck requests are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// Taken from the guest, not completed, and nothing outstanding below QEMU: the
    /// device model, the block layer or a throttle queue. A new QEMU helps.
    InsideQemu,
    /// QEMU's threads wait in the host kernel (file system, device, FUSE, NFS): a new
    /// QEMU on the same storage wedges again or never starts.
    BelowQemu,
    /// A network block driver inside QEMU (NBD, iSCSI, RBD) waits on its server.
    NetworkBackend,
    /// The guest reports I/O in progress that QEMU never received.
    GuestNotSubmitting,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::InsideQemu => "inside-qemu",
            Layer::BelowQemu => "below-qemu",
            Layer::NetworkBackend => "network-backend",
            Layer::GuestNotSubmitting => "guest-not-submitting",
        }
    }
    /// One sentence for the summary's first lines.
    pub fn sentence(self) -> &'static str {
        match self {
            Layer::InsideQemu => "stuck inside QEMU (device model, block layer or throttle queue): a full stop→start replaces the stuck process",
            Layer::BelowQemu => "stuck below QEMU (host kernel, filesystem or storage): a new QEMU on the same storage would wedge again or never start; the storage must recover first",
            Layer::NetworkBackend => "stuck in a network block backend (its server or the path to it): restarting QEMU does not fix the server; it must recover first",
            Layer::GuestNotSubmitting => "stuck in the guest: it reports I/O in progress that never reached QEMU",
        }
    }
}

/// What a restart can be expected to do, given the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "advice", content = "why", rename_all = "kebab-case")]
pub enum RestartAdvice {
    /// Proven stuck inside QEMU (or a wedged main loop): a full stop→start helps.
    Helps,
    /// Wedged, but not proven (no in-flight view), or stuck in the guest.
    Unproven(String),
    /// Stuck below QEMU or in a network backend: a new QEMU will not help.
    WontHelp(String),
    /// Not wedged at all (healthy, idle, paused, inconclusive, …).
    NotWedged(String),
}

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
    /// Set for wedge verdicts: how the verdict was established.
    pub strength: Option<Strength>,
    /// Set for a proven wedge: where the requests are stuck.
    pub layer: Option<Layer>,
    /// The facts the verdict rests on, each a sentence with its numbers.
    pub facts: Vec<String>,
    /// Per disk: moving, idle, stuck or suspected, with the in-flight evidence.
    pub disks: Vec<DiskState>,
    pub findings: Findings,
}

impl Diagnosis {
    /// A wedge verdict (what `--all-wedged` and the watch capture).
    pub fn is_wedged(&self) -> bool {
        matches!(self.verdict, Verdict::BlockPathFrozen | Verdict::MainLoopWedged)
    }

    /// How bad this verdict is, for picking the worst of a sweep (`diagnose --all`): a
    /// proven wedge above an I/O error above a stopped or unreachable QEMU above a
    /// suspected wedge above no verdict above a pause above healthy.
    pub fn severity(&self) -> u8 {
        match (self.verdict, self.strength) {
            (Verdict::Healthy, _) => 0,
            (Verdict::Paused, _) => 1,
            (Verdict::Inconclusive, _) => 2,
            (Verdict::BlockPathFrozen, Some(Strength::Suspected)) => 3,
            (Verdict::QmpUnreachable, _) => 4,
            (Verdict::ProcessStopped, _) => 5,
            (Verdict::IoError, _) => 6,
            (Verdict::BlockPathFrozen, _) => 7,
            (Verdict::MainLoopWedged, _) => 8,
        }
    }

    /// `diagnose`'s exit code: the verdict's, except that a merely suspected frozen block
    /// path has its own (17), so an alert rule keyed on 11 acts only on proof.
    pub fn exit_code(&self) -> u8 {
        match (self.verdict, self.strength) {
            (Verdict::BlockPathFrozen, Some(Strength::Suspected)) => SUSPECTED_FROZEN_EXIT,
            (v, _) => v.exit_code(),
        }
    }

    pub fn restart_advice(&self) -> RestartAdvice {
        if !self.is_wedged() {
            return RestartAdvice::NotWedged(format!("verdict {}: nothing to restart for", self.verdict));
        }
        match (self.strength, self.layer) {
            (Some(Strength::Proven), Some(l @ (Layer::BelowQemu | Layer::NetworkBackend))) => {
                RestartAdvice::WontHelp(l.sentence().to_string())
            }
            (Some(Strength::Proven), Some(Layer::GuestNotSubmitting)) => {
                RestartAdvice::Unproven(Layer::GuestNotSubmitting.sentence().to_string())
            }
            (Some(Strength::Proven), _) => RestartAdvice::Helps,
            _ => RestartAdvice::Unproven(
                "suspected only: no in-flight view shows requests stuck (counters alone cannot tell an idle disk from a frozen one)"
                    .into(),
            ),
        }
    }

    /// The gate for restarts nobody asked for by VMID (serve policies, `--all-wedged
    /// --then-restart`): only a proven wedge inside QEMU, or a suspected one when the
    /// operator opted in. `Err` says why not.
    pub fn automatic_restart(&self, allow_suspected: bool) -> Result<(), String> {
        match self.restart_advice() {
            RestartAdvice::Helps => Ok(()),
            RestartAdvice::Unproven(_) if allow_suspected && self.strength == Some(Strength::Suspected) => Ok(()),
            RestartAdvice::Unproven(why) => Err(format!("not restarted automatically: {why}")),
            RestartAdvice::WontHelp(why) => Err(format!("not restarted: {why}")),
            RestartAdvice::NotWedged(why) => Err(format!("not restarted: {why}")),
        }
    }
}

impl Diagnosis {
    /// A diagnosis with a verdict and no evidence, for gates' unit tests.
    #[cfg(test)]
    pub fn bare(verdict: Verdict, strength: Option<Strength>, layer: Option<Layer>) -> Diagnosis {
        Diagnosis { verdict, strength, layer, facts: vec![], disks: vec![], findings: Findings::default() }
    }
}

/// `diagnose` exit code of a `block-path-frozen` verdict that is only suspected.
pub const SUSPECTED_FROZEN_EXIT: u8 = 17;

/// Computes the verdict. `steps` are the run's step records (from the manifest when
/// reading an archive).
pub fn diagnose(ev: &dyn Evidence, steps: &[StepRecord], rules: &Rules) -> Diagnosis {
    let findings = findings::collect(ev, steps);
    let mut d = Diagnosis {
        verdict: Verdict::Inconclusive,
        strength: None,
        layer: None,
        facts: vec![],
        disks: vec![],
        findings,
    };
    d.verdict = decide(ev, steps, rules, &mut d);
    // The one hook of known-bug signatures: pure over the evidence, the verdict and its layer.
    d.findings.signatures =
        crate::signatures::matches(ev, d.verdict.as_str(), d.layer.map(Layer::as_str), crate::signatures::active());
    d
}

fn step<'a>(steps: &'a [StepRecord], id: &str) -> Option<&'a StepRecord> {
    steps.iter().find(|s| s.id == id)
}

fn decide(ev: &dyn Evidence, steps: &[StepRecord], rules: &Rules, d: &mut Diagnosis) -> Verdict {
    let f = &d.findings;
    let facts = &mut d.facts;
    // 1. A stopped process explains everything else (no greeting, frozen counters).
    if let Some(state) = &f.process_state {
        if state.starts_with('T') || state.starts_with('t') {
            facts.push(format!("the QEMU process is in state {state} (stopped by a signal or a tracer)"));
            let stopped = f.threads.iter().filter(|t| matches!(t.state, 'T' | 't')).count();
            facts.push(format!("{stopped} of {} threads are stopped", f.threads.len()));
            return Verdict::ProcessStopped;
        }
    }
    // 2. QMP reachability, from the connect step's typed failure.
    if let Some(c) = step(steps, crate::step::QMP_CONNECT_ID) {
        if c.status != StepStatus::Ok && c.status != StepStatus::Skipped {
            let err = c.error.clone().unwrap_or_default();
            if c.qmp_failure == Some(QmpFailure::CapabilitiesUnanswered) {
                facts.push(format!("QMP greeted but did not answer qmp_capabilities: {err}"));
                facts.push("in-band commands run on the main loop, so the main loop is not running".into());
                main_loop_layer(d);
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
    if let Some(t) = steps.iter().find(|s| s.qmp_failure == Some(QmpFailure::Timeout)) {
        facts.push(format!("QMP step {} timed out after {} ms while the session was up", t.id, t.duration_ms));
        facts.push("in-band commands run on the main loop, so the main loop is stuck".into());
        main_loop_layer(d);
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
    // 4. Block path: what is in flight, per disk, at both ends of the window.
    match inflight::Inflight::load(ev) {
        Some(inf) => block_path_inflight(&inf, rules, d),
        None => block_path_counters(rules, d),
    }
}

/// A wedged main loop is proven by QMP itself; its layer comes from the main thread:
/// blocked in an I/O call on storage (e.g. `query-block` stat-ing an image on a hung
/// NFS mount) it is below QEMU, otherwise inside.
fn main_loop_layer(d: &mut Diagnosis) {
    d.strength = Some(Strength::Proven);
    let main = d.findings.main_thread.clone();
    let below = main.as_ref().is_some_and(|m| {
        m.state == 'D'
            || ["nfs", "fuse", "request_wait_answer", "blk_mq", "io_schedule"].iter().any(|w| m.wchan.contains(w))
    });
    d.layer = Some(if below { Layer::BelowQemu } else { Layer::InsideQemu });
    if let (true, Some(m)) = (below, main) {
        d.facts.push(format!(
            "the main thread is in state {} waiting in {}: it is blocked in the host kernel, below QEMU",
            m.state, m.wchan
        ));
    }
}

fn block_path_inflight(inf: &inflight::Inflight, rules: &Rules, d: &mut Diagnosis) -> Verdict {
    let disks = inflight::assess(inf, &d.findings.devices, rules.min_idle_secs);
    let with = |c: DiskCondition| disks.iter().filter(move |x| x.condition == c);
    let verdict = if with(DiskCondition::Stuck).next().is_some() {
        let stuck: Vec<&DiskState> = with(DiskCondition::Stuck).collect();
        for s in &stuck {
            d.facts.extend(s.evidence.iter().cloned());
        }
        d.strength = Some(Strength::Proven);
        // The most consequential layer wins: one disk stuck below QEMU makes a restart futile.
        let layers: Vec<Layer> = stuck.iter().filter_map(|s| s.layer).collect();
        d.layer = [Layer::BelowQemu, Layer::NetworkBackend, Layer::InsideQemu, Layer::GuestNotSubmitting]
            .into_iter()
            .find(|l| layers.contains(l));
        d.facts.push(format!(
            "QEMU answered {} QMP commands during the capture: its main loop is alive",
            d.findings.qmp_replies
        ));
        Verdict::BlockPathFrozen
    } else if with(DiskCondition::Suspected).next().is_some() {
        for s in with(DiskCondition::Suspected) {
            d.facts.extend(s.evidence.iter().cloned());
            if let Some(why) = &s.no_view {
                d.facts.push(format!("suspected, not proven: {why}"));
            }
        }
        d.strength = Some(Strength::Suspected);
        Verdict::BlockPathFrozen
    } else if with(DiskCondition::StuckRecently).next().is_some() {
        for s in with(DiskCondition::StuckRecently) {
            d.facts.extend(s.evidence.iter().cloned());
        }
        d.facts
            .push("diagnose again in a minute: stuck requests that stay stuck past the threshold prove a wedge".into());
        Verdict::Inconclusive
    } else if with(DiskCondition::Moving).next().is_some()
        || (!disks.is_empty() && disks.iter().all(|x| x.condition == DiskCondition::Idle))
    {
        for s in disks.iter().filter(|x| matches!(x.condition, DiskCondition::Moving | DiskCondition::Idle)) {
            d.facts.extend(s.evidence.iter().cloned());
        }
        Verdict::Healthy
    } else if disks.is_empty() {
        d.facts.push("no disks found in query-block and the command line".into());
        Verdict::Inconclusive
    } else {
        for s in &disks {
            d.facts.extend(s.evidence.iter().cloned());
        }
        d.facts.push(format!(
            "nothing completed in the window and nothing proves the disks idle or stuck yet; diagnose again after {:.0} s",
            rules.min_idle_secs
        ));
        Verdict::Inconclusive
    };
    d.disks = disks;
    verdict
}

/// Archives without in-flight samples (custom runbooks): counters alone can only
/// suspect a wedge.
fn block_path_counters(rules: &Rules, d: &mut Diagnosis) -> Verdict {
    let f = &d.findings;
    if f.devices.is_empty() {
        d.facts.push("no in-flight samples and no two query-blockstats samples to compare".into());
        return Verdict::Inconclusive;
    }
    let window = f.sample_window_ms;
    let moving: Vec<&DeviceDelta> = f.devices.iter().filter(|x| x.ops_delta() > 0).collect();
    if !moving.is_empty() {
        for x in &moving {
            d.facts.push(format!("{}: +{} operations completed in {} ms", x.device, x.ops_delta(), window));
        }
        return Verdict::Healthy;
    }
    let frozen: Vec<String> = f
        .devices
        .iter()
        .filter(|x| x.idle_secs().is_some_and(|s| s >= rules.min_idle_secs))
        .map(|x| {
            format!(
                "{}: 0 operations completed in {window} ms, none for {:.1} s",
                x.device,
                x.idle_secs().unwrap_or(0.0)
            )
        })
        .collect();
    if frozen.is_empty() {
        let idle: Vec<String> = f
            .devices
            .iter()
            .map(|x| match x.idle_secs() {
                Some(s) => format!("{} idle {s:.1} s", x.device),
                None => format!("{} no I/O since start", x.device),
            })
            .collect();
        d.facts.push(format!(
            "no I/O completed in the {window} ms window ({}), none of it longer than {:.0} s ago",
            idle.join(", "),
            rules.min_idle_secs
        ));
        return Verdict::Inconclusive;
    }
    d.facts.extend(frozen);
    d.facts.push("suspected, not proven: this capture has no in-flight samples (runbook without an `inflight` step), so an idle disk looks the same".into());
    d.strength = Some(Strength::Suspected);
    Verdict::BlockPathFrozen
}

/// Parses a QMP reply file's `return` value.
pub(crate) fn ret(ev: &dyn Evidence, path: &str) -> Option<Value> {
    ev.read_json(path).map(|v| v["return"].clone())
}

#[cfg(test)]
mod tests;
