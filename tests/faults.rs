//! The fault matrix (issue #9): every test injects one fault into a run of the real
//! binary and asserts what was sealed, what the manifest and exit code say, and that
//! the VM's threads are as they were found (no thread newly stopped, `TracerPid` 0).
//!
//! Each test's doc comment has a `Fault: …` line, an optional `Stand-in: …` line (what
//! in the row is not the real thing) and an `Outcome: …` line that must equal the test's
//! `claim!` labels joined by "; ", in order, including those of the helpers it calls.
//! `scripts/fault-table` turns them into `docs/faults.md` and fails on a test without
//! them; `fault_table_is_current` keeps that file honest. So every outcome the table
//! states is an assertion that ran.
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
use common::{run_bounded, tmpfs, tracer_pid, wait_until, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Asserts one outcome the fault table states. The label is the table's text (a string
/// literal: `scripts/fault-table` reads it from here).
macro_rules! claim {
    ($what:literal, $ok:expr) => {
        assert!($ok, "fault-table claim failed: {}", $what)
    };
    ($what:literal, $ok:expr, $($fmt:tt)+) => {
        assert!($ok, "fault-table claim failed: {}: {}", $what, format!($($fmt)+))
    };
}

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
    claim!("sealed", json["sealed"] == true, "{json}");
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    let report = archive::verify(&path).expect("archive verifies");
    claim!("the archive verifies (every hash, the sidecar)", json["sha256"].as_str() == Some(report.sha256.as_str()));
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

/// Threads newly stopped or traced: `(tid, state, TracerPid)` against `before`.
fn disturbed(rows: &[(i32, char, i32)], before: &BTreeMap<i32, char>) -> Vec<(i32, char, i32)> {
    rows.iter()
        .filter(|(tid, st, tracer)| {
            *tracer != 0 || (matches!(st, 'T' | 't') && !matches!(before.get(tid), Some('T' | 't')))
        })
        .copied()
        .collect()
}

/// After the run: every thread as it was found (none newly stopped, `TracerPid` 0).
fn as_found(pid: i32, before: &BTreeMap<i32, char>) {
    let states = thread_states(pid);
    let rows: Vec<(i32, char, i32)> = common::thread_tracers(pid)
        .into_iter()
        .map(|(tid, tracer)| (tid, states.get(&tid).copied().unwrap_or('?'), tracer))
        .collect();
    claim!(
        "after exit every VM thread as found (none newly stopped, TracerPid 0)",
        !rows.is_empty() && disturbed(&rows, before).is_empty(),
        "pid {pid}: {:?} (before {before:?})",
        disturbed(&rows, before)
    );
}

/// A command step that records every VM thread's `State` and `TracerPid` into the
/// archive while the tool still holds the VM (after the stacks step, before the seal).
fn check_step(id: &str) -> String {
    let prog = "import os, sys\np = sys.argv[1]\nfor t in sorted(os.listdir('/proc/%s/task' % p), key=int):\n    d = dict(l.split(':', 1) for l in open('/proc/%s/task/%s/status' % (p, t)).read().splitlines() if ':' in l)\n    print(t, d['State'].split()[0], d['TracerPid'].strip())\n";
    format!(
        "[[step]]\nid = \"{id}\"\nkind = \"command\"\nargv = [\"python3\", \"-c\", {prog:?}, \"{{pid}}\"]\noutput = \"check/{id}.txt\"\ntimeout = \"10s\"\n\n"
    )
}

/// What [`check_step`] sealed: every thread the run found, none stopped or traced then.
fn as_found_during(ar: &ArchiveReader, id: &str, before: &BTreeMap<i32, char>) {
    let text = ar.read_string(&format!("check/{id}.txt")).unwrap_or_else(|| panic!("no check/{id}.txt sealed"));
    let rows: Vec<(i32, char, i32)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].chars().next().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    claim!(
        "while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped",
        // Every thread alive at that moment is listed (a QEMU pool worker may have exited
        // since `before`; the main thread must be there).
        before.keys().next().is_some_and(|main| rows.iter().any(|r| r.0 == *main)) && disturbed(&rows, before).is_empty(),
        "{text}\nbefore {before:?}"
    );
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

/// [`QMP_STEPS`] and the in-run "as found" check.
fn qmp_steps() -> String {
    format!("{QMP_STEPS}\n{}", check_step("during"))
}

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
    let rb = write_runbook(lab, "qmpfault", &qmp_steps());
    let vmid = lab.vmid().to_string();
    let out = run_bounded(
        &mut lab.tool_args(&[&vmid, "--json", "--sample-interval", "500ms", "--runbook", rb.to_str().unwrap()]),
        RUN_TIMEOUT,
    );
    let json = json_of(&out);
    (out, json)
}

/// Common to every QMP fault: the fault fired, sealed, exit 1, /proc and stacks
/// captured anyway, nothing sent once the fake misbehaved, the VM as found.
fn qmp_fault_common(
    lab: &Lab,
    fake: &FakeQmp,
    before: &BTreeMap<i32, char>,
    out: &Output,
    json: &Value,
) -> ArchiveReader {
    claim!("the scripted fault fired", fake.faulted());
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(out));
    let ar = sealed(json);
    claim!(
        "proc and stacks ok",
        status(json, "proc") == "ok"
            && status(json, "stacks") == "ok"
            && ar.read("stacks/threads.json").is_some()
            && ar.read("qmp/transcript.jsonl").is_some(),
        "{json}"
    );
    let after = fake.received_after_fault();
    claim!("nothing sent after the fault", after.is_empty(), "{after:?}");
    for c in fake.commands() {
        assert!(c.starts_with("query-") || c == "qmp_capabilities" || c.starts_with("qom-"), "non-read-only {c}");
    }
    as_found_during(&ar, "during", before);
    as_found(lab.pid(), before);
    ar
}

fn only(cmd: &'static str, acts: impl Fn(&Value) -> Vec<Act> + Send + Sync + 'static) -> common::fake_qmp::Responder {
    Box::new(move |c, id| if c == cmd { acts(id) } else { vec![Act::Reply] })
}

// ---------------------------------------------------------------------------
// QMP

/// Fault: QMP socket accepts but never greets (held by another client, or QEMU frozen).
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); qmp-connect failed as no-greeting; QMP steps skipped; nothing sent at all (no greeting); reconnected within the budget, each attempt noted in the transcript; verdict qmp-unreachable.
#[test]
fn qmp_no_greeting() {
    let (lab, fake) = fake_lab(201, Script { greet: false, ..Default::default() });
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    let ar = qmp_fault_common(&lab, &fake, &before, &out, &json);
    claim!(
        "qmp-connect failed as no-greeting",
        status(&json, "qmp-connect") == "failed" && err_of(&json, "qmp-connect").contains("no-greeting"),
        "{}",
        err_of(&json, "qmp-connect")
    );
    claim!(
        "QMP steps skipped",
        ["qmp-status", "qmp-blockstats", "qmp-block"].iter().all(|s| status(&json, s) == "skipped")
    );
    claim!("nothing sent at all (no greeting)", fake.received().is_empty(), "{:?}", fake.received());
    let noted = ar.read_string("qmp/transcript.jsonl").unwrap().matches("no greeting within").count();
    claim!(
        "reconnected within the budget, each attempt noted in the transcript",
        fake.connections() >= 2 && noted as u32 == fake.connections(),
        "{} connections, {noted} notes",
        fake.connections()
    );
    claim!("verdict qmp-unreachable", json["verdict"] == "qmp-unreachable", "{}", json["verdict"]);
}

/// Fault: QMP greets, then never answers `qmp_capabilities` (main loop wedged).
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); qmp-connect failed as capabilities-unanswered; exactly one line sent (qmp_capabilities), no reconnect; QMP steps skipped.
#[test]
fn qmp_greeting_then_silence() {
    let (lab, fake) = fake_lab(202, Script { answer_capabilities: false, ..Default::default() });
    let before = lab.thread_states();
    let (out, json) = run_qmp_fault(&lab);
    qmp_fault_common(&lab, &fake, &before, &out, &json);
    claim!(
        "qmp-connect failed as capabilities-unanswered",
        status(&json, "qmp-connect") == "failed" && err_of(&json, "qmp-connect").contains("capabilities"),
        "{}",
        err_of(&json, "qmp-connect")
    );
    claim!(
        "exactly one line sent (qmp_capabilities), no reconnect",
        fake.commands() == ["qmp_capabilities"] && fake.connections() == 1,
        "{:?}, {} connections",
        fake.commands(),
        fake.connections()
    );
    claim!(
        "QMP steps skipped",
        ["qmp-status", "qmp-blockstats", "qmp-block"].iter().all(|s| status(&json, s) == "skipped")
    );
}

/// Fault: a reply cut off mid-line, then silence (socket left open).
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); qmp-status timed out at its deadline; later QMP steps skipped; no half reply sealed as a reply; the partial line kept in the transcript.
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
    claim!(
        "qmp-status timed out at its deadline",
        status(&json, "qmp-connect") == "ok" && status(&json, "qmp-status") == "timeout",
        "{json}"
    );
    claim!("later QMP steps skipped", ["qmp-blockstats", "qmp-block"].iter().all(|s| status(&json, s) == "skipped"));
    claim!("no half reply sealed as a reply", ar.read("qmp/query-status.json").is_none());
    claim!("the partial line kept in the transcript", ar.read_string("qmp/transcript.jsonl").unwrap().contains("runn"));
}

/// Fault: garbage bytes (not JSON, invalid UTF-8) instead of a reply.
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); qmp-status failed as not JSON; later QMP steps skipped; the transcript stays JSONL with the bytes escaped.
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
    claim!(
        "qmp-status failed as not JSON",
        status(&json, "qmp-status") == "failed" && err_of(&json, "qmp-status").contains("not JSON"),
        "{}",
        err_of(&json, "qmp-status")
    );
    claim!("later QMP steps skipped", ["qmp-blockstats", "qmp-block"].iter().all(|s| status(&json, s) == "skipped"));
    let t = ar.read_string("qmp/transcript.jsonl").unwrap();
    claim!(
        "the transcript stays JSONL with the bytes escaped",
        t.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()) && t.contains("garbage") && !t.contains('\u{1b}'),
        "{t}"
    );
}

/// Fault: a reply line larger than the 8 MiB reply cap.
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); qmp-status (before the fault) ok; the second blockstats sample, due after the fault, failed without being sent; qmp-block failed as too large; no reply sealed for it; the transcript stays under 1 MiB.
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
    claim!("qmp-status (before the fault) ok", status(&json, "qmp-status") == "ok", "{json}");
    claim!(
        "the second blockstats sample, due after the fault, failed without being sent",
        status(&json, "qmp-blockstats") == "failed" && err_of(&json, "qmp-blockstats").contains("not sent"),
        "{}",
        err_of(&json, "qmp-blockstats")
    );
    claim!(
        "qmp-block failed as too large",
        status(&json, "qmp-block") == "failed" && err_of(&json, "qmp-block").contains("exceeds"),
        "{}",
        err_of(&json, "qmp-block")
    );
    claim!("no reply sealed for it", ar.read("qmp/query-block.json").is_none());
    let t = ar.read("qmp/transcript.jsonl").unwrap();
    claim!("the transcript stays under 1 MiB", t.len() < 1 << 20, "{} bytes", t.len());
}

/// Fault: a reply carrying a foreign id arrives before the real one.
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: exit 0; sealed; the archive verifies (every hash, the sidecar); the right reply sealed, the foreign one not taken; the foreign reply noted in the transcript; every command sent once (capabilities, status, 2 blockstats, block); while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
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
    claim!("exit 0", out.status.code() == Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!(
        "the right reply sealed, the foreign one not taken",
        ar.read_json("qmp/query-status.json").unwrap()["return"]["status"] == "running"
    );
    claim!(
        "the foreign reply noted in the transcript",
        ar.read_string("qmp/transcript.jsonl").unwrap().contains("pvestatd-7")
    );
    claim!(
        "every command sent once (capabilities, status, 2 blockstats, block)",
        fake.commands() == ["qmp_capabilities", "query-status", "query-blockstats", "query-block", "query-blockstats"]
            || fake.commands()
                == ["qmp_capabilities", "query-status", "query-blockstats", "query-blockstats", "query-block"],
        "{:?}",
        fake.commands()
    );
    as_found_during(&ar, "during", &before);
    as_found(lab.pid(), &before);
}

/// Fault: a flood of 20 000 events before a reply.
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: exit 0; sealed; the archive verifies (every hash, the sidecar); qmp-status ok (the reply after the flood taken); 1000 events kept in qmp/events.json; the other 19000 counted in a transcript note; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
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
    claim!("exit 0", out.status.code() == Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!(
        "qmp-status ok (the reply after the flood taken)",
        status(&json, "qmp-status") == "ok" && ar.read("qmp/query-status.json").is_some()
    );
    let events = ar.read_json("qmp/events.json").unwrap();
    claim!("1000 events kept in qmp/events.json", events.as_array().unwrap().len() == 1000);
    claim!(
        "the other 19000 counted in a transcript note",
        ar.read_string("qmp/transcript.jsonl").unwrap().contains("19000 events dropped")
    );
    as_found_during(&ar, "during", &before);
    as_found(lab.pid(), &before);
}

/// Fault: the socket is closed in the middle of a reply (second blockstats sample).
/// Stand-in: a scripted QMP socket in front of a real lab QEMU.
/// Outcome: the scripted fault fired; exit 1; sealed; the archive verifies (every hash, the sidecar); proc and stacks ok; nothing sent after the fault; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0); the sampled step failed; the first sample sealed, the second not; query-block (run between the samples) ok.
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
    claim!(
        "the sampled step failed",
        status(&json, "qmp-blockstats") == "failed",
        "{}",
        err_of(&json, "qmp-blockstats")
    );
    claim!(
        "the first sample sealed, the second not",
        ar.read("qmp/query-blockstats.1.json").is_some() && ar.read("qmp/query-blockstats.2.json").is_none()
    );
    claim!(
        "query-block (run between the samples) ok",
        status(&json, "qmp-block") == "ok" && ar.read("qmp/query-block.json").is_some(),
        "{json}"
    );
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
argv = ["sleep", "{NAP}"]
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

/// The nap of VM `vmid`'s slow runbook: about 7 s, and an argv of its own, so a test
/// waiting for its sleep never mistakes another test's (they run in parallel).
fn nap(vmid: u32) -> String {
    format!("7.{vmid}")
}

/// [`SLOW_THEN_STACKS`] for VM `vmid` (its [`nap`]) with the in-run "as found" check
/// right after the stacks step.
fn slow_then_stacks(vmid: u32) -> String {
    let rb = SLOW_THEN_STACKS.replace("{NAP}", &nap(vmid));
    let (head, tail) = rb.split_at(rb.find("[[step]]\nid = \"proc-after\"").unwrap());
    format!("{head}{}{tail}", check_step("during"))
}

/// Fault: QEMU exits (SIGKILL) in the middle of the capture, during a slow step.
/// Outcome: QEMU killed while the nap step ran (its sleep seen); exit 1; sealed; the archive verifies (every hash, the sidecar); the steps before the kill ok and their files sealed; the next QMP step failed; stacks failed as no longer VM's QEMU, nothing traced.
#[test]
fn target_exits_mid_capture() {
    let lab = lab(211);
    let rb = write_runbook(&lab, "slow", &slow_then_stacks(211));
    let child = spawn_tool(&lab, &["211", "--json", "--runbook", rb.to_str().unwrap()], None);
    let sleeper = wait_for_argv(&["sleep", &nap(211)]);
    lab.kill();
    claim!("QEMU killed while the nap step ran (its sleep seen)", common::pid_alive(sleeper));
    let out = wait_output(child);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!(
        "the steps before the kill ok and their files sealed",
        ["proc", "qmp-status", "nap"].iter().all(|s| status(&json, s) == "ok")
            && ar.read("proc/status").is_some()
            && ar.read("qmp/query-status.json").is_some(),
        "{json}"
    );
    claim!("the next QMP step failed", status(&json, "qmp-block") == "failed", "{}", err_of(&json, "qmp-block"));
    claim!(
        "stacks failed as no longer VM's QEMU, nothing traced",
        status(&json, "stacks") == "failed"
            && err_of(&json, "stacks").contains("no longer")
            && ar.read("stacks/threads.json").is_none(),
        "{}",
        err_of(&json, "stacks")
    );
}

/// Fault: QEMU dies mid-capture and its pid is reused by an unrelated process (forced via `ns_last_pid`) before the stacks step.
/// Outcome: the pid taken over by an unrelated process while the run went on; exit 1; sealed; the archive verifies (every hash, the sidecar); stacks, a later /proc step and a {pid} command all failed as no longer VM's QEMU; the foreign process untouched (state S, TracerPid 0).
#[test]
fn target_pid_reused_by_foreign_process() {
    let lab = lab(212);
    let pid = lab.pid();
    let rb = write_runbook(&lab, "slow", &slow_then_stacks(212));
    let mut child = spawn_tool(&lab, &["212", "--json", "--runbook", rb.to_str().unwrap()], None);
    wait_for_argv(&["sleep", &nap(212)]);
    lab.kill();
    // Take the pid over: set the last pid handed out to pid-1 and fork, retrying
    // while other processes on the machine race us for it.
    let mut foreign = None;
    assert!(
        wait_until(Duration::from_secs(30), || !Path::new(&format!("/proc/{pid}")).exists()),
        "pid {pid} never released (not reaped)"
    );
    for _ in 0..200 {
        if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()) {
            panic!(
                "cannot write /proc/sys/kernel/ns_last_pid ({e}): this test needs root in the initial pid namespace"
            );
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
    // Killed and reaped however the test ends, so no stray `sleep 300` outlives it.
    let _foreign = Reaped(foreign.expect("could not make an unrelated process take over the pid within 200 tries"));
    claim!(
        "the pid taken over by an unrelated process while the run went on",
        // The fork may not have exec'd `sleep` yet (its cmdline is empty until it does).
        wait_until(Duration::from_secs(5), || common::proc_cmdline(pid).is_some_and(|a| a == ["sleep", "300"]))
            && child.try_wait().unwrap().is_none(),
        "tool exit: {:?}; pid {pid} argv: {:?}",
        child.try_wait(),
        common::proc_cmdline(pid)
    );
    let out = wait_output(child);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    claim!(
        "stacks, a later /proc step and a {pid} command all failed as no longer VM's QEMU",
        ["stacks", "proc-after", "pid-command"]
            .iter()
            .all(|s| status(&json, s) == "failed" && err_of(&json, s).contains("no longer")),
        "{json}"
    );
    claim!(
        "the foreign process untouched (state S, TracerPid 0)",
        wait_until(Duration::from_secs(5), || common::proc_state(pid) == Some('S')) && tracer_pid(pid) == 0,
        "{:?}",
        common::proc_state(pid)
    );
}

/// A child killed and reaped when dropped, on every path out of a test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
/// Stand-in: a C fixture (`parked vfork`) named by the VM's pidfile, not a QEMU.
/// Outcome: a thread in D before the run; sealed; the archive verifies (every hash, the sidecar); sealed with stacks ok within its deadline; the D thread recorded as skipped_d, its syscall or kernel stack read without a stop; the D thread still in D afterwards, the process alive; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn target_thread_in_d_state() {
    let lab = lab(213);
    let bin = cc_parked(lab.root());
    let pidfile = lab.run_dir().join("214.pid");
    let mut cmd = Command::new(&bin);
    cmd.arg("vfork").arg("-pidfile").arg(&pidfile);
    let pid = standin_vm(&lab, 214, cmd);
    claim!(
        "a thread in D before the run",
        wait_until(Duration::from_secs(10), || thread_states(pid).values().any(|&c| c == 'D')),
        "{:?}",
        thread_states(pid)
    );
    let before = thread_states(pid);
    let out = run_bounded(&mut lab.tool_args(&["214", "--json", "--no-qmp", "--stacks", "native"]), RUN_TIMEOUT);
    let json = json_of(&out);
    let ar = sealed(&json);
    claim!("sealed with stacks ok within its deadline", status(&json, "stacks") == "ok", "{}", err_of(&json, "stacks"));
    let threads = ar.read_json("stacks/threads.json").unwrap();
    let vforker =
        threads["threads"].as_array().unwrap().iter().find(|t| t["comm"] == "vforker").expect("D thread listed");
    claim!(
        "the D thread recorded as skipped_d, its syscall or kernel stack read without a stop",
        vforker["capture"] == "skipped_d" && (vforker["syscall"].is_object() || vforker["kernel_stack"].is_array()),
        "{vforker}"
    );
    claim!(
        "the D thread still in D afterwards, the process alive",
        thread_states(pid).values().any(|&c| c == 'D') && common::pid_alive(pid)
    );
    as_found(pid, &before);
}

/// Fault: the QEMU was already stopped (SIGSTOP) by someone else before the run.
/// Outcome: every thread stopped before the run; exit 1; sealed; the archive verifies (every hash, the sidecar); qmp-connect failed (a stopped QEMU cannot greet); stacks still captured; left stopped exactly as found, every thread, untraced.
#[test]
fn target_already_stopped_is_left_stopped() {
    let lab = lab(215);
    lab.sigstop();
    let pid = lab.pid();
    claim!(
        "every thread stopped before the run",
        wait_until(Duration::from_secs(5), || thread_states(pid).values().all(|&c| c == 'T'))
    );
    let before = thread_states(pid);
    let out = run_bounded(&mut lab.tool_args(&["215", "--json", "--sample-interval", "0"]), RUN_TIMEOUT);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    claim!("qmp-connect failed (a stopped QEMU cannot greet)", status(&json, "qmp-connect") == "failed");
    claim!("stacks still captured", status(&json, "stacks") == "ok", "{}", err_of(&json, "stacks"));
    claim!(
        "left stopped exactly as found, every thread, untraced",
        thread_states(pid) == before && common::thread_tracers(pid).iter().all(|(_, t)| *t == 0),
        "{:?}",
        thread_states(pid)
    );
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

/// A gdb that does what a wedged gdb does: stops the whole process, then hangs (in a
/// `sleep 600.<tag>` of its own, so a test can tell its gdb from another test's).
fn hanging_gdb(tag: u32) -> String {
    format!("while [ $# -gt 0 ]; do [ \"$1\" = \"-p\" ] && kill -STOP \"$2\"; shift; done\nexec sleep 600.{tag}")
}

/// Fault: gdb hangs after stopping every thread of the target (fake `gdb` first on PATH).
/// Stand-in: a fake `gdb` (a script) in front of a real lab QEMU.
/// Outcome: exit 1; sealed; the archive verifies (every hash, the sidecar); stacks failed as gdb timed out; the threads gdb stopped resumed and that noted; gdb's process group killed; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn tool_gdb_hangs() {
    let lab = lab(221);
    let bin = fake_bin(&lab, &[("gdb", &hanging_gdb(221))]);
    let steps = format!(
        "[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"stacks\"\nkind = \"stacks\"\nmethods = [\"gdb\"]\ntimeout = \"4s\"\n\n{}",
        check_step("during")
    );
    let rb = write_runbook(&lab, "gdb", &steps);
    let pid = lab.pid();
    let before = thread_states(pid);
    let out = wait_output(spawn_tool(&lab, &["221", "--json", "--runbook", rb.to_str().unwrap()], Some(&bin)));
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!(
        "stacks failed as gdb timed out",
        status(&json, "stacks") == "failed" && err_of(&json, "stacks").contains("timed out"),
        "{}",
        err_of(&json, "stacks")
    );
    let notes = ar.manifest.steps.iter().find(|s| s.id == "stacks").unwrap().notes.join("; ");
    claim!("the threads gdb stopped resumed and that noted", notes.contains("resumed"), "{notes}");
    claim!(
        "gdb's process group killed",
        wait_until(Duration::from_secs(5), || !common::proc_cmdline_exists(&["sleep", "600.221"]))
    );
    as_found_during(&ar, "during", &before);
    as_found(pid, &before);
}

/// Fault: `journalctl` floods output without end (fake first on PATH), default runbook.
/// Stand-in: a fake `journalctl` (`yes`) in front of a real lab QEMU.
/// Outcome: exit 0 (the journal step is optional); sealed; the archive verifies (every hash, the sidecar); the journal step timed out at its deadline with a cap note; its output kept, capped at 8 MiB; every other step ok, or skipped as not applicable off Proxmox; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn tool_journalctl_floods() {
    let lab = lab(222);
    let bin = fake_bin(&lab, &[("journalctl", "exec yes 'Nov 25 journal line flooding the pipe'")]);
    let before = thread_states(lab.pid());
    let out = wait_output(spawn_tool(&lab, &["222", "--json", "--sample-interval", "0"], Some(&bin)));
    let json = json_of(&out);
    claim!("exit 0 (the journal step is optional)", out.status.code() == Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    let rec = ar.manifest.steps.iter().find(|s| s.id == "journal").unwrap();
    claim!(
        "the journal step timed out at its deadline with a cap note",
        status(&json, "journal") == "timeout" && rec.optional && rec.notes.iter().any(|n| n.contains("capped")),
        "{rec:?}"
    );
    let j = ar.read("host/journal.txt").unwrap();
    claim!("its output kept, capped at 8 MiB", j.len() <= 8 << 20 && j.len() > 1 << 20, "{} bytes", j.len());
    // Off Proxmox (no pveversion, no HA, no task log, upstream QEMU) those steps do not
    // apply; each says so as skipped. Everything else must be ok.
    const NOT_HERE: [&str; 6] =
        ["qmp-proxmox-support", "qmp-backup", "pveversion", "ha-status", "vzdump-log", "pve-tasks"];
    claim!(
        "every other step ok, or skipped as not applicable off Proxmox",
        json["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"] != "journal")
            .all(|s| s["status"] == "ok"
                || (s["status"] == "skipped" && NOT_HERE.contains(&s["id"].as_str().unwrap_or("")))),
        "{json}"
    );
    as_found(lab.pid(), &before);
}

/// Fault: a collector blocks in the kernel for good: a `file` step whose path is a FIFO nobody writes (its `open` never returns, and no signal ends it).
/// Outcome: exit 1; sealed; the archive verifies (every hash, the sidecar); the stuck step abandoned at its deadline as a timeout; the steps after it (stacks, the in-run check) ok and sealed; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn tool_collector_stuck_in_the_kernel_is_abandoned() {
    let lab = lab(223);
    let fifo = lab.root().join("never-written.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in the lab's temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
    let steps = format!(
        "[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"stuck\"\nkind = \"file\"\npath = {:?}\noutput = \"host/stuck.txt\"\ntimeout = \"3s\"\n\n[[step]]\nid = \"stacks\"\nkind = \"stacks\"\nmethods = [\"native\"]\ntimeout = \"15s\"\n\n{}",
        fifo.display().to_string(),
        check_step("during")
    );
    let rb = write_runbook(&lab, "stuck", &steps);
    let pid = lab.pid();
    let before = thread_states(pid);
    let out = wait_output(spawn_tool(&lab, &["223", "--json", "--runbook", rb.to_str().unwrap()], None));
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!(
        "the stuck step abandoned at its deadline as a timeout",
        status(&json, "stuck") == "timeout" && err_of(&json, "stuck").contains("abandoned"),
        "{}",
        step(&json, "stuck")
    );
    claim!(
        "the steps after it (stacks, the in-run check) ok and sealed",
        status(&json, "stacks") == "ok"
            && status(&json, "during") == "ok"
            && ar.read("stacks/threads.json").is_some()
            && ar.read("check/during.txt").is_some(),
        "{json}"
    );
    as_found_during(&ar, "during", &before);
    as_found(pid, &before);
}

// ---------------------------------------------------------------------------
// the tool itself

fn signal(child: &Child, sig: i32) {
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Pending connections on a listening Unix socket (`ss`'s Recv-Q): a client waiting in
/// QEMU's backlog for a greeting while another holds the monitor.
fn backlog(path: &Path) -> u32 {
    let o = run_bounded(Command::new("ss").args(["-xlnH", "src"]).arg(path), Duration::from_secs(10));
    String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2).and_then(|q| q.parse().ok()).unwrap_or(0)
}

/// The staging dir of the run in progress, once it holds `rel`.
fn staged(lab: &Lab, rel: &str) -> bool {
    std::fs::read_dir(lab.out_dir())
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".staging") && e.path().join(rel).exists())
}

/// Fault: SIGTERM while the tool waits for a QMP greeting that never comes (another client holds the real QEMU's monitor).
/// Outcome: SIGTERM sent while the tool's connection waited in QEMU's backlog; exit 1, marked interrupted; sealed; the archive verifies (every hash, the sidecar); sealed with /proc; qmp-connect and every later step interrupted; nothing traced; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn self_sigterm_during_qmp_connect() {
    let lab = lab(231);
    let _holder = lab.hold_qmp();
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "qmpfault", &qmp_steps());
    let child = spawn_tool(&lab, &["231", "--json", "--runbook", rb.to_str().unwrap()], None);
    claim!(
        "SIGTERM sent while the tool's connection waited in QEMU's backlog",
        wait_until(Duration::from_secs(30), || backlog(&lab.qmp_path()) >= 1)
    );
    signal(&child, libc::SIGTERM);
    let out = wait_output(child);
    let json = json_of(&out);
    claim!(
        "exit 1, marked interrupted",
        out.status.code() == Some(1) && json["interrupted"] == true,
        "{}\n{json}",
        stderr(&out)
    );
    let ar = sealed(&json);
    claim!("sealed with /proc", ar.manifest.interrupted && status(&json, "proc") == "ok", "{json}");
    claim!(
        "qmp-connect and every later step interrupted",
        ["qmp-connect", "qmp-status", "qmp-blockstats", "qmp-block", "stacks"]
            .iter()
            .all(|s| status(&json, s) == "interrupted"),
        "{json}"
    );
    claim!("nothing traced", ar.read("stacks/threads.json").is_none());
    as_found(lab.pid(), &before);
}

/// Fault: SIGINT while a blockstats sample waits for its interval (30 s) in the background.
/// Outcome: SIGINT sent after the first sample and the stacks step, while only the second sample was pending; exit 1; sealed; the archive verifies (every hash, the sidecar); the sampled step interrupted; the first sample sealed, the second not; query-blockstats sent once (the transcript); while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn self_sigint_during_sampling() {
    let lab = lab(232);
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "qmpfault", &qmp_steps());
    let child =
        spawn_tool(&lab, &["232", "--json", "--sample-interval", "30s", "--runbook", rb.to_str().unwrap()], None);
    // The check step is the last; once its file is staged the tool only waits for sample 2.
    claim!(
        "SIGINT sent after the first sample and the stacks step, while only the second sample was pending",
        wait_until(Duration::from_secs(60), || staged(&lab, "check/during.txt")
            && staged(&lab, "qmp/query-blockstats.1.json")
            && !staged(&lab, "qmp/query-blockstats.2.json"))
    );
    signal(&child, libc::SIGINT);
    let out = wait_output(child);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    claim!("the sampled step interrupted", status(&json, "qmp-blockstats") == "interrupted", "{json}");
    claim!(
        "the first sample sealed, the second not",
        ar.read("qmp/query-blockstats.1.json").is_some() && ar.read("qmp/query-blockstats.2.json").is_none()
    );
    let t = ar.read_string("qmp/transcript.jsonl").unwrap();
    let sent = t
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "send" && e["line"].as_str().unwrap_or("").contains("query-blockstats"))
        .count();
    claim!("query-blockstats sent once (the transcript)", sent == 1, "{t}");
    as_found_during(&ar, "during", &before);
    as_found(lab.pid(), &before);
}

/// Fault: SIGTERM while gdb (hung, with the VM stopped) is running in the stacks step.
/// Stand-in: a fake `gdb` (a script) in front of a real lab QEMU.
/// Outcome: SIGTERM sent while the fake gdb held the VM stopped; exit 1; sealed; the archive verifies (every hash, the sidecar); stacks interrupted; the threads gdb stopped resumed; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn self_sigterm_during_gdb() {
    let lab = lab(233);
    let bin = fake_bin(&lab, &[("gdb", &hanging_gdb(233))]);
    let pid = lab.pid();
    let before = thread_states(pid);
    let child = spawn_tool(&lab, &["233", "--json", "--stacks", "gdb", "--sample-interval", "0"], Some(&bin));
    claim!(
        "SIGTERM sent while the fake gdb held the VM stopped",
        wait_until(Duration::from_secs(60), || thread_states(pid).values().any(|&c| c == 'T'))
    );
    signal(&child, libc::SIGTERM);
    let out = wait_output(child);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    sealed(&json);
    claim!("stacks interrupted", status(&json, "stacks") == "interrupted", "{}", err_of(&json, "stacks"));
    claim!(
        "the threads gdb stopped resumed",
        wait_until(Duration::from_secs(5), || thread_states(pid).values().all(|c| !matches!(c, 'T' | 't'))),
        "{:?}",
        thread_states(pid)
    );
    as_found(pid, &before);
}

/// Fault: SIGKILL of the tool in the middle of a run (during a slow command step).
/// Outcome: killed while the nap step ran (its sleep seen); no output and no archive, one `.<name>.<pid>.staging` dir left; after exit every VM thread as found (none newly stopped, TracerPid 0); the next run exits 0, removes the leftover and notes it; sealed; the archive verifies (every hash, the sidecar).
#[test]
fn self_sigkill_leaves_nothing_the_next_run_does_not_clean() {
    let lab = lab(234);
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "slow", &slow_then_stacks(234));
    let child = spawn_tool(&lab, &["234", "--json", "--runbook", rb.to_str().unwrap()], None);
    let sleeper = wait_for_argv(&["sleep", &nap(234)]);
    claim!("killed while the nap step ran (its sleep seen)", common::pid_alive(sleeper));
    signal(&child, libc::SIGKILL);
    let out = wait_output(child);
    assert_eq!(out.status.code(), None, "killed");
    // The staging dir, and the per-VM lock file whose flock died with the process.
    let left: Vec<String> = std::fs::read_dir(lab.out_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "locks")
        .collect();
    claim!(
        "no output and no archive, one `.<name>.<pid>.staging` dir left",
        out.stdout.is_empty() && left.len() == 1 && left[0].starts_with('.') && left[0].ends_with(".staging"),
        "{left:?}"
    );
    as_found(lab.pid(), &before);
    // The orphaned command step (own process group) finishes by itself.
    assert!(wait_until(Duration::from_secs(15), || !common::pid_alive(sleeper)), "the orphaned sleep never ended");
    let out = run_bounded(
        &mut lab.tool_args(&["234", "--json", "--sample-interval", "0", "--stacks", "native"]),
        RUN_TIMEOUT,
    );
    let json = json_of(&out);
    let names: Vec<String> = std::fs::read_dir(lab.out_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    claim!(
        "the next run exits 0, removes the leftover and notes it",
        out.status.code() == Some(0)
            && !names.iter().any(|n| n.ends_with(".staging"))
            && sealed(&json).manifest.steps[0]
                .notes
                .iter()
                .any(|n| n.contains("removed leftovers") && n.contains(&left[0])),
        "{}\n{json}\n{names:?}",
        stderr(&out)
    );
}

/// Fault: SIGKILL of the tool while it traces the VM (native snapshots of a 60-vCPU VM, ten stacks steps per run, 8 runs).
/// Outcome: every round killed while a thread of the tool was the VM's tracer (seen in TracerPid, the tool frozen with SIGSTOP to keep it so); after every kill no VM thread stopped and every TracerPid 0; the VM keeps running.
#[test]
fn self_sigkill_while_tracing_never_leaves_the_vm_stopped() {
    let lab = Lab::start(LabOptions { vmid: 235, name: "k".into(), smp: 60, mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let steps: String =
        (0..10).map(|i| format!("[[step]]\nid = \"s{i}\"\nkind = \"stacks\"\nmethods = [\"native\"]\n\n")).collect();
    let rb = write_runbook(&lab, "stacks10", &steps);
    let before = thread_states(pid);
    for round in 0..8 {
        // A run can end between two reads of TracerPid; try again (a few times) until one is caught.
        let mut caught = None;
        for _ in 0..3 {
            let child = spawn_tool(&lab, &["235", "--json", "--runbook", rb.to_str().unwrap()], None);
            let tracer = common::stop_while_tracing(child.id() as i32, pid, Duration::from_secs(60));
            signal(&child, libc::SIGKILL);
            let _ = wait_output(child);
            if tracer.is_some() {
                caught = tracer;
                break;
            }
        }
        claim!(
            "every round killed while a thread of the tool was the VM's tracer (seen in TracerPid, the tool frozen with SIGSTOP to keep it so)",
            caught.is_some(),
            "round {round}: three runs ended without being caught tracing"
        );
        let released = wait_until(Duration::from_secs(5), || {
            common::thread_tracers(pid).iter().all(|(_, t)| *t == 0)
                && thread_states(pid).values().all(|c| !matches!(c, 'T' | 't'))
        });
        claim!(
            "after every kill no VM thread stopped and every TracerPid 0",
            released
                && disturbed(
                    &common::thread_tracers(pid)
                        .iter()
                        .map(|&(t, tr)| (t, thread_states(pid).get(&t).copied().unwrap_or('?'), tr))
                        .collect::<Vec<_>>(),
                    &before
                )
                .is_empty(),
            "round {round}: {:?} {:?}",
            thread_states(pid),
            common::thread_tracers(pid)
        );
    }
    claim!("the VM keeps running", lab.is_alive());
}

// ---------------------------------------------------------------------------
// storage

fn run_out(lab: &Lab, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = common::tool();
    cmd.arg(lab.vmid().to_string()).arg("--json").args(extra);
    cmd.arg("--run-dir").arg(lab.run_dir()).arg("--pve-dir").arg(lab.pve_dir()).arg("--out").arg(out);
    run_bounded(&mut cmd, RUN_TIMEOUT)
}

/// Fault: the output filesystem is full (a 256 KiB tmpfs).
/// Outcome: with the default 1 GiB min_free floor refused before the VM is touched, exit 4 naming the floor; with the floor off sealing fails naming ENOSPC, exit 4, not sealed; no half-written archive left; the unsealed staging dir kept and named in the error; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn storage_output_full() {
    let lab = lab(241);
    let dir = lab.root().join("full");
    let _m = tmpfs(&dir, "256k");
    let before = lab.thread_states();
    // The free-space floor refuses up front, before anything is captured.
    let out = run_out(&lab, &dir.join("out"), &["--sample-interval", "0"]);
    claim!(
        "with the default 1 GiB min_free floor refused before the VM is touched, exit 4 naming the floor",
        out.status.code() == Some(4)
            && stderr(&out).contains("below the min_free floor")
            && lab.thread_states() == before
            && tracer_pid(lab.pid()) == 0,
        "{}",
        stderr(&out)
    );
    // With the floor off, the disk fills up while sealing.
    let cfg = lab.root().join("nofloor.toml");
    std::fs::write(&cfg, "[retention]\nmin_free = \"0\"\n").unwrap();
    let out = run_out(&lab, &dir.join("out"), &["--sample-interval", "0", "--config", cfg.to_str().unwrap()]);
    let json = json_of(&out);
    let err = stderr(&out);
    claim!(
        "with the floor off sealing fails naming ENOSPC, exit 4, not sealed",
        out.status.code() == Some(4) && json["sealed"] == false && err.contains("No space left"),
        "{err}\n{json}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    claim!("no half-written archive left", !left.iter().any(|n| n.contains(".tar.zst")), "{left:?}");
    // Besides the kept staging dir, only the per-VM lock file (its flock died with the run).
    let staging: Vec<&String> = left.iter().filter(|n| n.as_str() != "locks").collect();
    claim!(
        "the unsealed staging dir kept and named in the error",
        staging.len() == 1
            && staging[0].ends_with(".staging")
            && err.contains(staging[0].as_str())
            && err.contains("kept"),
        "{left:?}\n{err}"
    );
    as_found(lab.pid(), &before);
}

/// Fault: the output directory is on a read-only filesystem.
/// Outcome: refused before touching the VM: exit 2 with one line naming --out; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn storage_output_read_only() {
    let lab = lab(242);
    let dir = lab.root().join("ro");
    let _m = tmpfs(&dir, "1m");
    let st = Command::new("mount").args(["-o", "remount,ro"]).arg(&dir).status().unwrap();
    assert!(st.success(), "mount -o remount,ro failed");
    let before = lab.thread_states();
    let out = run_out(&lab, &dir.join("out"), &[]);
    claim!(
        "refused before touching the VM: exit 2 with one line naming --out",
        out.status.code() == Some(2)
            && stderr(&out).contains("--out")
            && stderr(&out).trim().lines().count() == 1
            && lab.thread_states() == before,
        "{}",
        stderr(&out)
    );
    as_found(lab.pid(), &before);
}

/// Fault: the output directory is deleted (rm -rf) while a slow step runs.
/// Outcome: deleted while the nap step ran (its sleep seen); exit 1; sealed; the archive verifies (every hash, the sidecar); the step whose file vanished failed, naming it; the later steps recreated the staging dir and were sealed; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn storage_output_deleted_mid_run() {
    let lab = lab(243);
    let before = lab.thread_states();
    let rb = write_runbook(&lab, "slow", &slow_then_stacks(243));
    let child = spawn_tool(&lab, &["243", "--json", "--runbook", rb.to_str().unwrap()], None);
    let sleeper = wait_for_argv(&["sleep", &nap(243)]);
    std::fs::remove_dir_all(lab.out_dir()).unwrap();
    claim!("deleted while the nap step ran (its sleep seen)", common::pid_alive(sleeper));
    let out = wait_output(child);
    let json = json_of(&out);
    claim!("exit 1", out.status.code() == Some(1), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    // (proc's files were written again by proc-after, so only qmp-status lost its file.)
    claim!(
        "the step whose file vanished failed, naming it",
        status(&json, "qmp-status") == "failed"
            && err_of(&json, "qmp-status").contains("vanished")
            && ar.read("qmp/query-status.json").is_none(),
        "{}",
        err_of(&json, "qmp-status")
    );
    claim!(
        "the later steps recreated the staging dir and were sealed",
        ["qmp-block", "stacks", "proc-after"].iter().all(|s| status(&json, s) == "ok")
            && ar.read("qmp/query-block.json").is_some(),
        "{json}"
    );
    as_found_during(&ar, "during", &before);
    as_found(lab.pid(), &before);
}

// ---------------------------------------------------------------------------
// scale

/// Fault: scale — a VM with 64 disks (10 LSI controllers), default runbook plus the in-run check.
/// Outcome: exit 0; sealed; the archive verifies (every hash, the sidecar); both blockstats samples hold all 64 devices; query-block lists 64; every thread has a native stack, captured stopped, frames unwound; while the tool still held the VM (a step after stacks, before the seal) every thread untraced and none newly stopped; after exit every VM thread as found (none newly stopped, TracerPid 0).
#[test]
fn scale_64_disks_every_device_and_thread() {
    let lab = Lab::start(LabOptions { vmid: 251, name: "wide".into(), disks: 64, mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let before = thread_states(pid);
    let default = std::fs::read_to_string(common::repo_root().join("runbooks/qemu-wedge.toml")).unwrap();
    let rb = lab.root().join("wide.toml");
    std::fs::write(&rb, format!("{default}\n{}", check_step("during"))).unwrap();
    let out = run_bounded(
        &mut lab.tool_args(&["251", "--json", "--sample-interval", "1s", "--runbook", rb.to_str().unwrap()]),
        RUN_TIMEOUT,
    );
    let json = json_of(&out);
    claim!("exit 0", out.status.code() == Some(0), "{}\n{json}", stderr(&out));
    let ar = sealed(&json);
    let devices = |n: u32| -> std::collections::BTreeSet<String> {
        let bs = ar.read_json(&format!("qmp/query-blockstats.{n}.json")).unwrap();
        bs["return"].as_array().unwrap().iter().filter_map(|d| d["device"].as_str().map(str::to_string)).collect()
    };
    claim!(
        "both blockstats samples hold all 64 devices",
        [1, 2].iter().all(|&n| devices(n).len() == 64 && devices(n).contains("drive-scsi63"))
    );
    claim!(
        "query-block lists 64",
        ar.read_json("qmp/query-block.json").unwrap()["return"].as_array().unwrap().len() == 64
    );
    let threads = ar.read_json("stacks/threads.json").unwrap();
    let got: BTreeMap<i64, &Value> =
        threads["threads"].as_array().unwrap().iter().map(|t| (t["tid"].as_i64().unwrap(), t)).collect();
    let bad: Vec<i32> = before
        .keys()
        .filter(|tid| {
            let Some(t) = got.get(&(**tid as i64)) else { return true };
            // KVM's kernel worker (kvm-nx-lpage-recovery) lives in the process but has no user stack.
            let kernel_only = t["syscall"]["pc"] == 0 && t["kernel_stack"].as_array().is_some_and(|k| !k.is_empty());
            t["capture"] != "stopped" || (t["frames"].as_array().unwrap().is_empty() && !kernel_only)
        })
        .copied()
        .collect();
    claim!("every thread has a native stack, captured stopped, frames unwound", bad.is_empty(), "{bad:?}: {threads}");
    as_found_during(&ar, "during", &before);
    as_found(pid, &before);
}

// ---------------------------------------------------------------------------
// secrets

/// Fault: secrets outside the VM's command line: in the QEMU process's environment (a secret-named key, a database URL with a password) and in host files the tool captures (a kernel log line written to /dev/kmsg, journal lines with `password=`, a URL with user-info and the environment's secret value).
/// Stand-in: a fake `journalctl` (a script) for the journal; the kernel log is the real /dev/kmsg.
/// Outcome: every secret is in its source before the run; sealed; the archive verifies (every hash, the sidecar); no secret in any file of the sealed tar (decompressed, manifest included); proc/environ keeps the keys with the values redacted; host/kmsg.txt keeps the line with password=<redacted>; host/journal.txt keeps its lines with every secret redacted; manifest.json records the redaction and how many values it replaced.
#[test]
fn secrets_in_the_environment_and_host_files_never_reach_the_archive() {
    const SECRETS: [&str; 6] =
        ["EnvS3cretVal", "DbUrlS3cret", "KmsgS3cret", "J0urnalS3cret", "JrnUrlS3cret", "JrnT0kenS3cret"];
    let lab = Lab::start(LabOptions {
        vmid: 261,
        name: "envsecret".into(),
        mbps: 0,
        qemu_env: vec![
            ("BACKUP_PASSWORD".into(), "EnvS3cretVal".into()),
            ("DATABASE_URL".into(), "postgres://app:DbUrlS3cret@db.example/app".into()),
        ],
        ..LabOptions::default()
    });
    let pid = lab.pid();
    let tag = format!("wedge-autopsy-test-{}", std::process::id());
    std::fs::write("/dev/kmsg", format!("{tag}: mount helper password=KmsgS3cret\n"))
        .unwrap_or_else(|e| panic!("write /dev/kmsg: {e} (this test needs root)"));
    let journal = "echo 'Nov 25 pvedaemon: login with password=J0urnalS3cret'\necho 'Nov 25 sync: fetching https://bob:JrnUrlS3cret@mirror.example/x'\necho 'Nov 25 cron: auth_token=JrnT0kenS3cret refreshed'\necho 'Nov 25 backup: env leaked EnvS3cretVal here'";
    let bin = fake_bin(&lab, &[("journalctl", journal)]);
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned();
    let kmsg_has = wait_until(Duration::from_secs(10), || {
        let o = run_bounded(&mut Command::new("dmesg"), Duration::from_secs(10));
        String::from_utf8_lossy(&o.stdout).contains("KmsgS3cret")
    });
    claim!(
        "every secret is in its source before the run",
        environ.contains("EnvS3cretVal") && environ.contains("DbUrlS3cret") && kmsg_has,
        "{environ}"
    );
    let steps = "[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"host\"\nkind = \"host\"\n\n[[step]]\nid = \"journal\"\nkind = \"command\"\nargv = [\"journalctl\", \"--no-pager\"]\noutput = \"host/journal.txt\"\ntimeout = \"10s\"\n";
    let rb = write_runbook(&lab, "secrets", steps);
    let out =
        wait_output(spawn_tool(&lab, &["261", "--json", "--no-qmp", "--runbook", rb.to_str().unwrap()], Some(&bin)));
    let json = json_of(&out);
    let ar = sealed(&json);
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    let all = common::archive_entries(&path);
    assert!(all.len() > 5, "{} entries", all.len());
    let leaks: Vec<(String, &str)> = all
        .iter()
        .flat_map(|(name, b)| common::secrets_in(b, &SECRETS).into_iter().map(move |s| (name.clone(), s)))
        .collect();
    claim!("no secret in any file of the sealed tar (decompressed, manifest included)", leaks.is_empty(), "{leaks:?}");
    let env = ar.read_string("proc/environ").unwrap();
    claim!(
        "proc/environ keeps the keys with the values redacted",
        env.contains("BACKUP_PASSWORD=<redacted>")
            && env.contains("DATABASE_URL=postgres://app:<redacted>@db.example/app"),
        "{env}"
    );
    let kmsg = ar.read_string("host/kmsg.txt").unwrap_or_default();
    claim!(
        "host/kmsg.txt keeps the line with password=<redacted>",
        kmsg.lines().any(|l| l.contains(&tag) && l.contains("password=<redacted>")),
        "{}",
        kmsg.lines().filter(|l| l.contains(&tag)).collect::<Vec<_>>().join("\n")
    );
    let j = ar.read_string("host/journal.txt").unwrap_or_default();
    claim!(
        "host/journal.txt keeps its lines with every secret redacted",
        j.lines().count() == 4
            && j.contains("password=<redacted>")
            && j.contains("https://bob:<redacted>@mirror.example/x")
            && j.contains("auth_token=<redacted>")
            && j.contains("env leaked <redacted> here"),
        "{j}"
    );
    let m = serde_json::to_value(&ar.manifest).unwrap();
    claim!(
        "manifest.json records the redaction and how many values it replaced",
        m["redaction"]["applied"] == true && m["redaction"]["values_replaced"].as_u64().unwrap_or(0) >= 6,
        "{}",
        m["redaction"]
    );
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
