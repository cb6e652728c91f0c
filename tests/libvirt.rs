//! The `libvirt-qemu` runbook against a real QEMU laid out as libvirtd lays it out
//! (`lab up --libvirt`), with `tests/support/virsh` standing in for virsh.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run_bounded, Lab, LabOptions};
use serde_json::Value;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};

/// The shipped runbook with its host paths moved under the lab root.
fn lab_runbook(lab: &Lab, qmp_pattern: &str) -> PathBuf {
    let root = lab.root().display().to_string();
    let shipped = std::fs::read_to_string(common::repo_root().join("runbooks/libvirt-qemu.toml")).unwrap();
    let text = shipped
        .replace(
            "\"/run/libvirt/qemu/{domain}.pid\"",
            &format!("{:?}", format!("{root}/run/libvirt/qemu/{{domain}}.pid")),
        )
        .replace(
            "\"/var/lib/libvirt/qemu/domain-*-{domain}/monitor.sock\"",
            &format!("{:?}", format!("{root}/{qmp_pattern}")),
        )
        .replace(
            "monitor = \"virsh\"",
            &format!(
                "monitor = \"virsh\"\nvirsh = {:?}",
                common::repo_root().join("tests/support/virsh").display().to_string()
            ),
        );
    assert_ne!(text, shipped);
    let p = lab.root().join("libvirt.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn libvirt_domain_is_captured_through_virsh() {
    let lab = Lab::start(LabOptions { vmid: 140, name: "vm-140".into(), libvirt: true, ..LabOptions::default() });
    assert_eq!(lab.wedge()["wedged"], true);
    let before = lab.thread_states();
    let rb = lab_runbook(&lab, "lib/libvirt/qemu/domain-*-{domain}/monitor.sock");
    let log = lab.root().join("virsh.log");
    let out = run_bounded(
        lab.tool_args(&["140", "--json", "--sample-interval", "0", "--runbook", rb.to_str().unwrap()])
            .env("WEDGE_LAB_ROOT", lab.root())
            .env("VIRSH_LOG", &log),
        Duration::from_secs(90),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    // The domain XML under /etc/libvirt does not exist here; that step is optional.
    assert_eq!(out.status.code(), Some(0), "{err}\n{json}");
    let path = PathBuf::from(json["archive"].as_str().unwrap());
    archive::verify(&path).unwrap();
    let ar = ArchiveReader::open(&path).unwrap();
    // Proven by the monitor path (libvirt does not pass -pidfile for its own pidfile).
    let target = ar.manifest.target.clone().unwrap();
    assert_eq!(target["proof"], "qmp-socket", "{target}");
    assert_eq!(target["domain"], "vm-140");
    assert!(target["qmp_socket"].as_str().unwrap().ends_with("domain-1-vm-140/monitor.sock"), "{target}");
    assert_eq!(ar.read_json("qmp/query-status.json").unwrap()["return"]["status"], "running");
    let wr = |f: &str| ar.read_json(f).unwrap()["return"][0]["stats"]["wr_operations"].as_u64().unwrap();
    assert_eq!(wr("qmp/query-blockstats.1.json"), wr("qmp/query-blockstats.2.json"));
    assert!(ar.read_string("qmp/transcript.jsonl").unwrap().contains("\"via\":\"virsh\""));
    assert!(ar.read("stacks/threads.json").is_some(), "{:?}", ar.list());
    // Every monitor command went through virsh, and only read-only ones.
    let calls: Vec<Vec<String>> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(calls.len() >= 10, "{calls:?}");
    for c in &calls {
        assert_eq!(c[0], "qemu-monitor-command");
        assert_eq!(c[1], "vm-140");
        let cmd: Value = serde_json::from_str(&c[2]).unwrap();
        let name = cmd["execute"].as_str().unwrap();
        assert!(wedge_autopsy::qmp::policy::is_allowed(name, cmd.get("arguments")), "{name}");
    }
    for (tid, st) in lab.thread_states() {
        assert!(!matches!(st, 'T' | 't') || matches!(before.get(&tid), Some('T' | 't')));
    }
}

#[test]
fn a_domain_whose_command_line_names_neither_is_refused() {
    // As with libvirt's monitor passed by descriptor: the pattern matches no path on the
    // command line, and libvirt's pidfile is not named there either.
    let lab = Lab::start(LabOptions { vmid: 141, name: "vm-141".into(), libvirt: true, ..LabOptions::default() });
    let rb = lab_runbook(&lab, "lib/libvirt/qemu/domain-*-{domain}/other.sock");
    let out = run_bounded(
        lab.tool_args(&["141", "--runbook", rb.to_str().unwrap()]).env("WEDGE_LAB_ROOT", lab.root()),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("refusing pid") && err.contains("names neither"), "{err}");
    assert!(!lab.out_dir().exists());
}
