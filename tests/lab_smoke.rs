//! Tests of the lab itself against real QEMU. Every other integration test
//! trusts this harness, so these pin down what it promises: the Proxmox
//! layout, a wedge that freezes writes while QMP answers, the `qm` stand-in's
//! restart and escalation, and that nothing outlives a `Lab`.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{pid_alive, proc_cmdline, wait_until, Lab, LabOptions};
use serde_json::Value;

const QMP_TIMEOUT: Duration = Duration::from_secs(5);

fn n(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64().unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn started_vm_is_laid_out_like_proxmox() {
    let lab = Lab::start(LabOptions::default());
    let pid = lab.pid();
    assert_eq!(pid, lab.initial_pid());

    // the pidfile's process names that pidfile and the QMP socket
    let argv = proc_cmdline(pid).expect("cmdline");
    let pidfile = lab.pidfile();
    assert!(argv.windows(2).any(|w| w[0] == "-pidfile" && w[1] == pidfile.to_str().unwrap()));
    let qmp = lab.qmp_path();
    let chardev = format!("socket,id=qmp,path={},server=on,wait=off", qmp.display());
    assert!(argv.windows(2).any(|w| w[0] == "-chardev" && w[1] == chardev), "{argv:?}");
    assert!(argv.windows(2).any(|w| w[0] == "-name" && w[1] == "devvm,debug-threads=on"));
    assert!(argv.iter().any(|a| a == "lsi53c895a,id=scsihw0,bus=pci.0,addr=0x5"));
    let drive = argv.iter().find(|a| a.contains("id=drive-scsi0")).expect("-drive");
    assert!(drive.starts_with("file=blkdebug::"), "{drive}");
    assert!(drive.contains("bps_rd=62914560,bps_wr=62914560"), "{drive}");
    assert!(!argv.iter().any(|a| a.contains("iothread")), "incident config has no iothread");

    // the saved command line (qm start's source) is what is running
    let saved: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(lab.run_dir().join("102.cmdline.json")).unwrap()).unwrap();
    assert_eq!(saved, argv);

    // a live QMP socket, and debug-threads names
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&qmp).unwrap().file_type().is_socket());
    let mut q = lab.qmp(QMP_TIMEOUT).expect("QMP handshake");
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "running");
    let names: Vec<String> = lab.thread_names().into_values().collect();
    assert!(names.iter().any(|t| t.starts_with("CPU 0/")), "{names:?}");

    // config and vmlist
    let conf = std::fs::read_to_string(lab.conf_path()).unwrap();
    for line in ["scsihw: lsi", "cipassword: hunter2", "name: devvm", "cores: 2"] {
        assert!(conf.lines().any(|l| l == line), "{line:?} missing in\n{conf}");
    }
    let scsi0 = conf.lines().find(|l| l.starts_with("scsi0: ")).unwrap();
    assert!(scsi0.contains("mbps_rd=60") && scsi0.contains("mbps_wr=60"), "{scsi0}");
    let vmlist: Value = serde_json::from_str(&std::fs::read_to_string(lab.pve_dir().join(".vmlist")).unwrap()).unwrap();
    assert_eq!(vmlist["ids"]["102"]["type"], "qemu");
    assert_eq!(vmlist["ids"]["102"]["node"], lab.up_info()["node"]);
    assert!(!lab.out_dir().exists(), "out dir must be left for the tool to create");
    eprintln!("accel={} up_seconds={}", lab.accel(), lab.up_info()["up_seconds"]);
}

#[test]
fn wedge_freezes_writes_while_qmp_answers() {
    let lab = Lab::start(LabOptions::default());
    let r = lab.wedge();
    eprintln!("wedge report: {r}");
    assert_eq!(r["wedged"], true);
    let done = n(&r, &["after_completed_write", "wr_operations"]);
    assert_eq!(done, n(&r, &["before", "wr_operations"]) + 1, "warm-up write is counted");
    assert_eq!(n(&r, &["t0", "wr_operations"]), done, "no queued write completed");
    assert_eq!(n(&r, &["t1", "wr_operations"]), done, "still none a second later");
    assert!(n(&r, &["t1", "idle_time_ns"]) > n(&r, &["t0", "idle_time_ns"]));
    assert_eq!(n(&r, &["queued_writes"]), 4);

    // independently of the lab's own check: QMP answers, counters frozen
    let mut q = lab.qmp(QMP_TIMEOUT).expect("QMP still answers when wedged");
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "running");
    let a = q.blockstats("drive-scsi0").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b = q.blockstats("drive-scsi0").unwrap();
    assert_eq!(n(&a, &["wr_operations"]), done);
    assert_eq!(n(&b, &["wr_operations"]), done);
    assert_eq!(n(&b, &["wr_bytes"]), 4096);
    assert!(n(&b, &["idle_time_ns"]) > n(&a, &["idle_time_ns"]));
    drop(q);
    assert_eq!(lab.status()["wedged"], true);
    assert_eq!(lab.status()["qmp"], "ok");
}

#[test]
fn wedge_works_with_virtio_scsi_single_iothread() {
    let lab = Lab::start(LabOptions {
        vmid: 110,
        scsihw: "virtio-scsi-single".into(),
        iothread: true,
        aio: "threads".into(),
        mbps: 0,
        ..Default::default()
    });
    let argv = proc_cmdline(lab.pid()).unwrap();
    assert!(argv.iter().any(|a| a == "iothread,id=iothread-virtioscsi0"), "{argv:?}");
    assert!(argv.iter().any(|a| a == "virtio-scsi-pci,id=virtioscsi0,iothread=iothread-virtioscsi0"));
    let r = lab.wedge();
    assert_eq!(r["wedged"], true, "{r}");
    assert_eq!(n(&r, &["t1", "wr_operations"]), n(&r, &["after_completed_write", "wr_operations"]));
}

#[test]
fn qm_restarts_a_healthy_vm_to_a_new_pid() {
    let lab = Lab::start(LabOptions::default());
    let log = lab.root().join("qm.log");
    let old = lab.pid();

    let out = lab.qm().args(["stop", "102"]).env("QM_LOG", &log).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pid_alive(old));
    assert!(!lab.pidfile().exists() && !lab.qmp_path().exists(), "runtime files removed");
    let st = lab.qm().args(["status", "102"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "status: stopped");

    let out = lab.qm().args(["start", "102"]).env("QM_LOG", &log).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new = lab.pid();
    assert_ne!(new, old);
    let st = lab.qm().args(["status", "102"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "status: running");
    let mut q = lab.qmp(QMP_TIMEOUT).expect("restarted VM answers QMP");
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "running");

    // starting a running VM is refused, like qm
    let again = lab.qm().args(["start", "102"]).output().unwrap();
    assert_eq!(again.status.code(), Some(255));
    assert_eq!(lab.pid(), new);

    let calls: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(calls, vec![serde_json::json!(["stop", "102"]), serde_json::json!(["start", "102"])]);
}

#[test]
fn qm_stop_escalates_to_sigkill_on_a_wedged_vm() {
    let lab = Lab::start(LabOptions::default());
    lab.wedge();
    let pid = lab.pid();
    let out = lab.qm().args(["stop", "102", "--timeout", "1"]).env("QM_TERM_GRACE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // quit was ignored, then SIGTERM was ignored: only SIGKILL ended it
    assert!(err.contains("terminating now with SIGTERM"), "{err}");
    assert!(err.contains("terminating now with SIGKILL"), "{err}");
    assert!(wait_until(Duration::from_secs(10), || !pid_alive(pid)));
    assert!(!lab.pidfile().exists() && !lab.qmp_path().exists());
    assert!(lab.qemu_pids().is_empty());
}

#[test]
fn qm_stop_hang_knob_holds_the_lock_and_never_returns() {
    let lab = Lab::start(LabOptions::default());
    let mut cmd = lab.qm();
    cmd.args(["stop", "102"]).env("QM_STOP_HANG", "1");
    let qm_pid = lab.spawn(&mut cmd);
    let lockfile = lab.lock_dir().join("lock-102.conf");
    // the hung stop holds qm's per-VM lock, as a real stuck qm stop does
    let held = wait_until(Duration::from_secs(10), || {
        let f = std::fs::File::open(&lockfile).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: flock on an fd we own; a non-blocking probe.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        rc != 0
    });
    assert!(held, "hung qm stop never took the lock");
    assert!(lab.wait_spawned(qm_pid, Duration::from_millis(300)).is_none(), "stop returned");
    assert!(lab.is_alive(), "a hung stop must not have touched the VM");
}

#[test]
fn pause_sigstop_and_held_qmp_are_observable() {
    let lab = Lab::start(LabOptions { vmid: 120, ..Default::default() });

    // a held socket: a second client connects but gets no greeting
    let holder = lab.hold_qmp();
    let mut probe = std::os::unix::net::UnixStream::connect(lab.qmp_path()).unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    assert!(probe.read(&mut buf).is_err(), "greeting while the socket is held");
    drop(probe);
    drop(holder);
    let q = lab.qmp(QMP_TIMEOUT).expect("greeting once the holder is gone");
    drop(q); // QMP serves one client at a time: let `lab pause` in

    assert_eq!(lab.pause()["status"], "paused");
    let mut q = lab.qmp(QMP_TIMEOUT).unwrap();
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "paused");
    q.execute("cont", None).unwrap();
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "running");
    drop(q);

    lab.sigstop();
    let st = lab.thread_states();
    assert!(!st.is_empty() && st.values().all(|c| *c == 'T' || *c == 't'), "{st:?}");
    lab.sigcont();
    assert!(wait_until(Duration::from_secs(5), || { lab.thread_states().values().all(|c| *c != 'T') }));
}

#[test]
fn drop_leaves_no_qemu_behind() {
    let (root, pids) = {
        let mut lab = Lab::start(LabOptions { vmid: 130, ..Default::default() });
        let other = lab.add_vm(LabOptions { vmid: 131, name: "other".into(), ..Default::default() });
        let vmlist: Value =
            serde_json::from_str(&std::fs::read_to_string(lab.pve_dir().join(".vmlist")).unwrap()).unwrap();
        assert!(vmlist["ids"]["130"].is_object() && vmlist["ids"]["131"].is_object(), "{vmlist}");
        // the hardest cases: one wedged and SIGSTOPped, one restarted by qm
        lab.wedge();
        lab.sigstop();
        let out = lab.qm().args(["stop", "131"]).output().unwrap();
        assert!(out.status.success());
        let out = lab.qm().args(["start", "131"]).output().unwrap();
        assert!(out.status.success());
        assert_ne!(other.pid(), other.initial_pid());
        let mut pids = lab.qemu_pids();
        pids.sort();
        let mut want = vec![lab.pid(), other.pid()];
        want.sort();
        assert_eq!(pids, want);
        (lab.root().to_path_buf(), pids)
    };
    for pid in pids {
        assert!(!pid_alive(pid), "QEMU {pid} outlived its Lab");
    }
    assert!(!root.exists(), "lab root {} not removed", root.display());
}

#[test]
fn drop_kills_qemu_even_when_the_test_panics() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let lab = Lab::start(LabOptions { vmid: 140, ..Default::default() });
        *seen.lock().unwrap() = Some((lab.pid(), lab.root().to_path_buf()));
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    let (pid, root) = seen.lock().unwrap().clone().expect("lab started");
    assert!(
        !pid_alive(pid),
        "QEMU {pid} survived a panicking test: state {:?}, cmdline {:?}",
        common::proc_state(pid),
        proc_cmdline(pid)
    );
    assert!(!root.exists());
}

#[test]
fn throttle_off_on_a_wedged_drive_kills_qmp_and_qm_stop_still_ends_it() {
    let lab = Lab::start(LabOptions { vmid: 150, ..Default::default() });
    lab.wedge();
    let r = lab.hang_main_loop();
    eprintln!("hang-mainloop: {r}");
    assert_eq!(r["how"], "throttle-off", "the incident drive is throttled");
    assert_ne!(r["qmp"], "ok");
    assert!(lab.is_alive(), "the process lives on with a dead main loop");
    assert!(lab.qmp(Duration::from_secs(2)).is_err(), "QMP must not answer any more");

    let pid = lab.pid();
    let out = lab.qm().args(["stop", "150", "--timeout", "1"]).env("QM_TERM_GRACE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("qmp command 'quit' failed"), "{err}");
    assert!(err.contains("terminating now with SIGKILL"), "{err}");
    assert!(wait_until(Duration::from_secs(10), || !pid_alive(pid)));
}
