//! Re-symbolization from the archive (`inspect --resymbolize`) against real parts: a
//! stripped C fixture whose debug file appears (by build-id) only after the capture, and
//! a lab QEMU captured without glibc's debug info, re-symbolized with Debian's
//! `libc6-dbg` (scripts/install-deps installs it). Needs root (ptrace), cc, strip,
//! objcopy, qemu-system-x86_64.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{run_bounded, wait_until, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{ArchiveReader, Evidence, Staging};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::stacks::native::modules::{hex, DebugSearch, Elf};
use wedge_autopsy::stacks::native::{self, raw, NativeOptions, ThreadReport};
use wedge_autopsy::stacks::resymbolize::{resymbolize, ResymbolizeOptions};

fn sh(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

/// The fixture process; its process group is SIGKILLed on drop.
struct Fixture(Child);

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn in_read(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| s.split_whitespace().next() == Some("0"))
}

fn main_thread(threads: &[ThreadReport], pid: i32) -> &ThreadReport {
    threads.iter().find(|t| t.tid == pid).expect("main thread in the report")
}

#[test]
fn stripped_fixture_gains_static_and_inlined_frames_from_a_later_debug_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inlined.c");
    let full = d.join("inlined");
    sh(Command::new("cc").args(["-O2", "-g", "-o"]).arg(&full).arg(&src));
    let stripped = d.join("inlined-stripped");
    sh(Command::new("strip").arg("-o").arg(&stripped).arg(&full));
    let debug = d.join("inlined.debug");
    sh(Command::new("objcopy").arg("--only-keep-debug").arg(&full).arg(&debug));
    let id = hex(&Elf::open(&stripped).unwrap().build_id.expect("cc writes a build-id"));

    let mut cmd = Command::new(&stripped);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let fx = Fixture(cmd.stdin(Stdio::null()).spawn().unwrap());
    let pid = fx.0.id() as i32;
    assert!(wait_until(Duration::from_secs(20), || in_read(pid)), "fixture never blocked in read()");

    // Capture with an empty debug dir: the static function has no name.
    let empty = d.join("empty-debug");
    std::fs::create_dir(&empty).unwrap();
    let opts = NativeOptions { lines: true, debug: DebugSearch { dirs: vec![empty] }, ..Default::default() };
    let captured = native::capture(pid, &opts, &Cancel::new(), None).expect("capture");
    let report = captured.report(&opts);
    let before: Vec<Option<&str>> =
        main_thread(&report.threads, pid).frames.iter().map(|f| f.symbol.as_deref()).collect();
    assert!(!before.contains(&Some("parked_static")), "stripped: {before:?}");
    let (doc, data) = raw::encode(&captured);
    let staging = Staging::create(&d.join("out"), "autopsy-1-x-h").unwrap();
    let sink = staging.sink();
    sink.write(raw::JSON_PATH, &serde_json::to_vec(&doc).unwrap()).unwrap();
    sink.write(raw::DATA_PATH, &data).unwrap();
    sink.write("stacks/threads.json", &serde_json::to_vec(&report).unwrap()).unwrap();

    // Later: the binary is gone (an upgrade), its debug file is installed by build-id.
    std::fs::remove_file(&stripped).unwrap();
    let dbg_dir = d.join("debug");
    let by_id = dbg_dir.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&by_id).unwrap();
    std::fs::rename(&debug, by_id.join(format!("{}.debug", &id[2..]))).unwrap();
    let r = resymbolize(&staging, &ResymbolizeOptions { debug_dirs: vec![dbg_dir], debuginfod_urls: None })
        .expect("resymbolize");
    let src_mod = r.modules.iter().find(|m| m.name.ends_with("inlined-stripped")).expect("fixture module");
    assert!(src_mod.archived_cfi, "the binary is gone, so its CFI came from the archive: {src_mod:?}");
    assert!(src_mod.has_lines && src_mod.debug_file.is_some(), "{src_mod:?}");
    let main = main_thread(&r.report.threads, pid);
    let text = wedge_autopsy::stacks::resymbolize::render(&r);
    let f =
        main.frames.iter().find(|f| f.symbol.as_deref() == Some("parked_static")).unwrap_or_else(|| panic!("{text}"));
    assert!(f.file.as_deref().unwrap_or("").ends_with("inlined.c"), "{f:?}");
    assert!(f.line.is_some(), "{f:?}");
    let inl = f.inlined.iter().find(|i| i.function.as_deref() == Some("wait_here")).unwrap_or_else(|| panic!("{f:?}"));
    assert_eq!(inl.line, Some(17), "the parked read() is on line 17: {inl:?}");
    assert!(main.frames.iter().any(|f| f.symbol.as_deref() == Some("main")), "{text}");
    assert!(!r.missing.iter().any(|m| m.module.ends_with("inlined-stripped")), "{:?}", r.missing);
    assert!(text.contains("inlined wait_here at") && text.contains("inlined.c:17"), "{text}");
}

fn libc_frames(threads: &Value) -> Vec<&Value> {
    threads
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["frames"].as_array().unwrap())
        .filter(|f| f["module"].as_str().is_some_and(|m| m.ends_with("/libc.so.6")))
        .collect()
}

#[test]
fn lab_qemu_captured_without_debug_info_gains_glibc_lines_later() {
    let libc = Elf::open(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
    let id = hex(libc.build_id.as_deref().unwrap());
    let dbg = PathBuf::from(format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]));
    assert!(dbg.exists(), "libc6-dbg is not installed ({} missing): run scripts/install-deps", dbg.display());

    let lab = Lab::start(LabOptions { vmid: 171, name: "resym".into(), ..LabOptions::default() });
    let empty = lab.root().join("empty-debug");
    std::fs::create_dir(&empty).unwrap();
    let out = run_bounded(
        &mut lab.tool_args(&["171", "--json", "--sample-interval", "0", "--debug-dir", empty.to_str().unwrap()]),
        Duration::from_secs(90),
    );
    let json: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let archive = json["archive"].as_str().unwrap().to_string();
    let ar = ArchiveReader::open(Path::new(&archive)).unwrap();
    let captured = ar.read_json("stacks/threads.json").unwrap();
    let before = libc_frames(&captured["threads"]);
    assert!(!before.is_empty());
    assert!(before.iter().all(|f| f.get("file").is_none()), "no glibc debug info at capture time: {before:?}");
    assert!(ar.read(raw::JSON_PATH).is_some() && ar.read(raw::DATA_PATH).is_some(), "{:?}", ar.list());

    let out = run_bounded(
        common::tool().args(["inspect", &archive, "--resymbolize", "--debug-dir", "/usr/lib/debug", "--json"]),
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let after = libc_frames(&r["report"]["threads"]);
    assert_eq!(after.len(), before.len(), "the same frames, unwound again");
    let with_lines: Vec<&&Value> = after.iter().filter(|f| f["line"].as_u64().is_some()).collect();
    assert!(with_lines.len() * 2 >= after.len(), "most glibc frames gain file:line: {after:?}");
    let main = r["report"]["threads"].as_array().unwrap().iter().find(|t| t["tid"] == lab.pid()).unwrap();
    let f0 = &main["frames"][0];
    assert!(f0["file"].as_str().unwrap_or("").ends_with("sysdeps/unix/sysv/linux/ppoll.c"), "main loop in ppoll: {f0}");
    let missing = r["missing"].as_array().unwrap();
    let qemu = missing.iter().find(|m| m["module"].as_str().unwrap().ends_with("qemu-system-x86_64")).unwrap();
    assert!(qemu["package"].as_str().unwrap().contains("dbgsym"), "{qemu}");
    assert!(!missing.iter().any(|m| m["module"].as_str().unwrap().ends_with("/libc.so.6")), "{missing:?}");

    let text = run_bounded(
        common::tool().args(["inspect", &archive, "--resymbolize", "--debug-dir", "/usr/lib/debug"]),
        Duration::from_secs(90),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ppoll.c:") && text.contains("still without debug info"), "{text}");
}
