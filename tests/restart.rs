//! `--then-restart` against real lab QEMUs, driven through the `qm` stand-in
//! (`tests/support/qm`) exactly as the tool drives Proxmox's `qm`: argv only, under the
//! tool's deadlines. Every QEMU (including ones the stand-in restarts) is killed when
//! the `Lab` drops.
//!
//! Test-only hook: `WEDGE_AUTOPSY_TEST_HOOK_BEFORE_KILL=<P>` makes the tool write
//! `<P>.ready` (the old pid) right before its kill decision and wait for `<P>.go`. It is
//! used by one test to swap the process behind the old pid, and is recorded as a
//! `test-hook` action in restart.json whenever it fires. The hook exists only in builds
//! with `--features test-hooks` (scripts/test enables it); without it that test is not
//! compiled and `hook_tests_need_the_feature` says so.

mod common;

#[cfg(feature = "test-hooks")]
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pid_alive, run_bounded, wait_until, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Writes the tool's config: the qm/ha-manager stand-ins and short restart timeouts.
fn config(lab: &Lab, restart_extra: &str) -> PathBuf {
    let p = lab.root().join("wa.toml");
    let support = common::repo_root().join("tests/support");
    std::fs::write(
        &p,
        format!(
            "qm = {:?}\n\n[restart]\nha_manager = {:?}\n{}{restart_extra}\n",
            support.join("qm").display().to_string(),
            support.join("ha-manager").display().to_string(),
            if restart_extra.contains("verify_timeout") { "" } else { "verify_timeout = \"30s\"\n" }
        ),
    )
    .unwrap();
    p
}

fn qm_log_path(lab: &Lab) -> PathBuf {
    lab.root().join("qm.log")
}

/// The tool with this lab's dirs, the config, the lab root for the stand-ins, and
/// `QM_LOG` so each qm invocation is recorded.
fn tool(lab: &Lab, cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = lab.tool_args(args);
    c.arg("--config")
        .arg(cfg)
        .env("WEDGE_LAB_ROOT", lab.root())
        .env("QM_LOG", qm_log_path(lab))
        .env("HA_LOG", lab.root().join("ha.log"));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(lab: &Lab, cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
    let out = run_bounded(&mut tool(lab, cfg, args, env), RUN_TIMEOUT);
    let json = serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Each qm (or ha-manager) invocation's argv, in order.
fn log_lines(p: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(p).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn action<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == name)
        .unwrap_or_else(|| panic!("no {name} action in {r:#}"))
}

/// The restart.json next to the archive, checked against the `--json` restart object.
fn restart_json_matches(json: &Value) -> Value {
    let archive = PathBuf::from(json["archive"].as_str().unwrap());
    archive::verify(&archive).expect("archive still verifies after the restart");
    let side = wedge_autopsy::restart::outcome_path(&archive);
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(&side).unwrap_or_else(|e| panic!("{}: {e}", side.display()))).unwrap();
    assert_eq!(on_disk, json["restart"], "restart.json equals the --json restart object");
    on_disk
}

/// The new QEMU answers QMP for us too.
fn qmp_status(lab: &Lab) -> String {
    let mut q = lab.qmp(Duration::from_secs(10)).expect("new QEMU's QMP");
    q.execute("query-status", None).unwrap()["status"].as_str().unwrap().to_string()
}

#[test]
fn healthy_vm_restarts_then_cooldown_refuses_and_force_passes() {
    let lab = Lab::start(LabOptions { vmid: 120, name: "calm".into(), ..LabOptions::default() });
    let cfg = config(&lab, "timeout = \"5s\"");
    let old = lab.pid();
    let t = Instant::now();
    let (out, json) = run(&lab, &cfg, &["120", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    eprintln!("healthy restart run took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    assert_eq!(r["performed"], true, "{r:#}");
    assert_eq!(r["method"], "qm");
    assert_eq!(r["escalated"], false, "a healthy QEMU obeys quit: {r:#}");
    assert_eq!(r["old_pid"], old);
    assert_eq!(r["error"], Value::Null);
    assert_eq!(r["qmp_status"], "running");
    let new = r["new_pid"].as_i64().unwrap() as i32;
    assert_ne!(new, old);
    assert!(!pid_alive(old), "old QEMU {old} is gone");
    assert_eq!(lab.pid(), new, "the pidfile names the new, verified QEMU");
    assert_eq!(qmp_status(&lab), "running");
    let on_disk = restart_json_matches(&json);
    assert!(on_disk["duration_ms"].as_u64().unwrap() > 0);
    // Order: verify the seal, then stop, then start, then verify the new QEMU.
    let names: Vec<&str> = r["actions"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or_else(|| panic!("{n} in {names:?}"));
    assert!(
        pos("verify-archive") < pos("stop") && pos("stop") < pos("start") && pos("start") < pos("verify-new"),
        "{names:?}"
    );
    assert_eq!(
        log_lines(&qm_log_path(&lab)),
        vec![vec!["stop", "120", "--timeout", "5"], vec!["start", "120"]],
        "exactly one qm stop and one qm start"
    );

    // Within the cooldown: refused after a good seal, exit 6, nothing touched.
    let (out, json) = run(&lab, &cfg, &["120", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(json["sealed"], true);
    let r = &json["restart"];
    assert_eq!(r["performed"], false);
    assert_eq!(r["error_kind"], "cooldown");
    assert!(r["error"].as_str().unwrap().contains("--force"), "{r:#}");
    assert!(stderr(&out).contains("cooldown"), "{}", stderr(&out));
    assert_eq!(lab.pid(), new, "refused: the VM is untouched");
    assert_eq!(log_lines(&qm_log_path(&lab)).len(), 2, "no qm call during the cooldown");

    // --force passes; the printed summary carries the restart outcome.
    let (out, _) = run(&lab, &cfg, &["120", "--then-restart", "--force", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let md = String::from_utf8_lossy(&out.stdout);
    let newer = lab.pid();
    assert_ne!(newer, new);
    // The restart is a short table, one row per recorded action, not the raw JSON.
    let head = format!("**Performed** via qm: VM restarted, old pid {new} → new pid {newer}, ");
    assert!(md.contains("## Restart") && md.contains(&head), "{head}\n{md}");
    assert!(!md.contains("\"performed\"") && !md.contains("```json"), "{md}");
    let archive = md
        .lines()
        .find_map(|l| l.strip_prefix("- **Archive:** `")?.split('`').next().map(PathBuf::from))
        .unwrap_or_else(|| panic!("no archive line:\n{md}"));
    let side: Value =
        serde_json::from_slice(&std::fs::read(wedge_autopsy::restart::outcome_path(&archive)).unwrap()).unwrap();
    let table: Vec<&str> = md
        .lines()
        .skip_while(|l| *l != "| action | result | ms | detail |")
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let actions = side["actions"].as_array().unwrap();
    assert_eq!(table.len(), actions.len(), "{md}");
    for (row, a) in table.iter().zip(actions) {
        let want = format!(
            "| {} | {} | {} | ",
            a["action"].as_str().unwrap(),
            if a["ok"] == true { "ok" } else { "FAILED" },
            a["duration_ms"]
        );
        assert!(row.starts_with(&want), "{row} vs {want}");
    }
    for name in ["stop", "start", "verify-new"] {
        assert!(table.iter().any(|r| r.starts_with(&format!("| {name} | ok |"))), "{name}: {md}");
    }
    assert!(!pid_alive(new));
    assert_eq!(log_lines(&qm_log_path(&lab)).len(), 4);
}

#[test]
fn wedged_vm_ignoring_quit_and_sigterm_is_sigkilled_after_the_deadline() {
    let lab = Lab::start(LabOptions { vmid: 121, name: "wedged".into(), ..LabOptions::default() });
    let w = lab.wedge();
    assert_eq!(w["wedged"], true, "{w}");
    let old = lab.pid();
    // qm stop --timeout 1 sends quit (hangs in the drain), SIGTERM after 1 s, and would
    // wait 60 s before its own SIGKILL: the tool's 5 s deadline comes first.
    let cfg = config(&lab, "timeout = \"1s\"\nstop_deadline = \"5s\"");
    let t = Instant::now();
    let (out, json) =
        run(&lab, &cfg, &["121", "--then-restart", "--json", "--sample-interval", "0"], &[("QM_TERM_GRACE", "60")]);
    eprintln!("wedged restart run took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    eprintln!("wedged restart: {}", serde_json::to_string_pretty(r).unwrap());
    assert_eq!(r["performed"], true, "{r:#}");
    assert_eq!(r["escalated"], true, "{r:#}");
    let stop = action(r, "stop");
    assert_eq!(stop["timed_out"], true, "{stop}");
    let kill = action(r, "kill");
    assert!(kill["detail"].as_str().unwrap().contains("SIGKILL to pid"), "{kill}");
    assert!(kill["detail"].as_str().unwrap().contains(&old.to_string()), "{kill}");
    assert!(!pid_alive(old));
    let new = r["new_pid"].as_i64().unwrap() as i32;
    assert_eq!(lab.pid(), new);
    assert_eq!(qmp_status(&lab), "running");
    restart_json_matches(&json);
    // The stand-in's stop was killed with its process group: no qm is left behind.
    assert!(!qm_processes(&lab).iter().any(|a| a.contains(&"stop".to_string())), "{:?}", qm_processes(&lab));
}

/// Live `qm` stand-in processes for this lab's VM (argv), found by cmdline.
fn qm_processes(lab: &Lab) -> Vec<Vec<String>> {
    let qm = common::qm_path().display().to_string();
    let vmid = lab.vmid().to_string();
    common::live_pids_where(|a| a.contains(&qm) && a.contains(&vmid))
        .into_iter()
        .filter_map(common::proc_cmdline)
        .collect()
}

#[test]
fn hanging_qm_stop_is_killed_then_the_proven_qemu_is_sigkilled() {
    let lab = Lab::start(LabOptions { vmid: 122, name: "hang".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = config(&lab, "timeout = \"1s\"\nstop_deadline = \"3s\"");
    let (out, json) =
        run(&lab, &cfg, &["122", "--then-restart", "--json", "--sample-interval", "0"], &[("QM_STOP_HANG", "1")]);
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    let stop = action(r, "stop");
    assert_eq!(stop["timed_out"], true, "{stop}");
    assert!(stop["detail"].as_str().unwrap().contains("process group was killed"), "{stop}");
    assert_eq!(r["escalated"], true);
    assert_eq!(r["performed"], true);
    assert!(!pid_alive(old));
    assert_ne!(lab.pid(), old);
    assert!(qm_processes(&lab).is_empty(), "hung qm left behind: {:?}", qm_processes(&lab));
    restart_json_matches(&json);
}

/// Makes the next process forked in this pid namespace get `pid` (needs root), by
/// setting ns_last_pid and spawning; retries because other processes fork too.
/// Fails the test naming the missing capability when ns_last_pid is not writable.
#[cfg(feature = "test-hooks")]
fn spawn_with_pid(lab: &Lab, pid: i32) -> Option<i32> {
    for _ in 0..200 {
        if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)) {
            panic!(
                "cannot write /proc/sys/kernel/ns_last_pid ({e}): this test needs root in the initial pid namespace"
            );
        }
        let mut c = Command::new("sleep");
        c.arg("600");
        let got = lab.spawn(&mut c) as i32;
        if got == pid {
            return Some(got);
        }
        // SAFETY: our own child, just spawned.
        unsafe { libc::kill(got, libc::SIGKILL) };
        lab.wait_spawned(got as u32, Duration::from_secs(5));
    }
    None
}

/// A plain `cargo test` cannot run the kill-guard test: fail saying how to, rather than
/// pass without it.
#[cfg(not(feature = "test-hooks"))]
#[test]
fn hook_tests_need_the_feature() {
    panic!("the kill-decision tests (pid reuse, failure paths) need `cargo test --features test-hooks` (scripts/test)");
}

#[cfg(feature = "test-hooks")]
#[test]
fn pid_reused_between_seal_and_kill_is_not_signalled() {
    let lab = Lab::start(LabOptions { vmid: 123, name: "reuse".into(), ..LabOptions::default() });
    let old = lab.pid();
    // qm stop hangs, so the tool reaches its own kill; the hook pauses it right before.
    let cfg = config(&lab, "timeout = \"1s\"\nstop_deadline = \"2s\"");
    let hook = lab.root().join("hook");
    let stdout_path = lab.root().join("tool.out");
    let mut cmd =
        tool(&lab, &cfg, &["123", "--then-restart", "--json", "--sample-interval", "0"], &[("QM_STOP_HANG", "1")]);
    cmd.env(wedge_autopsy::restart::TEST_HOOK_ENV, &hook)
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(Stdio::null());
    let tool_pid = lab.spawn(&mut cmd);
    let ready = PathBuf::from(format!("{}.ready", hook.display()));
    assert!(wait_until(RUN_TIMEOUT, || ready.exists()), "the tool never reached the kill decision");
    assert_eq!(std::fs::read_to_string(&ready).unwrap().trim(), old.to_string());
    // Mid-restart the VM's lock is still held: another run is turned away.
    let (busy, _) = run(&lab, &cfg, &["123", "--quiet"], &[]);
    assert_eq!(busy.status.code(), Some(6), "{}", stderr(&busy));
    assert!(stderr(&busy).contains(&format!("pid {tool_pid}")), "{}", stderr(&busy));

    // The old QEMU dies on its own; another process takes its pid (when the kernel lets
    // us) and the pidfile names that process.
    lab.kill();
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{old}")).exists()),
        "old QEMU pid {old} was never reaped, so it cannot be reused"
    );
    let impostor = spawn_with_pid(&lab, old)
        .unwrap_or_else(|| panic!("no process could be made to take over pid {old} within 200 forks"));
    std::fs::write(lab.pidfile(), format!("{impostor}\n")).unwrap();
    std::fs::write(format!("{}.go", hook.display()), "").unwrap();

    let status = lab.wait_spawned(tool_pid, RUN_TIMEOUT).expect("tool finished");
    let json: Value = serde_json::from_slice(&std::fs::read(&stdout_path).unwrap()).unwrap();
    let r = &json["restart"];
    eprintln!("restart: {}", serde_json::to_string_pretty(r).unwrap());
    assert_eq!(common::proc_state(impostor), Some('S'), "the process now behind pid {old} survived");
    assert_eq!(r["escalated"], false, "nothing was killed: {r:#}");
    assert_eq!(action(r, "test-hook")["ok"], true, "the hook is visible in the record");
    assert_eq!(impostor, old);
    let kill = action(r, "kill");
    assert!(kill["detail"].as_str().unwrap().contains("not signalled"), "{kill}");
    // The old QEMU is gone, so the start went ahead and produced a proven new one.
    assert_eq!(status.code(), Some(0), "{r:#}");
    assert_eq!(r["performed"], true);
    let new = lab.pid();
    assert_eq!(r["new_pid"], new);
    assert!(new != impostor && new != old);
}

#[test]
fn seal_failure_stops_nothing() {
    let lab = Lab::start(LabOptions { vmid: 124, name: "noseal".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = config(&lab, "");
    // The output directory is a small tmpfs, and a capture step fills it: sealing then
    // fails writing the archive, as on a full disk. (Taking the archive's name no longer
    // fails a seal: a taken name gets the next free one.)
    let out_dir = lab.out_dir();
    let _mounted = common::tmpfs(&out_dir, "64m");
    let prog = format!(
        "import os\nf = open(os.path.join({:?}, 'filler'), 'wb')\ntry:\n    while True:\n        f.write(b'x' * (1 << 20))\n        f.flush()\nexcept OSError as e:\n    print('full:', e)\n",
        out_dir.display().to_string()
    );
    let rb = lab.root().join("block.toml");
    std::fs::write(
        &rb,
        format!("schema = 1\nname = \"block\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"occupy\"\nkind = \"command\"\nargv = [\"python3\", \"-c\", {prog:?}]\n"),
    )
    .unwrap();
    let (out, json) = run(&lab, &cfg, &["124", "--then-restart", "--json", "--runbook", rb.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(4), "{}\n{json:#}", stderr(&out));
    assert_eq!(json["sealed"], false);
    let r = &json["restart"];
    assert_eq!(r["performed"], false);
    assert_eq!(r["error_kind"], "not-sealed");
    assert!(stderr(&out).contains("nothing was stopped"), "{}", stderr(&out));
    assert!(log_lines(&qm_log_path(&lab)).is_empty(), "qm was never called");
    assert_eq!(lab.pid(), old, "the VM still runs its old QEMU");
    let leftovers: Vec<String> =
        std::fs::read_dir(&out_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!leftovers.iter().any(|n| n.ends_with(".restart.json")), "{leftovers:?}");
    assert!(!out_dir.join("restart-state/124.json").exists(), "no cooldown recorded for a restart that never happened");
}

#[test]
fn second_autopsy_while_the_first_holds_the_lock_is_busy() {
    let lab = Lab::start(LabOptions { vmid: 125, name: "busy".into(), ..LabOptions::default() });
    let cfg = config(&lab, "");
    let release = lab.root().join("release");
    let prog = format!(
        "import os, time\nt = time.monotonic()\nwhile not os.path.exists({:?}) and time.monotonic() - t < 90:\n    time.sleep(0.05)\n",
        release.display().to_string()
    );
    let rb = lab.root().join("wait.toml");
    std::fs::write(
        &rb,
        format!("schema = 1\nname = \"wait\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"hold\"\nkind = \"command\"\nargv = [\"python3\", \"-c\", {prog:?}]\ntimeout = \"100s\"\n"),
    )
    .unwrap();
    let mut first = tool(&lab, &cfg, &["125", "--quiet", "--runbook", rb.to_str().unwrap()], &[]);
    first.stdout(Stdio::null()).stderr(Stdio::null());
    let first_pid = lab.spawn(&mut first);
    let lock = lab.out_dir().join("locks/125.lock");
    let holder = |p: &Path| std::fs::read_to_string(p).ok().and_then(|t| serde_json::from_str::<Value>(t.trim()).ok());
    assert!(
        wait_until(RUN_TIMEOUT, || holder(&lock).is_some_and(|h| h["pid"] == first_pid)),
        "first run never took the lock"
    );

    let old = lab.pid();
    let (out, _) = run(&lab, &cfg, &["125", "--then-restart"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("already being autopsied") && err.contains(&format!("pid {first_pid}")), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(log_lines(&qm_log_path(&lab)).is_empty());
    assert_eq!(lab.pid(), old);

    std::fs::write(&release, "").unwrap();
    let st = lab.wait_spawned(first_pid, RUN_TIMEOUT).expect("first run finished");
    assert_eq!(st.code(), Some(0));
    // Released: the next run gets the lock.
    let (out, _) = run(&lab, &cfg, &["125", "--quiet", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn ha_managed_vm_is_refused_without_allow_ha_and_goes_through_ha_manager_with_it() {
    let lab = Lab::start(LabOptions { vmid: 126, name: "ha".into(), ..LabOptions::default() });
    std::fs::create_dir_all(lab.pve_dir().join("ha")).unwrap();
    std::fs::write(lab.pve_dir().join("ha/resources.cfg"), "vm: 126\n\tstate started\n\tmax_restart 1\n").unwrap();
    let cfg = config(&lab, "timeout = \"5s\"");
    let old = lab.pid();

    let plan = run_bounded(&mut tool(&lab, &cfg, &["126", "--then-restart", "--dry-run"], &[]), RUN_TIMEOUT);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.contains("HA-managed: REFUSED without --allow-ha"), "{plan}");
    assert!(plan.contains(&format!("pid {old}")), "{plan}");

    let (out, json) = run(&lab, &cfg, &["126", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(json["sealed"], true);
    let r = &json["restart"];
    assert_eq!(r["error_kind"], "ha-managed");
    assert!(r["error"].as_str().unwrap().contains("--allow-ha"), "{r:#}");
    assert!(stderr(&out).contains("HA-managed"), "{}", stderr(&out));
    assert!(log_lines(&qm_log_path(&lab)).is_empty(), "qm never called");
    assert_eq!(lab.pid(), old);
    restart_json_matches(&json);

    let (out, json) =
        run(&lab, &cfg, &["126", "--then-restart", "--allow-ha", "--json", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    assert_eq!(r["method"], "ha-manager");
    assert_eq!(r["performed"], true);
    assert_eq!(
        log_lines(&lab.root().join("ha.log")),
        vec![vec!["set", "vm:126", "--state", "stopped"], vec!["set", "vm:126", "--state", "started"]]
    );
    assert_ne!(lab.pid(), old);
}

#[test]
fn dry_run_shows_the_restart_plan_and_touches_nothing() {
    let lab = Lab::start(LabOptions { vmid: 127, name: "plan".into(), ..LabOptions::default() });
    let cfg = config(&lab, "timeout = \"7s\"\ncooldown = \"1h\"");
    let old = lab.pid();
    let out = run_bounded(&mut tool(&lab, &cfg, &["127", "--then-restart", "--dry-run"], &[]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("QMP query-status"), "the capture plan comes first: {plan}");
    assert!(plan.contains("qm stop 127 --timeout 7"), "{plan}");
    assert!(plan.contains("qm start 127"), "{plan}");
    assert!(plan.contains("not HA-managed") && plan.contains("1h between restarts"), "{plan}");
    assert!(plan.contains(&format!("if pid {old} is still alive")), "{plan}");
    assert!(!lab.out_dir().exists(), "dry run writes nothing, not even the lock");
    assert!(log_lines(&qm_log_path(&lab)).is_empty());
    assert_eq!(lab.pid(), old);
    // A bad [restart] table is bad input before anything is touched.
    let bad = lab.root().join("bad.toml");
    std::fs::write(&bad, "[restart]\nmethod = \"reboot\"\n").unwrap();
    let out = run_bounded(&mut tool(&lab, &bad, &["127", "--then-restart"], &[]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("[restart]"), "{}", stderr(&out));
    assert!(!lab.out_dir().exists());
}

#[test]
fn command_and_libvirt_backends_restart_the_same_way() {
    let lab = Lab::start(LabOptions { vmid: 128, name: "other".into(), ..LabOptions::default() });
    let support = common::repo_root().join("tests/support");
    let qm = support.join("qm").display().to_string();

    // method = "command": the site's own argv lists, with placeholders.
    let cfg = config(
        &lab,
        &format!(
            "method = \"command\"\ncooldown = \"0\"\nstop = [{qm:?}, \"stop\", \"{{vmid}}\", \"--timeout\", \"5\"]\nstart = [{qm:?}, \"start\", \"{{vmid}}\"]"
        ),
    );
    let old = lab.pid();
    let (out, json) = run(&lab, &cfg, &["128", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    assert_eq!(r["method"], "command");
    assert_eq!(r["performed"], true, "{r:#}");
    assert_eq!(action(r, "stop")["argv"], serde_json::json!([qm, "stop", "128", "--timeout", "5"]));
    let mid = lab.pid();
    assert!(mid != old && !pid_alive(old));

    // method = "libvirt": the domain comes from the QEMU's own -name.
    let cfg = config(
        &lab,
        &format!("method = \"libvirt\"\ncooldown = \"0\"\nvirsh = {:?}", support.join("virsh").display().to_string()),
    );
    let vlog = lab.root().join("virsh.log");
    let (out, json) = run(
        &lab,
        &cfg,
        &["128", "--then-restart", "--json", "--sample-interval", "0"],
        &[("VIRSH_DOMAIN", "other"), ("VIRSH_VMID", "128"), ("VIRSH_LOG", vlog.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}\n{json:#}", stderr(&out));
    let r = &json["restart"];
    assert_eq!(r["method"], "libvirt");
    assert_eq!(r["performed"], true, "{r:#}");
    assert_eq!(log_lines(&vlog), vec![vec!["destroy", "other"], vec!["start", "other"]]);
    assert!(lab.pid() != mid && !pid_alive(mid));

    // A failing stop is not gone around: nothing killed, nothing started, exit 5.
    let before = lab.pid();
    let (out, json) = run(
        &lab,
        &cfg,
        &["128", "--then-restart", "--json", "--sample-interval", "0"],
        &[("VIRSH_DOMAIN", "someone-else"), ("VIRSH_VMID", "128")],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let r = &json["restart"];
    assert_eq!(r["error_kind"], "stop-failed", "{r:#}");
    assert_eq!(r["escalated"], false);
    assert_eq!(r["vm_state"], "running-old");
    assert!(r["error"].as_str().unwrap().contains("failed to get domain"), "{r:#}");
    assert_eq!(lab.pid(), before, "the VM still runs its old QEMU");
}

// ---------------------------------------------------------------------------
// restart failure paths

/// Runs the tool in the background with the before-kill hook at `<root>/hook`; returns
/// (tool pid, stdout path, hook base).
#[cfg(feature = "test-hooks")]
fn spawn_hooked(lab: &Lab, cfg: &Path, vmid: &str, env: &[(&str, &str)]) -> (u32, PathBuf, PathBuf) {
    let hook = lab.root().join("hook");
    let stdout_path = lab.root().join("tool.out");
    let mut cmd = tool(lab, cfg, &[vmid, "--then-restart", "--json", "--sample-interval", "0"], env);
    cmd.env(wedge_autopsy::restart::TEST_HOOK_ENV, &hook)
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(Stdio::null());
    (lab.spawn(&mut cmd), stdout_path, hook)
}

/// Waits for the hook's `.ready` (the tool paused right before its kill decision).
#[cfg(feature = "test-hooks")]
fn wait_hook(hook: &Path) {
    let ready = PathBuf::from(format!("{}.ready", hook.display()));
    assert!(
        wait_until(RUN_TIMEOUT, || ready.exists()),
        "the tool never reached the kill decision ({})",
        ready.display()
    );
}

#[cfg(feature = "test-hooks")]
fn release_hook(hook: &Path) {
    std::fs::write(format!("{}.go", hook.display()), "").unwrap();
}

/// The tool's exit status and `--json` output once it finished.
#[cfg(feature = "test-hooks")]
fn finished(lab: &Lab, tool_pid: u32, stdout_path: &Path) -> (Option<i32>, Value) {
    let st = lab.wait_spawned(tool_pid, RUN_TIMEOUT).expect("the tool finished within its deadline");
    let text = std::fs::read(stdout_path).unwrap();
    let json =
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&text)));
    (st.code(), json)
}

/// A process frozen in a cgroup-v1 freezer cgroup: in D state (`__refrigerator`), it
/// does not die of SIGKILL until thawed. Thawed (so a pending SIGKILL takes effect) and
/// removed on drop.
#[cfg(feature = "test-hooks")]
struct Frozen {
    dir: PathBuf,
    pid: i32,
}

#[cfg(feature = "test-hooks")]
impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        let root = Path::new("/sys/fs/cgroup/freezer");
        assert!(
            root.join("cgroup.procs").exists(),
            "no cgroup-v1 freezer at {}: this test needs it to make a QEMU survive SIGKILL",
            root.display()
        );
        let dir = root.join(format!("wedge-autopsy-test-{pid}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e} (needs root)", dir.display()));
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::write(dir.join("freezer.state"), "FROZEN").unwrap();
        let f = Frozen { dir, pid };
        assert!(
            wait_until(Duration::from_secs(30), || std::fs::read_to_string(f.dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")),
            "pid {pid} never froze"
        );
        f
    }
}

#[cfg(feature = "test-hooks")]
impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        wait_until(Duration::from_secs(30), || !pid_alive(self.pid));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(feature = "test-hooks")]
#[test]
fn qemu_surviving_sigkill_is_reported_and_nothing_is_started() {
    let lab = Lab::start(LabOptions { vmid: 130, name: "survivor".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = config(&lab, "timeout = \"1s\"\nstop_deadline = \"2s\"\nkill_wait = \"3s\"");
    let (tool_pid, out, hook) = spawn_hooked(&lab, &cfg, "130", &[("QM_STOP_HANG", "1")]);
    wait_hook(&hook);
    let _frozen = Frozen::freeze(old);
    release_hook(&hook);
    let (code, json) = finished(&lab, tool_pid, &out);
    let r = &json["restart"];
    assert_eq!(code, Some(5), "{r:#}");
    assert_eq!(r["error_kind"], "survived-kill", "{r:#}");
    assert_eq!(r["escalated"], true, "the tool sent its SIGKILL: {r:#}");
    assert_eq!(r["vm_state"], "stuck");
    assert!(r["error"].as_str().unwrap().contains("refrigerator"), "names the wchan: {r:#}");
    assert_eq!(action(r, "wait-exit")["ok"], false);
    assert!(r["new_pid"].is_null());
    assert_eq!(common::proc_state(old), Some('D'), "still there, in D");
    assert!(!log_lines(&qm_log_path(&lab)).iter().any(|a| a[0] == "start"), "no second QEMU on top of it");
    restart_json_matches(&json);
}

/// Overwrites `needle` in `pid`'s argv (through /proc/PID/mem, as root) with `X`s, so its
/// cmdline no longer names what proved it, while it stays the same process.
#[cfg(feature = "test-hooks")]
fn rewrite_argv(pid: i32, needle: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // arg_start is field 48 of stat; fields here start at field 3.
    let arg_start: u64 = fields[48 - 3].parse().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let off = cmdline.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("needle in cmdline");
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/mem for writing: {e} (needs root)"));
    mem.seek(SeekFrom::Start(arg_start + off as u64)).unwrap();
    mem.write_all(&vec![b'X'; needle.len()]).unwrap();
    let now = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
    assert!(!now.contains(needle), "cmdline still names {needle}: {now}");
}

#[cfg(feature = "test-hooks")]
#[test]
fn old_qemu_that_can_no_longer_be_proven_is_not_killed() {
    let lab = Lab::start(LabOptions { vmid: 131, name: "unproven".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = config(&lab, "timeout = \"1s\"\nstop_deadline = \"2s\"\nkill_wait = \"2s\"");
    let (tool_pid, out, hook) = spawn_hooked(&lab, &cfg, "131", &[("QM_STOP_HANG", "1")]);
    wait_hook(&hook);
    let (pidfile, qmp) = (lab.pidfile().display().to_string(), lab.qmp_path().display().to_string());
    rewrite_argv(old, &pidfile);
    rewrite_argv(old, &qmp);
    release_hook(&hook);
    let (code, json) = finished(&lab, tool_pid, &out);
    let r = &json["restart"];
    let alive = pid_alive(old);
    // The lab finds its QEMUs by cmdline, which no longer names it: kill it here.
    // SAFETY: the QEMU this test started and altered.
    unsafe { libc::kill(old, libc::SIGKILL) };
    assert_eq!(code, Some(5), "{r:#}");
    assert_eq!(r["error_kind"], "not-proven", "{r:#}");
    assert_eq!(r["escalated"], false, "{r:#}");
    assert!(action(r, "kill")["detail"].as_str().unwrap().contains("not signalled"), "{r:#}");
    assert!(alive, "the unproven process was not killed");
    assert!(!log_lines(&qm_log_path(&lab)).iter().any(|a| a[0] == "start"));
    restart_json_matches(&json);
}

/// `method = "command"`: qm stop as the stop, `start` as given.
fn command_cfg(lab: &Lab, start: &[&str], extra: &str) -> PathBuf {
    let qm = common::qm_path().display().to_string();
    config(
        lab,
        &format!(
            "method = \"command\"\ncooldown = \"0\"\nstop = [{qm:?}, \"stop\", \"{{vmid}}\", \"--timeout\", \"5\"]\nstart = {}\n{extra}",
            serde_json::to_string(start).unwrap()
        ),
    )
}

#[test]
fn start_that_fails_or_hangs_leaves_the_vm_down_and_says_so() {
    let lab = Lab::start(LabOptions { vmid: 132, name: "nostart".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = command_cfg(&lab, &["false"], "");
    let (out, json) = run(&lab, &cfg, &["132", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    let r = &json["restart"];
    assert_eq!(out.status.code(), Some(5), "{}\n{r:#}", stderr(&out));
    assert_eq!(r["error_kind"], "start-failed", "{r:#}");
    assert_eq!(r["vm_state"], "down");
    assert!(r["error"].as_str().unwrap().contains("VM is DOWN"), "{r:#}");
    assert!(stderr(&out).contains("VM is DOWN"), "{}", stderr(&out));
    assert!(!pid_alive(old) && !lab.is_alive());
    restart_json_matches(&json);

    // Back up through the stand-in; then a start that never returns is killed at its deadline.
    let st = run_bounded(lab.qm().args(["start", "132"]), RUN_TIMEOUT);
    assert!(st.status.success(), "{}", stderr(&st));
    let cfg = command_cfg(&lab, &["sleep", "600"], "start_timeout = \"2s\"");
    let (out, json) = run(&lab, &cfg, &["132", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    let r = &json["restart"];
    assert_eq!(out.status.code(), Some(5), "{}\n{r:#}", stderr(&out));
    assert_eq!(r["error_kind"], "start-failed", "{r:#}");
    assert_eq!(action(r, "start")["timed_out"], true, "{r:#}");
    assert!(!common::proc_cmdline_exists(&["sleep", "600"]), "the hung start's process group was killed");
}

#[test]
fn new_process_that_cannot_be_proven_fails_verification() {
    let lab = Lab::start(LabOptions { vmid: 133, name: "unverified".into(), ..LabOptions::default() });
    let old = lab.pid();
    // The "start" writes the pidfile naming a process whose cmdline does not name it.
    let prog = format!(
        "import subprocess\np = subprocess.Popen(['sleep', '45'], start_new_session=True)\nopen({:?}, 'w').write('%d\\n' % p.pid)\n",
        lab.pidfile().display().to_string()
    );
    let cfg = command_cfg(&lab, &["python3", "-c", &prog], "verify_timeout = \"3s\"");
    let (out, json) = run(&lab, &cfg, &["133", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    let r = &json["restart"];
    assert_eq!(out.status.code(), Some(5), "{}\n{r:#}", stderr(&out));
    assert_eq!(r["error_kind"], "verify-new", "{r:#}");
    assert_eq!(r["performed"], false);
    assert_eq!(r["vm_state"], "unverified");
    assert!(r["error"].as_str().unwrap().contains("no new proven QEMU"), "{r:#}");
    assert_eq!(action(r, "verify-new")["ok"], false);
    assert!(!pid_alive(old));
    restart_json_matches(&json);
}

#[test]
fn unreadable_ha_config_refuses_the_restart() {
    let lab = Lab::start(LabOptions { vmid: 134, name: "haunknown".into(), ..LabOptions::default() });
    // A directory where resources.cfg should be: reading it fails, so HA cannot be ruled out.
    std::fs::create_dir_all(lab.pve_dir().join("ha/resources.cfg")).unwrap();
    let cfg = config(&lab, "");
    let old = lab.pid();
    let (out, json) = run(&lab, &cfg, &["134", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    let r = &json["restart"];
    assert_eq!(out.status.code(), Some(5), "{}\n{r:#}", stderr(&out));
    assert_eq!(json["sealed"], true);
    assert_eq!(r["error_kind"], "ha-unknown", "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("resources.cfg"), "{r:#}");
    assert!(log_lines(&qm_log_path(&lab)).is_empty(), "qm never called");
    assert_eq!(lab.pid(), old);
    restart_json_matches(&json);
}

#[cfg(feature = "test-hooks")]
#[test]
fn ctrl_c_after_the_stop_began_does_not_abort_the_restart() {
    let lab = Lab::start(LabOptions { vmid: 135, name: "sigint".into(), ..LabOptions::default() });
    let old = lab.pid();
    let cfg = config(&lab, "timeout = \"5s\"");
    let (tool_pid, out, hook) = spawn_hooked(&lab, &cfg, "135", &[]);
    wait_hook(&hook);
    assert!(log_lines(&qm_log_path(&lab)).iter().any(|a| a[0] == "stop"), "the stop was issued");
    // SAFETY: SIGINT to the tool this test spawned.
    unsafe { libc::kill(tool_pid as i32, libc::SIGINT) };
    release_hook(&hook);
    let (code, json) = finished(&lab, tool_pid, &out);
    let r = &json["restart"];
    eprintln!("exit {code:?}; restart {r:#}");
    assert_eq!(r["performed"], true, "{r:#}");
    assert_eq!(r["vm_state"], "restarted");
    let new = lab.pid();
    assert!(new != old && !pid_alive(old));
    assert_eq!(r["new_pid"], new);
    assert_eq!(qmp_status(&lab), "running");
    assert_eq!(code, Some(0), "{r:#}");
}

/// The kill is refused by the kernel: the QEMU runs as `nobody` (`-runas`) and the tool
/// runs without CAP_KILL (`setpriv --bounding-set -kill`), so `pidfd_send_signal` gets
/// EPERM. Everything else the tool needs (ptrace, /proc) it still has.
#[test]
fn kill_the_kernel_refuses_is_reported_as_kill_failed_and_nothing_is_started() {
    let lab = Lab::start(LabOptions {
        vmid: 136,
        name: "nokill".into(),
        qemu_args: vec!["-runas".into(), "nobody".into()],
        ..LabOptions::default()
    });
    let old = lab.pid();
    let uid = std::fs::read_to_string(format!("/proc/{old}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next().unwrap_or("").to_string()))
        .unwrap();
    assert_ne!(uid, "0", "the lab QEMU dropped to nobody");
    let started = lab.root().join("started");
    let cfg = command_cfg(&lab, &["touch", started.to_str().unwrap()], "kill_wait = \"2s\"\nverify_timeout = \"3s\"");
    // The stop "succeeds" without stopping anything, so the tool goes on to its kill.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let stop_line = text.lines().find(|l| l.starts_with("stop = ")).unwrap().to_string();
    std::fs::write(&cfg, text.replace(&stop_line, "stop = [\"true\"]")).unwrap();
    let cmd = tool(&lab, &cfg, &["136", "--then-restart", "--json", "--sample-interval", "0"], &[]);
    let argv: Vec<std::ffi::OsString> =
        std::iter::once(cmd.get_program().to_owned()).chain(cmd.get_args().map(|a| a.to_owned())).collect();
    let mut wrapped = Command::new("setpriv");
    wrapped.args(["--bounding-set", "-kill", "--"]).args(&argv);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let out = run_bounded(&mut wrapped, RUN_TIMEOUT);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let r = &json["restart"];
    assert_eq!(json["sealed"], true, "captured and sealed first: {json}");
    assert_eq!(out.status.code(), Some(5), "{}\n{r:#}", stderr(&out));
    assert_eq!(r["error_kind"], "kill-failed", "{r:#}");
    assert_eq!(r["vm_state"], "stuck", "{r:#}");
    let kill = action(r, "kill");
    assert_eq!(kill["ok"], false, "{r:#}");
    assert!(kill["detail"].as_str().unwrap().contains("Operation not permitted"), "{r:#}");
    assert!(r["error"].as_str().unwrap().contains(&old.to_string()), "names the pid: {r:#}");
    assert!(!started.exists(), "no start after a failed kill");
    assert!(pid_alive(old) && lab.pid() == old, "the old QEMU still runs");
    restart_json_matches(&json);
}
