//! The native stack snapshot against real processes (x86_64 Linux; needs root or
//! CAP_SYS_PTRACE, `cc`, `strip`/`objcopy`, `eu-stack` and `qemu-system-x86_64`).
//!
//! Targets are children of this test process, in their own process group, killed
//! (whole group) in `Drop`. No wall-clock assertions: times are printed, not checked.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::stacks::native::{render_text, snapshot_and_unwind, NativeOptions, StacksReport, ThreadReport};
use wedge_autopsy::stacks::StackError;

/// A spawned target; the whole process group is SIGKILLed and reaped on drop.
struct Target {
    child: Child,
}

impl Target {
    fn spawn(cmd: &mut Command) -> Target {
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        Target { child: cmd.spawn().expect("spawn target") }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn sh(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

/// Compiles tests/fixtures/parked.c into `dir`: `parked` (-O0 -g), `parked-stripped`
/// (no .symtab, no DWARF), `parked-linked` (stripped + .gnu_debuglink to parked.debug).
fn build_fixtures(dir: &Path) -> BTreeMap<&'static str, PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parked.c");
    let plain = dir.join("parked");
    sh(Command::new("cc").args(["-O0", "-g", "-pthread", "-o"]).arg(&plain).arg(&src));
    let stripped = dir.join("parked-stripped");
    sh(Command::new("strip").arg("-o").arg(&stripped).arg(&plain));
    let debug = dir.join("parked.debug");
    sh(Command::new("objcopy").arg("--only-keep-debug").arg(&plain).arg(&debug));
    let linked = dir.join("parked-linked");
    sh(Command::new("objcopy").arg("--add-gnu-debuglink=parked.debug").arg(&stripped).arg(&linked).current_dir(dir));
    // No .eh_frame for our functions: CFI only in .debug_frame (with -g), or none at
    // all (frame pointers, which -O0 keeps).
    let no_eh = ["-O0", "-pthread", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-omit-frame-pointer"];
    let debug_frame = dir.join("parked-dframe");
    sh(Command::new("cc").args(no_eh).arg("-g").arg("-o").arg(&debug_frame).arg(&src));
    let frame_pointer = dir.join("parked-fp");
    sh(Command::new("cc").args(no_eh).arg("-o").arg(&frame_pointer).arg(&src));
    BTreeMap::from([
        ("plain", plain),
        ("stripped", stripped),
        ("linked", linked),
        ("debug_frame", debug_frame),
        ("frame_pointer", frame_pointer),
    ])
}

fn thread_states(pid: i32) -> Vec<(i32, String, char, Option<i64>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        let dir = e.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else { continue };
        let close = stat.rfind(')').unwrap();
        let comm = stat[stat.find('(').unwrap() + 1..close].to_string();
        let state = stat[close + 2..].chars().next().unwrap();
        let nr =
            std::fs::read_to_string(dir.join("syscall")).ok().and_then(|s| s.split_whitespace().next()?.parse().ok());
        out.push((tid, comm, state, nr));
    }
    out.sort();
    out
}

/// Waits (bounded) until `ok` holds for the target's threads.
fn wait_for(pid: i32, what: &str, mut ok: impl FnMut(&[(i32, String, char, Option<i64>)]) -> bool) {
    let t0 = Instant::now();
    loop {
        let th = thread_states(pid);
        if ok(&th) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "target never reached: {what}; threads: {th:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fixture is parked: main and sig-victim blocked in read (syscall 0).
fn wait_parked(pid: i32, extra: usize) {
    wait_for(pid, "main and sig-victim blocked in read()", |th| {
        th.len() == 2 + extra && th.iter().filter(|t| t.3 == Some(0)).count() == 2
    });
}

/// Nothing left stopped and nobody tracing, for every thread.
fn assert_untouched(pid: i32) {
    for (tid, comm, state, _) in thread_states(pid) {
        assert!(!matches!(state, 'T' | 't'), "thread {tid} ({comm}) left in state {state}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:")).map(|v| v.trim().to_string());
        assert_eq!(tracer.as_deref(), Some("0"), "thread {tid} ({comm}) still traced");
    }
}

fn snapshot(pid: i32) -> StacksReport {
    snapshot_with(pid, &NativeOptions::default())
}

fn snapshot_with(pid: i32, opts: &NativeOptions) -> StacksReport {
    match snapshot_and_unwind(pid, opts, &Cancel::new()) {
        Ok(r) => r,
        Err(e) => panic!("snapshot of {pid} failed: {e}"),
    }
}

fn thread<'a>(r: &'a StacksReport, comm: &str) -> &'a ThreadReport {
    r.threads.iter().find(|t| t.comm == comm).unwrap_or_else(|| panic!("no thread {comm}:\n{}", render_text(r)))
}

fn symbols(t: &ThreadReport) -> Vec<&str> {
    t.frames.iter().map(|f| f.symbol.as_deref().unwrap_or("??")).collect()
}

#[test]
fn call_chain_and_signal_frame_with_debug_info() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    let r = snapshot_with(pid, &NativeOptions { lines: true, ..NativeOptions::default() });
    println!("{}", render_text(&r));
    assert_untouched(pid);
    assert_eq!(r.threads.len(), 2);
    assert!(r.threads.iter().all(|t| t.capture == "stopped" && t.errors.is_empty()), "{r:#?}");

    // main -> a -> b -> c -> read, frame by frame, with lines from DWARF.
    let main = thread(&r, "parked");
    let syms = symbols(main);
    let at = syms.iter().position(|s| *s == "c").unwrap_or_else(|| panic!("no c in {syms:?}"));
    assert_eq!(&syms[at..at + 4], ["c", "b", "a", "main"], "{syms:?}");
    assert!(syms[..at].iter().any(|s| s.contains("read")), "frame 0 is in read: {syms:?}");
    assert_eq!(main.frames[at].line, Some(26), "c's read() call is on line 26");
    assert!(main.frames[at].file.as_deref().unwrap_or("").ends_with("parked.c"));
    assert_eq!(main.end.as_deref(), Some("outermost frame"));
    assert_eq!(syms.last(), Some(&"_start"));

    // read <- on_usr1 <- __restore_rt (signal frame) <- spinner <- victim_thread.
    let victim = thread(&r, "sig-victim");
    let syms = symbols(victim);
    let h = syms.iter().position(|s| *s == "on_usr1").unwrap_or_else(|| panic!("no on_usr1 in {syms:?}"));
    let tramp = &victim.frames[h + 1];
    assert!(tramp.signal_frame, "frame after the handler is the signal trampoline: {:?}", tramp);
    assert_eq!(tramp.symbol.as_deref(), Some("__restore_rt"));
    assert_eq!(&syms[h + 2..h + 4], ["spinner", "victim_thread"], "{syms:?}");
    // The interrupted frame is shown at its exact PC, on the loop's line.
    let spin = &victim.frames[h + 2];
    assert!(matches!(spin.line, Some(39..=41)), "spinner's loop is lines 39-41: {spin:?}");
    assert!(syms.contains(&"start_thread"), "{syms:?}");
    assert_eq!(victim.end.as_deref(), Some("outermost frame"), "{syms:?}");
    assert!(r.freeze_us > 0 && victim.freeze_us.is_some());
}

/// A frame as (module, offset in the module), comparable across processes.
type ModuleOffset = (Option<String>, Option<u64>);

#[test]
fn stripped_binary_unwinds_the_same_and_debuglink_restores_names() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let mut offsets = BTreeMap::new();
    for variant in ["plain", "stripped", "linked"] {
        let target = Target::spawn(&mut Command::new(&bins[variant]));
        wait_parked(target.pid(), 0);
        let r = snapshot(target.pid());
        assert_untouched(target.pid());
        let exe = bins[variant].to_str().unwrap();
        let per_thread: Vec<(String, Vec<ModuleOffset>)> = r
            .threads
            .iter()
            .map(|t| {
                let name = if t.tid == target.pid() { "main".to_string() } else { t.comm.clone() };
                // The PC a signal interrupted (in spinner's loop) differs from run to run.
                let frames = t.frames.iter().enumerate().map(|(i, f)| {
                    let interrupted = i > 0 && t.frames[i - 1].signal_frame;
                    let module = f.module.clone().map(|m| if m == exe { "EXE".into() } else { m });
                    (module, if interrupted { None } else { f.module_offset })
                });
                (name, frames.collect())
            })
            .collect();
        let main = r.threads.iter().find(|t| t.tid == target.pid()).unwrap();
        let syms = symbols(main);
        match variant {
            // Only .dynsym and .eh_frame: c, b, a are unnamed but still unwound through.
            "stripped" => assert!(!syms.contains(&"c") && syms.len() >= 7, "{syms:?}"),
            _ => assert!(syms.windows(4).any(|w| w == ["c", "b", "a", "main"]), "{variant}: {syms:?}"),
        }
        offsets.insert(variant, per_thread);
    }
    // Same code, so the same return addresses (module-relative) in every variant.
    assert_eq!(offsets["plain"], offsets["stripped"]);
    assert_eq!(offsets["plain"], offsets["linked"]);
}

#[test]
fn d_state_thread_is_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(Command::new(&bins["plain"]).arg("vfork"));
    let pid = target.pid();
    wait_parked(pid, 1);
    wait_for(pid, "vforker in D", |th| th.iter().any(|t| t.1 == "vforker" && t.2 == 'D'));
    let r = snapshot(pid);
    println!("{}", render_text(&r));
    assert_untouched(pid);
    let v = thread(&r, "vforker");
    assert!(matches!(v.capture.as_str(), "skipped_d" | "not_stopped"), "{v:?}");
    assert!(!v.errors.is_empty(), "a thread that was not stopped says so");
    assert!(v.wchan.is_some() && v.kernel_stack.is_some(), "{v:?}");
    assert!(v.freeze_us.is_none());
    // Best effort from /proc/TID/syscall: frame 0 is vfork itself.
    // (glibc's vfork is global `__vfork` with a weak alias `vfork`.)
    let f0 = v.frames.first().and_then(|f| f.symbol.as_deref()).unwrap_or("");
    assert!(f0.ends_with("vfork"), "{v:?}");
    assert!(v.end.as_deref().unwrap_or("").contains("register"), "vfork keeps its return address in rdi: {v:?}");
    for t in r.threads.iter().filter(|t| t.comm != "vforker") {
        assert_eq!(t.capture, "stopped", "{t:?}");
    }
    // Still exactly as before: the vforker still in D, the others blocked in read.
    let after = thread_states(pid);
    assert!(after.iter().any(|t| t.1 == "vforker" && t.2 == 'D'), "{after:?}");
    assert_eq!(after.iter().filter(|t| t.3 == Some(0)).count(), 2, "{after:?}");
}

/// Not a test on its own: the body of the process the next test SIGKILLs.
#[test]
#[ignore = "helper: the body of the process tracer_killed_mid_snapshot SIGKILLs; not a test on its own"]
fn snapshot_loop_helper() {
    let pid = std::env::var("WEDGE_TEST_LOOP_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("a helper run by tracer_killed_mid_snapshot_leaves_target_running (WEDGE_TEST_LOOP_PID unset)");
    loop {
        let _ = snapshot_and_unwind(pid, &NativeOptions::default(), &Cancel::new());
    }
}

#[test]
fn tracer_killed_mid_snapshot_leaves_target_running() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    let me = std::env::current_exe().unwrap();
    for round in 0..12u64 {
        let mut helper = Target::spawn(
            Command::new(&me)
                .args(["snapshot_loop_helper", "--ignored", "--exact", "--test-threads=1"])
                .env("WEDGE_TEST_LOOP_PID", pid.to_string()),
        );
        // Kill it while one of its threads is the target's tracer (seen in TracerPid and
        // held there by stopping the helper first), not after a guessed sleep.
        let tracer = common::stop_while_tracing(helper.pid(), pid, Duration::from_secs(60));
        assert!(tracer.is_some(), "round {round}: the helper was never seen tracing the target");
        // SAFETY: SIGKILL to our own child.
        unsafe { libc::kill(helper.pid(), libc::SIGKILL) };
        let st = helper.child.wait().unwrap();
        assert!(!st.success());
        // Once the tracer is reaped, the kernel has detached it everywhere.
        assert_untouched(pid);
        let th = thread_states(pid);
        assert_eq!(th.len(), 2, "target alive: {th:?}");
    }
    // And the target still answers a snapshot, unchanged.
    let r = snapshot(pid);
    assert!(symbols(thread(&r, "parked")).windows(4).any(|w| w == ["c", "b", "a", "main"]));
}

#[test]
fn target_exiting_mid_snapshot_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let mut target = Target::spawn(Command::new(&bins["plain"]).arg("churn"));
    let pid = target.pid();
    let (mut ok, mut gone, mut vanished_threads) = (0, 0, 0);
    let t0 = Instant::now();
    // The churner exits after 1 s (alarm); snapshot it until it is gone.
    while t0.elapsed() < Duration::from_secs(10) {
        match snapshot_and_unwind(pid, &NativeOptions::default(), &Cancel::new()) {
            Ok(r) => {
                ok += 1;
                vanished_threads += r.threads.iter().filter(|t| t.capture == "vanished").count();
                for t in &r.threads {
                    assert!(!matches!(t.capture.as_str(), "failed"), "{t:?}");
                }
            }
            Err(StackError::NoProcess(p)) => {
                assert_eq!(p, pid);
                gone += 1;
                if target.child.try_wait().unwrap().is_some() {
                    break;
                }
            }
            Err(e) => panic!("unexpected error while the target exits: {e}"),
        }
        if target.child.try_wait().unwrap().is_some() {
            // Reaped: the pid is gone for good.
            match snapshot_and_unwind(pid, &NativeOptions::default(), &Cancel::new()) {
                Err(StackError::NoProcess(_)) => gone += 1,
                other => panic!("snapshot of a reaped pid: {:?}", other.map(|r| r.threads.len())),
            }
            break;
        }
    }
    println!("{ok} snapshots while alive ({vanished_threads} threads vanished mid-snapshot), {gone} NoProcess");
    assert!(ok > 0, "at least one snapshot while the churner lived");
    assert!(gone > 0, "the exit was reported as NoProcess");
}

#[test]
fn cancelled_snapshot_detaches_and_says_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    let cancel = Cancel::new();
    cancel.cancel();
    match snapshot_and_unwind(pid, &NativeOptions::default(), &cancel) {
        Err(StackError::Interrupted) => {}
        other => panic!("expected Interrupted, got {:?}", other.map(|r| r.threads.len())),
    }
    assert_untouched(pid);
}

#[test]
fn permission_and_missing_process_errors() {
    // A pid that does not exist.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id() as i32;
    child.wait().unwrap();
    assert!(matches!(
        snapshot_and_unwind(dead, &NativeOptions::default(), &Cancel::new()),
        Err(StackError::NoProcess(p)) if p == dead
    ));
    // Our own process cannot be traced by one of its threads.
    let me = std::process::id() as i32;
    match snapshot_and_unwind(me, &NativeOptions::default(), &Cancel::new()) {
        Err(StackError::Permission { pid, .. }) => assert_eq!(pid, me),
        other => panic!("tracing ourselves must be refused: {:?}", other.map(|r| r.threads.len())),
    }
}

// ---- eu-stack comparison on a real QEMU ----

/// `eu-stack -p PID` output: tid -> [(address, name)].
fn eu_stack(pid: i32) -> BTreeMap<i32, Vec<(u64, Option<String>)>> {
    let out = Command::new("eu-stack").args(["-p", &pid.to_string()]).env_remove("DEBUGINFOD_URLS").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map: BTreeMap<i32, Vec<(u64, Option<String>)>> = BTreeMap::new();
    let mut cur = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("TID ") {
            cur = t.trim_end_matches(':').parse().ok();
            map.insert(cur.unwrap(), Vec::new());
        } else if let (Some(tid), true) = (cur, line.starts_with('#')) {
            let mut it = line.split_whitespace().skip(1);
            let addr = u64::from_str_radix(it.next().unwrap().trim_start_matches("0x"), 16).unwrap();
            let name: Option<String> = it.next().map(|s| s.to_string());
            map.get_mut(&tid).unwrap().push((addr, name));
        }
    }
    map
}

fn strip_version(s: &str) -> &str {
    s.split('@').next().unwrap_or(s)
}

#[test]
fn qemu_threads_match_eu_stack() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64", "-smp", "4"]);
    cmd.args(["-name", "wedge-test,debug-threads=on"]).current_dir(dir.path());
    let qemu = Target::spawn(&mut cmd);
    let pid = qemu.pid();
    // Settled: thread count stable for a while.
    let mut last = 0;
    let mut stable = 0;
    wait_for(pid, "qemu threads settled", |th| {
        stable = if th.len() == last { stable + 1 } else { 0 };
        last = th.len();
        stable >= 25 && th.len() >= 6
    });
    let mut best: Option<(usize, usize, usize, usize, usize, String)> = None;
    for attempt in 0..3 {
        let eu1 = eu_stack(pid);
        let r = snapshot(pid);
        let eu2 = eu_stack(pid);
        assert_untouched(pid);
        let (mut threads_ok, mut frames_ok, mut frames_total, mut named, mut names_equal) = (0, 0, 0, 0, 0);
        let mut eu_named_matching = 0;
        let mut diffs = String::new();
        for t in &r.threads {
            let ours: Vec<u64> = t.frames.iter().map(|f| f.pc).collect();
            let pick = [eu1.get(&t.tid), eu2.get(&t.tid)]
                .into_iter()
                .flatten()
                .max_by_key(|eu| eu.iter().zip(&ours).take_while(|(e, o)| e.0 == **o).count())
                .cloned()
                .unwrap_or_default();
            let same = pick.iter().map(|e| e.0).eq(ours.iter().copied());
            threads_ok += same as usize;
            frames_total += pick.len();
            for (e, f) in pick.iter().zip(&t.frames) {
                if e.0 != f.pc {
                    break;
                }
                frames_ok += 1;
                if let Some(n) = &e.1 {
                    eu_named_matching += 1;
                    named += f.symbol.is_some() as usize;
                    names_equal += (f.symbol.as_deref().map(strip_version) == Some(strip_version(n))) as usize;
                }
            }
            if !same {
                diffs += &format!("tid {} ({}): ours {:x?}\n  eu-stack {:x?}\n", t.tid, t.name, ours, pick);
            }
        }
        let eu_named: usize =
            r.threads.iter().filter_map(|t| eu1.get(&t.tid)).flat_map(|v| v.iter()).filter(|e| e.1.is_some()).count();
        println!(
            "attempt {attempt}: {threads_ok}/{} threads identical, {frames_ok}/{frames_total} frames, \
             {named} of the eu-stack-named matching frames named by us, {names_equal} with the same name \
             (eu-stack named {eu_named} frames); freeze {} µs\n{diffs}",
            r.threads.len(),
            r.freeze_us
        );
        let all = threads_ok == r.threads.len();
        if best.as_ref().is_none_or(|b| threads_ok > b.0) {
            best = Some((threads_ok, r.threads.len(), frames_ok, frames_total, eu_named_matching - named, diffs));
        }
        if all {
            break;
        }
    }
    let (threads_ok, threads, frames_ok, frames_total, unnamed, diffs) = best.unwrap();
    assert_eq!(threads_ok, threads, "every thread's return addresses equal eu-stack's:\n{diffs}");
    assert_eq!(frames_ok, frames_total);
    assert_eq!(unnamed, 0, "a name wherever eu-stack has one");
}

#[test]
fn runbook_method_writes_json_and_grouped_text() {
    use wedge_autopsy::stacks::{method, StackRequest};
    use wedge_autopsy::step::StepSink;
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    let out = tempfile::tempdir().unwrap();
    let sink = StepSink::new(out.path());
    let cancel = Cancel::new();
    let victim_tid = thread_states(pid).into_iter().find(|t| t.1 == "sig-victim").unwrap().0;
    let req = StackRequest {
        pid,
        sink: &sink,
        deadline: Instant::now() + Duration::from_secs(30),
        cancel: &cancel,
        labels: BTreeMap::from([(victim_tid, "iothread0".to_string())]),
        debug_dirs: vec![],
    };
    let m = method("native").expect("native is registered");
    assert_eq!(m.name(), "native");
    let summary = m.capture(&req).unwrap();
    assert!(summary.starts_with("2 threads,"), "{summary}");
    assert_untouched(pid);
    let (files, _notes) = sink.close();
    assert_eq!(
        files,
        ["stacks/threads.json", "stacks/raw/data.bin", "stacks/raw/snapshot.json", "stacks/threads.txt"]
            .map(String::from)
            .to_vec()
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("stacks/threads.json")).unwrap()).unwrap();
    assert_eq!(json["method"], "native");
    assert!(json["freeze_us"].as_u64().is_some());
    let threads = json["threads"].as_array().unwrap();
    let v = threads.iter().find(|t| t["tid"] == victim_tid).unwrap();
    assert_eq!(v["name"], "sig-victim [iothread0]");
    assert_eq!(v["state"], "S");
    assert!(v["frames"].as_array().unwrap().iter().any(|f| f["symbol"] == "spinner" && f["line"].is_u64()));
    let text = std::fs::read_to_string(out.path().join("stacks/threads.txt")).unwrap();
    assert!(text.contains("[iothread0]") && text.contains("in spinner+0x"), "{text}");
    assert!(text.contains("<signal handler called>"), "{text}");
}

#[test]
fn threads_that_miss_the_deadline_are_released_when_the_tracer_thread_exits() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    // A zero deadline: every thread is seized and interrupted but never waited for,
    // as a thread stuck in the kernel would be. Their interrupts complete (or not)
    // after the ptrace thread has given up; its exit must release them.
    let mut opts = NativeOptions::default();
    opts.freeze.stop_timeout = Duration::ZERO;
    let r = snapshot_with(pid, &opts);
    println!("{}", render_text(&r));
    for t in &r.threads {
        assert_eq!(t.capture, "not_stopped", "{t:?}");
        assert!(t.errors.iter().any(|e| e.contains("did not stop")), "{t:?}");
        assert!(t.syscall.is_some(), "PC/SP from /proc/TID/syscall instead: {t:?}");
    }
    assert!(r.notes.iter().all(|n| !n.contains("left stopped") && !n.contains("still traced")), "{:?}", r.notes);
    assert_untouched(pid);
    // Still parked where it was: both threads back in read().
    wait_parked(pid, 0);
}

#[test]
fn a_process_stopped_by_someone_else_stays_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    let target = Target::spawn(&mut Command::new(&bins["plain"]));
    let pid = target.pid();
    wait_parked(pid, 0);
    // SAFETY: SIGSTOP to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_for(pid, "group-stopped", |th| th.iter().all(|t| t.2 == 'T'));
    let r = snapshot(pid);
    // Captured through the group-stop...
    assert!(r.threads.iter().all(|t| t.capture == "stopped" && t.state == 'T'), "{r:#?}");
    assert!(symbols(thread(&r, "parked")).windows(4).any(|w| w == ["c", "b", "a", "main"]));
    // ...and left in it: still T, untraced, not resumed by us.
    let th = thread_states(pid);
    assert!(th.iter().all(|t| t.2 == 'T'), "{th:?}");
    for (tid, ..) in &th {
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        assert!(status.contains("TracerPid:\t0"), "{status}");
    }
    // SAFETY: SIGCONT to our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_parked(pid, 0);
}

#[test]
fn debug_frame_and_frame_pointer_fallbacks() {
    use wedge_autopsy::stacks::native::unwind::Via;
    let dir = tempfile::tempdir().unwrap();
    let bins = build_fixtures(dir.path());
    for variant in ["debug_frame", "frame_pointer"] {
        let target = Target::spawn(&mut Command::new(&bins[variant]));
        let pid = target.pid();
        wait_parked(pid, 0);
        let r = snapshot(pid);
        assert_untouched(pid);
        let main = r.threads.iter().find(|t| t.tid == pid).unwrap();
        let syms = symbols(main);
        let at = syms.iter().position(|s| *s == "c").unwrap_or_else(|| panic!("{variant}: no c in {syms:?}"));
        assert_eq!(&syms[at..at + 4], ["c", "b", "a", "main"], "{variant}");
        assert_eq!(syms.last(), Some(&"_start"), "{variant}: {syms:?}");
        // How b, a and main were reached: CFI from .debug_frame, or the rbp chain.
        let want = if variant == "debug_frame" { Via::Cfi } else { Via::FramePointer };
        for f in &main.frames[at + 1..at + 4] {
            assert_eq!(f.via, want, "{variant}: {f:?}");
        }
        let victim = thread(&r, "sig-victim");
        let syms = symbols(victim);
        let h = syms.iter().position(|s| *s == "on_usr1").unwrap_or_else(|| panic!("{variant}: {syms:?}"));
        assert_eq!(&syms[h + 1..h + 4], ["__restore_rt", "spinner", "victim_thread"], "{variant}");
    }
}
