//! `minicore` on a real lab QEMU: the core loads in gdb with every thread, gdb's
//! backtraces match the native snapshot of the same freeze, guest RAM (1 GiB, all of
//! it faulted in with -mem-prealloc) is left out, the freeze is recorded, and the VM is
//! left running. Needs root, qemu-system-x86_64, gdb.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{run_bounded, tracer_pid, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};

const MEM_MIB: u64 = 1024;

/// gdb's `thread apply all bt` on a core: LWP -> addresses gdb printed (`#N  0x… in`).
fn gdb_backtraces(text: &str) -> BTreeMap<i32, Vec<u64>> {
    let mut out: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    let mut cur = None;
    for line in text.lines() {
        if line.starts_with("Thread ") {
            cur = line.split("LWP ").nth(1).and_then(|r| r.split(')').next()?.trim().parse().ok());
            if let Some(t) = cur {
                out.entry(t).or_default();
            }
        } else if let (Some(t), Some(rest)) = (cur, line.strip_prefix('#')) {
            let mut it = rest.split_whitespace().skip(1);
            if let Some(a) = it.next().and_then(|a| a.strip_prefix("0x")) {
                if it.next() == Some("in") {
                    out.get_mut(&t).unwrap().push(u64::from_str_radix(a, 16).unwrap());
                }
            }
        }
    }
    out
}

#[test]
fn minicore_loads_in_gdb_matches_the_snapshot_and_leaves_guest_ram_out() {
    let lab = Lab::start(LabOptions {
        vmid: 181,
        name: "core".into(),
        mem_mib: Some(MEM_MIB as u32),
        mem_prealloc: true,
        ..LabOptions::default()
    });
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", lab.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kb > MEM_MIB * 1024, "guest RAM is faulted in (RSS {rss_kb} kB), so leaving it out is real work");
    let out = run_bounded(
        &mut lab.tool_args(&["181", "--json", "--sample-interval", "0", "--runbook", "qemu-wedge-core"]),
        Duration::from_secs(150),
    );
    let json: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let step = json["steps"].as_array().unwrap().iter().find(|s| s["id"] == "minicore").unwrap().clone();
    assert_eq!(step["status"], "ok", "{json}");
    let archive_path = json["archive"].as_str().unwrap().to_string();
    let ar = ArchiveReader::open(Path::new(&archive_path)).unwrap();
    let rec = ar.manifest.steps.iter().find(|s| s.id == "minicore").unwrap();
    assert!(rec.notes.iter().any(|n| n.starts_with("froze ") && n.contains(" µs")), "freeze recorded: {:?}", rec.notes);
    assert!(rec.notes.iter().any(|n| n.contains("secret")), "{:?}", rec.notes);
    let report = ar.read_json("core/minicore.json").unwrap();
    println!(
        "minicore: {}",
        serde_json::to_string(&{
            let mut r = report.clone();
            r.as_object_mut().unwrap().remove("excluded");
            r
        })
        .unwrap()
    );
    let ram = MEM_MIB << 20;
    assert!(report["guest_ram_bytes"].as_u64().unwrap() >= ram, "guest RAM left out: {report}");
    let core_bytes = report["core_bytes"].as_u64().unwrap();
    assert!(core_bytes < ram / 8, "core {core_bytes} bytes vs {ram} of guest RAM");
    assert!(report["freeze_us"].as_u64().unwrap() > 0);
    assert_eq!(report["memory_copy"], "after_resume", "QEMU's memory is over the frozen-copy budget");
    let entry = ar.manifest.files.iter().find(|f| f.path == "core/qemu.core").unwrap().clone();
    assert_eq!(entry.size, core_bytes);

    // gdb opens it: as many threads as the process had, the same return addresses.
    let tmp = tempfile::tempdir().unwrap();
    let core = tmp.path().join("qemu.core");
    archive::extract_entry(Path::new(&archive_path), &entry, &core).unwrap();
    let exe = report["exe"].as_str().unwrap();
    let gdb = run_bounded(
        std::process::Command::new("gdb")
            .args(["-batch", "-nx", "-iex", "set debuginfod enabled off", "-ex", "set pagination off", exe])
            .arg(&core)
            .args(["-ex", "info threads", "-ex", "thread apply all bt"])
            .env_remove("DEBUGINFOD_URLS"),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&gdb.stdout).into_owned();
    let bts = gdb_backtraces(&text);
    let same_freeze = ar.read_json("core/stacks.json").unwrap();
    let live = ar.read_json("stacks/threads.json").unwrap();
    let n = |v: &Value| v["threads"].as_array().unwrap().len();
    assert_eq!(bts.len(), n(&same_freeze), "gdb sees every thread of the core:\n{text}");
    assert_eq!(bts.len(), n(&live), "as many threads as the live process had");
    // Same registers and stacks, so the same return addresses. (gdb, with libc6-dbg's
    // DWARF, sometimes shows one glibc frame more inside futex waits than the native
    // .eh_frame unwinder; tolerate a few, never a majority.)
    let (mut matched, mut other) = (0, Vec::new());
    for t in same_freeze["threads"].as_array().unwrap() {
        let tid = t["tid"].as_i64().unwrap() as i32;
        let native: BTreeSet<u64> = t["frames"].as_array().unwrap().iter().map(|f| f["pc"].as_u64().unwrap()).collect();
        let seen = bts.get(&tid).unwrap_or_else(|| panic!("gdb has no thread {tid}:\n{text}"));
        for a in seen {
            if native.contains(a) {
                matched += 1;
            } else {
                other.push((tid, *a));
            }
        }
    }
    println!("gdb vs native: {matched} addresses match, {} differ: {other:x?}", other.len());
    assert!(matched >= bts.len() * 2, "gdb printed addresses for most frames ({matched}):\n{text}");
    assert!(other.len() * 10 <= matched, "gdb and the native snapshot disagree: {other:x?}\n{text}");

    // --qemu-state without QEMU's debug symbols says what is missing, and still shows threads.
    let qs = run_bounded(
        common::tool().args(["inspect", &archive_path, "--qemu-state", "--json"]),
        Duration::from_secs(150),
    );
    assert!(qs.status.success(), "{}", String::from_utf8_lossy(&qs.stderr));
    let qs: Value = serde_json::from_slice(&qs.stdout).unwrap();
    let missing: Vec<&str> = qs["missing"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(missing.iter().any(|m| m.contains("debug symbols of") && m.contains("dbgsym")), "{missing:?}");
    assert!(missing.iter().any(|m| m.contains("apt-get source qemu")), "{missing:?}");
    assert_eq!(qs["threads"].as_u64().unwrap() as usize, bts.len(), "{}", qs["gdb_output"]);

    // The VM runs on, untraced.
    assert!(lab.thread_states().values().all(|s| !matches!(s, 'T' | 't')));
    assert_eq!(tracer_pid(lab.pid()), 0);
    assert!(lab.is_alive());
}
