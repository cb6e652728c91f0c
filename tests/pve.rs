//! Proxmox evidence and known-bug signatures against real lab QEMUs: the QMP steps run
//! against the real QEMU 7.2 (which has query-stats but none of Proxmox's commands),
//! `pveversion` and `ha-manager` are the stand-ins of tests/support on PATH, and the
//! log dir is laid out as a PVE node's /var/log.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run_bounded, Lab, LabOptions};
use serde_json::{json, Value};
use wedge_autopsy::archive::{self, ArchiveReader, Evidence, MemEvidence};
use wedge_autopsy::signatures;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_UPID: &str = "UPID:pve1:00001A2B:0012D687:66A1B2C3:qmstop:102:root@pam:";

/// `<root>/log` as a PVE node's /var/log: a vzdump log with a secret in it, the active
/// task list with this VM's running stop task, another VM's task, and the stop's log.
fn log_dir(root: &Path) -> PathBuf {
    let log = root.join("log");
    std::fs::create_dir_all(log.join("vzdump")).unwrap();
    let mut vz = String::new();
    for i in 0..8000 {
        vz.push_str(&format!(
            "2026-06-11 15:{:02}:{:02} INFO: status: {}% (chunk {i})\n",
            i / 60 % 60,
            i % 60,
            i % 100
        ));
    }
    vz.push_str("2026-06-11 15:20:00 INFO: creating Proxmox Backup Server archive password=hunter2\n");
    vz.push_str("2026-06-11 15:20:01 INFO: `backup stalled` | no progress for 600 s\n");
    std::fs::write(log.join("vzdump/qemu-102.log"), vz).unwrap();
    let tasks = log.join("pve/tasks");
    std::fs::create_dir_all(tasks.join("3")).unwrap();
    std::fs::write(
        tasks.join("active"),
        format!("{STOP_UPID}\nUPID:pve1:00001A2C:0012D687:66A1B2C4:qmstart:103:root@pam: 66A1B2D0 OK\n"),
    )
    .unwrap();
    std::fs::write(tasks.join("3").join(STOP_UPID), "trying to acquire lock...\n OK\nstopping VM 102\n").unwrap();
    log
}

fn archive_of(out: &std::process::Output) -> (Value, ArchiveReader) {
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}); stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(json["sealed"], true, "{json}");
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    archive::verify(&path).expect("archive verifies");
    (json.clone(), ArchiveReader::open(&path).unwrap())
}

fn step<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["steps"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no step {id} in {json}"))
}

#[test]
fn proxmox_evidence_is_captured_and_unavailable_parts_do_not_fail_the_run() {
    let lab = Lab::start(LabOptions::default());
    std::fs::create_dir_all(lab.pve_dir().join("ha")).unwrap();
    std::fs::write(lab.pve_dir().join("ha/resources.cfg"), "vm: 102\n\tstate started\n").unwrap();
    let log = log_dir(lab.root());
    // A backup lock left behind and a staged controller change, as `qm set` writes them.
    let conf = lab.pve_dir().join("qemu-server/102.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    assert!(!text.contains('['), "the lab config has no sections yet: {text}");
    text.push_str("lock: backup\n[PENDING]\nscsihw: virtio-scsi-single\n");
    std::fs::write(&conf, text).unwrap();
    let path = format!("{}:{}", common::repo_root().join("tests/support").display(), std::env::var("PATH").unwrap());
    let mut cmd = lab.tool_args(&["102", "--json", "--sample-interval", "0", "--log-dir", log.to_str().unwrap()]);
    cmd.env("PATH", &path).env("WEDGE_LAB_ROOT", lab.root()).env("HA_STATE", "request_stop");
    let out = run_bounded(&mut cmd, RUN_TIMEOUT);
    let (json, ar) = archive_of(&out);
    assert_eq!(out.status.code(), Some(0), "optional Proxmox steps never fail the run: {json}");

    // The real QEMU 7.2 has none of Proxmox's QMP commands: its answer is what is kept.
    for (id, file) in
        [("qmp-proxmox-support", "qmp/query-proxmox-support.json"), ("qmp-backup", "qmp/query-backup.json")]
    {
        let s = step(&json, id);
        assert_eq!(s["status"], "skipped", "{s}");
        assert!(s["error"].as_str().unwrap().contains("unavailable"), "{s}");
        let reply = ar.read_json(file).unwrap_or_else(|| panic!("{file} missing: {:?}", ar.list()));
        assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");
    }
    // query-stats exists since QEMU 7.2: two samples for the VM and its vCPUs.
    for f in [
        "qmp/query-stats-vm.1.json",
        "qmp/query-stats-vm.2.json",
        "qmp/query-stats-vcpu.1.json",
        "qmp/query-stats-vcpu.2.json",
    ] {
        let v = ar.read_json(f).unwrap_or_else(|| panic!("{f} missing: {:?}", ar.list()));
        assert!(v["return"].is_array(), "{f}: {v}");
    }
    assert_eq!(step(&json, "qmp-stats-vcpu")["status"], "ok");
    if lab.accel() == "kvm" {
        let vcpu = ar.read_json("qmp/query-stats-vcpu.1.json").unwrap();
        assert!(!vcpu["return"].as_array().unwrap().is_empty(), "KVM provides vCPU stats: {vcpu}");
    }

    // pveversion and ha-manager (the VM is in resources.cfg) from PATH.
    assert!(ar.read_string("commands/pveversion.txt").unwrap().contains("pve-qemu-kvm: 9.2.0-5"));
    assert!(ar.read_string("commands/ha-manager.txt").unwrap().contains("service vm:102"));
    // The vzdump log: tail only, redacted.
    let vz = ar.read_string("logs/vzdump.log").unwrap();
    assert!(vz.len() <= 256 << 10, "bounded: {} bytes", vz.len());
    assert!(vz.contains("backup stalled") && !vz.contains("(chunk 0)"), "the tail only: {}", &vz[..200]);
    assert!(!vz.contains("hunter2"), "redacted");
    // The VM's tasks only, with the running stop task's log.
    let tasks = ar.read_json("pve/tasks.json").unwrap();
    let t = tasks["tasks"].as_array().unwrap();
    assert_eq!(t.len(), 1, "{tasks}");
    assert_eq!((t[0]["type"].as_str(), t[0]["status"].as_str()), (Some("qmstop"), Some("running")));
    assert!(ar.read_string(t[0]["log"].as_str().unwrap()).unwrap().contains("stopping VM 102"));

    // The summary answers a Proxmox engineer: versions, tasks, HA, the coming stop, the risk stack.
    let md = ar.read_string("summary.md").unwrap();
    for want in [
        "## Proxmox VE",
        "**About to be stopped:** a qmstop task is running",
        "**About to be stopped:** HA has this VM in state request_stop",
        "- **QEMU:** 7.2.",
        "pve-qemu-kvm: 9.2.0-5",
        "**Proxmox QEMU:** no (CommandNotFound)",
        "unavailable: this QEMU has no query-backup (CommandNotFound)",
        "Risk stack: the 2026-06-11 risk stack",
        "fixed in: not a bug",
        "**Config lock:** backup: set by vzdump, but no running backup was seen",
        "pending (applies only at the next full stop→start): `scsihw: lsi → virtio-scsi-single`",
    ] {
        assert!(md.contains(want), "summary.md lacks {want:?}:\n{md}");
    }
    // Log text stays data: the backticks and the pipe of the last vzdump line never
    // open code or a table cell.
    let line = md.lines().find(|l| l.contains("backup stalled")).unwrap_or_else(|| panic!("{md}"));
    assert!(line.contains("'backup stalled'") && line.contains("\\|"), "{line}");

    // inspect recomputes the match from the sealed archive.
    let mut insp = common::tool();
    insp.args(["inspect", json["archive"].as_str().unwrap()]);
    let o = run_bounded(&mut insp, RUN_TIMEOUT);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Recomputed risk match: incident-2026-06-11-risk-stack"), "{text}");
}

#[test]
fn bug_signature_matches_real_stacks_only_with_the_bugs_frames() {
    // Two disks with iothreads and a QEMU throttle: the config of QEMU issue 3144.
    let lab = Lab::start(LabOptions {
        vmid: 106,
        name: "iothreads".into(),
        disks: 2,
        scsihw: "virtio-scsi-single".into(),
        iothread: true,
        ..LabOptions::default()
    });
    let out = run_bounded(&mut lab.tool_args(&["106", "--json", "--sample-interval", "0"]), RUN_TIMEOUT);
    let (_, ar) = archive_of(&out);
    let set = signatures::load(Path::new("/nonexistent"));
    let files = MemEvidence::copy_of(&ar);

    // The real, healthy QEMU's stacks match no bug, whatever the verdict.
    let real = signatures::matches(&files, "block-path-frozen", None, &set);
    assert!(real.iter().all(|m| m.kind != "bug"), "false positive on real stacks: {real:?}");

    // EDITED archive: the real iothread's real stack, with the frames of QEMU issue
    // 3144's backtrace (from its fix) pushed on top, as that thread would show them.
    let mut stacks: Value = serde_json::from_slice(&files.0["stacks/threads.json"]).unwrap();
    let thread = stacks["threads"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"].as_str().is_some_and(|n| n.contains("iothread")))
        .unwrap_or_else(|| panic!("no iothread among the real threads"));
    let real_frames = thread["frames"].as_array().unwrap().clone();
    assert!(!real_frames.is_empty(), "the real iothread was unwound: {thread}");
    let mut frames: Vec<Value> =
        ["__lll_lock_wait", "qemu_mutex_lock_impl", "throttle_group_co_io_limits_intercept", "blk_co_do_preadv_part"]
            .iter()
            .map(|s| json!({"symbol": s, "pc": 0}))
            .collect();
    frames.extend(real_frames);
    thread["frames"] = Value::Array(frames);
    let tid = thread["tid"].as_i64().unwrap();
    let edited = files.clone().with("stacks/threads.json", &stacks.to_string());

    let m = signatures::matches(&edited, "block-path-frozen", None, &set);
    let bug = m.iter().find(|m| m.id == "qemu-3144-throttle-group-iothreads").unwrap_or_else(|| panic!("{m:?}"));
    assert!(
        bug.evidence
            .iter()
            .any(|e| e.contains(&format!("thread {tid}")) && e.contains("#2 throttle_group_co_io_limits_intercept")),
        "{bug:?}"
    );
    assert!(
        bug.evidence.iter().any(|e| e.contains("QEMU 7.2.") && e.contains("affected range")),
        "the real QEMU's version: {bug:?}"
    );
    assert!(bug.evidence.iter().any(|e| e.contains("2 disks with an iothread")), "{bug:?}");
    assert_eq!(bug.fixed_in, "QEMU 11.0.0, pve-qemu-kvm 10.2.1-1");
    assert!(bug.links.iter().any(|l| l.ends_with("/issues/3144")));
    // Not while QEMU is healthy: the bug is a wedge.
    assert!(signatures::matches(&edited, "healthy", None, &set).iter().all(|m| m.kind != "bug"));
}

#[test]
fn signatures_check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "schema = 1\nid = \"x\"\nkind = \"bug\"\ntitle = \"t\"\nadvice = \"a\"\nlinks = [\"https://x\"]\n[versions]\nqemu_fixed = \"soon\"\n[match]\n[[match.stack]]\nframes = [\"f\"]\n").unwrap();
    let good = common::repo_root().join("signatures/pve-6810-virtio-scsi-tmf-deadlock.toml");
    let mut c = common::tool();
    c.arg("signatures").arg("check").arg(&good).arg(&bad);
    let o = run_bounded(&mut c, RUN_TIMEOUT);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}:8: qemu_fixed", bad.display())), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (bug pve-6810-virtio-scsi-tmf-deadlock"));
    let mut l = common::tool();
    l.args(["signatures", "list"]);
    let o = run_bounded(&mut l, RUN_TIMEOUT);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().filter(|l| l.contains("built-in")).count(), signatures::BUILT_IN.len(), "{text}");
}
