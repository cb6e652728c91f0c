use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::json;

use super::*;

#[derive(Default)]
struct Mem(BTreeMap<String, Vec<u8>>);

impl Mem {
    fn put(mut self, p: &str, v: serde_json::Value) -> Self {
        self.0.insert(p.into(), v.to_string().into_bytes());
        self
    }
    fn text(mut self, p: &str, t: &str) -> Self {
        self.0.insert(p.into(), t.as_bytes().to_vec());
        self
    }
}

impl Evidence for Mem {
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.0.get(path).cloned()
    }
    fn list(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

fn rec(id: &str, kind: &str, status: StepStatus, error: Option<&str>, files: &[&str]) -> StepRecord {
    StepRecord {
        id: id.into(),
        kind: kind.into(),
        status,
        start: Utc::now(),
        duration_ms: 2000,
        error: error.map(str::to_string),
        notes: vec![],
        files: files.iter().map(|s| s.to_string()).collect(),
        optional: false,
        qmp_failure: None,
    }
}

fn failed(id: &str, status: StepStatus, failure: QmpFailure) -> StepRecord {
    StepRecord { qmp_failure: Some(failure), ..rec(id, "qmp", status, Some("(from the lane)"), &[]) }
}

fn bs(wr_ops: u64, highest: u64, idle: Option<u64>) -> serde_json::Value {
    let mut stats = json!({"rd_operations": 10, "wr_operations": wr_ops, "flush_operations": 3, "unmap_operations": 0, "wr_highest_offset": highest});
    if let Some(i) = idle {
        stats["idle_time_ns"] = json!(i);
    }
    json!({"return": [{"device": "drive-scsi0", "stats": stats}]})
}

fn running(ev: Mem) -> Mem {
    ev.put("qmp/query-status.json", json!({"return": {"status": "running", "running": true}}))
        .text("proc/status", "Name:\tqemu\nState:\tS (sleeping)\nPid:\t100\n")
}

fn ok_steps() -> Vec<StepRecord> {
    vec![
        rec("qmp-connect", "qmp", StepStatus::Ok, None, &[]),
        rec("qmp-status", "qmp", StepStatus::Ok, None, &["qmp/query-status.json"]),
        rec(
            "qmp-blockstats",
            "qmp",
            StepStatus::Ok,
            None,
            &["qmp/query-blockstats.1.json", "qmp/query-blockstats.2.json"],
        ),
    ]
}

#[test]
fn devices_that_never_completed_io_are_not_called_frozen() {
    let ev = running(Mem::default())
        .put("qmp/query-blockstats.1.json", bs(0, 0, None))
        .put("qmp/query-blockstats.2.json", bs(0, 0, None));
    let d = diagnose(&ev, &ok_steps(), &Rules { min_idle_secs: 0.0 });
    assert_eq!(d.verdict, Verdict::Inconclusive, "{:?}", d.facts);
    assert!(d.facts.iter().any(|f| f.contains("no I/O since start")), "{:?}", d.facts);
}

#[test]
fn frozen_long_idle_but_short_idle_is_inconclusive() {
    let long = running(Mem::default())
        .put("qmp/query-blockstats.1.json", bs(5, 4096, Some(600_000_000_000)))
        .put("qmp/query-blockstats.2.json", bs(5, 4096, Some(602_000_000_000)));
    // Counters alone (no in-flight samples): a wedge can only be suspected.
    let d = diagnose(&long, &ok_steps(), &Rules::default());
    assert_eq!((d.verdict, d.strength), (Verdict::BlockPathFrozen, Some(Strength::Suspected)), "{:?}", d.facts);
    assert_eq!(d.exit_code(), SUSPECTED_FROZEN_EXIT);
    assert!(d.automatic_restart(false).is_err());
    let short = running(Mem::default())
        .put("qmp/query-blockstats.1.json", bs(5, 4096, Some(1_000_000_000)))
        .put("qmp/query-blockstats.2.json", bs(5, 4096, Some(3_000_000_000)));
    let d = diagnose(&short, &ok_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Inconclusive, "{:?}", d.facts);
    assert_eq!(diagnose(&short, &ok_steps(), &Rules { min_idle_secs: 2.0 }).verdict, Verdict::BlockPathFrozen);
}

#[test]
fn moving_counters_are_healthy() {
    let ev = running(Mem::default())
        .put("qmp/query-blockstats.1.json", bs(5, 4096, Some(1000)))
        .put("qmp/query-blockstats.2.json", bs(9, 8192, Some(1000)));
    let d = diagnose(&ev, &ok_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Healthy);
    assert!(d.facts.iter().any(|f| f.contains("+4 operations")), "{:?}", d.facts);
}

#[test]
fn paused_and_io_error() {
    let ev = Mem::default().put("qmp/query-status.json", json!({"return": {"status": "paused", "running": false}}));
    assert_eq!(diagnose(&ev, &ok_steps(), &Rules::default()).verdict, Verdict::Paused);
    let ev =
        Mem::default().put("qmp/query-status.json", json!({"return": {"status": "running", "running": true}})).put(
            "qmp/query-block.json",
            json!({"return": [{"device": "drive-scsi0", "io-status": "nospace", "inserted": {}}]}),
        );
    let d = diagnose(&ev, &ok_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::IoError);
    assert!(d.facts.iter().any(|f| f.contains("nospace")));
}

#[test]
fn qmp_failures() {
    let held = Mem::default()
        .text("proc/status", "State:\tS (sleeping)\nPid:\t100\n")
        .text("proc/task/100/stat", "100 (qemu) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0")
        .text("proc/task/100/wchan", "do_sys_poll");
    let steps = vec![failed("qmp-connect", StepStatus::Failed, QmpFailure::NoGreeting)];
    let d = diagnose(&held, &steps, &Rules::default());
    assert_eq!(d.verdict, Verdict::QmpUnreachable);
    assert!(d.facts.iter().any(|f| f.contains("another client most likely holds the socket")), "{:?}", d.facts);
    let steps = vec![failed("qmp-connect", StepStatus::Failed, QmpFailure::CapabilitiesUnanswered)];
    let d = diagnose(&held, &steps, &Rules::default());
    assert_eq!(
        (d.verdict, d.strength, d.layer),
        (Verdict::MainLoopWedged, Some(Strength::Proven), Some(Layer::InsideQemu))
    );
    // The error text does not decide: only the typed failure does.
    let steps = vec![rec("qmp-connect", "qmp", StepStatus::Failed, Some("x (capabilities-unanswered)"), &[])];
    assert_eq!(diagnose(&held, &steps, &Rules::default()).verdict, Verdict::QmpUnreachable);
    let mut steps = ok_steps();
    steps.push(failed("qmp-block", StepStatus::Timeout, QmpFailure::Timeout));
    assert_eq!(diagnose(&running(Mem::default()), &steps, &Rules::default()).verdict, Verdict::MainLoopWedged);
}

#[test]
fn stopped_process_wins() {
    let ev = running(Mem::default()).text("proc/status", "State:\tT (stopped)\nPid:\t100\n");
    let steps = vec![failed("qmp-connect", StepStatus::Failed, QmpFailure::NoGreeting)];
    assert_eq!(diagnose(&ev, &steps, &Rules::default()).verdict, Verdict::ProcessStopped);
}

#[test]
fn missing_evidence_is_inconclusive() {
    assert_eq!(diagnose(&Mem::default(), &[], &Rules::default()).verdict, Verdict::Inconclusive);
}

#[test]
fn io_uring_pending_and_throttle_drift() {
    let ev = running(Mem::default())
        .text("proc/fdinfo.txt", "== fd 12\npos:\t0\nSqMask:\t0x7f\nSqHead:\t10\nSqTail:\t14\nCachedSqHead:\t10\nCqMask:\t0xff\nCqHead:\t8\nCqTail:\t8\n")
        .text("config/102.conf", "scsihw: lsi\nscsi0: local-lvm:vm-102-disk-0,mbps_rd=60,mbps_wr=60\n")
        .put("qmp/query-block.json", json!({"return": [{"device": "drive-scsi0", "io-status": "ok", "inserted": {"bps_rd": 62914560, "bps_wr": 52428800}}]}));
    let d = diagnose(&ev, &[], &Rules::default());
    assert!(d.findings.io_uring[0].starts_with("fd 12: 4 submissions not consumed"), "{:?}", d.findings.io_uring);
    assert_eq!(d.findings.throttle_drift.len(), 1, "{:?}", d.findings.throttle_drift);
    assert!(d.findings.throttle_drift[0].contains("52428800"));
    assert!(d.findings.risks.iter().any(|r| r.key == "scsihw"));
}

// In-flight evidence: samples as the `inflight` step writes them. The real-guest tests
// (tests/guest_verdicts.rs) check the same rules against real QEMUs and guests; these
// pin each rule's edge with exact numbers.

const VSCSI: &str = "/machine/peripheral/virtioscsi0/virtio-backend";

fn cmdline(ctl: &str) -> String {
    let ctl_dev = match ctl {
        "lsi" => "lsi,id=scsihw0",
        _ => "virtio-scsi-pci,id=virtioscsi0,iothread=iothread-virtioscsi0",
    };
    let bus = if ctl == "lsi" { "scsihw0.0" } else { "virtioscsi0.0" };
    ["qemu", "-device", ctl_dev, "-device", &format!("scsi-hd,bus={bus},drive=drive-scsi0,id=scsi0")].join("\0")
}

fn vq(inuse: u32, avail: u16, used: u16) -> serde_json::Value {
    json!({"index": 2, "inuse": inuse, "last_avail_idx": avail, "shadow_avail_idx": avail, "used_idx": used})
}

fn sample(n: u32, t_ms: u64, queue: Option<serde_json::Value>, threads: serde_json::Value) -> serde_json::Value {
    let virtio = match queue {
        Some(q) => json!([{"path": VSCSI, "name": "virtio-scsi", "queues": [
            {"index": 0, "inuse": 0, "last_avail_idx": 0, "shadow_avail_idx": 0, "used_idx": 0},
            {"index": 1, "inuse": 0, "last_avail_idx": 0, "shadow_avail_idx": 0, "used_idx": 0}, q]}]),
        None => json!([]),
    };
    json!({"n": n, "t_ms": t_ms, "virtio": virtio, "threads": threads, "rings": [], "sockets": [], "agent": null})
}

/// A running VM with one disk; `idle` seconds since its last completion (both samples),
/// no completion in the window.
fn vm(
    ctl: &str,
    file: &str,
    idle_s: u64,
    q1: Option<serde_json::Value>,
    q2: Option<serde_json::Value>,
    threads: serde_json::Value,
) -> Mem {
    let idle = idle_s * 1_000_000_000;
    running(Mem::default())
        .put("qmp/query-blockstats.1.json", bs(5, 4096, Some(idle)))
        .put("qmp/query-blockstats.2.json", bs(5, 4096, Some(idle + 2_000_000_000)))
        .put("qmp/query-block.json", json!({"return": [{"device": "drive-scsi0", "qdev": "scsi0", "inserted": {"file": file, "image": {"filename": file}}}]}))
        .put("qmp/x-query-virtio.json", json!({"return": if ctl == "lsi" { json!([]) } else { json!([{"name": "virtio-scsi", "path": VSCSI}]) }}))
        .text("proc/cmdline", &cmdline(ctl))
        .put("inflight/sample.1.json", sample(1, 0, q1, threads.clone()))
        .put("inflight/sample.2.json", sample(2, 2000, q2, threads))
}

fn inflight_steps() -> Vec<StepRecord> {
    vec![
        rec("qmp-connect", "qmp", StepStatus::Ok, None, &[]),
        rec("qmp-status", "qmp", StepStatus::Ok, None, &["qmp/query-status.json"]),
        rec("inflight", "inflight", StepStatus::Ok, None, &["inflight/sample.1.json", "inflight/sample.2.json"]),
    ]
}

const IMG: &str = "/var/lib/vz/images/102/vm-102-disk-0.raw";

#[test]
fn idle_virtio_disk_is_healthy_however_long_idle() {
    let ev = vm("virtio", IMG, 3600, Some(vq(0, 263, 263)), Some(vq(0, 263, 263)), json!([]));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Healthy, "{:?}", d.facts);
    assert_eq!(d.disks[0].condition, DiskCondition::Idle);
    assert!(d.facts.iter().any(|f| f.contains("nothing in flight")), "{:?}", d.facts);
    assert!(d.automatic_restart(true).is_err());
}

#[test]
fn stuck_virtio_request_is_proven_frozen_inside_qemu() {
    let ev = vm("virtio", IMG, 41, Some(vq(1, 2, 1)), Some(vq(1, 2, 1)), json!([]));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(
        (d.verdict, d.strength, d.layer),
        (Verdict::BlockPathFrozen, Some(Strength::Proven), Some(Layer::InsideQemu)),
        "{:?}",
        d.facts
    );
    assert!(
        d.facts.iter().any(|f| f.contains("1 request(s) in flight") && f.contains("used-idx unchanged")),
        "{:?}",
        d.facts
    );
    assert!(d.facts.iter().any(|f| f.contains("no request completed for 43.0 s")), "{:?}", d.facts);
    assert_eq!(d.exit_code(), 11);
    assert_eq!(d.automatic_restart(false), Ok(()));
    // Below the threshold the same picture is not yet a wedge.
    let young = vm("virtio", IMG, 5, Some(vq(1, 2, 1)), Some(vq(1, 2, 1)), json!([]));
    let d = diagnose(&young, &inflight_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Inconclusive, "{:?}", d.facts);
    // Completions on the queue are progress, whatever blockstats says.
    let moving = vm("virtio", IMG, 41, Some(vq(1, 2, 1)), Some(vq(1, 3, 2)), json!([]));
    assert_eq!(diagnose(&moving, &inflight_steps(), &Rules::default()).verdict, Verdict::Healthy);
}

#[test]
fn worker_blocked_on_the_image_is_below_qemu_and_not_restarted() {
    let worker = json!([{"tid": 4711, "name": "worker", "state": "S", "wchan": "request_wait_answer", "syscall": 18,
        "syscall_name": "pwrite64", "fd": 17, "file": IMG, "run_ns": 123456}]);
    let ev = vm("virtio", IMG, 41, Some(vq(1, 2, 1)), Some(vq(1, 2, 1)), worker.clone());
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!((d.verdict, d.layer), (Verdict::BlockPathFrozen, Some(Layer::BelowQemu)), "{:?}", d.facts);
    assert!(
        d.facts
            .iter()
            .any(|f| f.contains("thread 4711 (worker) in pwrite64 on fd 17") && f.contains("request_wait_answer")),
        "{:?}",
        d.facts
    );
    assert!(matches!(d.restart_advice(), RestartAdvice::WontHelp(_)));
    assert!(d.automatic_restart(true).is_err());
    // On LSI the worker is the in-flight view: proven, not merely suspected.
    let lsi = vm("lsi", IMG, 41, None, None, worker);
    let d = diagnose(&lsi, &inflight_steps(), &Rules::default());
    assert_eq!(
        (d.verdict, d.strength, d.layer),
        (Verdict::BlockPathFrozen, Some(Strength::Proven), Some(Layer::BelowQemu)),
        "{:?}",
        d.facts
    );
}

#[test]
fn network_backend_is_named() {
    let ev = vm("virtio", "nbd://127.0.0.1:10809/exp", 41, Some(vq(2, 9, 7)), Some(vq(2, 9, 7)), json!([]));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!((d.verdict, d.layer), (Verdict::BlockPathFrozen, Some(Layer::NetworkBackend)), "{:?}", d.facts);
    assert!(d.facts.iter().any(|f| f.contains("nbd driver")), "{:?}", d.facts);
}

#[test]
fn lsi_without_a_view_is_at_most_suspected() {
    let ev = vm("lsi", IMG, 3600, None, None, json!([]));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!((d.verdict, d.strength), (Verdict::BlockPathFrozen, Some(Strength::Suspected)), "{:?}", d.facts);
    assert!(d.facts.iter().any(|f| f.contains("LSI 53C895A controller exposes no in-flight counter")), "{:?}", d.facts);
    assert_eq!(d.exit_code(), SUSPECTED_FROZEN_EXIT);
    assert!(d.automatic_restart(false).is_err());
    assert_eq!(d.automatic_restart(true), Ok(()));
    let recent = vm("lsi", IMG, 3, None, None, json!([]));
    assert_eq!(diagnose(&recent, &inflight_steps(), &Rules::default()).verdict, Verdict::Inconclusive);
}

#[test]
fn a_busy_vm_with_an_unused_disk_is_healthy() {
    // scsi0 idle for an hour on virtio with nothing in flight; scsi1 (own controller) busy.
    let mut ev = vm("virtio", IMG, 3600, Some(vq(0, 5, 5)), Some(vq(0, 5, 5)), json!([]));
    let two = |wr: u64| {
        json!({"return": [
        {"device": "drive-scsi0", "stats": {"wr_operations": 5, "idle_time_ns": 3_600_000_000_000u64}},
        {"device": "drive-scsi1", "stats": {"wr_operations": wr, "idle_time_ns": 1000}}]})
    };
    ev = ev.put("qmp/query-blockstats.1.json", two(100)).put("qmp/query-blockstats.2.json", two(180));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Healthy, "{:?}", d.facts);
}

// The guest agent on a two-disk LSI VM: guest disks mapped to drives by `guest-get-disks`.

/// Two LSI disks (scsi-id 0 and 1 on `scsihw0`, `addr` as qemu-server gives it when
/// `addr` is set), both idle in QEMU for a minute; `agent(n)` is sample n's agent view.
fn lsi_pair(ctl_addr: &str, agent: impl Fn(u32) -> serde_json::Value) -> Mem {
    let idle = 60_000_000_000u64;
    let stats = |extra: u64| {
        json!({"return": [
            {"device": "drive-scsi0", "stats": {"wr_operations": 5, "idle_time_ns": idle + extra}},
            {"device": "drive-scsi1", "stats": {"wr_operations": 9, "idle_time_ns": idle + extra}}]})
    };
    let block = |n: u32| {
        json!({"device": format!("drive-scsi{n}"), "qdev": format!("scsi{n}"),
        "inserted": {"file": format!("/var/lib/vz/images/102/vm-102-disk-{n}.raw")}})
    };
    let cmd = [
        "qemu",
        "-device",
        &format!("lsi,id=scsihw0{ctl_addr}"),
        "-device",
        "scsi-hd,bus=scsihw0.0,scsi-id=0,drive=drive-scsi0,id=scsi0",
        "-device",
        "scsi-hd,bus=scsihw0.0,scsi-id=1,drive=drive-scsi1,id=scsi1",
    ]
    .join("\0");
    let s = |n: u32, t_ms: u64| {
        let mut v = sample(n, t_ms, None, json!([]));
        v["agent"] = agent(n);
        v
    };
    running(Mem::default())
        .put("qmp/query-blockstats.1.json", stats(0))
        .put("qmp/query-blockstats.2.json", stats(2_000_000_000))
        .put("qmp/query-block.json", json!({"return": [block(0), block(1)]}))
        .put("qmp/x-query-virtio.json", json!({"return": []}))
        .text("proc/cmdline", &cmd)
        .put("inflight/sample.1.json", s(1, 0))
        .put("inflight/sample.2.json", s(2, 2000))
}

/// As qemu-ga 7.2 answers `guest-get-disks` on that VM (sym53c8xx: the target is `unit`).
fn lsi_addresses() -> serde_json::Value {
    let a = |name: &str, unit: u32| json!({"name": name, "bus_type": "scsi", "bus": 0, "target": 0, "unit": unit, "pci": [0, 0, 5, 0]});
    json!([a("sda", 0), a("sdb", 1)])
}

fn agent(n: u32, sda: (u64, u64), sdb: (u64, u64)) -> serde_json::Value {
    let mut v = json!({"disks": [
        {"name": "sda", "in_progress": sda.0, "completed": sda.1},
        {"name": "sdb", "in_progress": sdb.0, "completed": sdb.1}]});
    if n == 1 {
        v["addresses"] = lsi_addresses();
    }
    v
}

fn conditions(d: &Diagnosis) -> Vec<(String, DiskCondition, Strength)> {
    d.disks.iter().map(|s| (s.device.clone(), s.condition, s.strength)).collect()
}

#[test]
fn agent_decides_per_drive_on_a_two_disk_lsi_vm() {
    // sda holds one write that never completes; sdb has nothing in flight.
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| agent(n, (1, 40), (0, 7)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(
        conditions(&d),
        vec![
            ("drive-scsi0".into(), DiskCondition::Stuck, Strength::Proven),
            ("drive-scsi1".into(), DiskCondition::Idle, Strength::Proven)
        ],
        "{:?}",
        d.facts
    );
    assert_eq!(
        (d.verdict, d.strength, d.layer),
        (Verdict::BlockPathFrozen, Some(Strength::Proven), Some(Layer::InsideQemu)),
        "{:?}",
        d.facts
    );
    let ev0 = &d.disks[0].evidence;
    assert!(
        ev0.iter()
            .any(|f| f == "guest agent: I/O in progress without completing across the window on sda (1 in progress)"),
        "{ev0:?}"
    );
    assert!(
        ev0.iter()
            .any(|f| f == "guest agent: sda is drive-scsi0 (by SCSI unit 0 on the controller at PCI 0000:00:05.0)"),
        "{ev0:?}"
    );
    assert!(
        d.disks[1].evidence.iter().any(|f| f.contains("sdb: no I/O in progress at either end")),
        "{:?}",
        d.disks[1]
    );

    // The stuck disk is the other one: the verdict follows the drive, not the guest name.
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| agent(n, (0, 40), (2, 7)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(
        conditions(&d),
        vec![
            ("drive-scsi0".into(), DiskCondition::Idle, Strength::Proven),
            ("drive-scsi1".into(), DiskCondition::Stuck, Strength::Proven)
        ]
    );

    // sdb completes I/O while sda is stuck: sdb's drive is moving; in progress at one end
    // only is a request that came or went, proven but not stuck.
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| agent(n, (1, 40), (if n == 1 { 1 } else { 0 }, 6 + n as u64)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(d.disks[1].condition, DiskCondition::Moving, "{:?}", d.disks[1]);
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| agent(n, (1, 40), (n as u64 - 1, 7)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!((d.disks[1].condition, d.disks[1].strength), (DiskCondition::Quiet, Strength::Proven));
    assert_eq!(d.disks[0].condition, DiskCondition::Stuck);
}

#[test]
fn an_unmapped_guest_disk_decides_nothing() {
    let suspected = |d: &Diagnosis| {
        conditions(d).iter().all(|(_, c, s)| (*c, *s) == (DiskCondition::Suspected, Strength::Suspected))
    };
    // The controller's slot is not on the command line: the guest's address could be any
    // controller's, so neither drive is decided by the agent, and the stuck guest disk
    // does not make either drive stuck.
    let ev = lsi_pair("", |n| agent(n, (1, 40), (0, 7)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert!(suspected(&d), "{:?}", conditions(&d));
    assert_eq!((d.verdict, d.strength), (Verdict::BlockPathFrozen, Some(Strength::Suspected)));
    // An agent without `guest-get-disks` (or one that blocks it): the same.
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| {
        let mut v = agent(n, (1, 40), (0, 7));
        v.as_object_mut().unwrap().remove("addresses");
        v["addresses_error"] = json!("guest agent error for `guest-get-disks`: command is disabled");
        v
    });
    assert!(suspected(&diagnose(&ev, &inflight_steps(), &Rules::default())));
    // Two guest disks at one address: neither is known to be the drive.
    let ev = lsi_pair(",bus=pci.0,addr=0x5", |n| {
        let mut v = agent(n, (1, 40), (0, 7));
        if n == 1 {
            v["addresses"][1]["unit"] = json!(0);
        }
        v
    });
    assert!(suspected(&diagnose(&ev, &inflight_steps(), &Rules::default())));
    // Every guest disk idle at both ends still proves every drive idle, mapped or not.
    let ev = lsi_pair("", |n| agent(n, (0, 40), (0, 7)));
    let d = diagnose(&ev, &inflight_steps(), &Rules::default());
    assert_eq!(d.verdict, Verdict::Healthy, "{:?}", d.facts);
    assert!(conditions(&d).iter().all(|(_, c, s)| (*c, *s) == (DiskCondition::Idle, Strength::Proven)));
}
