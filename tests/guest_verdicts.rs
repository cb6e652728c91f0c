//! Verdicts on real Linux guests doing real I/O (Debian's kernel, a busybox initramfs,
//! TCG): a quiet disk is never a frozen one, and stuck I/O is proven with the requests
//! in flight and the layer they are stuck in — live, and again from the sealed archive.
//!
//! One lab with six guests booting in parallel (TCG boots dominate the wall time):
//! idle virtio-scsi, write-once virtio-blk, idle LSI, and three steady writers wedged
//! inside QEMU (blkdebug breakpoint), below QEMU (a FUSE file whose writes never return,
//! aio=threads) and in a network backend (paused NBD server).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run_bounded, Backend, Controller, GuestMode, GuestSpec, Lab, Vm, WedgeKind};
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
    let again = diagnose::diagnose(&ar, &ar.manifest.steps, &Rules { min_idle_secs: 3.0 });
    assert_eq!(
        (again.verdict.as_str(), again.strength, again.layer),
        ("block-path-frozen", Some(diagnose::Strength::Proven), Some(diagnose::Layer::InsideQemu)),
        "recomputed from the archive: {:?}",
        again.facts
    );
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
