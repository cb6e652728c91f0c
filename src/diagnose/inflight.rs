//! Per-disk judgment from the in-flight samples: moving, idle (nothing in flight),
//! stuck (in flight without progress), or only suspected (no in-flight view).
//!
//! In: the first and last [`Sample`], the [`Topology`] and the completion deltas. Out: a
//! [`DiskState`] per disk, each with the sentences (and numbers) it rests on, and for a
//! stuck disk the [`Layer`] its requests are stuck in.

use serde::Serialize;

use super::findings::DeviceDelta;
use super::guest_map;
use super::{Layer, Strength};
use crate::archive::Evidence;
use crate::inflight::{self, Backend, ControllerKind, Disk, Sample, ThreadIo, Topology};

/// What the evidence says about one disk across the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCondition {
    /// I/O completed in the window.
    Moving,
    /// Nothing in flight at either end, by an in-flight view: idle however long.
    Idle,
    /// Requests in flight at both ends, no progress, none completed for at least
    /// `min_idle`: proven stuck.
    Stuck,
    /// In flight without progress, but for less than `min_idle` so far.
    StuckRecently,
    /// No in-flight view, and nothing completed for at least `min_idle`.
    Suspected,
    /// No in-flight view, nothing completed in the window, and the last completion was
    /// recent: nothing can be said yet.
    Quiet,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskState {
    pub device: String,
    pub controller: ControllerKind,
    pub backend: Backend,
    pub condition: DiskCondition,
    /// Set when the condition is `Stuck` or `StuckRecently`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<Layer>,
    /// How the condition was established.
    pub strength: Strength,
    /// Sentences with numbers, in the order they matter.
    pub evidence: Vec<String>,
    /// Why an in-flight view is missing, and what would give one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_view: Option<String>,
}

/// The samples and topology as read back from the evidence.
pub struct Inflight {
    pub first: Sample,
    pub last: Sample,
    pub topology: Topology,
}

impl Inflight {
    /// Reads `inflight/sample.*.json` (first and last) and builds the topology from
    /// `qmp/query-block.json`, `qmp/x-query-virtio.json` and `proc/cmdline`.
    pub fn load(ev: &dyn Evidence) -> Option<Inflight> {
        let mut ns: Vec<u32> = ev
            .list()
            .iter()
            .filter_map(|p| p.strip_prefix("inflight/sample.")?.strip_suffix(".json")?.parse().ok())
            .collect();
        ns.sort_unstable();
        let (&a, &b) = (ns.first()?, ns.last()?);
        if a == b {
            return None;
        }
        let read = |n| serde_json::from_slice::<Sample>(&ev.read(&inflight::sample_path(n))?).ok();
        let cmdline = ev.read("proc/cmdline").map(|b| crate::procfs::split_nul(&b)).unwrap_or_default();
        let block = super::ret(ev, "qmp/query-block.json");
        let virtio = super::ret(ev, "qmp/x-query-virtio.json");
        Some(Inflight {
            first: read(a)?,
            last: read(b)?,
            topology: inflight::topology::build(block.as_ref(), virtio.as_ref(), &cmdline),
        })
    }

    pub fn window_ms(&self) -> u64 {
        self.last.t_ms.saturating_sub(self.first.t_ms)
    }
}

/// Threads in the same I/O call on the same fd at both ends, that did not run between.
fn stuck_threads(a: &Sample, b: &Sample) -> Vec<(ThreadIo, ThreadIo)> {
    let mut out = Vec::new();
    for t2 in &b.threads {
        let Some(t1) = a.threads.iter().find(|t| t.tid == t2.tid) else { continue };
        let same_call = t1.syscall.is_some() && t1.syscall == t2.syscall && t1.fd == t2.fd;
        let never_ran = match (t1.run_ns, t2.run_ns) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        if same_call && never_ran {
            out.push((t1.clone(), t2.clone()));
        }
    }
    out
}

fn describe_thread(t: &ThreadIo, window_ms: u64) -> String {
    let on = match (t.fd, t.file.is_empty()) {
        (Some(fd), false) => format!(" on fd {fd} ({})", t.file),
        (Some(fd), true) => format!(" on fd {fd}"),
        _ => String::new(),
    };
    let wait = if t.wchan.is_empty() { String::new() } else { format!(", kernel wait {}", t.wchan) };
    format!(
        "thread {} ({}) in {}{on} at both ends of the {window_ms} ms window without running, state {}{wait}",
        t.tid, t.name, t.syscall_name, t.state
    )
}

/// Judges every disk. `deltas` are the blockstats deltas by device name.
pub fn assess(inf: &Inflight, deltas: &[DeviceDelta], min_idle_secs: f64) -> Vec<DiskState> {
    let (a, b) = (&inf.first, &inf.last);
    let window = inf.window_ms();
    let threads = stuck_threads(a, b);
    let stuck_rings: Vec<_> = b
        .rings
        .iter()
        .filter(|r2| {
            a.rings
                .iter()
                .any(|r1| r1.fd == r2.fd && r1.in_kernel() > 0 && r2.in_kernel() > 0 && r1.cq_tail == r2.cq_tail)
        })
        .collect();
    // The guest agent's view, when it answered at both ends of the window.
    let agents = match (&a.agent, &b.agent) {
        (Some(x), Some(y)) if x.error.is_none() && y.error.is_none() => Some((x, y)),
        _ => None,
    };
    let agent_stuck: Option<Vec<String>> = agents.map(|(x, y)| {
        y.disks
            .iter()
            .filter(|d2| {
                x.disks.iter().any(|d1| {
                    d1.name == d2.name && d1.in_progress > 0 && d2.in_progress > 0 && d1.completed == d2.completed
                })
            })
            .map(|d| format!("{} ({} in progress)", d.name, d.in_progress))
            .collect()
    });
    // Which guest disk is which drive: from the addresses the first sample asked for.
    let links = agents
        .map(|(x, y)| {
            let addrs = [x, y].into_iter().find(|v| !v.addresses.is_empty()).map(|v| v.addresses.as_slice());
            super::guest_map::map(&inf.topology, addrs.unwrap_or_default())
        })
        .unwrap_or_default();
    let local_disks = inf.topology.disks.iter().filter(|d| d.backend == Backend::Local).count();
    let mut out = Vec::new();
    for disk in &inf.topology.disks {
        let delta = deltas.iter().find(|d| d.device == disk.device || Some(&d.device) == disk.qdev.as_ref());
        let completed = delta.map(|d| d.ops_delta()).unwrap_or(0);
        let idle = delta.and_then(|d| d.idle_secs());
        let mut st = DiskState {
            device: disk.device.clone(),
            controller: disk.controller,
            backend: disk.backend.clone(),
            condition: DiskCondition::Quiet,
            layer: None,
            strength: Strength::Suspected,
            evidence: vec![],
            no_view: None,
        };
        if completed > 0 {
            st.condition = DiskCondition::Moving;
            st.strength = Strength::Proven;
            st.evidence.push(format!("{}: +{completed} operations completed in {window} ms", disk.device));
            out.push(st);
            continue;
        }
        // Workers blocked on this disk's files (or on any storage file when this is the
        // only local disk) are an in-flight view of their own, for every controller.
        let mine: Vec<&(ThreadIo, ThreadIo)> = threads
            .iter()
            .filter(|(_, t)| {
                inflight::is_storage_path(&t.file)
                    && (disk.files.contains(&t.file) || (local_disks == 1 && disk.backend == Backend::Local))
            })
            .collect();
        let queue = queue_view(disk, &inf.topology, a, b, deltas);
        let idle_txt = idle.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never (no completion yet)".into());
        let guest = links.get(&disk.device).and_then(|l| guest_view(l, disk, a, b));
        match (&queue, mine.is_empty(), &agent_stuck) {
            (Some(q), _, _) if q.state == QState::Progress => {
                st.condition = DiskCondition::Moving;
                st.strength = Strength::Proven;
                st.evidence.push(q.sentence.clone());
            }
            (Some(q), _, _) if q.state == QState::InFlightBoth => {
                st.evidence.push(q.sentence.clone());
                stuck(&mut st, idle, min_idle_secs, &idle_txt);
            }
            (_, false, _) => stuck(&mut st, idle, min_idle_secs, &idle_txt),
            (Some(q), true, _) if q.state == QState::Empty => {
                st.condition = DiskCondition::Idle;
                st.strength = Strength::Proven;
                st.evidence.push(q.sentence.clone());
            }
            (Some(q), true, _) => {
                // In flight at one end only: a request just arrived or just left.
                st.condition = DiskCondition::Quiet;
                st.strength = Strength::Proven;
                st.evidence.push(q.sentence.clone());
            }
            (None, true, Some(g))
                if g.is_empty() && b.agent.as_ref().is_some_and(|x| x.disks.iter().all(|d| d.in_progress == 0)) =>
            {
                st.condition = DiskCondition::Idle;
                st.strength = Strength::Proven;
                st.evidence
                    .push("guest agent: no I/O in progress on any guest disk at either end of the window".into());
            }
            (None, true, _) if guest.is_some() => {
                let (state, sentences) = guest.unwrap_or((QState::OneEnd, vec![]));
                st.evidence.extend(sentences);
                match state {
                    QState::InFlightBoth => stuck(&mut st, idle, min_idle_secs, &idle_txt),
                    QState::Progress => (st.condition, st.strength) = (DiskCondition::Moving, Strength::Proven),
                    QState::Empty => (st.condition, st.strength) = (DiskCondition::Idle, Strength::Proven),
                    QState::OneEnd => (st.condition, st.strength) = (DiskCondition::Quiet, Strength::Proven),
                }
            }
            (None, true, Some(g)) if inf.topology.disks.len() == 1 && !g.is_empty() => {
                st.evidence.push(format!(
                    "guest agent: I/O in progress without completing across the window on {}",
                    g.join(", ")
                ));
                stuck(&mut st, idle, min_idle_secs, &idle_txt);
            }
            (None, true, _) => {
                st.no_view = Some(no_view_reason(disk));
                match idle {
                    Some(s) if s >= min_idle_secs => {
                        st.condition = DiskCondition::Suspected;
                        st.evidence.push(format!(
                            "{}: 0 operations completed in {window} ms and none for {s:.1} s; no view of what is in flight ({})",
                            disk.device,
                            disk.controller.as_str()
                        ));
                    }
                    _ => {
                        st.condition = DiskCondition::Quiet;
                        st.evidence.push(format!(
                            "{}: 0 operations completed in {window} ms; last completion {idle_txt} ago",
                            disk.device
                        ));
                    }
                }
            }
        }
        if matches!(st.condition, DiskCondition::Stuck | DiskCondition::StuckRecently) {
            st.layer = Some(layer(disk, &mine, &stuck_rings, &mut st.evidence, b, window));
        }
        out.push(st);
    }
    out
}

/// The mapped guest disk's counters across the window, as the queue states: in progress
/// at both ends with nothing completed, completed something, nothing in progress at either
/// end, or in progress at one end only. `None` when a sample lacks the disk.
fn guest_view(link: &guest_map::Link, disk: &Disk, a: &Sample, b: &Sample) -> Option<(QState, Vec<String>)> {
    let at = |s: &Sample| s.agent.as_ref()?.disks.iter().find(|d| d.name == link.guest).cloned();
    let (g1, g2) = (at(a)?, at(b)?);
    let mapped = format!("guest agent: {} is {} (by {})", link.guest, disk.device, link.by);
    let done = g2.completed.wrapping_sub(g1.completed);
    let (state, what) = if g1.in_progress > 0 && g2.in_progress > 0 && done == 0 {
        (
            QState::InFlightBoth,
            format!(
                "guest agent: I/O in progress without completing across the window on {} ({} in progress)",
                link.guest, g2.in_progress
            ),
        )
    } else if done > 0 {
        (QState::Progress, format!("guest agent: {}: {done} I/O(s) completed across the window", link.guest))
    } else if g1.in_progress == 0 && g2.in_progress == 0 {
        (QState::Empty, format!("guest agent: {}: no I/O in progress at either end of the window: idle", link.guest))
    } else {
        (
            QState::OneEnd,
            format!(
                "guest agent: {}: I/O came and went across the window ({} then {} in progress)",
                link.guest, g1.in_progress, g2.in_progress
            ),
        )
    };
    Some((state, vec![what, mapped]))
}

fn stuck(st: &mut DiskState, idle: Option<f64>, min_idle_secs: f64, idle_txt: &str) {
    st.strength = Strength::Proven;
    match idle {
        Some(s) if s >= min_idle_secs => {
            st.condition = DiskCondition::Stuck;
            st.evidence
                .push(format!("{}: no request completed for {idle_txt} (threshold {min_idle_secs:.0} s)", st.device));
        }
        _ => {
            st.condition = DiskCondition::StuckRecently;
            st.evidence.push(format!(
                "{}: last completion {idle_txt} ago, under the {min_idle_secs:.0} s threshold: a slow disk or a failover looks the same so far",
                st.device
            ));
        }
    }
}

/// Where the stuck requests are, from the most direct evidence available.
fn layer(
    disk: &Disk,
    workers: &[&(ThreadIo, ThreadIo)],
    rings: &[&inflight::Ring],
    evidence: &mut Vec<String>,
    last: &Sample,
    window: u64,
) -> Layer {
    if !workers.is_empty() {
        evidence.extend(workers.iter().map(|(_, t)| describe_thread(t, window)));
        evidence.push(
            "QEMU's I/O threads are blocked in the host kernel on the image: the stall is below QEMU (host storage, filesystem or the device behind it)"
                .into(),
        );
        return Layer::BelowQemu;
    }
    if let Backend::Network { protocol, target } = &disk.backend {
        let socks: Vec<String> = last
            .sockets
            .iter()
            .filter(|s| s.proto.starts_with("tcp") && (s.tx_queue.unwrap_or(0) > 0 || s.rx_queue.unwrap_or(0) > 0))
            .map(|s| {
                format!(
                    "{} -> {} send-q {} recv-q {}",
                    s.local,
                    s.remote,
                    s.tx_queue.unwrap_or(0),
                    s.rx_queue.unwrap_or(0)
                )
            })
            .collect();
        evidence.push(format!(
            "the image is served by QEMU's {protocol} driver ({target}) and no QEMU thread is blocked on a local file: the requests wait on the {protocol} server{}",
            if socks.is_empty() { String::new() } else { format!(" (sockets with queued bytes: {})", socks.join("; ")) }
        ));
        return Layer::NetworkBackend;
    }
    if !rings.is_empty() {
        evidence.push(format!(
            "io_uring: {} submission(s) in the kernel without completion across the window ({}): the stall is below QEMU",
            rings.iter().map(|r| r.in_kernel() as u64).sum::<u64>(),
            rings.iter().map(|r| format!("fd {} SqHead {} CqTail {}", r.fd, r.sq_head, r.cq_tail)).collect::<Vec<_>>().join(", ")
        ));
        return Layer::BelowQemu;
    }
    evidence.push(format!(
        "no QEMU thread is in an I/O system call and no io_uring submission is in the kernel: the requests are held inside QEMU ({}{})",
        if disk.controller.has_queue_view() { "popped from the virtqueue, not completed: block layer or device model" } else { "device model or block layer" },
        if disk.throttled { "; this disk has a QEMU throttle, whose queue holds requests until its timer fires" } else { "" }
    ));
    Layer::InsideQemu
}

/// One disk's virtqueue evidence across the window.
struct QueueView {
    state: QState,
    sentence: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QState {
    /// used-idx moved: requests completed.
    Progress,
    /// In flight at both ends, used-idx unchanged.
    InFlightBoth,
    /// Nothing in flight at either end.
    Empty,
    /// In flight at one end only.
    OneEnd,
}

fn queue_view(disk: &Disk, topo: &Topology, a: &Sample, b: &Sample, deltas: &[DeviceDelta]) -> Option<QueueView> {
    let path = disk.virtio_path.as_ref()?;
    let d1 = a.virtio.iter().find(|d| &d.path == path && d.error.is_none())?;
    let d2 = b.virtio.iter().find(|d| &d.path == path && d.error.is_none())?;
    if d1.queues.is_empty() || d2.queues.is_empty() {
        return None;
    }
    // A controller shared by several disks: its queues speak for a disk only while the
    // others complete nothing either.
    let siblings = topo.disks.iter().filter(|o| o.virtio_path.as_ref() == Some(path) && o.device != disk.device);
    let sibling_moving = siblings.into_iter().any(|o| {
        deltas.iter().any(|d| (d.device == o.device || Some(&d.device) == o.qdev.as_ref()) && d.ops_delta() > 0)
    });
    if sibling_moving {
        return None;
    }
    let used_moved = d1.request_queues().zip(d2.request_queues()).any(|(x, y)| x.used_idx != y.used_idx);
    let (n1, n2) = (d1.inuse() + d1.posted(), d2.inuse() + d2.posted());
    let per_queue: Vec<String> = d2
        .request_queues()
        .filter(|q| q.inuse > 0 || q.posted() > 0)
        .map(|q| {
            format!(
                "queue {}: {} popped not completed, {} posted not popped, used-idx {}",
                q.index,
                q.inuse,
                q.posted(),
                q.used_idx
            )
        })
        .collect();
    let state = match (used_moved, n1 > 0, n2 > 0) {
        (true, _, _) => QState::Progress,
        (false, true, true) => QState::InFlightBoth,
        (false, false, false) => QState::Empty,
        _ => QState::OneEnd,
    };
    let sentence = if state == QState::Progress {
        let done: u32 =
            d1.request_queues().zip(d2.request_queues()).map(|(x, y)| y.used_idx.wrapping_sub(x.used_idx) as u32).sum();
        format!("{} ({}): {done} request(s) completed on its queues across the window", disk.device, d2.name)
    } else if state == QState::InFlightBoth {
        format!(
            "{} ({}): {n2} request(s) in flight at the end of the window and {n1} at its start, used-idx unchanged ({})",
            disk.device,
            d2.name,
            per_queue.join("; ")
        )
    } else if state == QState::Empty {
        format!(
            "{} ({}): nothing in flight at either end of the window (inuse 0, avail == used): idle",
            disk.device, d2.name
        )
    } else {
        format!("{} ({}): requests came and went across the window ({n1} then {n2} in flight, used-idx moved: {used_moved})", disk.device, d2.name)
    };
    Some(QueueView { state, sentence })
}

fn no_view_reason(disk: &Disk) -> String {
    let what = match disk.controller {
        ControllerKind::VirtioScsi | ControllerKind::VirtioBlk => {
            "its virtqueues could not be read (x-query-virtio-queue-status needs QEMU 7.2+)".to_string()
        }
        c => format!("the {} controller exposes no in-flight counter", c.as_str()),
    };
    format!(
        "{what}; a virtio controller (virtio-scsi-single), a running guest agent (agent: 1) or debug symbols for a stack of the device model would prove it"
    )
}
