//! The summary answers an incident commander's first questions, on real lab QEMUs with
//! real Linux guests (TCG): the first lines give the decision (verdict, strength, layer,
//! whether the evidence is sealed and verified, whether a restart helps), then the
//! versions, each disk's storage backend and backing device, and the host's I/O over
//! the window. Every expected value is read independently from the host (stat, sysfs,
//! uname, dpkg-query, eu-readelf, the archive's own kernel log), not from the tool.
//!
//! Two guests booting in parallel: an idle one on a file (virtio-scsi-single) and a
//! steady writer on NBD (virtio-blk) whose server is then paused.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Backend, Controller, GuestMode, GuestSpec, Lab, WedgeKind};
use serde_json::Value;
use wedge_autopsy::archive::{ArchiveReader, Evidence};

const T: Duration = Duration::from_secs(120);

/// Stdout of a host command (bounded), trimmed.
fn host(argv: &[&str]) -> String {
    let out = run_bounded(Command::new(argv[0]).args(&argv[1..]), Duration::from_secs(20));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The GNU build-id of an ELF file, as eu-readelf prints it.
fn build_id(path: &str) -> String {
    let notes = host(&["eu-readelf", "-n", path]);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID:").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| panic!("no build-id note in {path}:\n{notes}"))
}

/// Runs the autopsy (text output: the summary as printed after the verified seal) and
/// returns (printed summary, archive path).
fn autopsy(lab: &Lab, vmid: u32, cfg: &Path) -> (String, PathBuf) {
    let v = vmid.to_string();
    let out = run_bounded(&mut lab.tool_args(&[&v, "--config", cfg.to_str().unwrap(), "--stacks", "native"]), T);
    let md = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "VM {vmid}: exit {:?}\n{err}\n{md}", out.status.code());
    let archive = md
        .lines()
        .find_map(|l| l.strip_prefix("- **Archive:** `")?.split('`').next().map(PathBuf::from))
        .unwrap_or_else(|| panic!("VM {vmid}: no archive line in the printed summary:\n{md}"));
    (md, archive)
}

/// The first line after the title, which must carry the decision.
fn decision_line(md: &str) -> &str {
    let mut lines = md.lines().filter(|l| !l.trim().is_empty());
    let title = lines.next().unwrap_or("");
    assert!(title.starts_with("# wedge-autopsy: VM "), "title: {md}");
    lines.next().unwrap_or("")
}

#[test]
fn the_summary_answers_the_first_questions_for_a_file_disk_and_a_stuck_nbd_disk() {
    let spec = |vmid, controller, mode, backend| GuestSpec { vmid, controller, mode, backend, ..GuestSpec::default() };
    let lab = Lab::up_guests(vec![
        spec(311, Controller::VirtioScsiSingle, GuestMode::Idle, Backend::File),
        spec(312, Controller::VirtioBlk, GuestMode::Steady, Backend::Nbd),
    ]);
    // The lab's configs name `local-lvm:`; declare it as a directory storage, as on a node
    // whose local-lvm is file-based.
    let images = lab.root().join("images");
    std::fs::write(
        lab.pve_dir().join("storage.cfg"),
        format!("dir: local-lvm\n\tpath {}\n\tcontent images\n", images.display()),
    )
    .unwrap();
    let w = lab.vm(312).wedge_guest(WedgeKind::Nbd);
    assert!(w["wedged"].as_bool().unwrap_or(false), "NBD wedge: {w}");
    std::thread::sleep(Duration::from_secs(4)); // past min_idle (3 s) since the last completion
    let cfg = lab.root().join("fast.toml");
    std::fs::write(&cfg, "min_idle = \"3s\"\nsample_interval = \"1s\"\n").unwrap();

    // --- the idle guest on a file ---
    let (md, archive) = autopsy(&lab, 311, &cfg);
    // After the verified seal the printed first lines say so, and that nothing needs a restart.
    let first = decision_line(&md);
    assert!(
        first.starts_with("**Decision:** **healthy** — evidence sealed and verified (read back, ")
            && first.contains("no restart needed"),
        "{first}"
    );
    let ar = ArchiveReader::open(&archive).unwrap();
    // The copy sealed inside the archive was written before sealing and claims no result.
    let sealed_md = ar.read_string("summary.md").unwrap();
    let first = decision_line(&sealed_md);
    assert!(first.contains("written before sealing") && !first.contains("sealed and verified"), "{first}");
    // inspect --verify states the verified result for the archive as it is now.
    let out = run_bounded(common::tool().args(["inspect", "--verify"]).arg(&archive), T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.lines().nth(1).unwrap_or("").starts_with("Now: **healthy** — evidence sealed and verified"), "{text}");

    // Versions: the running image, its build-id, the kernel, the QEMU package.
    let pid = lab.vm(311).pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().display().to_string();
    let qemu = format!(", running `{exe}`, build-id `{}`", build_id(&exe));
    assert!(md.lines().any(|l| l.starts_with("- **QEMU:** 7.2.") && l.contains(&qemu)), "{qemu}\n{md}");
    let kernel = format!("kernel `{}`", host(&["uname", "-r"]));
    assert!(md.lines().any(|l| l.starts_with("- **Host:** ") && l.contains(&kernel)), "{kernel}\n{md}");
    let pkg = host(&["dpkg-query", "-W", "-f", "${Version}", "qemu-system-x86"]);
    assert!(md.contains(&format!("- **pve-qemu-kvm:** not installed (dpkg: `qemu-system-x86 {pkg}`)")), "{md}");

    // Storage: the image file, its filesystem's device and mount, from stat, sysfs and findmnt.
    let image = images.join("vm-311-disk-0.raw");
    let dev = std::fs::metadata(&image).unwrap().dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let info = ar.read_json("host/info.json").expect("host/info.json sealed");
    let d = &info["disks"][0];
    assert_eq!((d["device"].as_str(), d["kind"].as_str()), (Some("drive-scsi0"), Some("file")), "{d:#}");
    assert_eq!(d["target"].as_str(), image.to_str(), "{d:#}");
    assert_eq!((d["backing"]["major"].as_u64(), d["backing"]["minor"].as_u64()), (Some(major), Some(minor)), "{d:#}");
    assert_eq!(d["storage"]["kind"], "dir", "{d:#}");
    let fstype = host(&["findmnt", "-n", "-o", "FSTYPE", "--target", image.to_str().unwrap()]);
    assert_eq!(d["fstype"].as_str(), Some(fstype.as_str()), "{d:#}");
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let devname = std::fs::read_link(&sys).ok().and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned()));
    assert_eq!(d["backing"]["name"].as_str(), devname.as_deref(), "{d:#}");
    let row =
        format!("| drive-scsi0 | scsi0: local-lvm:vm-311-disk-0 | local-lvm (dir) | file | {} |", image.display());
    assert!(md.contains(&row), "{row}\n{md}");

    // Host I/O: the backing device's in-flight count at both ends, pressure, hung tasks.
    let para = md
        .lines()
        .skip_while(|l| *l != "## Host I/O")
        .nth(2)
        .unwrap_or_else(|| panic!("no Host I/O paragraph:\n{md}"))
        .to_string();
    assert!(para.starts_with("Over the window (host step → host-info step, "), "{para}");
    match &devname {
        Some(n) => assert!(para.contains(&format!("`{n}`: ")) && para.contains(" in flight"), "{para}"),
        None => assert!(para.contains("no local block device backs the disks"), "{para}"),
    }
    if std::fs::read_to_string("/proc/pressure/io").is_ok() {
        assert!(para.contains("I/O pressure (avg10) ") && para.contains("% → "), "{para}");
    } else {
        assert!(md.contains("- unavailable: /proc/pressure/io"), "{md}");
    }
    let kmsg = ar.read_string("host/kmsg.txt").unwrap_or_default();
    let hung = kmsg.lines().filter(|l| l.contains("blocked for more than")).count();
    if hung == 0 {
        assert!(para.contains("no hung-task message in host/kmsg.txt"), "{para}");
    } else {
        assert!(para.contains("hung-task message(s)** in host/kmsg.txt"), "{para}");
    }

    // Unnamed frames of the stripped QEMU: explained once, with the build-id.
    let unnamed: Vec<&str> =
        md.lines().filter(|l| l.starts_with("- Unnamed frames such as `qemu-system-x86_64+0x")).collect();
    assert_eq!(unnamed.len(), 1, "{md}");
    assert!(
        unnamed[0].contains(&build_id(&exe)) && unnamed[0].contains("no debug-symbol package is reachable"),
        "{md}"
    );

    // --- the steady writer whose NBD server is paused ---
    let (md, archive) = autopsy(&lab, 312, &cfg);
    let first = decision_line(&md);
    assert!(
        first.starts_with(
            "**Decision:** **block-path-frozen (proven, network-backend)** — evidence sealed and verified (read back, "
        ) && first.contains("restart would not help: stuck in a network block backend"),
        "{first}"
    );
    assert!(!first.contains("safe to restart"), "{first}");
    let ar = ArchiveReader::open(&archive).unwrap();
    let info = ar.read_json("host/info.json").expect("host/info.json sealed");
    let d: &Value = &info["disks"][0];
    assert_eq!((d["device"].as_str(), d["kind"].as_str()), (Some("drive-virtio0"), Some("nbd")), "{d:#}");
    let sock = lab.run_dir().join("312.nbd.sock");
    assert!(d["target"].as_str().unwrap_or("").contains(sock.to_str().unwrap()), "{d:#} vs {}", sock.display());
    assert!(d["backing"].is_null(), "an NBD export has no host block device: {d:#}");
    assert!(
        md.contains("| drive-virtio0 | virtio0: local-lvm:vm-312-disk-0 | local-lvm (dir) | NBD | nbd+unix"),
        "{md}"
    );
    assert!(md.contains("storage.cfg declares local-lvm (dir), QEMU opens NBD"), "{md}");
    assert!(md.contains("no local block device backs the disks"), "{md}");
}
