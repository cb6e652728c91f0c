//! Shared helpers for integration tests: real QEMU "VMs" in a Proxmox-like
//! layout (driven by `scripts/lab`), the `qm` stand-in, and the binary under
//! test. Use with `mod common;` from each test file.
//!
//! Every QEMU a [`Lab`] starts (including ones restarted through the `qm`
//! stand-in) is SIGKILLed when the `Lab` is dropped, also on test panic, and
//! its temp dir is removed. Every wait here has a deadline.
#![allow(dead_code)]

pub mod fake_qmp;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::ops::Deref;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long any lab command may take before the test gives up on it.
/// `up` waits up to 60 s for the guest firmware (slow under TCG).
const LAB_CMD_TIMEOUT: Duration = Duration::from_secs(150);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn lab_script() -> PathBuf {
    repo_root().join("scripts/lab")
}

/// The `qm` stand-in (python3). Needs `WEDGE_LAB_ROOT`; see [`Lab::qm`].
pub fn qm_path() -> PathBuf {
    repo_root().join("tests/support/qm")
}

/// The binary under test, with no arguments. See [`Lab::tool_args`].
pub fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wedge-autopsy"))
}

/// Options for one lab VM. `Default` is the incident's VM 102:
/// LSI controller, no iothread, 60 MB/s throttle, io_uring.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub vmid: u32,
    pub name: String,
    pub smp: u32,
    pub disks: u32,
    /// `lsi`, `virtio-scsi-pci` or `virtio-scsi-single`
    pub scsihw: String,
    /// only honoured with `virtio-scsi-single` (as in qemu-server)
    pub iothread: bool,
    /// 0 = no throttle
    pub mbps: u32,
    /// `io_uring`, `threads` or `native`
    pub aio: String,
    /// node in `.vmlist`; `None` = this host's short hostname
    pub node: Option<String>,
    /// extra `KEY=VAL` config lines
    pub extra_conf: Vec<String>,
    /// also lay the VM out as libvirtd would (`lab up --libvirt`)
    pub libvirt: bool,
    /// guest RAM in MiB (`-m`), and whether all of it is faulted in at start
    pub mem_mib: u32,
    pub mem_prealloc: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            vmid: 102,
            name: "devvm".into(),
            smp: 2,
            disks: 1,
            scsihw: "lsi".into(),
            iothread: false,
            mbps: 60,
            aio: "io_uring".into(),
            node: None,
            extra_conf: Vec::new(),
            libvirt: false,
            mem_mib: 128,
            mem_prealloc: false,
        }
    }
}

impl LabOptions {
    fn up_args(&self) -> Vec<String> {
        let mut a = vec![
            "--vmid".into(),
            self.vmid.to_string(),
            "--name".into(),
            self.name.clone(),
            "--smp".into(),
            self.smp.to_string(),
            "--disks".into(),
            self.disks.to_string(),
            "--scsihw".into(),
            self.scsihw.clone(),
            "--mbps".into(),
            self.mbps.to_string(),
            "--aio".into(),
            self.aio.clone(),
        ];
        if self.iothread {
            a.push("--iothread".into());
        }
        if self.libvirt {
            a.push("--libvirt".into());
        }
        if self.mem_mib != 128 {
            a.push("--mem".into());
            a.push(self.mem_mib.to_string());
        }
        if self.mem_prealloc {
            a.push("--mem-prealloc".into());
        }
        if let Some(n) = &self.node {
            a.push("--node".into());
            a.push(n.clone());
        }
        for e in &self.extra_conf {
            a.push("--extra-conf".into());
            a.push(e.clone());
        }
        a
    }
}

// ---------------------------------------------------------------------------
// bounded process helpers

/// Run a command to completion, killing it (and failing) after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // drain pipes on threads so a chatty child cannot block on a full pipe
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Poll `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Process state letter from `/proc/PID/stat`, `None` if gone.
/// `TracerPid` of `pid`: 0 when nothing traces it.
pub fn tracer_pid(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("TracerPid:")).unwrap().trim().parse().unwrap()
}

pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
}

/// Alive = exists and is not a zombie (a killed, daemonized QEMU may linger
/// as a zombie until init reaps it).
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(c) if c != 'Z' && c != 'X')
}

pub fn proc_cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// The value following `-pidfile` in `argv`, if any.
pub fn pidfile_arg(argv: &[String]) -> Option<&str> {
    argv.windows(2).find(|w| w[0] == "-pidfile").map(|w| w[1].as_str())
}

fn sigkill(pid: i32) {
    // SAFETY: plain kill(2) on a pid we just verified by cmdline.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
        libc::kill(pid, libc::SIGKILL);
    }
}

// ---------------------------------------------------------------------------
// a minimal QMP client for assertions (read timeouts, one command at a time)

pub struct Qmp {
    reader: BufReader<UnixStream>,
    pub greeting: Value,
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities, each step
    /// bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut q = Qmp { reader: BufReader::new(s), greeting: Value::Null };
        q.greeting = q.read_msg()?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_msg(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Returns the `return` value; a QMP error becomes an `Err`.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> std::io::Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(b'\n');
        self.reader.get_mut().write_all(&bytes)?;
        loop {
            let v = self.read_msg()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("{cmd}: {e}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Device-level `stats` of one drive from `query-blockstats`.
    pub fn blockstats(&mut self, drive: &str) -> std::io::Result<Value> {
        let all = self.execute("query-blockstats", None)?;
        all.as_array()
            .and_then(|a| a.iter().find(|d| d["device"] == drive))
            .map(|d| d["stats"].clone())
            .ok_or_else(|| std::io::Error::other(format!("no blockstats for {drive}")))
    }
}

// ---------------------------------------------------------------------------
// one lab VM

/// A handle on one lab VM. Cheap to clone; the owning [`Lab`] kills it.
#[derive(Clone, Debug)]
pub struct Vm {
    lab_root: PathBuf,
    vmid: u32,
    /// the JSON line `scripts/lab up` printed
    up: Value,
}

impl Vm {
    pub fn vmid(&self) -> u32 {
        self.vmid
    }

    /// What `lab up` reported: pid, qmp, accel (kvm|tcg), aio, up_seconds, notes…
    pub fn up_info(&self) -> &Value {
        &self.up
    }

    /// `kvm` or `tcg`.
    pub fn accel(&self) -> &str {
        self.up["accel"].as_str().unwrap_or("unknown")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.lab_root.join(format!("run/qemu-server/{}.pid", self.vmid))
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.lab_root.join(format!("run/qemu-server/{}.qmp", self.vmid))
    }

    /// The lab's own second QMP monitor (Proxmox has one for qmeventd): lets a test
    /// drive I/O while the tool holds `<vmid>.qmp`.
    pub fn lab_qmp_path(&self) -> PathBuf {
        self.lab_root.join("run/qemu-server").join(format!("{}.lab.qmp", self.vmid))
    }

    pub fn conf_path(&self) -> PathBuf {
        self.lab_root.join(format!("etc/pve/qemu-server/{}.conf", self.vmid))
    }

    /// The pid `lab up` started (stays the same after a `qm` restart).
    pub fn initial_pid(&self) -> i32 {
        self.up["pid"].as_i64().expect("pid in lab up output") as i32
    }

    /// The current pid from the pidfile, if that process is alive and its
    /// cmdline names this pidfile (the check Proxmox does).
    pub fn try_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pidfile()).ok()?.trim().parse().ok()?;
        if !pid_alive(pid) {
            return None;
        }
        let argv = proc_cmdline(pid)?;
        (pidfile_arg(&argv) == Some(self.pidfile().to_str()?)).then_some(pid)
    }

    /// The current, verified pid. Panics if the VM is not running.
    pub fn pid(&self) -> i32 {
        self.try_pid().unwrap_or_else(|| panic!("VM {} is not running", self.vmid))
    }

    pub fn is_alive(&self) -> bool {
        self.try_pid().is_some()
    }

    fn lab(&self, sub: &str, extra: &[&str]) -> Value {
        let mut cmd = Command::new("python3");
        cmd.arg(lab_script())
            .arg(sub)
            .arg("--root")
            .arg(&self.lab_root)
            .arg("--vmid")
            .arg(self.vmid.to_string())
            .args(extra);
        let out = run_bounded(&mut cmd, LAB_CMD_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "lab {sub} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
    }

    /// Wedge `drive-scsi0` (blkdebug breakpoints + queued writes) and return
    /// the lab's verification report: `wedged`, `before`,
    /// `after_completed_write`, `t0`, `t1` (blockstats), `qmp_status`.
    /// Panics if the drive did not wedge.
    pub fn wedge(&self) -> Value {
        self.lab("wedge", &[])
    }

    pub fn wedge_drive(&self, drive: &str) -> Value {
        self.lab("wedge", &["--drive", drive])
    }

    /// After [`Vm::wedge`]: make the main loop hang on the stuck writes
    /// (throttled drive: `block_set_io_throttle` to zero, the incident's
    /// live throttle rewrite; otherwise a drain). QMP then stops answering.
    /// Returns `{"how", "qmp": "no-greeting"|"no-reply", "alive"}`.
    pub fn hang_main_loop(&self) -> Value {
        self.lab("hang-mainloop", &[])
    }

    /// QMP `stop` (returns `{"status": "paused", …}`).
    pub fn pause(&self) -> Value {
        self.lab("pause", &[])
    }

    pub fn sigstop(&self) -> Value {
        self.lab("sigstop", &[])
    }

    pub fn sigcont(&self) -> Value {
        self.lab("sigcont", &[])
    }

    /// `lab status` for this VM (runs a 1 s QMP probe).
    pub fn status(&self) -> Value {
        self.lab("status", &[])
    }

    /// Connect to the QMP socket and hold it without reading: while the
    /// returned stream lives, other clients get no greeting.
    pub fn hold_qmp(&self) -> UnixStream {
        UnixStream::connect(self.qmp_path()).expect("connect QMP to hold it")
    }

    /// A QMP session on this VM (each read bounded by `timeout`).
    pub fn qmp(&self, timeout: Duration) -> std::io::Result<Qmp> {
        Qmp::connect(&self.qmp_path(), timeout)
    }

    /// tid -> state letter (R, S, D, T, t, Z…) from `/proc/PID/task/*/stat`.
    pub fn thread_states(&self) -> BTreeMap<i32, char> {
        let pid = self.pid();
        let mut m = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in rd.flatten() {
                if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                    if let Ok(s) = std::fs::read_to_string(e.path().join("stat")) {
                        if let Some(c) = s.rfind(')').and_then(|i| s[i + 1..].trim_start().chars().next()) {
                            m.insert(tid, c);
                        }
                    }
                }
            }
        }
        m
    }

    /// tid -> thread name (`CPU 0/KVM`, `IO mon_iothread`, …).
    pub fn thread_names(&self) -> BTreeMap<i32, String> {
        let pid = self.pid();
        let mut m = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in rd.flatten() {
                if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                    if let Ok(s) = std::fs::read_to_string(e.path().join("comm")) {
                        m.insert(tid, s.trim_end().to_string());
                    }
                }
            }
        }
        m
    }

    /// SIGKILL this VM's QEMU (after the cmdline check) and wait until it is gone.
    pub fn kill(&self) {
        if let Some(pid) = self.try_pid() {
            sigkill(pid);
            assert!(wait_until(Duration::from_secs(10), || !pid_alive(pid)), "pid {pid} survived SIGKILL");
        }
    }
}

// ---------------------------------------------------------------------------
// the lab: a temp root with one or more VMs

pub struct Lab {
    // dropped after the QEMUs are killed (see Drop)
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    vms: Vec<Vm>,
    children: Mutex<Vec<Child>>,
}

fn fresh_root() -> tempfile::TempDir {
    // sun_path is 108 bytes: keep the socket paths short even with a long TMPDIR
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 { PathBuf::from("/tmp") } else { base };
    tempfile::Builder::new().prefix("wlab-").tempdir_in(base).expect("create lab temp dir")
}

impl Lab {
    /// Create a fresh root and start one VM in it.
    pub fn start(opts: LabOptions) -> Lab {
        let dir = fresh_root();
        let root = dir.path().to_path_buf();
        let mut lab = Lab { dir: Some(dir), root, vms: Vec::new(), children: Mutex::new(Vec::new()) };
        lab.add_vm(opts);
        lab
    }

    /// Start another VM under the same root (shared `.vmlist`, run dir…).
    pub fn add_vm(&mut self, opts: LabOptions) -> Vm {
        let mut cmd = Command::new("python3");
        cmd.arg(lab_script()).arg("up").arg("--root").arg(&self.root).args(opts.up_args());
        let out = run_bounded(&mut cmd, LAB_CMD_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "lab up failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let up: Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("lab up printed {stdout:?}: {e}"));
        let vm = Vm { lab_root: self.root.clone(), vmid: opts.vmid, up };
        self.vms.push(vm.clone());
        vm
    }

    pub fn vm(&self, vmid: u32) -> &Vm {
        self.vms.iter().find(|v| v.vmid == vmid).unwrap_or_else(|| panic!("no lab VM {vmid}"))
    }

    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stand-in for `/var/run/qemu-server`.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run/qemu-server")
    }

    /// The stand-in for `/etc/pve`.
    pub fn pve_dir(&self) -> PathBuf {
        self.root.join("etc/pve")
    }

    /// `ROOT/out`, not created (the tool must create it).
    pub fn out_dir(&self) -> PathBuf {
        self.root.join("out")
    }

    pub fn lock_dir(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The binary under test with `args` first, then this lab's
    /// `--run-dir`, `--pve-dir` and `--out`.
    pub fn tool_args(&self, args: &[&str]) -> Command {
        let mut c = tool();
        c.args(args)
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--pve-dir")
            .arg(self.pve_dir())
            .arg("--out")
            .arg(self.out_dir());
        c
    }

    /// The `qm` stand-in, with `WEDGE_LAB_ROOT` set to this lab.
    pub fn qm(&self) -> Command {
        let mut c = Command::new("python3");
        c.arg(qm_path()).env("WEDGE_LAB_ROOT", &self.root);
        c
    }

    /// Spawn a background process that is killed when the lab is dropped.
    /// Returns its pid.
    pub fn spawn(&self, cmd: &mut Command) -> u32 {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        pid
    }

    /// Wait (bounded) for a tracked background process; `None` on timeout.
    pub fn wait_spawned(&self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut ch = self.children.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = ch.iter_mut().find(|c| c.id() == pid) {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Some(st);
                    }
                } else {
                    return None;
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every live QEMU whose `-pidfile` lies in this lab's run dir (an
    /// exiting one whose cmdline is already empty is not listed)
    /// (found via /proc, so `qm`-restarted VMs count too).
    pub fn qemu_pids(&self) -> Vec<i32> {
        let prefix = format!("{}/", self.run_dir().display());
        let mut pids = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if let Some(argv) = proc_cmdline(pid) {
                    if pidfile_arg(&argv).is_some_and(|p| p.starts_with(&prefix)) && pid_alive(pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }
}

impl Deref for Lab {
    type Target = Vm;
    /// The first VM (the one `Lab::start` created).
    fn deref(&self) -> &Vm {
        &self.vms[0]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // 1. background helpers (holders, tools, hung qm…)
        let mut ch = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for c in ch.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        ch.clear();
        drop(ch);
        // 2. every QEMU of this root, by cmdline (never by name). Then wait
        //    on those pids, not on a new cmdline scan: an exiting QEMU has an
        //    empty cmdline (mm gone) for a while before it becomes a zombie,
        //    and under (nested) KVM that teardown is slow.
        let killed = self.qemu_pids();
        for &pid in &killed {
            sigkill(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut left: Vec<i32> = killed.clone();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left.retain(|&p| pid_alive(p));
        }
        if !left.is_empty() {
            eprintln!("lab: QEMU pids {left:?} survived SIGKILL; leaving {}", self.root.display());
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
            return;
        }
        // 3. the temp dir (TempDir removes it)
        if std::env::var_os("WEDGE_LAB_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("lab: keeping {}", d.keep().display());
            }
        }
    }
}
