//! Verdicts on real Linux guests doing real I/O (Debian's kernel, a busybox initramfs,
//! TCG): a quiet disk is never a frozen one, and stuck I/O is proven with the requests
//! in flight and the layer they are stuck in — live, and again from the sealed archive.
//!
//! The first test boots six guests in parallel (TCG boots dominate the wall time): idle
//! virtio-scsi, write-once virtio-blk, idle LSI, and three steady writers wedged inside
//! QEMU (blkdebug breakpoint), below QEMU (a FUSE file whose writes never return,
//! aio=threads) and in a network backend (paused NBD server). The second boots two LSI
//! guests running qemu-guest-agent, whose own in-progress counts stand in for the
//! in-flight view LSI lacks.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run_bounded, Backend, Controller, GuestMode, GuestSpec, Lab, LabOptions, Vm, WedgeKind};
use serde_json::Value;
use wedge_autopsy::archive::{ArchiveReader, Evidence};
use wedge_autopsy::diagnose::{self, Rules};

const T: Duration = Duration::from_secs(120);

/// `diagnose VMID --json` with the given extra flags: (exit code, JSON).
fn diagnose(lab: &Lab, vm: &Vm, extra: &[&str]) -> (i32, Value) {
    let v = vm.vmid().to_string();
    let mut args = vec!["diagnose", &v, "--json"];
    args.extend_from_slice(extra);
    let out = run_bounded(&mut lab.tool_args(&args), T);
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("VM {v}: diagnose printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), json)
}

/// Fast thresholds for the wedged guests: 1 s window, stuck for 3 s counts.
const FAST: &[&str] = &["--window", "1s", "--min-idle", "3s"];

fn facts(j: &Value) -> String {
    j["facts"].to_string()
}

/// `inspect`'s path: the sealed archive alone (3 s threshold) gives a frozen block path,
/// proven, stuck inside QEMU.
fn assert_archive_proves_inside_qemu(ar: &ArchiveReader) {
    let again = diagnose::diagnose(ar, &ar.manifest.steps, &Rules { min_idle_secs: 3.0 });
    assert_eq!(
        (again.verdict.as_str(), again.strength, again.layer),
        ("block-path-frozen", Some(diagnose::Strength::Proven), Some(diagnose::Layer::InsideQemu)),
        "recomputed from the archive: {:?}",
        again.facts
    );
}

#[test]
fn quiet_guests_are_never_frozen_and_stuck_guests_are_proven_with_their_layer() {
    let spec = |vmid, controller, mode, backend, aio: &str| GuestSpec {
        vmid,
        controller,
        mode,
        backend,
        aio: aio.into(),
        ..GuestSpec::default()
    };
    let lab = Lab::up_guests(vec![
        spec(301, Controller::VirtioScsiSingle, GuestMode::Idle, Backend::File, "io_uring"),
        spec(302, Controller::VirtioBlk, GuestMode::WriteOnce, Backend::File, "io_uring"),
        spec(303, Controller::Lsi, GuestMode::Idle, Backend::File, "io_uring"),
        spec(304, Controller::VirtioScsiSingle, GuestMode::Steady, Backend::File, "io_uring"),
        spec(305, Controller::VirtioScsiSingle, GuestMode::Steady, Backend::Fuse, "threads"),
        spec(306, Controller::VirtioBlk, GuestMode::Steady, Backend::Nbd, "io_uring"),
    ]);
    let vm = |id| lab.vm(id);

    // On the defaults (2 s window, 30 s threshold): an idle virtio guest is healthy at once,
    // because nothing is in flight — not because it has been idle for a short while.
    let (code, j) = diagnose(&lab, vm(301), &[]);
    assert_eq!((code, j["verdict"].as_str()), (0, Some("healthy")), "{j}");
    assert_eq!(j["disks"][0]["condition"], "idle", "{j}");
    assert!(facts(&j).contains("nothing in flight at either end"), "{j}");

    for kind in [(304, WedgeKind::Inside), (305, WedgeKind::Below), (306, WedgeKind::Nbd)] {
        let w = vm(kind.0).wedge_guest(kind.1);
        assert!(w["wedged"].as_bool().unwrap_or(false), "VM {} wedge {:?}: {w}", kind.0, kind.1);
    }
    // Past the 3 s threshold of FAST (the guests' last completions were before the wedge).
    std::thread::sleep(Duration::from_secs(4));

    // Quiet guests, however long quiet, with the same fast threshold the stuck ones get.
    for id in [301, 302] {
        let (code, j) = diagnose(&lab, vm(id), FAST);
        assert_eq!((code, j["verdict"].as_str()), (0, Some("healthy")), "VM {id}: {j}");
        assert_eq!(j["disks"][0]["condition"], "idle", "VM {id}: {j}");
    }
    // LSI has no in-flight view: at most suspected (exit 17), never proven, never restarted.
    let (code, j) = diagnose(&lab, vm(303), FAST);
    assert_ne!(j["strength"], "proven", "{j}");
    assert!(code == 17 || code == 10, "LSI idle guest: exit {code}: {j}");
    if code == 17 {
        assert_eq!(j["restart"]["advice"], "unproven", "{j}");
        assert!(facts(&j).contains("no in-flight counter"), "{j}");
    }

    // Stuck inside QEMU: popped from the virtqueue, no thread or ring below.
    let (code, j) = diagnose(&lab, vm(304), FAST);
    assert_eq!(code, 11, "{j}");
    assert_eq!((j["verdict"].as_str(), j["strength"].as_str()), (Some("block-path-frozen"), Some("proven")), "{j}");
    assert_eq!(j["layer"], "inside-qemu", "{j}");
    assert_eq!(j["restart"]["advice"], "helps", "{j}");
    assert!(facts(&j).contains("request(s) in flight") && facts(&j).contains("used-idx unchanged"), "{j}");
    // Stuck below QEMU: a worker blocked in pwrite on the FUSE-backed image.
    let (code, j) = diagnose(&lab, vm(305), FAST);
    assert_eq!((code, j["layer"].as_str()), (11, Some("below-qemu")), "{j}");
    assert!(facts(&j).contains("(worker) in pwrite"), "{j}");
    assert_eq!(j["restart"]["advice"], "wont-help", "{j}");
    // Stuck in the NBD server.
    let (code, j) = diagnose(&lab, vm(306), FAST);
    assert_eq!((code, j["layer"].as_str()), (11, Some("network-backend")), "{j}");
    assert!(facts(&j).contains("nbd driver"), "{j}");

    // The autopsy of the stuck-inside guest: the archive alone gives the same answer.
    let cfg = lab.root().join("fast.toml");
    std::fs::write(&cfg, "min_idle = \"3s\"\nsample_interval = \"1s\"\n").unwrap();
    let out = run_bounded(&mut lab.tool_args(&["304", "--json", "--config", cfg.to_str().unwrap()]), T);
    let j: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("autopsy: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(j["verdict"], "block-path-frozen", "{j}");
    let ar = ArchiveReader::open(&PathBuf::from(j["archive"].as_str().unwrap())).unwrap();
    for n in [1, 2] {
        let s = ar.read_json(&format!("inflight/sample.{n}.json")).expect("in-flight sample sealed");
        assert_eq!(s["virtio"][0]["path"], "/machine/peripheral/virtioscsi0/virtio-backend", "{s}");
    }
    assert_archive_proves_inside_qemu(&ar);
    let md = ar.read_string("summary.md").unwrap();
    assert!(md.contains("## Verdict: block-path-frozen (proven, inside-qemu)"), "{md}");

    // A restart the operator asks for on storage that is still stuck is refused without
    // --force: nothing is stopped (exit 5, same QEMU).
    let before = vm(305).pid();
    let out = run_bounded(
        &mut lab.tool_args(&["305", "--then-restart", "--config", cfg.to_str().unwrap(), "--qm", "/bin/false"]),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("recover first") && err.contains("--force"), "{err}");
    assert_eq!(vm(305).pid(), before, "the VM was left as it was");
    assert!(vm(305).is_alive());

    // --all-wedged finds exactly the wedged guests (suspected LSI included: capturing is
    // harmless), never the idle virtio ones.
    let out = run_bounded(
        &mut lab.tool_args(&["--all-wedged", "--json", "--config", cfg.to_str().unwrap(), "--stacks", "none"]),
        Duration::from_secs(240),
    );
    let vmids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["vmid"].as_u64())
        .collect();
    for id in [304, 305, 306] {
        assert!(vmids.contains(&id), "--all-wedged missed {id}: {vmids:?}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    for id in [301, 302] {
        assert!(!vmids.contains(&id), "--all-wedged took idle VM {id}: {vmids:?}");
    }
}

/// The sampled agent view of sample `n` of an archive (`inflight/sample.N.json`).
fn agent_in_sample(ar: &ArchiveReader, n: u32) -> Value {
    ar.read_json(&format!("inflight/sample.{n}.json")).expect("in-flight sample sealed")["agent"].clone()
}

/// qemu-guest-agent running inside real guests, wired as Proxmox does for `agent: 1`.
/// LSI has no in-flight counter of its own; the guest's `guest-get-diskstats` is one:
/// with the agent an idle LSI guest is proven idle and a stuck one proven stuck (without
/// it, the first test shows both are at most suspected). An agent socket nobody answers
/// on (a guest-less VM with `agent: 1`) is a note in the sample, never a failed step.
#[test]
fn guest_agent_in_a_real_guest_proves_what_lsi_alone_cannot() {
    let spec = |vmid, mode| GuestSpec { vmid, controller: Controller::Lsi, mode, agent: true, ..GuestSpec::default() };
    let mut lab = Lab::up_guests(vec![spec(311, GuestMode::WriteOnce), spec(312, GuestMode::Steady)]);
    for id in [311, 312] {
        let up = lab.vm(id).up_info();
        eprintln!(
            "guest {id}: ready after {} s, agent answered {} s later: {}",
            up["boot_to_ready_s"], up["agent_answered_s"], up["guest_ready"]
        );
        assert!(up["guest_ready"].as_str().unwrap_or("").contains("agent=/dev/vport"), "{up}");
    }
    // A guest-less VM with `agent: 1`: the socket accepts, nothing behind it answers.
    lab.add_vm(LabOptions { vmid: 313, name: "noagent".into(), agent: true, ..LabOptions::default() });

    // audit pings every running VM's agent: the real ones answer, the empty socket does not.
    let out = run_bounded(&mut lab.tool_args(&["audit", "--json"]), T);
    let audit = String::from_utf8_lossy(&out.stdout).to_string();
    let vms: Value = serde_json::from_str(&audit).unwrap_or_else(|e| panic!("audit --json: {e}: {audit}"));
    let agent_of = |id: &str| {
        let vm = vms.as_array().unwrap().iter().find(|v| v["vmid"] == id).unwrap_or_else(|| panic!("{id}: {vms}"));
        vm["running"]["agent"]["state"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(agent_of("311"), "answers", "{audit}");
    assert_eq!(agent_of("313"), "no-answer", "{audit}");

    // Quiet LSI guest, past the threshold: the guest itself says nothing is in flight.
    std::thread::sleep(Duration::from_secs(3));
    let (code, j) = diagnose(&lab, lab.vm(311), FAST);
    assert_eq!((code, j["verdict"].as_str()), (0, Some("healthy")), "{j}");
    assert_eq!(
        (j["disks"][0]["condition"].as_str(), j["disks"][0]["strength"].as_str()),
        (Some("idle"), Some("proven"))
    );
    assert!(facts(&j).contains("guest agent: no I/O in progress on any guest disk"), "{j}");

    // Stuck inside QEMU on LSI: the guest counts the write in progress, and it never
    // completes. Diagnosed well before the guest's SCSI abort (+30 s).
    let w = lab.vm(312).wedge_guest(WedgeKind::Inside);
    assert!(w["wedged"].as_bool().unwrap_or(false), "{w}");
    std::thread::sleep(Duration::from_secs(4));
    let (code, j) = diagnose(&lab, lab.vm(312), FAST);
    assert_eq!(code, 11, "{j}");
    assert_eq!((j["verdict"].as_str(), j["strength"].as_str()), (Some("block-path-frozen"), Some("proven")), "{j}");
    assert_eq!(j["layer"], "inside-qemu", "{j}");
    assert!(facts(&j).contains("guest agent: I/O in progress without completing across the window on sda"), "{j}");

    // The autopsy seals the agent's view at both ends, and the archive alone proves it.
    let cfg = lab.root().join("fast.toml");
    std::fs::write(&cfg, "min_idle = \"3s\"\nsample_interval = \"1s\"\n").unwrap();
    let autopsy = |id: &str| {
        let out =
            run_bounded(&mut lab.tool_args(&[id, "--json", "--stacks", "none", "--config", cfg.to_str().unwrap()]), T);
        let j: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("autopsy {id}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (ArchiveReader::open(&PathBuf::from(j["archive"].as_str().unwrap())).unwrap(), j)
    };
    let (ar, j) = autopsy("312");
    assert_eq!(j["verdict"], "block-path-frozen", "{j}");
    for n in [1, 2] {
        let a = agent_in_sample(&ar, n);
        eprintln!("stuck LSI guest, sample {n}: agent {a}");
        assert!(a["error"].is_null(), "sample {n}: {a}");
        let sda = a["disks"].as_array().unwrap().iter().find(|d| d["name"] == "sda").cloned();
        assert!(sda.as_ref().is_some_and(|d| d["in_progress"].as_u64() >= Some(1)), "sample {n}: {a}");
    }
    assert_archive_proves_inside_qemu(&ar);

    // The agent that never answers: its sample says why, the step is still ok.
    let (ar, _) = autopsy("313");
    let a = agent_in_sample(&ar, 1);
    eprintln!("agent socket with nothing behind it, sample 1: agent {a}");
    let err = a["error"].as_str().unwrap_or("");
    // It waited its whole budget (1.5 s), and says so.
    let waited: u64 = err.split("within ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(err.contains("did not answer") && waited >= 1500, "{a}");
    let step = ar.manifest.steps.iter().find(|s| s.id == "inflight").expect("inflight step");
    assert_eq!(step.status.as_str(), "ok", "{step:?}");
}

/// `(device, condition, strength)` of every disk in a diagnose/inspect JSON.
fn disk_states(j: &Value) -> Vec<(String, String, String)> {
    let s = |d: &Value, k: &str| d[k].as_str().unwrap_or_default().to_string();
    j["disks"]
        .as_array()
        .map(|a| a.iter().map(|d| (s(d, "device"), s(d, "condition"), s(d, "strength"))).collect())
        .unwrap_or_default()
}

/// A two-disk LSI guest with qemu-guest-agent: the guest writes on `sda` (drive-scsi0,
/// scsi-id 0) and `sdb` (drive-scsi1, scsi-id 1) stays idle. `guest-get-disks` says where
/// each sits (SCSI unit = target, on the controller at 00:05.0, qemu-server's slot for
/// scsihw0), so the agent's counts decide per drive: the held write proves drive-scsi0
/// stuck inside QEMU and drive-scsi1 idle, not "suspected" — live, and from the archive.
#[test]
fn guest_agent_decides_per_drive_on_a_two_disk_lsi_guest() {
    let lab = Lab::up_guests(vec![GuestSpec {
        vmid: 314,
        controller: Controller::Lsi,
        mode: GuestMode::Steady,
        agent: true,
        disks: 2,
        ..GuestSpec::default()
    }]);
    let vm = lab.vm(314);
    let up = vm.up_info();
    eprintln!(
        "guest 314: ready after {} s, agent answered {} s later: {}",
        up["boot_to_ready_s"], up["agent_answered_s"], up["guest_ready"]
    );
    assert!(up["guest_ready"].as_str().unwrap_or("").contains("disk=/dev/sda agent=/dev/vport"), "{up}");
    // The drive behind the guest's sda (the one that counted its first write): which one it
    // is depends on the guest's probe order, not on the drive's number.
    let busy = up["drive"].as_str().unwrap_or_default().to_string();
    let busy_n: u32 = match busy.as_str() {
        "drive-scsi0" => 0,
        "drive-scsi1" => 1,
        other => panic!("lab up named no written drive: {other:?} in {up}"),
    };
    let quiet_n = 1 - busy_n;
    let quiet = format!("drive-scsi{quiet_n}");
    eprintln!("guest 314 writes on sda = {busy}");
    let mapped = |j: &Value, guest: &str, drive: &str, unit: u32| {
        let want =
            format!("guest agent: {guest} is {drive} (by SCSI unit {unit} on the controller at PCI 0000:00:05.0)");
        assert!(j["disks"].to_string().contains(&want), "want {want:?} in the disks of {j}");
    };
    let in_order = |busy_state: &str, quiet_state: &str| {
        let mut v = vec![
            (busy.clone(), busy_state.to_string(), "proven".to_string()),
            (quiet.clone(), quiet_state.to_string(), "proven".to_string()),
        ];
        v.sort();
        v
    };

    // Writing: the busy drive moves, and the agent proves the unused one idle.
    let (code, j) = diagnose(&lab, vm, FAST);
    assert_eq!((code, j["verdict"].as_str()), (0, Some("healthy")), "{j}");
    assert_eq!(disk_states(&j), in_order("moving", "idle"), "{j}");
    // By the mapping, or (when sda too had nothing in progress at the end) by the rule that
    // every guest disk idle proves every drive idle.
    assert!(j["disks"][quiet_n as usize]["evidence"].to_string().contains("guest agent: "), "{j}");

    // The guest's next write to sda is held inside QEMU: stuck on that drive only.
    let w = vm.wedge_guest(WedgeKind::Inside);
    assert!(w["wedged"].as_bool().unwrap_or(false) && w["drive"] == busy.as_str(), "{w}");
    std::thread::sleep(Duration::from_secs(4));
    let (code, j) = diagnose(&lab, vm, FAST);
    assert_eq!(code, 11, "{j}");
    assert_eq!(
        (j["verdict"].as_str(), j["strength"].as_str(), j["layer"].as_str()),
        (Some("block-path-frozen"), Some("proven"), Some("inside-qemu")),
        "{j}"
    );
    let want = in_order("stuck", "idle");
    assert_eq!(disk_states(&j), want, "{j}");
    assert!(facts(&j).contains("guest agent: I/O in progress without completing across the window on sda"), "{j}");
    mapped(&j, "sda", &busy, busy_n);
    mapped(&j, "sdb", &quiet, quiet_n);

    // The autopsy seals the addresses once (first sample), and the archive alone gives the
    // same verdict per drive; `inspect` says so too.
    let cfg = lab.root().join("fast.toml");
    std::fs::write(&cfg, "min_idle = \"3s\"\nsample_interval = \"1s\"\n").unwrap();
    let out =
        run_bounded(&mut lab.tool_args(&["314", "--json", "--stacks", "none", "--config", cfg.to_str().unwrap()]), T);
    let j: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("autopsy 314: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(j["verdict"], "block-path-frozen", "{j}");
    let path = PathBuf::from(j["archive"].as_str().unwrap());
    let ar = ArchiveReader::open(&path).unwrap();
    let first = agent_in_sample(&ar, 1);
    eprintln!("two-disk LSI guest, sample 1: agent {first}");
    let addr = |name: &str| {
        first["addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name).cloned())
            .unwrap_or_else(|| panic!("{name} in {first}"))
    };
    for (name, unit) in [("sda", busy_n), ("sdb", quiet_n)] {
        let a = addr(name);
        assert_eq!(
            (a["bus_type"].as_str(), a["unit"].as_u64(), a["pci"].clone()),
            (Some("scsi"), Some(unit as u64), serde_json::json!([0, 0, 5, 0])),
            "{a}"
        );
    }
    assert!(agent_in_sample(&ar, 2)["addresses"].is_null(), "asked once per run");
    let again = diagnose::diagnose(&ar, &ar.manifest.steps, &Rules { min_idle_secs: 3.0 });
    let again_json = serde_json::to_value(&again).unwrap();
    assert_eq!(disk_states(&again_json), want, "recomputed from the archive: {:?}", again.facts);
    assert_archive_proves_inside_qemu(&ar);
    let out = run_bounded(common::tool().arg("inspect").arg(&path), T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Recomputed from the archive: block-path-frozen"), "{text}");
}
