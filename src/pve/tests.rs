use super::*;
use crate::archive::MemEvidence as Mem;

const STOP: &str = "UPID:pve1:00001A2B:0012D687:66A1B2C3:qmstop:102:root@pam:";

#[test]
fn upid_fields_and_log_path_follow_pve_tools() {
    let u = Upid::parse(STOP).unwrap();
    assert_eq!((u.node.as_str(), u.pid, u.kind.as_str(), u.id.as_str()), ("pve1", 0x1A2B, "qmstop", "102"));
    assert_eq!(u.user, "root@pam");
    assert_eq!(u.starttime, 0x66A1B2C3);
    // subdir = the last hex digit of the start time, as PVE::Tools::upid_decode computes it
    assert_eq!(u.log_path(Path::new("/var/log/pve/tasks")).unwrap(), Path::new("/var/log/pve/tasks/3").join(STOP));
    assert_eq!(u.file_name(), "UPID_pve1_00001A2B_0012D687_66A1B2C3_qmstop_102_root_pam_");
    for bad in [
        "UPID:pve1:1A2B:0012D687:66A1B2C3:qmstop:102:root@pam:",
        "UPID:pve1:00001A2B:0012D687:66A1B2C3:qmstop:102:root@pam",
        "UPID:-x:00001A2B:0012D687:66A1B2C3:qmstop:102:root@pam:",
        "UPID:pve1:00001A2B:0012D687:66A1B2C3:qm stop:102:root@pam:",
        "UPID:pve1:00001A2B:0012D687:66A1B2C3:qmstop:102:root@pam:extra:",
        "not a upid",
    ] {
        assert!(Upid::parse(bad).is_none(), "{bad}");
    }
    let sneaky = Upid::parse("UPID:pve1:00001A2B:0012D687:66A1B2C3:qmstop:../../etc:root@pam:").unwrap();
    assert!(sneaky.log_path(Path::new("/t")).is_none(), "a / in a field never becomes a path");
}

#[test]
fn log_redaction_hides_secret_values_only() {
    let t =
        redact_log("INFO: starting --password hunter2 now\nrepository=pbs password=hunter3 token: abc\nplain: text");
    assert!(!t.contains("hunter2") && !t.contains("hunter3") && !t.contains("abc"), "{t}");
    assert!(t.contains("repository=pbs") && t.contains("plain: text") && t.contains("INFO: starting"), "{t}");
}

#[test]
fn tail_starts_at_a_line_and_says_it_cut() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    std::fs::write(&p, "first line\nsecond line\nthird\n").unwrap();
    let (b, cut) = tail(&p, 12).unwrap();
    assert!(cut);
    assert_eq!(String::from_utf8(b).unwrap(), "third\n");
    let (b, cut) = tail(&p, 1000).unwrap();
    assert!(!cut);
    assert_eq!(b.len(), 29);
}

#[test]
fn tasks_of_the_vm_and_their_logs_are_captured_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let tasks = log_dir.join("pve/tasks");
    std::fs::create_dir_all(tasks.join("3")).unwrap();
    let other = "UPID:pve1:00001A2C:0012D687:66A1B2C4:qmstart:103:root@pam:";
    let done = "UPID:pve1:00001A2D:0012D687:66A1B2C5:vzdump:102:root@pam: 66A1B2D0 OK";
    std::fs::write(tasks.join("active"), format!("{STOP}\n{other}\n{done}\ngarbage line\n")).unwrap();
    std::fs::write(tasks.join("3").join(STOP), format!("{}\nstopping VM 102\npassword=hunter2\n", "x".repeat(300)))
        .unwrap();
    let out = dir.path().join("out");
    let sink = StepSink::new(&out);
    let r = capture_tasks(&log_dir, "102", "pve/tasks.json", 64, &sink);
    assert!(matches!(r, StepOutcome::Ok), "{r:?}");
    let (files, notes) = sink.close();
    let v: Value = serde_json::from_slice(&std::fs::read(out.join("pve/tasks.json")).unwrap()).unwrap();
    let t = v["tasks"].as_array().unwrap();
    assert_eq!(t.len(), 2, "{v}");
    assert!(t.iter().all(|e| e["id"] == "102"));
    let stop = t.iter().find(|e| e["type"] == "qmstop").unwrap();
    assert_eq!(stop["status"], "running");
    assert_eq!(t.iter().find(|e| e["type"] == "vzdump").unwrap()["status"], "OK");
    let log = std::fs::read_to_string(out.join(stop["log"].as_str().unwrap())).unwrap();
    assert!(log.contains("stopping VM 102") && !log.contains("hunter2") && !log.contains("xxxx"), "{log}");
    assert!(notes.iter().any(|n| n.contains("last 64 bytes")), "{notes:?}");
    assert!(files.contains(&"pve/tasks/active.txt".to_string()));
    // The findings turn the running stop task into a warning with what to do.
    let ev = Mem::default()
        .with("pve/tasks.json", &v.to_string())
        .with("config/102.conf", "scsihw: lsi\n[PENDING]\nscsihw: virtio-scsi-single\n");
    let f = findings(&ev);
    assert!(f.stop_imminent.iter().any(|w| w.contains("qmstop") && w.contains("qemu-wedge-full")), "{f:?}");
    assert_eq!(f.pending, vec!["scsihw: lsi → virtio-scsi-single".to_string()]);
}

#[test]
fn no_task_list_is_unavailable_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let sink = StepSink::new(dir.path());
    assert!(matches!(capture_tasks(dir.path(), "102", "pve/tasks.json", 64, &sink), StepOutcome::Skipped(_)));
}

#[test]
fn versions_backup_and_ha_from_evidence() {
    let ev = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with(
            "qmp/query-version.json",
            r#"{"return":{"qemu":{"major":10,"minor":1,"micro":2},"package":"pve-qemu-kvm_10.1.2-1"}}"#,
        )
        .with("qmp/query-backup.json", r#"{"return":{"status":"active","total":100,"transferred":40}}"#)
        .with("qmp/query-proxmox-support.json", r#"{"error":{"class":"CommandNotFound","desc":"x"}}"#)
        .with("qmp/query-status.json", r#"{"return":{"status":"shutdown","running":false}}"#)
        .with(
            "commands/ha-manager.txt",
            "quorum OK\nservice vm:1020 (pve1, stopped)\nservice vm:102 (pve1, request_stop)\n",
        );
    let f = findings(&ev);
    assert_eq!(f.qemu_version.as_deref(), Some("10.1.2"));
    assert_eq!(f.pve_qemu_build.as_deref(), Some("10.1.2-1"));
    assert!(f.backup.as_deref().unwrap().contains("40 of 100"), "{f:?}");
    assert_eq!(f.proxmox_qemu.as_deref(), Some("no (CommandNotFound)"));
    assert_eq!(f.ha.as_deref(), Some("service vm:102 (pve1, request_stop)"));
    assert_eq!(f.stop_imminent.len(), 2, "HA and qmeventd: {:?}", f.stop_imminent);
    // A backup is attached: qmeventd waits for it before its quit.
    assert!(f.stop_imminent[1].contains("keeps QEMU alive until the backup ends"), "{:?}", f.stop_imminent);
    assert!(pve_build("Debian 1:7.2+dfsg-7+deb12u18+b3").is_none());
}

/// qmeventd: quit first (SIGTERM only if that fails), SIGKILL after its timeout; and each
/// HA state that ends this QEMU says how, including relocation and a node shutting down.
#[test]
fn imminent_stops_say_who_acts_and_how() {
    let shutdown = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with("qmp/query-status.json", r#"{"return":{"status":"shutdown","running":false}}"#);
    let f = findings(&shutdown);
    assert_eq!(f.stop_imminent.len(), 1, "{:?}", f.stop_imminent);
    assert!(
        f.stop_imminent[0].contains("sends QMP quit (SIGTERM only if it cannot) and SIGKILLs the process 60 s later")
    );
    for (state, says) in [
        ("relocate", "start the VM on another node"),
        ("freeze", "the node is shutting down"),
        ("migrate", "ends when the migration completes"),
        ("stopped", "will stop the running QEMU"),
    ] {
        let ev = Mem::default()
            .with("config/102.conf", "scsihw: lsi\n")
            .with("commands/ha-manager.txt", &format!("service vm:102 (pve1, {state})\n"));
        let f = findings(&ev);
        assert_eq!(f.stop_imminent.len(), 1, "{state}: {:?}", f.stop_imminent);
        assert!(
            f.stop_imminent[0].contains(says) && f.stop_imminent[0].contains("--state ignored"),
            "{state}: {:?}",
            f.stop_imminent
        );
    }
    let started = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with("commands/ha-manager.txt", "service vm:102 (pve1, started)\n");
    assert!(findings(&started).stop_imminent.is_empty());
}

/// `lock: backup` with no backup running is the leftover of a hung vzdump; with one
/// running it is that backup's; either way a restart through Proxmox is refused.
#[test]
fn config_lock_says_whose_it_is() {
    let leftover = Mem::default().with("config/102.conf", "lock: backup\nscsihw: lsi\n");
    let l = findings(&leftover).lock.unwrap();
    assert!(l.starts_with("backup: set by vzdump, but no running backup was seen"), "{l}");
    assert!(l.contains("refuse while it is set"), "{l}");
    let running = Mem::default()
        .with("config/102.conf", "lock: backup\nscsihw: lsi\n")
        .with("qmp/query-backup.json", r#"{"return":{"status":"active","total":100,"transferred":40}}"#);
    assert!(findings(&running).lock.unwrap().contains("is running"));
    // A snapshot section's lock is not the VM's.
    let snap = Mem::default().with("config/102.conf", "scsihw: lsi\n[snap1]\nlock: snapshot\n");
    assert!(findings(&snap).lock.is_none());
}

/// The two vCPU samples compared: exits, device exits and halted time over the window.
#[test]
fn vcpu_samples_are_compared() {
    let sample = |exits: u64, io: u64, halt_ns: u64| {
        format!(
            r#"{{"return":[{{"provider":"kvm","qom-path":"/machine/unattached/device[0]","stats":[{{"name":"exits","value":{exits}}},{{"name":"io_exits","value":{io}}},{{"name":"mmio_exits","value":0}},{{"name":"halt_wait_ns","value":{halt_ns}}},{{"name":"halt_wait_hist","value":[1,2]}}]}},{{"provider":"kvm","qom-path":"/machine/unattached/device[1]","stats":[{{"name":"exits","value":10}},{{"name":"io_exits","value":0}},{{"name":"mmio_exits","value":0}},{{"name":"halt_wait_ns","value":0}}]}}]}}"#
        )
    };
    let idle = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with("qmp/query-stats-vcpu.1.json", &sample(53, 0, 3_487_226_499))
        .with("qmp/query-stats-vcpu.2.json", &sample(60, 0, 4_489_586_652));
    let s = findings(&idle).stats.unwrap();
    assert!(
        s.ends_with("between the two samples, 2 vCPUs: 7 exits (0 port I/O and 0 MMIO handed to QEMU's device emulation; virtio kicks through ioeventfd are not counted), halted 1002 ms in total"),
        "{s}"
    );
    let busy = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with("qmp/query-stats-vcpu.1.json", &sample(53, 0, 0))
        .with("qmp/query-stats-vcpu.2.json", &sample(900, 400, 0));
    assert!(findings(&busy).stats.unwrap().contains("847 exits (400 port I/O and 0 MMIO handed to QEMU's"));
    // Without the per-kind counters nothing is claimed about devices.
    let bare = |exits: u64| format!(r#"{{"return":[{{"stats":[{{"name":"exits","value":{exits}}}]}}]}}"#);
    let unknown = Mem::default()
        .with("config/102.conf", "scsihw: lsi\n")
        .with("qmp/query-stats-vcpu.1.json", &bare(1))
        .with("qmp/query-stats-vcpu.2.json", &bare(5));
    assert!(findings(&unknown).stats.unwrap().ends_with("between the two samples, 1 vCPU: 4 exits"));
}
