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
    }
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
    assert_eq!(diagnose(&long, &ok_steps(), &Rules::default()).verdict, Verdict::BlockPathFrozen);
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
    let steps = vec![rec("qmp-connect", "qmp", StepStatus::Failed, Some("no QMP greeting (no-greeting)"), &[])];
    let d = diagnose(&held, &steps, &Rules::default());
    assert_eq!(d.verdict, Verdict::QmpUnreachable);
    assert!(d.facts.iter().any(|f| f.contains("another client most likely holds the socket")), "{:?}", d.facts);
    let steps = vec![rec("qmp-connect", "qmp", StepStatus::Failed, Some("x (capabilities-unanswered)"), &[])];
    assert_eq!(diagnose(&held, &steps, &Rules::default()).verdict, Verdict::MainLoopWedged);
    let mut steps = ok_steps();
    steps.push(rec("qmp-block", "qmp", StepStatus::Timeout, Some("did not finish"), &[]));
    assert_eq!(diagnose(&running(Mem::default()), &steps, &Rules::default()).verdict, Verdict::MainLoopWedged);
}

#[test]
fn stopped_process_wins() {
    let ev = running(Mem::default()).text("proc/status", "State:\tT (stopped)\nPid:\t100\n");
    let steps = vec![rec("qmp-connect", "qmp", StepStatus::Failed, Some("(no-greeting)"), &[])];
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
