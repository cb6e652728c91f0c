//! The core autopsy against real QEMU processes in a Proxmox-like layout.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{run_bounded, tracer_pid, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn run(lab: &Lab, args: &[&str]) -> (Output, Option<Value>) {
    let out = run_bounded(&mut lab.tool_args(args), RUN_TIMEOUT);
    let json = serde_json::from_slice::<Value>(&out.stdout).ok();
    (out, json)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn step<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["steps"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no step {id} in {json}"))
}

/// The sealed archive from `--json`, checked: sidecar matches, every hash verifies.
fn sealed_archive(json: &Value) -> ArchiveReader {
    assert_eq!(json["sealed"], true, "{json}");
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    let report = archive::verify(&path).expect("archive verifies");
    assert_eq!(json["sha256"].as_str().unwrap(), report.sha256);
    let sidecar = std::fs::read_to_string(archive::sidecar_path(&path)).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(sidecar, format!("{}  {name}\n", report.sha256));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    ArchiveReader::open(&path).unwrap()
}

fn no_thread_left_stopped(before: &BTreeMap<i32, char>, after: &BTreeMap<i32, char>) {
    for (tid, st) in after {
        if matches!(st, 'T' | 't') {
            assert!(
                matches!(before.get(tid), Some('T' | 't')),
                "thread {tid} left stopped: before {before:?} after {after:?}"
            );
        }
    }
}

#[test]
fn wedged_vm_is_sealed_with_all_evidence() {
    let lab = Lab::start(LabOptions::default());
    let wedge = lab.wedge();
    assert_eq!(wedge["wedged"], true, "lab could not wedge: {wedge}");
    let before = lab.thread_states();
    let cfg = lab.root().join("wa.toml");
    std::fs::write(&cfg, "min_idle = \"1s\"\n").unwrap();
    let (out, json) = run(&lab, &["102", "--json", "--sample-interval", "1s", "--config", cfg.to_str().unwrap()]);
    let json = json.unwrap_or_else(|| panic!("no JSON; stderr: {}", stderr(&out)));
    assert_eq!(out.status.code(), Some(0), "stderr: {}\n{json}", stderr(&out));
    assert_eq!(json["vmid"], 102);
    assert_eq!(json["pid"], lab.pid());
    let ar = sealed_archive(&json);

    // QMP replies, raw, both blockstats samples, throttle state, transcript.
    for f in [
        "qmp/query-version.json",
        "qmp/query-status.json",
        "qmp/query-block.json",
        "qmp/query-blockstats.1.json",
        "qmp/query-blockstats.2.json",
        "qmp/query-named-block-nodes.json",
        "qmp/throttle-groups.json",
        "qmp/query-iothreads.json",
        "qmp/query-cpus-fast.json",
        "qmp/query-block-jobs.json",
        "qmp/query-jobs.json",
        "qmp/query-chardev.json",
        "qmp/transcript.jsonl",
    ] {
        assert!(ar.read(f).is_some(), "{f} missing; files: {:?}", ar.list());
    }
    let status = ar.read_json("qmp/query-status.json").unwrap();
    assert_eq!(status["return"]["status"], "running");
    let bs1 = ar.read_json("qmp/query-blockstats.1.json").unwrap();
    let bs2 = ar.read_json("qmp/query-blockstats.2.json").unwrap();
    let wr = |v: &Value| v["return"][0]["stats"]["wr_operations"].as_u64().unwrap();
    assert_eq!(wr(&bs1), wr(&bs2), "wedged: no write completes between samples");
    let block = ar.read_json("qmp/query-block.json").unwrap();
    assert_eq!(block["return"][0]["inserted"]["bps_wr"], 62914560, "the incident's 60 MB/s throttle is live");

    // Per-thread kernel stacks for every thread, and user stacks.
    let tids: Vec<String> = ar
        .list()
        .iter()
        .filter_map(|p| p.strip_prefix("proc/task/")?.strip_suffix("/stack").map(str::to_string))
        .collect();
    assert_eq!(tids.len(), before.len(), "a kernel stack per thread: {tids:?} vs {before:?}");
    assert!(ar.read_string(&format!("proc/task/{}/stack", lab.pid())).unwrap().contains("[<0>]"));
    // Native stacks by default: every thread, frozen once, vCPUs labelled from QMP.
    let stacks = ar.read_json("stacks/threads.json").unwrap_or_else(|| panic!("no native stacks: {:?}", ar.list()));
    let threads = stacks["threads"].as_array().unwrap();
    assert_eq!(threads.len(), before.len(), "{stacks}");
    assert!(stacks["freeze_us"].as_u64().is_some());
    let main = threads.iter().find(|t| t["tid"] == lab.pid()).unwrap();
    assert!(main["frames"].as_array().unwrap().len() >= 3, "main thread unwound: {main}");
    let cpus = ar.read_json("qmp/query-cpus-fast.json").unwrap();
    for cpu in cpus["return"].as_array().unwrap() {
        let t = threads.iter().find(|t| t["tid"] == cpu["thread-id"]).unwrap();
        assert!(t["name"].as_str().unwrap().contains(&format!("CPU {}", cpu["cpu-index"])), "{t}");
    }
    assert!(ar.read_string("stacks/threads.txt").unwrap().contains("thread"));

    // Config redacted; manifest complete.
    let conf = ar.read_string("config/102.conf").unwrap();
    assert!(conf.contains("scsihw: lsi"));
    assert!(!conf.contains("hunter2"), "{conf}");
    let m = &ar.manifest;
    assert_eq!(m.vmid, Some(102));
    assert!(m.steps.iter().all(|s| !s.status.is_problem() || s.optional), "{:?}", m.steps);
    assert!(m.utc_offset.starts_with('+') || m.utc_offset.starts_with('-'));
    assert_eq!(json["verdict"], "block-path-frozen", "{}", json["facts"]);

    // The VM is as it was: nothing stopped, nothing tracing it, still wedged not dead.
    no_thread_left_stopped(&before, &lab.thread_states());
    assert_eq!(tracer_pid(lab.pid()), 0);
    assert!(lab.is_alive());
}

#[test]
fn healthy_vm_seals_ok_and_progress_ends_with_archive() {
    let lab = Lab::start(LabOptions { vmid: 105, name: "calm".into(), ..LabOptions::default() });
    let before = lab.thread_states();
    let (out, json) = run(&lab, &["105", "--json", "--sample-interval", "0", "--stacks", "gdb"]);
    let json = json.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ar = sealed_archive(&json);
    assert!(ar.read_string("stacks/gdb.txt").unwrap().contains("Thread "));
    let err = stderr(&out);
    let last = err.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>();
    assert!(
        last[last.len() - 1].contains(json["archive"].as_str().unwrap()),
        "progress ends with the archive path:\n{err}"
    );
    assert!(err.lines().any(|l| l.contains("proc") && l.contains("ok")), "one line per step:\n{err}");
    no_thread_left_stopped(&before, &lab.thread_states());
    assert_eq!(tracer_pid(lab.pid()), 0);
}

#[test]
fn socket_held_by_another_client_is_recorded_not_fatal() {
    let lab = Lab::start(LabOptions::default());
    let _holder = lab.hold_qmp();
    let (out, json) = run(&lab, &["102", "--json", "--sample-interval", "0"]);
    let json = json.unwrap();
    assert_eq!(out.status.code(), Some(1), "sealed with a failed step: {}", stderr(&out));
    let connect = step(&json, "qmp-connect");
    assert_eq!(connect["status"], "failed");
    assert!(connect["error"].as_str().unwrap().contains("no-greeting"), "{connect}");
    assert_eq!(step(&json, "qmp-status")["status"], "skipped");
    assert_eq!(step(&json, "proc")["status"], "ok");
    assert_eq!(json["verdict"], "qmp-unreachable");
    let ar = sealed_archive(&json);
    assert!(ar.read("qmp/transcript.jsonl").is_some());
}

#[test]
fn pidfile_naming_an_unrelated_process_is_refused_and_it_is_untouched() {
    let lab = Lab::start(LabOptions::default());
    let mut sleeper = std::process::Command::new("sleep");
    sleeper.arg("600");
    let pid = lab.spawn(&mut sleeper) as i32;
    std::fs::write(lab.run_dir().join("102.pid"), format!("{pid}\n")).unwrap();
    let (out, _) = run(&lab, &["102", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("refusing pid {pid}")), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!lab.out_dir().exists(), "nothing written, not even --out created");
    assert_eq!(common::proc_state(pid), Some('S'), "the unrelated process is untouched");
    assert_eq!(tracer_pid(pid), 0);
}

#[test]
fn refusals_are_one_line_and_touch_nothing() {
    let lab = Lab::start(LabOptions { vmid: 106, name: "ref".into(), ..LabOptions::default() });
    let before = lab.thread_states();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["abc"], 2, "invalid VMID"),
        (vec!["99"], 2, "invalid VMID"),
        (vec!["1000000000"], 2, "invalid VMID"),
        (vec!["0106"], 2, "invalid VMID"),
        (vec!["106;reboot"], 2, "invalid VMID"),
        (vec!["107"], 3, "not in the cluster's VM list"),
    ];
    for (args, code, msg) in cases {
        let (out, _) = run(&lab, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?} one line: {err}");
    }
    // Unwritable --out: a regular file where a directory must be.
    let file = lab.root().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = run_bounded(
        common::tool()
            .args(["106", "--run-dir"])
            .arg(lab.run_dir())
            .arg("--pve-dir")
            .arg(lab.pve_dir())
            .arg("--out")
            .arg(file.join("out")),
        RUN_TIMEOUT,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write to output directory") && err.contains("--out"), "{err}");
    assert_eq!(lab.thread_states(), before, "nothing was traced or stopped");
    assert_eq!(tracer_pid(lab.pid()), 0);
    // Missing pidfile: the VM is listed but not running here.
    std::fs::remove_file(lab.run_dir().join("106.pid")).unwrap();
    let (out, _) = run(&lab, &["106"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is not running on this node"), "{}", stderr(&out));
    assert!(!lab.out_dir().exists(), "refusals create nothing");
}

#[test]
fn vm_on_another_node_names_that_node() {
    let lab = Lab::start(LabOptions {
        vmid: 108,
        name: "away".into(),
        node: Some("pve-far".into()),
        ..LabOptions::default()
    });
    let (out, _) = run(&lab, &["108"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("runs on node pve-far"), "{}", stderr(&out));
}

#[test]
fn sigint_mid_run_still_seals_what_was_captured() {
    let lab = Lab::start(LabOptions { vmid: 109, name: "int".into(), ..LabOptions::default() });
    let rb = lab.root().join("slow.toml");
    std::fs::write(
        &rb,
        "schema = 1\nname = \"slow\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"status\"\nkind = \"qmp\"\ncommand = \"query-status\"\n\n[[step]]\nid = \"nap\"\nkind = \"command\"\nargv = [\"sleep\", \"60\"]\ntimeout = \"90s\"\n\n[[step]]\nid = \"after\"\nkind = \"host\"\n",
    )
    .unwrap();
    let mut cmd = lab.tool_args(&["109", "--json", "--runbook", rb.to_str().unwrap()]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Wait until the sleep step is running, then interrupt.
    assert!(common::wait_until(Duration::from_secs(20), || { common::proc_cmdline_exists(&["sleep", "60"]) }));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json["interrupted"], true);
    assert_eq!(step(&json, "proc")["status"], "ok");
    assert_eq!(step(&json, "status")["status"], "ok");
    assert_eq!(step(&json, "nap")["status"], "interrupted");
    assert_eq!(step(&json, "after")["status"], "interrupted");
    let ar = sealed_archive(&json);
    assert!(ar.manifest.interrupted);
    assert!(ar.read("proc/status").is_some());
    assert!(!common::proc_cmdline_exists(&["sleep", "60"]), "the interrupted command's process group was killed");
}

#[test]
fn hanging_command_step_is_killed_with_its_child_and_output_lands_hashed() {
    let lab = Lab::start(LabOptions { vmid: 110, name: "cmd".into(), ..LabOptions::default() });
    let rb = lab.root().join("fork.toml");
    // The program forks a child, both print their pid and hang.
    let prog = "import os, time\nwho = 'child' if os.fork() == 0 else 'parent'\nos.write(1, ('%s %d\\n' % (who, os.getpid())).encode())\ntime.sleep(300)\n";
    std::fs::write(
        &rb,
        format!("schema = 1\nname = \"fork\"\ndescription = \"d\"\n\n[[step]]\nid = \"forker\"\nkind = \"command\"\nargv = [\"python3\", \"-c\", {prog:?}]\ntimeout = \"8s\"\noutput = \"commands/forker.txt\"\n\n[[step]]\nid = \"pid\"\nkind = \"command\"\nargv = [\"echo\", \"{{pid}}\", \"{{vmid}}\"]\n"),
    )
    .unwrap();
    let (out, json) = run(&lab, &["110", "--json", "--runbook", rb.to_str().unwrap()]);
    let json = json.unwrap_or_else(|| panic!("{}", stderr(&out)));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let forker = step(&json, "forker");
    assert_eq!(forker["status"], "timeout");
    assert!(forker["error"].as_str().unwrap().contains("killed"), "{forker}");
    let ar = sealed_archive(&json);
    let text = ar.read_string("commands/forker.txt").unwrap();
    let pids: Vec<i32> = text.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{text}");
    for p in pids {
        let alive = common::proc_state(p).is_some_and(|s| s != 'Z');
        assert!(!alive, "pid {p} survived the step's deadline");
    }
    assert_eq!(ar.read_string("commands/echo.txt").unwrap().trim(), format!("{} 110", lab.pid()));
    let entry = ar.manifest.files.iter().find(|f| f.path == "commands/forker.txt").unwrap();
    assert_eq!(entry.size as usize, text.len());
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    let lab = Lab::start(LabOptions { vmid: 111, name: "dry".into(), ..LabOptions::default() });
    let before = lab.thread_states();
    let out = run_bounded(&mut lab.tool_args(&["111", "--dry-run"]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(0));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("in flight: blockstats, virtio queues") && plan.contains("2 samples"), "{plan}");
    assert!(plan.contains(&format!("pid {}", lab.pid())), "{plan}");
    assert!(!lab.out_dir().exists());
    assert_eq!(lab.thread_states(), before);
}

#[test]
fn several_vms_in_one_call_and_all_wedged() {
    let mut lab = Lab::start(LabOptions { vmid: 130, name: "one".into(), ..LabOptions::default() });
    let two = lab.add_vm(LabOptions { vmid: 131, name: "two".into(), ..LabOptions::default() });
    assert_eq!(two.wedge()["wedged"], true);
    std::thread::sleep(Duration::from_millis(1100));
    let (s130, s131) = (lab.vm(130).thread_states(), two.thread_states());

    // Two VMs and one that is not running: both captured, the refusal reported, worst code.
    let out = run_bounded(&mut lab.tool_args(&["130", "131", "132", "--json", "--sample-interval", "0"]), RUN_TIMEOUT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "the refusal of 132 is the worst outcome: {err}");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, vmid) in lines.iter().zip([130, 131]) {
        assert_eq!(line["vmid"], vmid);
        sealed_archive(line);
    }
    assert_eq!(lines[2]["vmid"], 132);
    assert_eq!(lines[2]["exit"], 3);
    assert!(err.contains("VM 132: ") && err.contains("not in the cluster's VM list"), "{err}");
    assert!(err.contains("130/proc") && err.contains("131/proc"), "progress names each VM: {err}");
    no_thread_left_stopped(&s130, &lab.vm(130).thread_states());
    no_thread_left_stopped(&s131, &two.thread_states());

    // --all-wedged asks diagnose and captures only the wedged VM. VM 130 completes I/O
    // meanwhile (a lab guest has no OS, so without it an idle disk would pass min_idle).
    let cfg = lab.root().join("idle.toml");
    std::fs::write(&cfg, "min_idle = \"1s\"\n").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = {
        let (stop, path) = (stop.clone(), lab.vm(130).lab_qmp_path());
        std::thread::spawn(move || {
            let mut q = common::Qmp::connect(&path, Duration::from_secs(10)).unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                q.execute(
                    "human-monitor-command",
                    Some(serde_json::json!({"command-line": "qemu-io drive-scsi0 \"aio_read 0 4k\""})),
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = run_bounded(
        &mut lab.tool_args(&["--all-wedged", "--json", "--sample-interval", "1s", "--config", cfg.to_str().unwrap()]),
        RUN_TIMEOUT,
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    io.join().unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{lines:?} {}", stderr(&out));
    assert_eq!(lines[0]["vmid"], 131);
    assert_eq!(lines[0]["verdict"], "block-path-frozen");
}

/// Every thread of `pid`: `(tid, state, TracerPid)`.
fn threads_now(lab: &Lab) -> Vec<(i32, char, i32)> {
    let states = lab.thread_states();
    common::thread_tracers(lab.pid())
        .into_iter()
        .map(|(t, tr)| (t, states.get(&t).copied().unwrap_or('?'), tr))
        .collect()
}

/// Untraced, and no thread stopped that was not stopped `before`.
fn untouched(rows: &[(i32, char, i32)], before: &BTreeMap<i32, char>) -> bool {
    !rows.is_empty()
        && rows
            .iter()
            .all(|(tid, st, tr)| *tr == 0 && (!matches!(st, 'T' | 't') || matches!(before.get(tid), Some('T' | 't'))))
}

#[test]
fn core_step_dumps_every_thread_and_leaves_the_vm_as_found() {
    let lab = Lab::start(LabOptions { vmid: 141, name: "core".into(), mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let before = lab.thread_states();
    // The task list right after the core, while the tool still holds the VM.
    let prog = "import os, sys\np = sys.argv[1]\nfor t in sorted(os.listdir('/proc/%s/task' % p), key=int):\n    d = dict(l.split(':', 1) for l in open('/proc/%s/task/%s/status' % (p, t)).read().splitlines() if ':' in l)\n    print(t, d['State'].split()[0], d['TracerPid'].strip())\n";
    let rb = lab.root().join("core.toml");
    std::fs::write(
        &rb,
        format!(
            "schema = 1\nname = \"core\"\ndescription = \"core test\"\ndeadline = \"120s\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"core\"\nkind = \"core\"\noutput = \"core/qemu.core\"\nmin_free = \"256M\"\ntimeout = \"90s\"\n\n[[step]]\nid = \"after\"\nkind = \"command\"\nargv = [\"python3\", \"-c\", {prog:?}, \"{{pid}}\"]\noutput = \"check/after.txt\"\ntimeout = \"10s\"\n"
        ),
    )
    .unwrap();
    let (out, json) = run(&lab, &["141", "--json", "--runbook", rb.to_str().unwrap()]);
    let json = json.unwrap_or_else(|| panic!("no JSON: {}", stderr(&out)));
    assert_eq!(out.status.code(), Some(0), "{}\n{json}", stderr(&out));
    assert_eq!(step(&json, "core")["status"], "ok", "{}", step(&json, "core"));
    let ar = sealed_archive(&json);
    let during: Vec<(i32, char, i32)> = ar
        .read_string("check/after.txt")
        .expect("check/after.txt sealed")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].chars().next().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert!(untouched(&during, &before), "right after the core: {during:?} (before {before:?})");
    // Streamed out of the sealed tar (ArchiveReader loads at most 64 MiB of an entry).
    let core_path = lab.root().join("qemu.core");
    let dec =
        zstd::stream::read::Decoder::new(std::fs::File::open(json["archive"].as_str().unwrap()).unwrap()).unwrap();
    let mut tar = tar::Archive::new(dec);
    let mut found = false;
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("core/qemu.core") {
            std::io::copy(&mut e, &mut std::fs::File::create(&core_path).unwrap()).unwrap();
            found = true;
        }
    }
    assert!(found, "the core is in the archive");
    let size = std::fs::metadata(&core_path).unwrap().len();
    assert!(size > 128 << 20, "a core of a 128 MiB guest holds its RAM: {size} bytes");
    let head = std::fs::read(&core_path).map(|b| b[..4].to_vec()).unwrap();
    assert_eq!(&head, b"\x7fELF", "an ELF core");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let g = run_bounded(
        std::process::Command::new("gdb")
            .args(["-batch", "-nx", "-iex", "set debuginfod enabled off", "-ex", "info threads"])
            .arg(&exe)
            .arg(&core_path)
            .env_remove("DEBUGINFOD_URLS"),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&g.stdout);
    let in_core = text
        .lines()
        .filter(|l| {
            let l = l.trim_start_matches('*').trim_start();
            l.split_whitespace().next().is_some_and(|n| n.parse::<u32>().is_ok())
                && (l.contains("Thread") || l.contains("LWP"))
        })
        .count();
    assert_eq!(
        in_core,
        during.len(),
        "gdb loads the core with as many threads as the live process:\n{text}\n{}",
        stderr(&g)
    );
    let after = threads_now(&lab);
    assert!(untouched(&after, &before), "after exit: {after:?} (before {before:?})");
    assert!(lab.is_alive());
}

#[test]
fn stacks_subcommand_on_a_live_qemu_native_and_gdb() {
    let lab = Lab::start(LabOptions { vmid: 142, name: "stk".into(), mbps: 0, ..LabOptions::default() });
    let pid = lab.pid();
    let before = lab.thread_states();
    let out = run_bounded(common::tool().args(["stacks", &pid.to_string(), "--json"]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let threads = report["threads"].as_array().unwrap();
    let live = threads_now(&lab);
    assert_eq!(threads.len(), live.len(), "one entry per thread: {report}");
    let main = threads.iter().find(|t| t["tid"] == pid).expect("the main thread");
    assert_eq!(main["capture"], "stopped", "{main}");
    let frames = main["frames"].as_array().unwrap();
    assert!(frames.len() >= 3, "the main thread unwound past its syscall: {main}");
    let with_frames = threads.iter().filter(|t| t["frames"].as_array().is_some_and(|f| !f.is_empty())).count();
    assert!(with_frames + 1 >= threads.len(), "every user thread has frames: {report}");
    assert!(untouched(&threads_now(&lab), &before), "after native: {:?}", threads_now(&lab));

    let out = run_bounded(common::tool().args(["stacks", &pid.to_string(), "--method", "gdb"]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let bt_threads = text.lines().filter(|l| l.starts_with("Thread ")).count();
    assert_eq!(bt_threads, threads_now(&lab).len(), "gdb printed every thread:\n{text}");
    assert!(untouched(&threads_now(&lab), &before), "after gdb: {:?}", threads_now(&lab));
    assert!(lab.is_alive());

    // A pid that does not exist: one line naming how to check it.
    let out = run_bounded(common::tool().args(["stacks", "999999999"]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ps -p 999999999"), "{}", stderr(&out));
}
