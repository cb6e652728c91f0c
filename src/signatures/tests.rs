use super::*;
use crate::archive::{Evidence, MemEvidence as Mem};

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

fn lsi_ev(pve: &str, scsihw: &str) -> Mem {
    Mem::default().with("config/102.conf", &format!("scsihw: {scsihw}\nscsi0: local:vm-102-disk-0\n")).with(
        "qmp/query-version.json",
        &format!(r#"{{"return":{{"qemu":{{"major":7,"minor":2,"micro":0}},"package":"pve-qemu-kvm_{pve}"}}}}"#),
    )
}

#[test]
fn lsi_regression_is_a_verified_version_and_config_rule() {
    let set = load(Path::new("/nonexistent"));
    let id = "pve-lsi-reentrancy-regression";
    let ids = |ev: &Mem, verdict: &str| -> Vec<String> {
        matches(ev, verdict, None, &set).into_iter().filter(|m| m.id == id).map(|m| m.id).collect()
    };
    let m = matches(&lsi_ev("7.2.0-5", "lsi"), "block-path-frozen", None, &set);
    let lsi = m.iter().find(|m| m.id == id).unwrap_or_else(|| panic!("{m:?}"));
    assert_eq!(lsi.status, Status::Matched);
    assert!(lsi.evidence.iter().any(|e| e.contains("pve-qemu-kvm 7.2.0-5 (the running build)")), "{lsi:?}");
    assert!(lsi.evidence.iter().any(|e| e.contains("scsihw lsi")), "{lsi:?}");
    assert!(!lsi.advice.contains("Blocked re-entrant"), "{}", lsi.advice);
    assert_eq!(ids(&lsi_ev("7.2.0-6", "lsi53c810"), "main-loop-wedged"), [id]);
    assert!(ids(&lsi_ev("7.2.0-7", "lsi"), "block-path-frozen").is_empty());
    assert!(ids(&lsi_ev("7.2.0-4", "lsi"), "block-path-frozen").is_empty());
    assert!(ids(&lsi_ev("7.2.0-5", "virtio-scsi-single"), "block-path-frozen").is_empty());
    assert!(ids(&lsi_ev("7.2.0-5", "lsi"), "healthy").is_empty());
    // Unverifiable is not enough without a stack rule: no config, or no version at all.
    let no_config = Mem::default()
        .with("qmp/query-version.json", &lsi_ev("7.2.0-5", "lsi").read_string("qmp/query-version.json").unwrap());
    assert!(ids(&no_config, "block-path-frozen").is_empty());
    let no_version = Mem::default().with("config/102.conf", "scsihw: lsi\nscsi0: local:vm-102-disk-0\n");
    assert!(ids(&no_version, "block-path-frozen").is_empty());
    // The installed version counts only when the image on disk is the running one.
    let installed = no_version.clone().with("commands/pveversion.txt", "proxmox-ve: 7.3-1\npve-qemu-kvm: 7.2.0-5\n");
    assert!(ids(&installed, "block-path-frozen").is_empty());
    let same = installed.clone().with("host/info.json", r#"{"versions":{"qemu_on_disk":"same"}}"#);
    let m = matches(&same, "block-path-frozen", None, &set);
    let lsi = m.iter().find(|m| m.id == id).unwrap_or_else(|| panic!("{m:?}"));
    assert!(lsi.evidence.iter().any(|e| e.contains("7.2.0-5 (installed; the QEMU image on disk is the running one)")));
}

#[test]
fn bug_without_stack_rule_needs_version_and_config() {
    let text = "schema = 1\nid = \"x\"\nkind = \"bug\"\ntitle = \"t\"\nadvice = \"a\"\nlinks = [\"https://x\"]\n[match]\n[match.config]\nscsihw = [\"lsi\"]\n";
    let e = parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.contains("x.toml") && e.contains("stack") && e.contains("affected version range"), "{e}");
}

#[test]
fn alternative_ranges_in_files_and_their_errors() {
    let set = load(Path::new("/nonexistent"));
    let tmf = set.signatures.iter().find(|s| s.id == "pve-6810-virtio-scsi-tmf-deadlock").unwrap();
    let r = tmf.qemu_affected.as_ref().unwrap();
    assert!(r.contains("10.0.6") && !r.contains("10.0.7") && r.contains("10.1.1") && !r.contains("10.2.0"));
    let text = "schema = 1\nid = \"x\"\nkind = \"bug\"\ntitle = \"t\"\nadvice = \"a\"\nlinks = [\"https://x\"]\n[versions]\nqemu_affected = \">= 1.0 || < two\"\n[match]\n[[match.stack]]\nframes = [\"f\"]\n";
    let e = parse(text, "alt.toml").unwrap_err().to_string();
    assert!(e.contains("alt.toml:8: qemu_affected") && e.contains("\"two\" is not a version"), "{e}");
    // An upstream (non-Proxmox) 10.0.7 has the stable backport: no match.
    let frames = ["qemu_mutex_lock_impl", "scsi_req_cancel_async", "virtio_scsi_do_tmf_aio_context"];
    let ev = |micro: u32| {
        Mem::default()
            .with("stacks/threads.json", &threads_json(&frames))
            .with("config/102.conf", "scsihw: virtio-scsi-pci\nscsi0: local:vm-102-disk-0\n")
            .with(
                "qmp/query-version.json",
                &format!(r#"{{"return":{{"qemu":{{"major":10,"minor":0,"micro":{micro}}},"package":""}}}}"#),
            )
    };
    let ids = |m: Vec<SignatureMatch>| m.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(matches(&ev(6), "block-path-frozen", None, &set)), ["pve-6810-virtio-scsi-tmf-deadlock"]);
    assert!(ids(matches(&ev(7), "block-path-frozen", None, &set)).is_empty());
}

#[test]
fn ide_range_and_non_proxmox_qemu() {
    let set = load(Path::new("/nonexistent"));
    let ide = set.signatures.iter().find(|s| s.id == "qemu-ide-trim-drain-deadlock").unwrap();
    let r = ide.pve_qemu_affected.as_ref().unwrap();
    assert!(r.contains("7.0.0-1") && r.contains("7.2.0-5") && !r.contains("7.2.0-6") && !r.contains("6.2.0-11"));
    assert_eq!(ide.fixed_in(), "pve-qemu-kvm 7.2.0-6");
    // A range only for pve-qemu-kvm does not apply to a QEMU that is not Proxmox's.
    let lsi = lsi_ev("7.2.0-5", "lsi").with(
        "qmp/query-version.json",
        r#"{"return":{"qemu":{"major":7,"minor":2,"micro":0},"package":"Debian 1:7.2+dfsg-7"}}"#,
    );
    assert!(matches(&lsi, "block-path-frozen", None, &set).iter().all(|m| m.kind != "bug"));
    let unknown = Mem::default()
        .with("config/102.conf", "scsihw: lsi\nscsi0: local:vm-102-disk-0\n")
        .with("qmp/query-proxmox-support.json", r#"{"error":{"class":"CommandNotFound","desc":"x"}}"#);
    assert!(matches(&unknown, "block-path-frozen", None, &set).iter().all(|m| m.kind != "bug"));
    // Nor does the installed pve-qemu-kvm when the running QEMU is not Proxmox's.
    let installed = unknown.clone().with("commands/pveversion.txt", "pve-qemu-kvm: 7.2.0-5\n");
    assert!(matches(&installed, "block-path-frozen", None, &set).iter().all(|m| m.kind != "bug"));
}

#[test]
fn effective_iothread_follows_qemu_server() {
    // 3144 needs a throttle and an effective iothread: not on LSI where iothread=1 is ignored.
    let set = load(Path::new("/nonexistent"));
    let frames = ["__lll_lock_wait", "qemu_mutex_lock_impl", "throttle_group_co_io_limits_intercept"];
    let ev =
        |conf: &str| Mem::default().with("stacks/threads.json", &threads_json(&frames)).with("config/102.conf", conf);
    let has = |conf: &str| {
        matches(&ev(conf), "block-path-frozen", None, &set).iter().any(|m| m.id == "qemu-3144-throttle-group-iothreads")
    };
    assert!(has("scsihw: virtio-scsi-single\nscsi0: local:x,iothread=1,mbps_wr=10\n"));
    assert!(has("scsihw: lsi\nvirtio0: local:x,iothread=1,iops_rd=100\n"));
    assert!(has("scsihw: virtio-scsi-single\nscsi0: local:x,iothread=1,bps_wr=1048576\n"));
    assert!(!has("scsihw: virtio-scsi-single\nscsi0: local:x,iothread=1\n"));
    assert!(!has("scsihw: lsi\nscsi0: local:x,iothread=1,mbps_wr=10\nscsi1: local:y,iothread=1\n"));
}

fn native(frames: serde_json::Value) -> String {
    serde_json::json!({"threads": [{"tid": 11, "name": "IO iothread2", "frames": frames}],
        "modules": [{"name": "/usr/bin/qemu-system-x86_64", "start": 1, "end": 2, "build_id": "abcdef0123"}]})
    .to_string()
}

/// A Proxmox 10.1.0-1 VM on virtio-scsi-single: 6810's version and config, no stacks.
fn tmf_ev() -> Mem {
    Mem::default().with("config/102.conf", "scsihw: virtio-scsi-single\nscsi0: local:x\n").with(
        "qmp/query-version.json",
        r#"{"return":{"qemu":{"major":10,"minor":1,"micro":0},"package":"pve-qemu-kvm_10.1.0-1"}}"#,
    )
}

/// 6810's entry among the matches (any status).
fn tmf_of(ev: &Mem, set: &Set) -> SignatureMatch {
    let m = matches(ev, "block-path-frozen", None, set);
    m.iter().find(|m| m.id == "pve-6810-virtio-scsi-tmf-deadlock").cloned().unwrap_or_else(|| panic!("{m:?}"))
}

#[test]
fn inlined_frames_count_as_gdb_shows_them() {
    let set = load(Path::new("/nonexistent"));
    // scsi_req_cancel_async inlined into the BH entry: only the inlined list names it.
    let frames = serde_json::json!([
        {"symbol": "__lll_lock_wait", "pc": 1},
        {"symbol": "virtio_scsi_do_tmf_aio_context", "pc": 2, "module": "/usr/bin/qemu-system-x86_64",
         "inlined": [{"function": "qemu_mutex_lock_impl"}, {"function": "scsi_req_cancel_async"}]},
    ]);
    let ev = tmf_ev().with("stacks/threads.json", &native(frames));
    let tmf = tmf_of(&ev, &set);
    assert_eq!(tmf.status, Status::Matched);
    assert!(tmf.evidence.iter().any(|e| e.contains("#1 qemu_mutex_lock_impl < #2 scsi_req_cancel_async < #3 virtio")));
}

#[test]
fn unnamed_qemu_frames_make_a_possible_match_never_a_confirmed_one() {
    let set = load(Path::new("/nonexistent"));
    let unnamed = |o: u64| serde_json::json!({"pc": o, "module": "/usr/bin/kvm", "module_offset": o});
    let frames = serde_json::json!([{"symbol": "__lll_lock_wait"}, unnamed(0x100), unnamed(0x200), unnamed(0x300)]);
    let ev = tmf_ev().with("stacks/threads.json", &native(frames));
    let tmf = tmf_of(&ev, &set);
    assert_eq!(tmf.status, Status::Possible);
    let u = tmf.unverified.join("\n");
    assert!(u.contains("stack rule not evaluable: QEMU frames unnamed"), "{u}");
    assert!(u.contains("build-id abcdef0123") && u.contains("pve-qemu-kvm-dbgsym=10.1.0-1"), "{u}");
    assert!(u.contains("wedge-autopsy audit") && u.contains("inspect --resymbolize"), "{u}");
    // Named frames that are not the bug's: no match at all.
    let named = serde_json::json!([{"symbol": "ppoll"}, {"symbol": "aio_poll"}, {"symbol": "iothread_run"}]);
    let ev2 = ev.clone().with("stacks/threads.json", &native(named));
    assert!(matches(&ev2, "block-path-frozen", None, &set).iter().all(|m| m.id != "pve-6810-virtio-scsi-tmf-deadlock"));
    // No stacks at all: possible, saying so.
    let tmf = tmf_of(&tmf_ev(), &set);
    assert!(
        tmf.status == Status::Possible
            && tmf.unverified.iter().any(|u| u.contains("no stacks were captured; a capture with stacks"))
    );
    // gdb's `?? ()` frames of QEMU's own image are unnamed too.
    let gdb = "Thread 2 (Thread 0x7f (LWP 11) \"iothread\"):\n#0  0x1 in __lll_lock_wait () from /lib/libc.so.6\n#1  0x2 in ?? ()\n#2  0x3 in ?? ()\n#3  0x4 in ?? ()\n";
    let tmf = tmf_of(&tmf_ev().with("stacks/gdb.txt", gdb), &set);
    assert!(
        tmf.status == Status::Possible && tmf.unverified.iter().any(|u| u.contains("QEMU frames unnamed")),
        "{tmf:?}"
    );
}

#[test]
fn module_offset_layer_and_aio_rules() {
    let text = "schema = 1\nid = \"o\"\nkind = \"bug\"\ntitle = \"t\"\nadvice = \"a\"\nlinks = [\"https://x\"]\n[match]\nlayer = [\"inside-qemu\"]\n[[match.stack]]\nframes = [\"kvm+0x100-0x200\"]\nthread = \"iothread\"\n[match.config]\naio = [\"io_uring\"]\n";
    let set = Set { signatures: vec![parse(text, "o.toml").unwrap()], errors: vec![] };
    let frames = serde_json::json!([{"pc": 1, "module": "/usr/bin/kvm", "module_offset": 0x180}]);
    let ev = Mem::default()
        .with("stacks/threads.json", &native(frames))
        .with("config/102.conf", "scsi0: local:x,aio=io_uring\n");
    let m = matches(&ev, "block-path-frozen", Some("inside-qemu"), &set);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].evidence.iter().any(|e| e.contains("#0 /usr/bin/kvm+0x180")), "{m:?}");
    assert!(m[0].evidence.iter().any(|e| e.contains("layer inside-qemu")) && m[0].status == Status::Matched);
    // Layer unknown: matched, the layer listed as not verified; another layer: no match.
    let m = matches(&ev, "block-path-frozen", None, &set);
    assert!(m.len() == 1 && m[0].unverified.iter().any(|u| u.starts_with("layer")), "{m:?}");
    assert!(matches(&ev, "block-path-frozen", Some("below-qemu"), &set).is_empty());
    // Offset outside the range, another aio, another thread name: no match.
    let out = serde_json::json!([{"pc": 1, "module": "/usr/bin/kvm", "module_offset": 0x200}]);
    assert!(matches(&ev.clone().with("stacks/threads.json", &native(out)), "x", Some("inside-qemu"), &set).is_empty());
    let threads = ev.clone().with("config/102.conf", "scsi0: local:x,aio=threads\n");
    assert!(matches(&threads, "x", Some("inside-qemu"), &set).is_empty());
    let renamed = native(serde_json::json!([{"pc": 1, "module": "/usr/bin/kvm", "module_offset": 0x180}]))
        .replace("IO iothread2", "CPU 0/KVM");
    assert!(matches(&ev.clone().with("stacks/threads.json", &renamed), "x", Some("inside-qemu"), &set).is_empty());
}

#[test]
fn installed_version_is_used_when_qmp_is_silent_and_says_so() {
    let set = load(Path::new("/nonexistent"));
    let frames = ["qemu_mutex_lock_impl", "throttle_group_co_io_limits_intercept"];
    let ev = Mem::default()
        .with("stacks/threads.json", &threads_json(&frames))
        .with("config/102.conf", "scsihw: virtio-scsi-single\nscsi0: local:x,iothread=1,mbps_wr=10\n")
        .with("commands/pveversion.txt", "proxmox-ve: 9.0.0\npve-qemu-kvm: 10.1.2-4\n");
    let m = matches(&ev, "main-loop-wedged", None, &set);
    let b = m.iter().find(|m| m.id == "qemu-3144-throttle-group-iothreads").unwrap_or_else(|| panic!("{m:?}"));
    assert!(b.evidence.iter().any(|e| e.contains("10.1.2-4 (installed; the running build may differ)")), "{b:?}");
    assert!(b.unverified.iter().any(|u| u.contains("running pve-qemu-kvm")), "{b:?}");
    // The fix is installed but QMP is silent: the VM may still run the affected build it
    // started with, so the frames still name the bug and the version stays unverified.
    let fixed = ev.clone().with("commands/pveversion.txt", "pve-qemu-kvm: 10.2.1-1\n");
    let m = matches(&fixed, "main-loop-wedged", None, &set);
    let b = m.iter().find(|m| m.id == "qemu-3144-throttle-group-iothreads").unwrap_or_else(|| panic!("{m:?}"));
    assert!(b.unverified.iter().any(|u| u.contains("installed 10.2.1-1 is outside the affected range")), "{b:?}");
    // Named by QMP as the fixed build, the running one is out of range: no match.
    let running_fixed = ev.clone().with(
        "qmp/query-version.json",
        r#"{"return":{"qemu":{"major":10,"minor":2,"micro":1},"package":"pve-qemu-kvm_10.2.1-1"}}"#,
    );
    assert!(matches(&running_fixed, "main-loop-wedged", None, &set)
        .iter()
        .all(|m| m.id != "qemu-3144-throttle-group-iothreads"));
}

#[test]
fn recorded_set_note() {
    let set = load(Path::new("/nonexistent"));
    let rec = serde_json::to_string(&record(&set)).unwrap();
    let same = Mem::default().with(RECORD_PATH, &rec);
    assert_eq!(record_note(&same, &set), None);
    let mut other = record(&set);
    other[0].sha256 = "0".repeat(64);
    let differs = Mem::default().with(RECORD_PATH, &serde_json::to_string(&other).unwrap());
    let note = record_note(&differs, &set).unwrap();
    assert!(note.contains("differs") && note.contains(&other[0].id), "{note}");
    assert!(record_note(&Mem::default(), &set).unwrap().contains("does not record"));
}
