//! The fault matrix (issue #9): every test injects one fault into a run of the real
//! binary and asserts what was sealed, what the manifest and exit code say, and that
//! the VM's threads are as they were found (no thread newly stopped, `TracerPid` 0).
//!
//! Each test's doc comment is two lines, `Fault: …` and `Outcome: …`; `scripts/fault-table`
//! turns them into `docs/faults.md`, and `fault_table_is_current` keeps that file honest.
//!
//! QMP faults use a scripted socket ([`common::fake_qmp`]) bound at `<run_dir>/<vmid>.qmp`
//! after QEMU's own socket was moved aside; the pid is still a real lab QEMU, proven by
//! its pidfile, so the stacks and /proc steps run against real threads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::fake_qmp::{Act, FakeQmp, Script};
use common::{run_bounded, tracer_pid, wait_until, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// helpers

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}); status {}; stderr:\n{}", o.status, stderr(o)))
}

fn step<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["steps"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no step {id} in {json}"))
}

fn status<'a>(json: &'a Value, id: &str) -> &'a str {
    step(json, id)["status"].as_str().unwrap()
}

fn err_of(json: &Value, id: &str) -> String {
    step(json, id)["error"].as_str().unwrap_or("").to_string()
}

/// The sealed archive named in `--json` output, verified (every hash, the sidecar).
fn sealed(json: &Value) -> ArchiveReader {
    assert_eq!(json["sealed"], true, "not sealed: {json}");
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    let report = archive::verify(&path).expect("archive verifies");
    assert_eq!(json["sha256"].as_str().unwrap(), report.sha256);
    ArchiveReader::open(&path).unwrap()
}

fn thread_states(pid: i32) -> BTreeMap<i32, char> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let (Some(tid), Some(st)) = (
            e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()),
            std::fs::read_to_string(e.path().join("stat")).ok(),
        ) {
            if let Some(c) = st.rfind(')').and_then(|i| st[i + 1..].trim_start().chars().next()) {
                m.insert(tid, c);
            }
        }
    }
    m
}

/// The process is as it was found: no thread newly stopped, nobody tracing it.
fn as_found(pid: i32, before: &BTreeMap<i32, char>) {
    let after = thread_states(pid);
    for (tid, st) in &after {
        if matches!(st, 'T' | 't') {
            assert!(
                matches!(before.get(tid), Some('T' | 't')),
                "thread {tid} left stopped: before {before:?} after {after:?}"
            );
        }
    }
    assert_eq!(tracer_pid(pid), 0, "pid {pid} still traced");
}

fn write_runbook(lab: &Lab, name: &str, steps: &str) -> PathBuf {
    let p = lab.root().join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("schema = 1\nname = \"{name}\"\ndescription = \"fault test\"\ndeadline = \"90s\"\n{steps}"),
    )
    .unwrap();
    p
}

/// proc, three QMP steps (blockstats sampled twice), native stacks.
const QMP_STEPS: &str = r#"
[[step]]
id = "proc"
kind = "proc"

[[step]]
id = "qmp-status"
kind = "qmp"
command = "query-status"
timeout = "2s"

[[step]]
id = "qmp-blockstats"
kind = "qmp"
command = "query-blockstats"
samples = 2
timeout = "2s"

[[step]]
id = "qmp-block"
kind = "qmp"
command = "query-block"
timeout = "2s"

[[step]]
id = "stacks"
kind = "stacks"
methods = ["native"]
timeout = "15s"
"#;

fn lab(vmid: u32) -> Lab {
    Lab::start(LabOptions { vmid, name: format!("f{vmid}"), mbps: 0, ..LabOptions::default() })
}

/// A lab VM whose `<vmid>.qmp` is served by a scripted fake (QEMU's socket is moved
/// aside, so the tool can only reach the fake).
fn fake_lab(vmid: u32, script: Script) -> (Lab, FakeQmp) {
    let lab = lab(vmid);
    std::fs::rename(lab.qmp_path(), lab.run_dir().join(format!("{vmid}.real-qmp"))).unwrap();
    let fake = FakeQmp::start(&lab.qmp_path(), script);
    (lab, fake)
}

fn run_qmp_fault(lab: &Lab) -> (Output, Value) {
    let rb = write_runbook(lab, "qmpfault", QMP_STEPS);
    let vmid = lab.vmid().to_string();
    let out = run_bounded(
        &mut lab.tool_args(&[&vmid, "--json", "--sample-interval", "500ms", "--runbook", rb.to_str().unwrap()]),
        RUN_TIMEOUT,
    );
    let json = json_of(&out);
    (out, json)
}

/// Common to every QMP fault: sealed, exit 1, /proc and stacks captured anyway,
/// the VM as found, and the fake received nothing once it misbehaved.
fn qmp_fault_common(
    lab: &Lab,
    fake: &FakeQmp,
    before: &BTreeMap<i32, char>,
    out: &Output,
    json: &Value,
) -> ArchiveReader {
    assert_eq!(out.status.code(), Some(1), "partial: {}\n{json}", stderr(out));
    let ar = sealed(json);
    assert_eq!(status(json, "proc"), "ok");
    assert_eq!(status(json, "stacks"), "ok", "{}", err_of(json, "stacks"));
    assert!(ar.read("stacks/threads.json").is_some(), "{:?}", ar.list());
    assert!(ar.read("qmp/transcript.jsonl").is_some(), "{:?}", ar.list());
    let after = fake.received_after_fault();
    assert!(after.is_empty(), "sent after the fault: {after:?}");
    for c in fake.commands() {
        assert!(c.starts_with("query-") || c == "qmp_capabilities" || c.starts_with("qom-"), "non-read-only {c}");
    }
    as_found(lab.pid(), before);
    ar
}

fn only(cmd: &'static str, acts: impl Fn(&Value) -> Vec<Act> + Send + Sync + 'static) -> common::fake_qmp::Responder {
    Box::new(move |c, id| if c == cmd { acts(id) } else { vec![Act::Reply] })
}

// ---------------------------------------------------------------------------
// QMP

/// Fault: QMP socket accepts but never greets (held by another client, or QEMU frozen).
/// Outcome: qmp-connect failed (no-greeting) after the 10 s budget with every attempt noted, QMP steps skipped (nothing sent), /proc and stacks sealed, exit 1.
#[test]
fn qmp_no_greeting() {
    let (lab, fake) = fake_lab(201, Script { greet: false, ..Default::default() });
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-connect"), "failed");
    assert!(err_of(&json, "qmp-connect").contains("no-greeting"), "{}", err_of(&json, "qmp-connect"));
    for s in ["qmp-status", "qmp-blockstats", "qmp-block"] {
        assert_eq!(status(&json, s), "skipped", "{s}");
    }
    assert!(fake.received().is_empty(), "nothing may be sent before a greeting: {:?}", fake.received());
    assert!(fake.connections() >= 2, "retried within the budget");
    assert_eq!(json["verdict"], "qmp-unreachable");
}

/// Fault: QMP greets, then never answers `qmp_capabilities` (main loop wedged).
/// Outcome: qmp-connect failed (capabilities unanswered), nothing sent after qmp_capabilities, QMP steps skipped, exit 1.
#[test]
fn qmp_greeting_then_silence() {
    let (lab, fake) = fake_lab(202, Script { answer_capabilities: false, ..Default::default() });
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-connect"), "failed");
    assert_eq!(fake.commands(), ["qmp_capabilities"], "exactly one line sent");
    assert_eq!(status(&json, "qmp-status"), "skipped");
}

/// Fault: a reply cut off mid-line, then silence (socket left open).
/// Outcome: that step times out at its deadline, the partial line is in the transcript, later QMP steps are skipped without sending, exit 1.
#[test]
fn qmp_reply_cut_mid_line() {
    let script = Script {
        on: only("query-status", |id| {
            vec![Act::Raw(format!("{{\"return\": {{\"status\": \"runn\", \"id\": {id}").into_bytes()), Act::Hang]
        }),
        ..Default::default()
    };
    let (lab, fake) = fake_lab(203, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    let ar = qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-connect"), "ok");
    assert_eq!(status(&json, "qmp-status"), "timeout");
    assert_eq!(status(&json, "qmp-blockstats"), "skipped");
    assert!(ar.read("qmp/query-status.json").is_none(), "no half reply sealed as a reply");
    assert!(ar.read_string("qmp/transcript.jsonl").unwrap().contains("runn"), "partial line kept");
}

/// Fault: garbage bytes (not JSON, invalid UTF-8) instead of a reply.
/// Outcome: step failed as a protocol error with the bytes escaped in the transcript, session ended, later QMP steps skipped, exit 1.
#[test]
fn qmp_garbage_bytes() {
    let script = Script {
        on: only("query-status", |_| vec![Act::Raw(b"\xff\xfe\x00garbage\x1b[31m{{{\r\n".to_vec()), Act::Hang]),
        ..Default::default()
    };
    let (lab, fake) = fake_lab(204, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    let ar = qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-status"), "failed");
    assert!(err_of(&json, "qmp-status").contains("not JSON"), "{}", err_of(&json, "qmp-status"));
    assert_eq!(status(&json, "qmp-block"), "skipped");
    let t = ar.read_string("qmp/transcript.jsonl").unwrap();
    assert!(t.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "transcript stays JSONL: {t}");
}

/// Fault: a reply line larger than the 8 MiB reply cap.
/// Outcome: read stops at the cap (only a 4 KiB head kept), step failed (reply too large), later QMP steps skipped, exit 1.
#[test]
fn qmp_reply_over_cap() {
    let script = Script {
        on: only("query-block", |id| {
            let mut big = format!("{{\"id\": {id}, \"return\": \"").into_bytes();
            big.extend(std::iter::repeat_n(b'x', 9 << 20));
            big.extend_from_slice(b"\"}\r\n");
            vec![Act::Raw(big), Act::Hang]
        }),
        ..Default::default()
    };
    let (lab, fake) = fake_lab(205, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    let ar = qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-status"), "ok");
    assert_eq!(status(&json, "qmp-block"), "failed");
    assert!(
        err_of(&json, "qmp-block").contains("too large") || err_of(&json, "qmp-block").contains("cap"),
        "{}",
        err_of(&json, "qmp-block")
    );
    assert!(ar.read("qmp/query-block.json").is_none());
    let t = ar.read("qmp/transcript.jsonl").unwrap();
    assert!(t.len() < 1 << 20, "transcript bounded: {} bytes", t.len());
}

/// Fault: a reply carrying a foreign id arrives before the real one.
/// Outcome: the foreign reply is skipped and noted in the transcript, the right reply is sealed, all steps ok, exit 0.
#[test]
fn qmp_foreign_id() {
    let script = Script {
        on: only("query-status", |id| {
            vec![
                Act::Raw(common::fake_qmp::reply_line(
                    &Value::String("pvestatd-7".into()),
                    serde_json::json!({"status": "paused"}),
                )),
                Act::Raw(common::fake_qmp::reply_line(id, common::fake_qmp::canned("query-status"))),
            ]
        }),
        ..Default::default()
    };
    let (lab, fake) = fake_lab(206, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    assert_eq!(out.status.code(), Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    assert_eq!(
        ar.read_json("qmp/query-status.json").unwrap()["return"]["status"],
        "running",
        "the foreign 'paused' was not taken"
    );
    assert!(ar.read_string("qmp/transcript.jsonl").unwrap().contains("pvestatd-7"));
    assert_eq!(fake.commands().len(), 5, "capabilities, status, 2 blockstats, block: {:?}", fake.commands());
    as_found(lab.pid(), &before);
}

/// Fault: a flood of 20 000 events before a reply.
/// Outcome: the reply is taken, 1000 events kept and the rest counted (qmp/events.json and a transcript note), memory bounded, exit 0.
#[test]
fn qmp_event_flood() {
    let script = Script {
        on: only("query-status", |id| {
            let mut flood = Vec::new();
            for i in 0..20_000 {
                flood.extend_from_slice(format!("{{\"event\": \"BLOCK_IO_ERROR\", \"data\": {{\"n\": {i}}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\r\n").as_bytes());
            }
            flood.extend(common::fake_qmp::reply_line(id, common::fake_qmp::canned("query-status")));
            vec![Act::Raw(flood)]
        }),
        ..Default::default()
    };
    let (lab, _fake) = fake_lab(207, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    assert_eq!(out.status.code(), Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    assert_eq!(status(&json, "qmp-status"), "ok");
    let events = ar.read_json("qmp/events.json").unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1000);
    assert!(ar.read_string("qmp/transcript.jsonl").unwrap().contains("19000 events dropped"));
    as_found(lab.pid(), &before);
}

/// Fault: the socket is closed in the middle of a reply (second blockstats sample).
/// Outcome: first sample sealed, the sampled step failed (closed), later QMP steps skipped, nothing sent after, exit 1.
#[test]
fn qmp_closed_mid_reply() {
    let n = std::sync::atomic::AtomicU32::new(0);
    let script = Script {
        on: Box::new(move |c, _id| {
            if c == "query-blockstats" && n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                vec![Act::Raw(b"{\"return\": [{\"device\": \"drive-scs".to_vec()), Act::Close]
            } else {
                vec![Act::Reply]
            }
        }),
        ..Default::default()
    };
    let (lab, fake) = fake_lab(208, script);
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    let ar = qmp_fault_common(&lab, &fake, &before, &out, &json);
    assert_eq!(status(&json, "qmp-blockstats"), "failed", "{}", err_of(&json, "qmp-blockstats"));
    assert!(ar.read("qmp/query-blockstats.1.json").is_some());
    assert!(ar.read("qmp/query-blockstats.2.json").is_none());
}

// ---------------------------------------------------------------------------
// the target

/// Spawns the tool with `args` and piped output; caller waits.
fn spawn_tool(lab: &Lab, args: &[&str], path_prefix: Option<&Path>) -> Child {
    let mut cmd = lab.tool_args(args);
    if let Some(p) = path_prefix {
        cmd.env("PATH", format!("{}:{}", p.display(), std::env::var("PATH").unwrap_or_default()));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn wait_output(child: Child) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("tool did not finish within {RUN_TIMEOUT:?}");
        }
    }
}

/// Waits until a process with exactly this argv exists.
fn wait_for_argv(argv: &[&str]) -> i32 {
    let mut found = 0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            found = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .find(|&p| common::proc_cmdline(p).is_some_and(|a| a == argv))
                .unwrap_or(0);
            found != 0
        }),
        "{argv:?} never started"
    );
    found
}

const SLOW_THEN_STACKS: &str = r#"
[[step]]
id = "proc"
kind = "proc"

[[step]]
id = "qmp-status"
kind = "qmp"
command = "query-status"
timeout = "2s"

[[step]]
id = "nap"
kind = "command"
argv = ["sleep", "7.25"]
timeout = "30s"

[[step]]
id = "qmp-block"
kind = "qmp"
command = "query-block"
timeout = "2s"

[[step]]
id = "stacks"
kind = "stacks"
methods = ["native", "gdb"]
timeout = "15s"

[[step]]
id = "proc-after"
kind = "proc"

[[step]]
id = "pid-command"
kind = "command"
argv = ["cat", "/proc/{pid}/comm"]
"#;

/// Fault: QEMU exits (SIGKILL) in the middle of the capture, during a slow step.
/// Outcome: sealed with what was captured before; later QMP step failed (closed), stacks failed ("no longer VM's QEMU", nothing traced), exit 1.
#[test]
fn target_exits_mid_capture() {
    let lab = lab(211);
    let rb = write_runbook(&lab, "slow", SLOW_THEN_STACKS);
    let child = spawn_tool(&lab, &["211", "--json", "--runbook", rb.to_str().unwrap()], None);
    wait_for_argv(&["sleep", "7.25"]);
    lab.kill();
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    assert_eq!(status(&json, "proc"), "ok");
    assert_eq!(status(&json, "qmp-status"), "ok");
    assert_eq!(status(&json, "nap"), "ok");
    assert_eq!(status(&json, "qmp-block"), "failed", "{}", err_of(&json, "qmp-block"));
    assert_eq!(status(&json, "stacks"), "failed");
    assert!(err_of(&json, "stacks").contains("no longer"), "{}", err_of(&json, "stacks"));
    assert!(ar.read("proc/status").is_some());
    assert!(ar.read("qmp/query-status.json").is_some());
}

/// Fault: QEMU dies mid-capture and its pid is reused by an unrelated process (forced via `ns_last_pid`) before the stacks step.
/// Outcome: `still_same()` sees another start time and cmdline: stacks, a later /proc step and a `{pid}` command all fail "no longer VM's QEMU" (nothing traced or read); the foreign process stays untouched (state S, TracerPid 0), exit 1.
#[test]
fn target_pid_reused_by_foreign_process() {
    let lab = lab(212);
    let pid = lab.pid();
    let rb = write_runbook(&lab, "slow", SLOW_THEN_STACKS);
    let child = spawn_tool(&lab, &["212", "--json", "--runbook", rb.to_str().unwrap()], None);
    wait_for_argv(&["sleep", "7.25"]);
    lab.kill();
    // Take the pid over: set the last pid handed out to pid-1 and fork, retrying
    // while other processes on the machine race us for it.
    let mut foreign = None;
    assert!(
        wait_until(Duration::from_secs(30), || !Path::new(&format!("/proc/{pid}")).exists()),
        "pid {pid} never released (not reaped)"
    );
    for _ in 0..200 {
        if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
            eprintln!("SKIP part: cannot write ns_last_pid; pid reuse not forced");
            break;
        }
        let c = Command::new("sleep").arg("300").spawn().unwrap();
        if c.id() as i32 == pid {
            foreign = Some(c);
            break;
        }
        let mut c = c;
        let _ = c.kill();
        let _ = c.wait();
    }
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    assert_eq!(status(&json, "stacks"), "failed");
    assert!(err_of(&json, "stacks").contains("no longer"), "{}", err_of(&json, "stacks"));
    let mut foreign = foreign.expect("could not make an unrelated process take over the pid within 200 tries");
    // Neither /proc nor a {pid} command may be filed from the stranger.
    assert_eq!(status(&json, "proc-after"), "failed");
    assert!(err_of(&json, "proc-after").contains("no longer"), "{}", err_of(&json, "proc-after"));
    assert_eq!(status(&json, "pid-command"), "failed");
    assert!(err_of(&json, "pid-command").contains("no longer"), "{}", err_of(&json, "pid-command"));
    assert!(
        wait_until(Duration::from_secs(5), || common::proc_state(pid) == Some('S')),
        "foreign process untouched: {:?}",
        common::proc_state(pid)
    );
    assert_eq!(tracer_pid(pid), 0);
    // The run's later /proc step must not have captured the stranger either.
    let _ = foreign.kill();
    let _ = foreign.wait();
}

fn cc_parked(dir: &Path) -> PathBuf {
    let bin = dir.join("parked");
    let st = Command::new("cc")
        .args(["-O0", "-g", "-pthread", "-o"])
        .arg(&bin)
        .arg(common::repo_root().join("tests/fixtures/parked.c"))
        .status()
        .expect("cc");
    assert!(st.success());
    bin
}

/// Adds VM `vmid` to the lab's cluster list and config dir, and makes `cmd` (whose argv
/// must name `-pidfile <run_dir>/<vmid>.pid`) its "QEMU" via the pidfile.
fn standin_vm(lab: &Lab, vmid: u32, mut cmd: Command) -> i32 {
    let vmlist = lab.pve_dir().join(".vmlist");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&vmlist).unwrap()).unwrap();
    let node = v["ids"][lab.vmid().to_string()]["node"].clone();
    v["ids"][vmid.to_string()] = serde_json::json!({"node": node, "type": "qemu", "version": 1});
    std::fs::write(&vmlist, v.to_string()).unwrap();
    std::fs::copy(lab.conf_path(), lab.pve_dir().join(format!("qemu-server/{vmid}.conf"))).unwrap();
    let pid = lab.spawn(&mut cmd) as i32;
    std::fs::write(lab.run_dir().join(format!("{vmid}.pid")), format!("{pid}\n")).unwrap();
    pid
}

/// Fault: a target thread sits in D state (a vfork parent waiting on its child) and never reaches a ptrace stop.
/// Outcome: the native snapshot finishes within its deadline, the D thread recorded as `skipped_d` with its syscall/kernel stack read without a stop, stacks ok, the process keeps running as found, untraced.
#[test]
fn target_thread_in_d_state() {
    let lab = lab(213);
    let bin = cc_parked(lab.root());
    let pidfile = lab.run_dir().join("214.pid");
    let mut cmd = Command::new(&bin);
    cmd.arg("vfork").arg("-pidfile").arg(&pidfile);
    let pid = standin_vm(&lab, 214, cmd);
    assert!(
        wait_until(Duration::from_secs(10), || thread_states(pid).values().any(|&c| c == 'D')),
        "no D thread: {:?}",
        thread_states(pid)
    );
    let before = thread_states(pid);
    let out = run_bounded(&mut lab.tool_args(&["214", "--json", "--no-qmp", "--stacks", "native"]), RUN_TIMEOUT);
    let json = json_of(&out);
    let ar = sealed(&json);
    assert_eq!(status(&json, "stacks"), "ok", "{}", err_of(&json, "stacks"));
    let threads = ar.read_json("stacks/threads.json").unwrap();
    let vforker =
        threads["threads"].as_array().unwrap().iter().find(|t| t["comm"] == "vforker").expect("D thread listed");
    assert_eq!(vforker["capture"], "skipped_d", "{vforker}");
    assert!(vforker["syscall"].is_object() || vforker["kernel_stack"].is_array(), "read without a stop: {vforker}");
    assert!(thread_states(pid).values().any(|&c| c == 'D'), "the vforker is still in D");
    as_found(pid, &before);
    assert!(common::pid_alive(pid));
}

/// Fault: the QEMU was already stopped (SIGSTOP) by someone else before the run.
/// Outcome: QMP has no greeting (recorded), stacks still captured, and the process is left stopped exactly as found (not resumed behind the stopper's back), untraced, exit 1.
#[test]
fn target_already_stopped_is_left_stopped() {
    let lab = lab(215);
    lab.sigstop();
    let pid = lab.pid();
    assert!(wait_until(Duration::from_secs(5), || thread_states(pid).values().all(|&c| c == 'T')));
    let before = thread_states(pid);
    let out = run_bounded(&mut lab.tool_args(&["215", "--json", "--sample-interval", "0"]), RUN_TIMEOUT);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    assert_eq!(status(&json, "qmp-connect"), "failed");
    assert_eq!(status(&json, "stacks"), "ok", "{}", err_of(&json, "stacks"));
    assert_eq!(thread_states(pid), before, "still stopped, every thread");
    assert_eq!(tracer_pid(pid), 0);
    lab.sigcont();
}

// ---------------------------------------------------------------------------
// external tools

/// A directory with executable scripts `name -> body` to put first on PATH.
fn fake_bin(lab: &Lab, tools: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = lab.root().join("fakebin");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body) in tools {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A gdb that does what a wedged gdb does: stops the whole process, then hangs.
const HANGING_GDB: &str = r#"while [ $# -gt 0 ]; do [ "$1" = "-p" ] && kill -STOP "$2"; shift; done
exec sleep 600"#;

/// Fault: gdb hangs after stopping every thread of the target (fake `gdb` first on PATH).
/// Outcome: gdb killed (with its process group) at the stacks deadline, the threads it stopped resumed with SIGCONT and noted, stacks failed ("gdb: timed out"), sealed, exit 1.
#[test]
fn tool_gdb_hangs() {
    let lab = lab(221);
    let bin = fake_bin(&lab, &[("gdb", HANGING_GDB)]);
    let rb = write_runbook(&lab, "gdb", "[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"stacks\"\nkind = \"stacks\"\nmethods = [\"gdb\"]\ntimeout = \"4s\"\n");
    let pid = lab.pid();
    let before = thread_states(pid);
    let out = wait_output(spawn_tool(&lab, &["221", "--json", "--runbook", rb.to_str().unwrap()], Some(&bin)));
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    assert_eq!(status(&json, "stacks"), "failed");
    assert!(err_of(&json, "stacks").contains("timed out"), "{}", err_of(&json, "stacks"));
    let ar = sealed(&json);
    let notes = ar.manifest.steps.iter().find(|s| s.id == "stacks").unwrap().notes.join("; ");
    assert!(notes.contains("resumed"), "{notes}");
    assert!(
        wait_until(Duration::from_secs(5), || thread_states(pid).values().all(|c| !matches!(c, 'T' | 't'))),
        "{:?}",
        thread_states(pid)
    );
    as_found(pid, &before);
    assert!(
        !std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|e| common::proc_cmdline(e.file_name().to_str().and_then(|s| s.parse().ok()).unwrap_or(0))
                .is_some_and(|a| a == ["sleep", "600"])),
        "gdb's process group killed"
    );
}

/// Fault: `journalctl` floods output without end (fake first on PATH), default runbook.
/// Outcome: its output is capped, the process group killed at the step's 10 s deadline, the (optional) step recorded as timeout with a cap note; everything else ok, exit 0.
#[test]
fn tool_journalctl_floods() {
    let lab = lab(222);
    let bin = fake_bin(&lab, &[("journalctl", "exec yes 'Nov 25 journal line flooding the pipe'")]);
    let before = thread_states(lab.pid());
    let out = wait_output(spawn_tool(&lab, &["222", "--json", "--sample-interval", "0"], Some(&bin)));
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "the journal step is optional: {}\n{json}", stderr(&out));
    let ar = sealed(&json);
    assert_eq!(status(&json, "journal"), "timeout", "{}", err_of(&json, "journal"));
    let rec = ar.manifest.steps.iter().find(|s| s.id == "journal").unwrap();
    assert!(rec.optional && rec.notes.iter().any(|n| n.contains("capped")), "{rec:?}");
    let j = ar.read("host/journal.txt").unwrap();
    assert!(j.len() <= 8 << 20 && j.len() > 1 << 20, "capped output kept: {} bytes", j.len());
    for s in ["proc", "qmp-status", "stacks", "config"] {
        assert_eq!(status(&json, s), "ok", "{s}");
    }
    as_found(lab.pid(), &before);
}

// ---------------------------------------------------------------------------
// the tool itself

fn signal(child: &Child, sig: i32) {
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Fault: SIGTERM while the tool waits for a QMP greeting that never comes.
/// Outcome: qmp-connect interrupted, every later step interrupted, archive sealed with /proc, exit 1.
#[test]
fn self_sigterm_during_qmp_connect() {
    let (lab, fake) = fake_lab(231, Script { greet: false, ..Default::default() });
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "qmpfault", QMP_STEPS);
    let child = spawn_tool(&lab, &["231", "--json", "--runbook", rb.to_str().unwrap()], None);
    assert!(wait_until(Duration::from_secs(30), || fake.connections() >= 1));
    signal(&child, libc::SIGTERM);
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    assert_eq!(json["interrupted"], true);
    let ar = sealed(&json);
    assert!(ar.manifest.interrupted);
    assert_eq!(status(&json, "proc"), "ok");
    assert_eq!(status(&json, "qmp-connect"), "interrupted");
    assert_eq!(status(&json, "stacks"), "interrupted");
    assert!(fake.received().is_empty());
    as_found(lab.pid(), &before);
}

/// Fault: SIGINT while a blockstats sample waits for its interval (30 s) in the background.
/// Outcome: the first sample is sealed, the sampled step interrupted, no second QMP command sent, exit 1.
#[test]
fn self_sigint_during_sampling() {
    let (lab, fake) = fake_lab(232, Script::default());
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "qmpfault", QMP_STEPS);
    let child =
        spawn_tool(&lab, &["232", "--json", "--sample-interval", "30s", "--runbook", rb.to_str().unwrap()], None);
    // The stacks step is the last; once it has run the tool only waits for sample 2.
    assert!(wait_until(Duration::from_secs(40), || fake.commands().iter().any(|c| c == "query-block")));
    std::thread::sleep(Duration::from_secs(3));
    signal(&child, libc::SIGINT);
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    assert_eq!(status(&json, "qmp-blockstats"), "interrupted");
    assert!(ar.read("qmp/query-blockstats.1.json").is_some());
    assert!(ar.read("qmp/query-blockstats.2.json").is_none());
    assert_eq!(fake.commands().iter().filter(|c| *c == "query-blockstats").count(), 1);
    as_found(lab.pid(), &before);
}

/// Fault: SIGTERM while gdb (hung, with the VM stopped) is running in the stacks step.
/// Outcome: gdb's group killed, the threads it stopped resumed, stacks interrupted, archive sealed, exit 1.
#[test]
fn self_sigterm_during_gdb() {
    let lab = lab(233);
    let bin = fake_bin(&lab, &[("gdb", HANGING_GDB)]);
    let pid = lab.pid();
    let before = thread_states(pid);
    let child = spawn_tool(&lab, &["233", "--json", "--stacks", "gdb", "--sample-interval", "0"], Some(&bin));
    assert!(
        wait_until(Duration::from_secs(60), || thread_states(pid).values().any(|&c| c == 'T')),
        "fake gdb never stopped the VM"
    );
    signal(&child, libc::SIGTERM);
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    assert_eq!(status(&json, "stacks"), "interrupted", "{}", err_of(&json, "stacks"));
    assert!(
        wait_until(Duration::from_secs(5), || thread_states(pid).values().all(|c| !matches!(c, 'T' | 't'))),
        "{:?}",
        thread_states(pid)
    );
    as_found(pid, &before);
}

/// Fault: SIGKILL of the tool in the middle of a run (during a slow command step).
/// Outcome: no archive and a `.<name>.<pid>.staging` dir left behind; the VM is not left stopped or traced; the next run removes the leftover, notes it, and seals, exit 0.
#[test]
fn self_sigkill_leaves_nothing_the_next_run_does_not_clean() {
    let lab = lab(234);
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "slow", SLOW_THEN_STACKS);
    let child = spawn_tool(&lab, &["234", "--json", "--runbook", rb.to_str().unwrap()], None);
    let sleeper = wait_for_argv(&["sleep", "7.25"]);
    signal(&child, libc::SIGKILL);
    let out = wait_output(child);
    assert_eq!(out.status.code(), None, "killed");
    assert!(out.stdout.is_empty());
    // The staging dir, and the per-VM lock file whose flock died with the process.
    let left: Vec<String> = std::fs::read_dir(lab.out_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "locks")
        .collect();
    assert!(left.len() == 1 && left[0].starts_with('.') && left[0].ends_with(".staging"), "{left:?}");
    as_found(lab.pid(), &before);
    // The orphaned command step (own process group) finishes by itself.
    assert!(wait_until(Duration::from_secs(15), || !common::pid_alive(sleeper)));
    let out = run_bounded(
        &mut lab.tool_args(&["234", "--json", "--sample-interval", "0", "--stacks", "native"]),
        RUN_TIMEOUT,
    );
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    let names: Vec<String> = std::fs::read_dir(lab.out_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".staging")), "leftover removed: {names:?}");
    assert!(
        ar.manifest.steps[0].notes.iter().any(|n| n.contains("removed leftovers") && n.contains(&left[0])),
        "{:?}",
        ar.manifest.steps[0].notes
    );
    as_found(lab.pid(), &before);
}

/// Fault: SIGKILL of the tool at many points, aimed at the moments it is tracing the VM (native snapshot of a 60-vCPU VM, ten stacks steps per run, 12 runs).
/// Outcome: killed with a tracer attached in 8 of 12 rounds here; after every kill no VM thread is left stopped and TracerPid is 0 (a SEIZE tracer's death releases the threads); the VM keeps running.
#[test]
fn self_sigkill_while_tracing_never_leaves_the_vm_stopped() {
    let lab = Lab::start(LabOptions { vmid: 235, name: "k".into(), smp: 60, mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let steps: String =
        (0..10).map(|i| format!("[[step]]\nid = \"s{i}\"\nkind = \"stacks\"\nmethods = [\"native\"]\n\n")).collect();
    let rb = write_runbook(&lab, "stacks10", &steps);
    let before = thread_states(pid);
    let mut while_tracing = 0;
    for round in 0..12 {
        let mut child = spawn_tool(&lab, &["235", "--json", "--runbook", rb.to_str().unwrap()], None);
        // Kill the instant a tracer is seen (or, every third round, a moment later).
        let mut seen = false;
        wait_until(Duration::from_secs(60), || {
            seen = tracer_pid(pid) != 0;
            seen || child.try_wait().ok().flatten().is_some()
        });
        if round % 3 == 2 {
            std::thread::sleep(Duration::from_millis(3));
        }
        signal(&child, libc::SIGKILL);
        let _ = wait_output(child);
        if seen {
            while_tracing += 1;
        }
        assert!(
            wait_until(Duration::from_secs(5), || tracer_pid(pid) == 0
                && thread_states(pid).values().all(|c| !matches!(c, 'T' | 't'))),
            "round {round}: left stopped or traced: {:?}, TracerPid {}",
            thread_states(pid),
            tracer_pid(pid)
        );
        as_found(pid, &before);
    }
    eprintln!("killed while a tracer was attached in {while_tracing} of 12 rounds");
    assert!(lab.is_alive());
}

// ---------------------------------------------------------------------------
// storage

/// Mounts a tmpfs of `size` at `dir`; `None` (with the reason printed) if refused.
fn tmpfs(dir: &Path, size: &str) -> Option<Mounted> {
    std::fs::create_dir_all(dir).unwrap();
    let st =
        Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(dir).output();
    match st {
        Ok(o) if o.status.success() => Some(Mounted(dir.to_path_buf())),
        Ok(o) => {
            eprintln!("SKIP: mount -t tmpfs refused: {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("SKIP: cannot run mount: {e}");
            None
        }
    }
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_out(lab: &Lab, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = common::tool();
    cmd.arg(lab.vmid().to_string()).arg("--json").args(extra);
    cmd.arg("--run-dir").arg(lab.run_dir()).arg("--pve-dir").arg(lab.pve_dir()).arg("--out").arg(out);
    run_bounded(&mut cmd, RUN_TIMEOUT)
}

/// Fault: the output filesystem is full (a 256 KiB tmpfs).
/// Outcome: with the default `min_free` floor (1 GiB) the capture is refused before the VM is touched, exit 4, naming the floor; with the floor off, sealing fails naming ENOSPC, exit 4; the half-written archive is removed, the unsealed staging dir is kept and named in the error (the next run removes it), the VM as found.
#[test]
fn storage_output_full() {
    let lab = lab(241);
    let dir = lab.root().join("full");
    let Some(_m) = tmpfs(&dir, "256k") else { return };
    let before = lab.thread_states();
    // The free-space floor refuses up front, before anything is captured.
    let out = run_out(&lab, &dir.join("out"), &["--sample-interval", "0"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("below the min_free floor"), "{}", stderr(&out));
    assert_eq!(lab.thread_states(), before, "refused before touching the VM");
    // With the floor off, the disk fills up while sealing.
    let cfg = lab.root().join("nofloor.toml");
    std::fs::write(&cfg, "[retention]\nmin_free = \"0\"\n").unwrap();
    let out = run_out(&lab, &dir.join("out"), &["--sample-interval", "0", "--config", cfg.to_str().unwrap()]);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(4), "{}\n{json}", stderr(&out));
    assert_eq!(json["sealed"], false);
    let err = stderr(&out);
    assert!(err.contains("No space left"), "{err}");
    let left: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains(".tar.zst")), "no half-written archive: {left:?}");
    // Besides the kept staging dir, only the per-VM lock file (its flock died with the run).
    let staging: Vec<&String> = left.iter().filter(|n| n.as_str() != "locks").collect();
    assert!(
        staging.len() == 1
            && staging[0].ends_with(".staging")
            && err.contains(staging[0].as_str())
            && err.contains("kept"),
        "unsealed files kept and named: {left:?}\n{err}"
    );
    as_found(lab.pid(), &before);
}

/// Fault: the output directory is on a read-only filesystem.
/// Outcome: refused before touching the VM: one-line error naming --out, exit 2, no thread stopped or traced.
#[test]
fn storage_output_read_only() {
    let lab = lab(242);
    let dir = lab.root().join("ro");
    let Some(_m) = tmpfs(&dir, "1m") else { return };
    let st = Command::new("mount").args(["-o", "remount,ro"]).arg(&dir).status().unwrap();
    assert!(st.success());
    let before = lab.thread_states();
    let out = run_out(&lab, &dir.join("out"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--out"), "{}", stderr(&out));
    assert_eq!(lab.thread_states(), before);
    as_found(lab.pid(), &before);
}

/// Fault: the output directory is deleted (rm -rf) while a slow step runs.
/// Outcome: later steps recreate the staging dir and are sealed; the steps whose files vanished are marked failed ("vanished … was --out deleted?") instead of ok, exit 1, the VM as found.
#[test]
fn storage_output_deleted_mid_run() {
    let lab = lab(243);
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "slow", SLOW_THEN_STACKS);
    let child = spawn_tool(&lab, &["243", "--json", "--runbook", rb.to_str().unwrap()], None);
    wait_for_argv(&["sleep", "7.25"]);
    std::fs::remove_dir_all(lab.out_dir()).unwrap();
    let out = wait_output(child);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    // (proc's files were written again by proc-after, so only qmp-status lost its file.)
    assert_eq!(status(&json, "qmp-status"), "failed");
    assert!(err_of(&json, "qmp-status").contains("vanished"), "{}", err_of(&json, "qmp-status"));
    for s in ["qmp-block", "stacks", "proc-after"] {
        assert_eq!(status(&json, s), "ok", "{s}");
    }
    assert!(ar.read("qmp/query-block.json").is_some() && ar.read("qmp/query-status.json").is_none());
    as_found(lab.pid(), &before);
}

// ---------------------------------------------------------------------------
// scale

/// Fault: scale — a VM with 64 disks (10 LSI controllers), default runbook.
/// Outcome: both blockstats samples hold all 64 devices, query-block lists 64, every thread has a native stack (captured stopped, frames unwound), exit 0, the VM as found.
#[test]
fn scale_64_disks_every_device_and_thread() {
    let lab = Lab::start(LabOptions { vmid: 251, name: "wide".into(), disks: 64, mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let before = thread_states(pid);
    let out = run_bounded(&mut lab.tool_args(&["251", "--json", "--sample-interval", "1s"]), RUN_TIMEOUT);
    let json = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    for n in [1, 2] {
        let bs = ar.read_json(&format!("qmp/query-blockstats.{n}.json")).unwrap();
        let devs: std::collections::BTreeSet<String> =
            bs["return"].as_array().unwrap().iter().filter_map(|d| d["device"].as_str().map(str::to_string)).collect();
        assert_eq!(devs.len(), 64, "sample {n}: {devs:?}");
        assert!(devs.contains("drive-scsi63"));
    }
    assert_eq!(ar.read_json("qmp/query-block.json").unwrap()["return"].as_array().unwrap().len(), 64);
    let threads = ar.read_json("stacks/threads.json").unwrap();
    let got: BTreeMap<i64, &Value> =
        threads["threads"].as_array().unwrap().iter().map(|t| (t["tid"].as_i64().unwrap(), t)).collect();
    for tid in before.keys() {
        let t = got.get(&(*tid as i64)).unwrap_or_else(|| panic!("thread {tid} has no stack: {:?}", got.keys()));
        assert_eq!(t["capture"], "stopped", "{t}");
        // KVM's kernel worker (kvm-nx-lpage-recovery) lives in the process but has no user stack.
        let kernel_only = t["syscall"]["pc"] == 0 && t["kernel_stack"].as_array().is_some_and(|k| !k.is_empty());
        assert!(!t["frames"].as_array().unwrap().is_empty() || kernel_only, "{t}");
    }
    as_found(pid, &before);
}

// ---------------------------------------------------------------------------
// the table

/// `docs/faults.md` is what `scripts/fault-table` makes of this file.
#[test]
fn fault_table_is_current() {
    let root = common::repo_root();
    let out = run_bounded(
        Command::new("python3").arg(root.join("scripts/fault-table")).arg("--stdout"),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = std::fs::read_to_string(root.join("docs/faults.md")).unwrap_or_default();
    assert!(committed == String::from_utf8_lossy(&out.stdout), "docs/faults.md is stale: run scripts/fault-table");
}
