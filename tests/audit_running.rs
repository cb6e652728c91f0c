//! `audit` on real lab QEMUs: per running QEMU, could a wedge be pinned to a line? The
//! build-id of the running image, a debug file (or none) under `--debug-dir`, the
//! package from QMP, a binary replaced on disk under a running VM, and the guest agent
//! (a lab socket nobody answers on, none at all, and the real `qemu-ga` answering).

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{run_bounded, wait_until, Lab, LabOptions};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// `audit --json` with the lab's dirs and `extra` flags → the VMs' entries.
fn audit(lab: &Lab, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(extra);
    let out = run_bounded(&mut lab.tool_args(&args), T);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn running(vms: &[Value], vmid: &str) -> Value {
    let vm = vms.iter().find(|v| v["vmid"] == vmid).unwrap_or_else(|| panic!("VM {vmid} not in {vms:?}"));
    vm["running"].clone()
}

/// The build-id as binutils reads it from a file, independent of the tool.
fn readelf_build_id(path: &Path) -> String {
    let out = run_bounded(Command::new("readelf").arg("-n").arg(path), T);
    assert!(out.status.success(), "readelf -n {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build-id in {}:\n{text}", path.display()))
        .trim()
        .to_string()
}

fn sh(cmd: &mut Command) {
    let out = run_bounded(cmd, T);
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A debug file for `build_id` at `<dir>/.build-id/xx/yyyy.debug`: a C fixture compiled
/// with that build-id and DWARF, cut down to its debug sections (`objcopy
/// --only-keep-debug`), exactly what a dbgsym package installs for a binary.
fn debug_file_for(build_id: &str, dir: &Path, work: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parked.c");
    let bin = work.join("fixture");
    sh(Command::new("cc")
        .args(["-O0", "-g", "-pthread", &format!("-Wl,--build-id=0x{build_id}"), "-o"])
        .arg(&bin)
        .arg(&src));
    let dest = dir.join(".build-id").join(&build_id[..2]).join(format!("{}.debug", &build_id[2..]));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    sh(Command::new("objcopy").arg("--only-keep-debug").arg(&bin).arg(&dest));
    assert_eq!(readelf_build_id(&dest), build_id, "the fixture carries the QEMU's build-id");
    dest
}

/// The real guest agent (`qemu-ga`, as a guest runs it) listening on `socket`, killed
/// with its process group on drop. Every command that can change anything is blocked.
struct Agent(Child);

impl Agent {
    fn start(socket: &Path, state: &Path) -> Agent {
        std::fs::create_dir_all(state).unwrap();
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(socket)
            .arg("-t")
            .arg(state)
            .arg("-f")
            .arg(state.join("qemu-ga.pid"))
            .args(["-b", "guest-shutdown,guest-exec,guest-file-open,guest-fsfreeze-freeze,guest-set-time,guest-suspend-disk,guest-suspend-ram,guest-set-user-password"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-ga (package qemu-guest-agent) starts");
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()),
            "qemu-ga socket {} did not appear",
            socket.display()
        );
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn audit_says_whether_a_wedge_could_be_pinned_to_a_line() {
    let mut lab = Lab::start(LabOptions { vmid: 140, name: "agent".into(), agent: true, ..LabOptions::default() });
    lab.add_vm(LabOptions { vmid: 141, name: "plain".into(), ..LabOptions::default() });
    let exe = PathBuf::from(format!("/proc/{}/exe", lab.vm(140).pid()));
    let build_id = readelf_build_id(&exe);
    let empty = lab.root().join("no-debug");
    std::fs::create_dir_all(&empty).unwrap();

    // Without a debug file: exported names only, and what to install (or why nothing).
    let vms = audit(&lab, &["--debug-dir", empty.to_str().unwrap()]);
    let r = running(&vms, "140");
    assert_eq!(r["pid"], lab.vm(140).pid(), "{r}");
    assert_eq!(r["binary"]["build_id"], build_id.as_str(), "{r}");
    assert_eq!(r["binary"]["on_disk"]["state"], "same", "{r}");
    assert_eq!(r["pin"], "exported-only", "Debian's QEMU is stripped: {r}");
    assert_eq!(r["debug"]["found"], Value::Null, "{r}");
    let looked = format!("{}/.build-id/{}/{}.debug", empty.display(), &build_id[..2], &build_id[2..]);
    assert_eq!(r["debug"]["searched"], serde_json::json!([looked]), "{r}");
    // The running QEMU's own word on its build (QMP query-version's package field).
    assert_eq!(r["package"]["source"], "qmp", "{r}");
    let pkg = r["package"]["name"].as_str().unwrap_or_default();
    match pkg {
        "qemu-system-x86" => {
            assert_eq!(r["package"]["dbgsym"], Value::Null, "{r}");
            assert!(r["advice"].to_string().contains("no debug-symbol package is reachable"), "{r}");
        }
        "pve-qemu-kvm" => assert!(r["advice"].to_string().contains("apt install pve-qemu-kvm-dbgsym="), "{r}"),
        other => panic!("unexpected package {other:?} for the lab QEMU: {r}"),
    }
    // `agent: 1` with no agent in the guest: the socket takes the connection, nothing answers.
    assert_eq!(r["agent"]["state"], "no-answer", "{r}");
    assert_eq!(running(&vms, "141")["agent"]["state"], "not-configured");

    // With a debug file for that build-id (and the real agent answering for VM 141).
    let dbg_dir = lab.root().join("debug");
    let dbg = debug_file_for(&build_id, &dbg_dir, lab.root());
    let _agent = Agent::start(&lab.run_dir().join("141.qga"), &lab.root().join("qga-state"));
    let vms = audit(&lab, &["--debug-dir", empty.to_str().unwrap(), "--debug-dir", dbg_dir.to_str().unwrap()]);
    let r = running(&vms, "140");
    assert_eq!(r["pin"], "line", "{r}");
    assert_eq!(r["debug"]["found"], dbg.to_str().unwrap(), "{r}");
    assert_eq!(r["debug"]["dwarf"], true, "{r}");
    assert_eq!(r["debug"]["searched"].as_array().map(Vec::len), Some(2), "both dirs, in order: {r}");
    assert_eq!(r["advice"], serde_json::json!([]), "nothing to do: {r}");
    let a = running(&vms, "141")["agent"].clone();
    assert_eq!(a["state"], "answers", "{a}");
    eprintln!("guest-ping round trip to qemu-ga: {} ms", a["ms"]);

    // The text form answers the question in words.
    let out = run_bounded(&mut lab.tool_args(&["audit", "--debug-dir", dbg_dir.to_str().unwrap()]), T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pin      YES") && text.contains(&build_id), "{text}");
    assert!(text.contains("agent    answers guest-ping"), "{text}");
}

#[test]
fn audit_sees_the_binary_replaced_under_a_running_vm() {
    // A private install: QEMU relocates its firmware and module paths relative to its
    // binary (<dir>/bin/../share/seabios, …), so <dir>/share and <dir>/lib point at /usr's.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    for d in ["share", "lib"] {
        std::os::unix::fs::symlink(Path::new("/usr").join(d), dir.path().join(d)).unwrap();
    }
    let bin = dir.path().join("bin/qemu-system-x86_64");
    std::fs::copy(which("qemu-system-x86_64"), &bin).unwrap();
    let lab =
        Lab::start(LabOptions { vmid: 142, name: "upgraded".into(), qemu: Some(bin.clone()), ..LabOptions::default() });
    let exe = PathBuf::from(format!("/proc/{}/exe", lab.pid()));
    assert_eq!(std::fs::read_link(&exe).unwrap(), bin, "the lab VM runs the copy");
    let running_id = readelf_build_id(&exe);
    let dbg_dir = lab.root().join("debug");
    debug_file_for(&running_id, &dbg_dir, lab.root());
    let flags = ["--debug-dir", dbg_dir.to_str().unwrap()];

    let r = running(&audit(&lab, &flags), "142");
    assert_eq!(r["binary"]["path"], bin.to_str().unwrap(), "{r}");
    assert_eq!(r["binary"]["on_disk"]["state"], "same", "{r}");

    // An "upgrade" as dpkg does it: the new file renamed over the old one.
    let other = Path::new("/bin/true");
    let staged = dir.path().join("bin/qemu-system-x86_64.dpkg-new");
    std::fs::copy(other, &staged).unwrap();
    std::fs::rename(&staged, &bin).unwrap();
    let new_id = readelf_build_id(&bin);
    assert_ne!(new_id, running_id);
    let r = running(&audit(&lab, &flags), "142");
    assert_eq!(r["binary"]["build_id"], running_id.as_str(), "the running image, not the file: {r}");
    assert_eq!(r["binary"]["on_disk"], serde_json::json!({"state": "replaced", "build_id": new_id}), "{r}");
    // The debug file of the running build still counts; the advice says the disk differs.
    assert_eq!(r["pin"], "line", "{r}");
    assert!(r["advice"].to_string().contains("another build"), "{r}");
    let text = String::from_utf8_lossy(&run_bounded(&mut lab.tool_args(&["audit", flags[0], flags[1]]), T).stdout)
        .into_owned();
    assert!(text.contains("on disk  REPLACED by another build"), "{text}");

    // Removed without a replacement.
    std::fs::remove_file(&bin).unwrap();
    let r = running(&audit(&lab, &flags), "142");
    assert_eq!(r["binary"]["on_disk"]["state"], "missing", "{r}");
    assert!(lab.is_alive(), "audit touched nothing");
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}
