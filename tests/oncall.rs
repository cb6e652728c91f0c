//! On-call polish (issue #18) against real QEMU processes in a Proxmox-like layout: no
//! sealed archive is ever replaced, a dry run predicts the real run's exit code and
//! touches nothing, closed pipes end quietly, `-q` says what a cron job needs, the
//! free-space floor is sized by the runbook and says how to change it, and every config
//! section is checked by every command.

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{run_bounded, tmpfs, tool, tracer_pid, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lab(vmid: u32) -> Lab {
    Lab::start(LabOptions { vmid, name: format!("oc{vmid}"), ..LabOptions::default() })
}

fn run(lab: &Lab, args: &[&str]) -> Output {
    run_bounded(&mut lab.tool_args(args), RUN_TIMEOUT)
}

/// Archive names in `dir` (`autopsy-*.tar.zst`), sorted.
fn archives(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n.starts_with("autopsy-") && n.ends_with(".tar.zst"));
    v.sort();
    v
}

/// Several captures of one VM back to back (`--sample-interval 0`): every archive and
/// every sidecar survives, each with its own hash, and each sidecar checks with
/// `sha256sum -c` from the archive's directory.
#[test]
fn back_to_back_captures_all_survive_with_their_own_hashes() {
    let lab = lab(180);
    let mut seen: Vec<(PathBuf, String)> = Vec::new();
    for i in 0..3 {
        let out = run(&lab, &["180", "--json", "--sample-interval", "0", "--stacks", "none"]);
        let json: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("run {i}: no JSON ({e}): {}", stderr(&out)));
        assert!(matches!(out.status.code(), Some(0 | 1)), "run {i}: {}", stderr(&out));
        assert_eq!(json["sealed"], true, "run {i}: {json}");
        seen.push((PathBuf::from(json["archive"].as_str().unwrap()), json["sha256"].as_str().unwrap().to_string()));
    }
    let names: Vec<String> = archives(&lab.out_dir());
    assert_eq!(names.len(), 3, "three runs, three archives: {names:?}");
    for (path, sha) in &seen {
        let report = archive::verify(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&report.sha256, sha, "{} was replaced after its run", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let sidecar = std::fs::read_to_string(archive::sidecar_path(path)).unwrap();
        assert_eq!(sidecar, format!("{sha}  {name}\n"));
        let check = Command::new("sha256sum")
            .arg("-c")
            .arg(archive::sidecar_path(path).file_name().unwrap())
            .current_dir(lab.out_dir())
            .output()
            .expect("sha256sum runs");
        assert!(
            check.status.success(),
            "sha256sum -c in the archive's dir: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    let distinct: std::collections::BTreeSet<&String> = seen.iter().map(|(_, s)| s).collect();
    assert_eq!(distinct.len(), 3, "each run has its own hash: {seen:?}");
}

/// Holds `<out>/locks/<vmid>.lock` as another autopsy would, until dropped.
struct HeldLock(#[allow(dead_code)] std::fs::File);

fn hold_lock(out: &Path, vmid: u32) -> HeldLock {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(out.join("locks")).unwrap();
    let f = std::fs::File::create(out.join("locks").join(format!("{vmid}.lock"))).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0, "test could not lock");
    HeldLock(f)
}

/// What `--dry-run` predicts equals what the real run does, for each way a run ends
/// before its first capture; the dry run creates nothing and stops no thread.
#[test]
fn dry_run_exits_with_the_real_runs_code_and_touches_nothing() {
    let mut lab = lab(181);
    let _far =
        lab.add_vm(LabOptions { vmid: 182, name: "far".into(), node: Some("pve-far".into()), ..Default::default() });
    let _gone = lab.add_vm(LabOptions { vmid: 183, name: "gone".into(), ..Default::default() });
    std::fs::remove_file(lab.run_dir().join("183.pid")).unwrap();
    let missing_run_dir = lab.root().join("no-such-run-dir");
    let cases: Vec<(&str, Vec<String>, i32, &str)> = vec![
        ("a VM that does not exist", vec!["189".into()], 3, "not in the cluster's VM list"),
        ("a VM that is not running", vec!["183".into()], 3, "is not running on this node"),
        ("a VM on another node", vec!["182".into()], 3, "runs on node pve-far"),
        ("a bad VMID", vec!["18x".into()], 2, "invalid VMID"),
        ("below the free-space floor", vec!["181".into(), "--min-free".into(), "1000T".into()], 4, "--min-free"),
    ];
    for (what, args, code, msg) in &cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push("--dry-run");
        let dry = run(&lab, &a);
        assert_eq!(dry.status.code(), Some(*code), "dry run, {what}: {}", stderr(&dry));
        assert!(stderr(&dry).contains(msg), "dry run, {what}: {}", stderr(&dry));
        assert!(!lab.out_dir().exists(), "dry run, {what}: --out was created");
        untouched(&lab, what);
        // --json: the plan as one object, with the same code (bad input has no plan).
        a.push("--json");
        let dry = run(&lab, &a);
        assert_eq!(dry.status.code(), Some(*code));
        if *code == 2 {
            assert!(dry.stdout.is_empty(), "{what}: {}", String::from_utf8_lossy(&dry.stdout));
        } else {
            let json: Value = serde_json::from_slice(&dry.stdout).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(json["exit"], *code, "{what}: {json}");
            assert_eq!(json["dry_run"], true, "{what}: {json}");
        }
        a.retain(|x| *x != "--dry-run" && *x != "--json");
        let real = run(&lab, &a);
        assert_eq!(real.status.code(), Some(*code), "real run, {what}: {}", stderr(&real));
        let _ = std::fs::remove_dir_all(lab.out_dir());
    }
    // A missing layout directory is named as such, in both runs.
    for extra in [&["--dry-run"][..], &[][..]] {
        let mut cmd = tool();
        cmd.arg("181").args(extra).arg("--run-dir").arg(&missing_run_dir).arg("--pve-dir").arg(lab.pve_dir());
        cmd.arg("--out").arg(lab.out_dir());
        let o = run_bounded(&mut cmd, RUN_TIMEOUT);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("is this a Proxmox node? ") && stderr(&o).contains("--run-dir"), "{}", stderr(&o));
        assert!(!stderr(&o).contains("not running"), "{}", stderr(&o));
    }
    // Another autopsy holds the VM's lock: 6 in both runs.
    let held = hold_lock(&lab.out_dir(), 181);
    let dry = run(&lab, &["181", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(6), "dry run, lock held: {}", stderr(&dry));
    assert!(stderr(&dry).contains("already being autopsied"), "{}", stderr(&dry));
    let real = run(&lab, &["181", "--sample-interval", "0"]);
    assert_eq!(real.status.code(), Some(6), "real run, lock held: {}", stderr(&real));
    drop(held);
    // Free: the plan, exit 0, and the prediction says so.
    let _ = std::fs::remove_dir_all(lab.out_dir());
    let dry = run(&lab, &["181", "--dry-run"]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(dry.status.code(), Some(0), "{plan}\n{}", stderr(&dry));
    assert!(plan.contains(&format!("pid {}", lab.pid())) && plan.contains("the real run would exit 0"), "{plan}");
    assert!(!lab.out_dir().exists());
    untouched(&lab, "the free dry run");
}

/// No thread of the lab VM is stopped or traced (running/sleeping flips under TCG).
fn untouched(lab: &Lab, what: &str) {
    let stopped: Vec<(i32, char)> = lab.thread_states().into_iter().filter(|(_, st)| matches!(st, 'T' | 't')).collect();
    assert!(stopped.is_empty(), "{what}: threads left stopped: {stopped:?}");
    assert_eq!(tracer_pid(lab.pid()), 0, "{what}: the VM is traced");
}

/// A write end whose reader is gone: what `cmd | true` gives a command.
fn closed_pipe() -> OwnedFd {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    w
}

/// Exit by SIGPIPE (as coreutils) or a normal code, never a panic (exit 101) or a trace.
fn assert_quiet_end(what: &str, o: &Output) {
    use std::os::unix::process::ExitStatusExt;
    let err = stderr(o);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: {err}");
    assert_ne!(o.status.code(), Some(101), "{what}: {err}");
    assert!(o.status.code().is_some() || o.status.signal() == Some(libc::SIGPIPE), "{what}: {:?}", o.status);
}

#[test]
fn a_closed_stdout_pipe_ends_quietly_on_every_output_path() {
    let lab = lab(184);
    let read_only: Vec<Vec<&str>> = vec![
        vec!["184", "--dry-run"],
        vec!["184", "--dry-run", "--json"],
        vec!["diagnose", "184", "--window", "0"],
        vec!["audit"],
        vec!["runbook", "list"],
        vec!["runbook", "show", "qemu-wedge"],
        vec!["signatures", "list"],
        vec!["prune", "--dry-run"],
        vec!["--help"],
    ];
    for args in &read_only {
        let mut cmd = lab.tool_args(args);
        cmd.stdout(Stdio::from(closed_pipe()));
        let o = run_bounded(&mut cmd, RUN_TIMEOUT);
        assert_quiet_end(&format!("{args:?}"), &o);
    }
    // The capture itself seals whether or not anyone reads its answer.
    for args in [&["184", "--json", "--sample-interval", "0"][..], &["184", "--sample-interval", "0"][..]] {
        let mut cmd = lab.tool_args(args);
        cmd.stdout(Stdio::from(closed_pipe()));
        let o = run_bounded(&mut cmd, RUN_TIMEOUT);
        assert_quiet_end(&format!("{args:?}"), &o);
        assert!(matches!(o.status.code(), Some(0 | 1)), "{args:?}: {:?} {}", o.status, stderr(&o));
    }
    let names = archives(&lab.out_dir());
    assert_eq!(names.len(), 2, "both captures sealed: {names:?}");
    let first = lab.out_dir().join(&names[0]);
    for args in [vec!["inspect", first.to_str().unwrap()], vec!["inspect", first.to_str().unwrap(), "--json"]] {
        let mut cmd = tool();
        cmd.args(&args).stdout(Stdio::from(closed_pipe()));
        assert_quiet_end(&format!("{args:?}"), &run_bounded(&mut cmd, RUN_TIMEOUT));
    }
    // And with stderr closed too (`2>&1 | true`): the capture still seals.
    let mut cmd = lab.tool_args(&["184", "--sample-interval", "0"]);
    let w = closed_pipe();
    cmd.stderr(Stdio::from(w.try_clone().unwrap())).stdout(Stdio::from(w));
    let o = run_bounded(&mut cmd, RUN_TIMEOUT);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{:?}", o.status);
    assert_eq!(archives(&lab.out_dir()).len(), 3);
}

/// `-q`: the archive path on stdout, failed steps and errors on stderr, nothing else.
/// Duplicate VMIDs collapse into one capture instead of locking each other out.
#[test]
fn quiet_says_what_a_cron_job_needs_and_duplicate_vmids_collapse() {
    let lab = lab(185);
    let rb = lab.root().join("fails.toml");
    std::fs::write(
        &rb,
        "schema = 1\nname = \"fails\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"broken\"\nkind = \"command\"\nargv = [\"cat\", \"/nonexistent/oncall\"]\n",
    )
    .unwrap();
    let out = run(&lab, &["185", "185", "-q", "--runbook", rb.to_str().unwrap(), "--sample-interval", "0"]);
    let (so, se) = (String::from_utf8_lossy(&out.stdout).into_owned(), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "a failed step is exit 1: {se}");
    let lines: Vec<&str> = so.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the archive path only: {so:?}");
    assert!(Path::new(lines[0]).is_file() && lines[0].ends_with(".tar.zst"), "{so:?}");
    assert!(se.contains("step broken failed"), "the failed step is named: {se}");
    assert!(!se.contains("step proc"), "ok steps are not listed: {se}");
    assert!(!se.contains("already being autopsied"), "102 102 locked itself out: {se}");
    assert_eq!(archives(&lab.out_dir()).len(), 1, "one VM, one archive");
}

/// The free-space floor follows the runbook (megabytes for a default capture), and the
/// refusal names both ways to change it; `--min-free` lowers it. On a real 8 MiB tmpfs.
#[test]
fn free_space_floor_is_the_runbooks_estimate_and_says_how_to_change_it() {
    let lab = lab(186);
    let dir = lab.root().join("small");
    let _m = tmpfs(&dir, "8m");
    let out_dir = dir.join("out");
    let with_out = |extra: &[&str]| {
        let mut cmd = tool();
        cmd.arg("186").args(extra).args(["--sample-interval", "0"]);
        cmd.arg("--run-dir").arg(lab.run_dir()).arg("--pve-dir").arg(lab.pve_dir()).arg("--out").arg(&out_dir);
        run_bounded(&mut cmd, RUN_TIMEOUT)
    };
    let dry = with_out(&["--dry-run"]);
    let o = with_out(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert_eq!(dry.status.code(), Some(4), "the dry run predicts it: {}", stderr(&dry));
    assert!(err.contains("what runbook qemu-wedge needs"), "says where the figure comes from: {err}");
    assert!(err.contains("--min-free SIZE") && err.contains("[retention] min_free"), "both ways named: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(archives(&out_dir).is_empty());
    let o = with_out(&["--min-free", "1M", "--json"]);
    let json: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    assert_eq!(json["sealed"], true, "{json}\n{}", stderr(&o));
    // The config key, named with its file, when it is what refuses.
    let cfg = lab.root().join("floor.toml");
    std::fs::write(&cfg, "[retention]\nmin_free = \"1T\"\n").unwrap();
    let o = with_out(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains(&format!("[retention] min_free in {}", cfg.display())), "{}", stderr(&o));
}

/// A typo in any section fails every command at load, one line naming key and file.
#[test]
fn every_config_section_is_checked_by_every_command() {
    let lab = lab(187);
    let cases = [
        ("[restart]\ncoldown = \"1h\"\n", "coldown"),
        ("[restart]\ncooldown = \"30m\"\n", "ambiguous"),
        ("[serve]\nlisten = \"127.0.0.1:9171\"\nrepeat_windw = \"4h\"\n", "repeat_windw"),
        ("[serve.watch]\nintervall = \"60s\"\n", "intervall"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let cfg = lab.root().join(format!("typo{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        for args in [&["187", "--dry-run"][..], &["runbook", "list"][..], &["187"][..]] {
            let mut a = args.to_vec();
            a.extend(["--config", cfg.to_str().unwrap()]);
            let o = run(&lab, &a);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{args:?} with {text:?}: {err}");
            assert!(err.contains(key) && err.contains(cfg.to_str().unwrap()), "{args:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
    }
    assert!(!lab.out_dir().exists(), "nothing captured");
    untouched(&lab, "config typos");
}

/// `prune --max-age 6m` is refused (minutes or months?) and removes nothing.
#[test]
fn prune_refuses_an_ambiguous_age_and_removes_nothing() {
    let d = tempfile::tempdir().unwrap();
    for i in 1..=3 {
        std::fs::write(d.path().join(format!("autopsy-102-2026061{i}T120000Z-pve1.tar.zst")), "x").unwrap();
    }
    let o = run_bounded(tool().args(["prune", "--max-age", "6m", "--out"]).arg(d.path()), RUN_TIMEOUT);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("6min") && err.contains("6mo"), "{err}");
    assert_eq!(archives(d.path()).len(), 3);
    let o = run_bounded(tool().args(["prune", "--max-age", "6mo", "--dry-run", "--out"]).arg(d.path()), RUN_TIMEOUT);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// The `[restart]` and `[serve]` keys the shipped config documents are what the loader
/// accepts: uncommented, the file passes the load-time check of every command.
#[test]
fn shipped_config_documents_restart_and_serve_as_the_loader_reads_them() {
    let text = wedge_autopsy::config::example_config();
    let body: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("#   ").or_else(|| l.strip_prefix("#  [").map(|_| &l[3..])))
        .map(|l| format!("{l}\n"))
        .collect();
    for key in ["[restart]", "cooldown = ", "[serve]", "repeat_window = ", "[[serve.policy]]", "[serve.watch]"] {
        assert!(body.contains(key), "shipped config does not document {key}: {body}");
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("config.toml");
    std::fs::write(&cfg, &body).unwrap();
    let o = run_bounded(tool().args(["runbook", "list", "--config"]).arg(&cfg), RUN_TIMEOUT);
    assert_eq!(o.status.code(), Some(0), "{}\n{body}", stderr(&o));
}

/// What a run prints leaves the host as surely as its archive (it is pasted into tickets):
/// a secret in the VM's command line or environment, or typed into `--reason`, reaches
/// neither stdout nor stderr, in the printed summary or in `--json`. The reason here
/// carries a URL with a password (redacted structurally where it enters the run) and
/// the VM's environment secret (redacted because the seal pass learned it).
#[test]
fn secrets_never_reach_the_printed_summary_or_the_json() {
    const SECRETS: [&str; 3] = ["Cmd11neS3cret", "EnvS3cretV4l", "Re4sonS3cret"];
    let lab = Lab::start(LabOptions {
        vmid: 187,
        name: "oc187".into(),
        qemu_args: vec!["-object".into(), "secret,id=sec0,data=Cmd11neS3cret".into()],
        qemu_env: vec![("BACKUP_PASSWORD".into(), "EnvS3cretV4l".into())],
        ..LabOptions::default()
    });
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/environ", lab.pid())).unwrap()).into_owned();
    assert!(environ.contains("EnvS3cretV4l"), "the lab QEMU carries the secret in its environment");
    let reason = "INC-9: https://ops:Re4sonS3cret@pve.example:8006 refused; backup env had EnvS3cretV4l";
    let base = ["187", "--sample-interval", "0", "--stacks", "none", "--reason", reason];

    let out = run(&lab, &base);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    assert!(printed.contains("## Verdict"), "the summary is printed: {printed}");
    let line = printed.lines().find(|l| l.contains("INC-9")).unwrap_or_else(|| panic!("no reason line in {printed}"));
    assert!(
        line.contains("https://ops:<redacted>@pve.example:8006") && line.contains("backup env had <redacted>"),
        "the printed reason, redacted: {line}"
    );
    let json_out = run(&lab, &[&base[..], &["--json"]].concat());
    let json: Value =
        serde_json::from_slice(&json_out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", stderr(&json_out)));
    assert_eq!(json["sealed"], true, "{json}");
    for (what, o) in [("summary run", &out), ("--json run", &json_out)] {
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o));
        let leaked: Vec<&str> = SECRETS.iter().copied().filter(|s| all.contains(s)).collect();
        assert!(leaked.is_empty(), "{what} printed {leaked:?}:\n{all}");
    }
    // The sealed copy says the same as the printed one.
    let ar = archive::ArchiveReader::open(Path::new(json["archive"].as_str().unwrap())).unwrap();
    let md = wedge_autopsy::archive::Evidence::read_string(&ar, "summary.md").unwrap();
    assert!(md.contains("https://ops:<redacted>@pve.example:8006"), "{md}");
    assert!(SECRETS.iter().all(|s| !md.contains(s)), "{md}");
}
