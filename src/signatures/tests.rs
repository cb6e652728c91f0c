use super::*;
use crate::archive::MemEvidence as Mem;

#[test]
fn every_built_in_signature_loads() {
    let set = load(Path::new("/nonexistent"));
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(set.signatures.len(), BUILT_IN.len());
    for s in &set.signatures {
        assert!(BUILT_IN.iter().any(|(n, _)| *n == s.id), "file name = id: {}", s.id);
        if s.kind == "bug" {
            assert!(s.fixed_in().contains("pve-qemu-kvm"), "{}: {}", s.id, s.fixed_in());
        }
    }
}

#[test]
fn errors_name_file_line_and_key() {
    let text = "schema = 1\nid = \"x\"\nkind = \"bug\"\ntitle = \"t\"\nadvice = \"a\"\nlinks = [\"http://insecure\"]\n\n[versions]\nqemu_affected = \"10.0\"\n\n[match]\nverdict = [\"frozen\"]\n[[match.stack]]\nframes = [\"a b\"]\n";
    let e = parse(text, "x.toml").unwrap_err().to_string();
    for want in ["x.toml:6: links", "x.toml:9: qemu_affected", "x.toml:12: verdict", "x.toml:14: frames"] {
        assert!(e.contains(want), "{want} in:\n{e}");
    }
    let e = parse("schema = 1\nid = \"x\"\nbogus = 1\n", "y.toml").unwrap_err().to_string();
    assert!(e.starts_with("y.toml:3:") && e.contains("bogus"), "{e}");
}

#[test]
fn operator_file_shadows_built_in_and_broken_one_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = BUILT_IN.iter().find(|(n, _)| n.starts_with("incident")).unwrap();
    std::fs::write(dir.path().join("mine.toml"), text.replace("the 2026-06-11 risk stack", "our stack")).unwrap();
    std::fs::write(dir.path().join("broken.toml"), "schema = 2\n").unwrap();
    let set = load(dir.path());
    let s = set.signatures.iter().find(|s| s.id == "incident-2026-06-11-risk-stack").unwrap();
    assert!(s.title.starts_with("our stack") && s.source.ends_with("mine.toml"), "{s:?}");
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    assert!(set.errors[0].contains("broken.toml"));
}

fn threads_json(frames: &[&str]) -> String {
    let fr: Vec<serde_json::Value> = frames.iter().map(|f| serde_json::json!({"symbol": f, "pc": 1})).collect();
    serde_json::json!({"threads": [
        {"tid": 10, "name": "qemu-system-x86", "frames": [{"symbol": "ppoll"}, {"symbol": "main"}]},
        {"tid": 11, "name": "IO iothread2", "frames": fr},
    ]})
    .to_string()
}

#[test]
fn tmf_deadlock_matches_by_frames_config_and_version() {
    let set = load(Path::new("/nonexistent"));
    let frames = [
        "__lll_lock_wait",
        "qemu_mutex_lock_impl",
        "scsi_req_cancel_async",
        "virtio_scsi_do_tmf_aio_context",
        "aio_bh_call",
    ];
    let ev = Mem::default()
        .with("stacks/threads.json", &threads_json(&frames))
        .with("config/102.conf", "scsihw: virtio-scsi-single\nscsi0: local:vm-102-disk-0,iothread=1\n")
        .with(
            "qmp/query-version.json",
            r#"{"return":{"qemu":{"major":10,"minor":0,"micro":2},"package":"pve-qemu-kvm_10.0.2-4"}}"#,
        );
    let m = matches(&ev, "block-path-frozen", None, &set);
    let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["pve-6810-virtio-scsi-tmf-deadlock"], "{m:?}");
    assert!(m[0].evidence.iter().any(|e| e.contains("thread 11") && e.contains("#1 qemu_mutex_lock_impl")), "{m:?}");
    assert_eq!(m[0].fixed_in, "QEMU 10.2.0, pve-qemu-kvm 10.1.2-1");
    // The fixed build does not match, nor does another verdict, nor the wrong order.
    let fixed = ev.clone().with(
        "qmp/query-version.json",
        r#"{"return":{"qemu":{"major":10,"minor":1,"micro":2},"package":"pve-qemu-kvm_10.1.2-1"}}"#,
    );
    assert!(matches(&fixed, "block-path-frozen", None, &set).is_empty());
    assert!(matches(&ev, "healthy", None, &set).is_empty());
    let reversed: Vec<&str> = frames.iter().rev().copied().collect();
    let rev = ev.clone().with("stacks/threads.json", &threads_json(&reversed));
    assert!(matches(&rev, "block-path-frozen", None, &set).is_empty());
}

#[test]
fn risk_stack_needs_only_the_config_and_gdb_text_stacks_work() {
    let set = load(Path::new("/nonexistent"));
    let ev = Mem::default().with("config/102.conf", "scsihw: lsi\nscsi0: local:vm-102-disk-0,mbps_wr=60\n");
    let m = matches(&ev, "healthy", None, &set);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].kind, "risk");
    assert!(m[0].evidence[0].contains("QEMU throttle on scsi0"), "{m:?}");
    // gdb's text: the IDE drain signature on a SATA disk with discard.
    let gdb = "Thread 1 (Thread 0x7f (LWP 4242) \"kvm\"):\n#0  0x00007f in ppoll () from /lib/libc.so.6\n#1  0x0000 in aio_poll (ctx=0x1) at ../util/aio-posix.c:660\n#2  bdrv_do_drained_begin (bs=0x2) at ../block/io.c:400\n";
    let ev = Mem::default()
        .with("stacks/gdb.txt", gdb)
        .with("config/102.conf", "scsihw: virtio-scsi-single\nsata0: local:vm-102-disk-0,discard=on\n");
    let m = matches(&ev, "main-loop-wedged", None, &set);
    assert_eq!(m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["qemu-ide-trim-drain-deadlock"], "{m:?}");
    assert!(m[0].unverified.iter().any(|u| u.contains("QEMU version")), "{m:?}");
}
