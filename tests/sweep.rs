//! Host-wide sweeps on real parts: a dozen lab QEMUs, three of them real Linux guests
//! (TCG) doing real I/O, two of those then wedged (a write stuck inside QEMU under
//! virtio-scsi, one stuck in the NBD server under virtio-blk). `diagnose --all` names
//! exactly the wedged ones, `--all-wedged` captures exactly those, and the recorded
//! sample times show the sweep's shape: every VM's first sample before any VM's second
//! sample (one window for all, not one per VM), each VM's samples a window apart.
//! No wall-clock bounds: the figures are in scripts/bench-sweep and docs/scale.md.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{run_bounded, Backend, Controller, GuestMode, GuestSpec, Lab, LabOptions, WedgeKind};
use serde_json::Value;

const T: Duration = Duration::from_secs(180);
/// The sweep's window in this test (`--window`, `sample_interval`).
const WINDOW_MS: i64 = 1000;

fn lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect()
}

fn at(v: &Value) -> DateTime<Utc> {
    v["at"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("sample without a time: {v}"))
}

/// A guest-less VM on virtio-scsi-single with an iothread and no throttle: its queues
/// are an in-flight view, so nothing queued proves it healthy.
fn quiet_vm(vmid: u32) -> LabOptions {
    LabOptions {
        vmid,
        name: format!("quiet{vmid}"),
        scsihw: "virtio-scsi-single".into(),
        iothread: true,
        mbps: 0,
        ..LabOptions::default()
    }
}

#[test]
fn a_sweep_names_and_captures_exactly_the_wedged_vms_in_one_window() {
    let guest = |vmid, controller, mode, backend| GuestSpec { vmid, controller, mode, backend, ..GuestSpec::default() };
    let mut lab = Lab::up_guests(vec![
        guest(601, Controller::VirtioScsiSingle, GuestMode::Steady, Backend::File),
        guest(602, Controller::VirtioBlk, GuestMode::Steady, Backend::Nbd),
        guest(603, Controller::VirtioScsiSingle, GuestMode::WriteOnce, Backend::File),
    ]);
    // Nine guest-less VMs on virtio-scsi-single (nothing in flight: healthy), one paused.
    let quiet: Vec<u32> = (611..=619).collect();
    for &vmid in &quiet {
        lab.add_vm(quiet_vm(vmid));
    }
    lab.vm(619).pause();
    for (vmid, kind) in [(601, WedgeKind::Inside), (602, WedgeKind::Nbd)] {
        let w = lab.vm(vmid).wedge_guest(kind);
        assert!(w["wedged"].as_bool().unwrap_or(false), "VM {vmid} wedge {kind:?}: {w}");
    }
    // Past the 3 s threshold (the guests' last completions were before the wedge).
    std::thread::sleep(Duration::from_secs(4));
    let wedged: BTreeSet<u64> = [601, 602].into();

    let out = run_bounded(
        &mut lab.tool_args(&["diagnose", "--all", "--json", "--window", "1s", "--min-idle", "3s", "--parallel", "4"]),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let rows = lines(&out.stdout);
    assert_eq!(rows.len(), 12, "one object per running VM: {rows:?}\n{err}");
    let ids: BTreeSet<u64> = rows.iter().filter_map(|r| r["vmid"].as_u64()).collect();
    assert_eq!(ids.len(), 12, "every VM once: {ids:?}");
    let frozen: BTreeSet<u64> =
        rows.iter().filter(|r| r["verdict"] == "block-path-frozen").filter_map(|r| r["vmid"].as_u64()).collect();
    assert_eq!(frozen, wedged, "exactly the wedged guests are frozen: {rows:?}");
    for r in &rows {
        let vmid = r["vmid"].as_u64().unwrap();
        match vmid {
            601 | 602 => assert_eq!(r["strength"], "proven", "{r}"),
            619 => assert_eq!(r["verdict"], "paused", "{r}"),
            _ => assert_eq!(r["verdict"], "healthy", "VM {vmid}: {r}"),
        }
    }
    assert_eq!(rows.iter().find(|r| r["vmid"] == 601).unwrap()["layer"], "inside-qemu");
    assert_eq!(rows.iter().find(|r| r["vmid"] == 602).unwrap()["layer"], "network-backend");
    // The worst verdict decides: proven block-path-frozen.
    assert_eq!(out.status.code(), Some(11), "{err}");

    // The shape: every first sample before any second sample, a window apart per VM.
    let samples: Vec<(u64, DateTime<Utc>, DateTime<Utc>)> = rows
        .iter()
        .map(|r| {
            let s = r["samples"].as_array().unwrap_or_else(|| panic!("no samples: {r}"));
            assert_eq!(s.len(), 2, "two in-flight samples: {r}");
            assert_eq!((s[0]["n"].as_u64(), s[1]["n"].as_u64()), (Some(1), Some(2)), "{r}");
            (r["vmid"].as_u64().unwrap(), at(&s[0]), at(&s[1]))
        })
        .collect();
    let last_first = samples.iter().map(|s| s.1).max().unwrap();
    let first_second = samples.iter().map(|s| s.2).min().unwrap();
    assert!(
        last_first < first_second,
        "a VM was sampled the second time ({first_second}) before another's first sample ({last_first}): {samples:?}"
    );
    for (vmid, a, b) in &samples {
        assert!((*b - *a).num_milliseconds() >= WINDOW_MS, "VM {vmid}: samples less than a window apart: {a} {b}");
    }

    // --all-wedged: the same sweep finds them, then exactly those are captured.
    let cfg = lab.root().join("fast.toml");
    std::fs::write(&cfg, "min_idle = \"3s\"\nsample_interval = \"1s\"\n").unwrap();
    let out =
        run_bounded(&mut lab.tool_args(&["--all-wedged", "--json", "--quiet", "--config", cfg.to_str().unwrap()]), T);
    let err = String::from_utf8_lossy(&out.stderr);
    let caps = lines(&out.stdout);
    let captured: BTreeSet<u64> = caps.iter().filter_map(|c| c["vmid"].as_u64()).collect();
    assert_eq!(captured, wedged, "--all-wedged captured exactly the wedged VMs: {caps:?}\n{err}");
    for c in &caps {
        assert_eq!(c["verdict"], "block-path-frozen", "{c}");
        let archive = c["archive"].as_str().unwrap_or_else(|| panic!("no archive: {c}"));
        assert!(std::path::Path::new(archive).is_file(), "{archive}");
    }
    for vmid in &wedged {
        assert!(err.contains(&format!("--all-wedged: VM {vmid} is block-path-frozen (proven)")), "{err}");
    }
    let archives = std::fs::read_dir(lab.out_dir()).unwrap().flatten().filter(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.starts_with("autopsy-") && n.ends_with(".tar.zst")
    });
    assert_eq!(archives.count(), 2, "one archive per wedged VM, none for the others");
}

/// A sweep where one QEMU's QMP socket is held by another client and another's main loop
/// hangs on a live throttle rewrite (QMP accepts, then never answers): each is named for
/// what it is, and neither changes what the rest get. The quiet VMs are healthy with both
/// samples, in one window (every first sample before any second sample), each a window
/// apart. (How long a silent socket may cost is bounded by its QMP deadline; the figures
/// are in docs/scale.md, not asserted here.)
#[test]
fn a_held_or_silent_qmp_costs_only_its_own_vm() {
    // The quiet ones on virtio-scsi-single; the other two as the incident's VM (LSI, a
    // QEMU throttle).
    let mut lab = Lab::start(quiet_vm(631));
    for vmid in [634, 635] {
        lab.add_vm(quiet_vm(vmid));
    }
    for (vmid, name) in [(632, "held632"), (633, "hung633")] {
        lab.add_vm(LabOptions { vmid, name: name.into(), ..LabOptions::default() });
    }
    let _holder = lab.vm(632).hold_qmp();
    assert_eq!(lab.vm(633).wedge()["wedged"], true, "VM 633's drive wedged");
    let hung = lab.vm(633).hang_main_loop();
    assert!(matches!(hung["qmp"].as_str(), Some("no-greeting" | "no-reply")), "VM 633's QMP stopped answering: {hung}");

    let out = run_bounded(
        &mut lab.tool_args(&["diagnose", "--all", "--json", "--window", "1s", "--min-idle", "3s", "--parallel", "2"]),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let rows = lines(&out.stdout);
    let row =
        |vmid: u64| rows.iter().find(|r| r["vmid"] == vmid).unwrap_or_else(|| panic!("no VM {vmid}: {rows:?}\n{err}"));
    assert_eq!(rows.len(), 5, "one object per running VM: {rows:?}\n{err}");
    assert_eq!(row(632)["verdict"], "qmp-unreachable", "{}", row(632));
    assert!(
        row(632)["facts"].to_string().contains("another client most likely holds the socket"),
        "the held socket is named: {}",
        row(632)
    );
    assert_eq!(row(633)["verdict"], "main-loop-wedged", "{}", row(633));
    // The worst verdict decides: main-loop-wedged (12).
    assert_eq!(out.status.code(), Some(12), "{err}");

    let quiet: Vec<(u64, DateTime<Utc>, DateTime<Utc>)> = [631u64, 634, 635]
        .iter()
        .map(|&vmid| {
            let r = row(vmid);
            assert_eq!(r["verdict"], "healthy", "VM {vmid}: {r}");
            let s = r["samples"].as_array().unwrap_or_else(|| panic!("no samples: {r}"));
            assert_eq!(s.len(), 2, "two in-flight samples despite the stuck neighbours: {r}");
            (vmid, at(&s[0]), at(&s[1]))
        })
        .collect();
    let last_first = quiet.iter().map(|s| s.1).max().unwrap();
    let first_second = quiet.iter().map(|s| s.2).min().unwrap();
    assert!(last_first < first_second, "one window for the quiet VMs: {quiet:?}");
    for (vmid, a, b) in &quiet {
        assert!((*b - *a).num_milliseconds() >= WINDOW_MS, "VM {vmid}: samples less than a window apart: {a} {b}");
    }
}
