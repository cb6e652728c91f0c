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
    /// guest RAM in MiB (`lab up --mem`; `None` = the lab's default), and whether all of
    /// it is faulted in at start (`--mem-prealloc`)
    pub mem_mib: Option<u32>,
    pub mem_prealloc: bool,
    /// extra QEMU arguments (`lab up --qemu-arg`)
    pub qemu_args: Vec<String>,
    /// extra environment of the QEMU process (`KEY`, `VALUE`)
    pub qemu_env: Vec<(String, String)>,
    /// `agent: 1` and a `<vmid>.qga` socket nobody answers on (`lab up --agent`)
    pub agent: bool,
    /// the QEMU binary to run (`LAB_QEMU`); `None` = qemu-system-x86_64 on PATH
    pub qemu: Option<PathBuf>,
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
            qemu_args: Vec::new(),
            qemu_env: Vec::new(),
            libvirt: false,
            mem_mib: None,
            mem_prealloc: false,
            agent: false,
            qemu: None,
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
        if let Some(m) = self.mem_mib {
            a.push("--mem".into());
            a.push(m.to_string());
        }
        if self.mem_prealloc {
            a.push("--mem-prealloc".into());
        }
        if self.agent {
            a.push("--agent".into());
        }
        if let Some(n) = &self.node {
            a.push("--node".into());
            a.push(n.clone());
        }
        for e in &self.extra_conf {
            a.push("--extra-conf".into());
            a.push(e.clone());
        }
        for q in &self.qemu_args {
            // `=` form: the value may itself start with '-'.
            a.push(format!("--qemu-arg={q}"));
        }
        a
    }
}

/// A real Linux guest needs longer than a guest-less VM: TCG boot plus the
/// first write, several guests booting at once on two shared cores.
const GUEST_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// Disk controller of a guest VM, laid out as qemu-server does it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    /// `scsihw: lsi`: `lsi53c895a,id=scsihw0,bus=pci.0,addr=0x5`, no in-flight view
    Lsi,
    /// `scsihw: virtio-scsi-single` + `iothread=1`: `virtioscsi0` with `iothread-virtioscsi0`
    VirtioScsiSingle,
    /// `virtio0: …,iothread=1`: `virtio-blk-pci,id=virtio0,iothread=iothread-virtio0`
    VirtioBlk,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Lsi, Controller::VirtioScsiSingle, Controller::VirtioBlk];

    pub fn arg(self) -> &'static str {
        match self {
            Controller::Lsi => "lsi",
            Controller::VirtioScsiSingle => "virtio-scsi-single",
            Controller::VirtioBlk => "virtio-blk",
        }
    }

    /// The `-drive` id (the `device` in `query-blockstats`).
    pub fn drive(self) -> &'static str {
        match self {
            Controller::VirtioBlk => "drive-virtio0",
            _ => "drive-scsi0",
        }
    }

    /// QOM path `x-query-virtio` lists for the disk's device, `None` for LSI.
    pub fn virtio_path(self) -> Option<&'static str> {
        match self {
            Controller::Lsi => None,
            Controller::VirtioScsiSingle => Some("/machine/peripheral/virtioscsi0/virtio-backend"),
            Controller::VirtioBlk => Some("/machine/peripheral/virtio0/virtio-backend"),
        }
    }

    /// (number of virtqueues, index of the request queue) with one vCPU:
    /// virtio-scsi has control 0, event 1, requests 2..; virtio-blk requests 0..
    pub fn virtio_queues(self) -> Option<(u64, u64)> {
        match self {
            Controller::Lsi => None,
            Controller::VirtioScsiSingle => Some((3, 2)),
            Controller::VirtioBlk => Some((1, 0)),
        }
    }
}

/// What the guest's /init does once its disk is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// no disk I/O after boot
    Idle,
    /// one 4 KiB O_DIRECT write, then silent
    WriteOnce,
    /// one 4 KiB O_DIRECT write every 0.5 s, forever
    Steady,
}

impl GuestMode {
    pub const ALL: [GuestMode; 3] = [GuestMode::Idle, GuestMode::WriteOnce, GuestMode::Steady];

    pub fn arg(self) -> &'static str {
        match self {
            GuestMode::Idle => "idle",
            GuestMode::WriteOnce => "write-once",
            GuestMode::Steady => "steady",
        }
    }
}

/// What backs the guest's disk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// a raw file under blkdebug (wedge kind `inside`)
    File,
    /// an NBD export from nbdkit with its pause filter (wedge kind `nbd`)
    Nbd,
    /// a raw file on an nbdfuse mount over a pausable nbdkit (wedge kind `below`)
    Fuse,
}

/// Which QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qemu {
    /// the system's /usr/bin/qemu-system-x86_64 (Debian 12)
    Debian72,
    /// QEMU 10.0 from bookworm-backports, unpacked in the lab cache
    Bookworm10,
}

/// Where a guest's stuck write is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WedgeKind {
    /// a blkdebug breakpoint: popped from the virtqueue, held in QEMU's block layer
    Inside,
    /// nbdkit paused: the request waits on the NBD connection
    Nbd,
    /// nbdkit under nbdfuse paused: a QEMU worker blocks in pwrite64 on FUSE
    Below,
}

impl WedgeKind {
    pub fn arg(self) -> &'static str {
        match self {
            WedgeKind::Inside => "inside",
            WedgeKind::Nbd => "nbd",
            WedgeKind::Below => "below",
        }
    }

    /// The disk backend this wedge needs.
    pub fn backend(self) -> Backend {
        match self {
            WedgeKind::Inside => Backend::File,
            WedgeKind::Nbd => Backend::Nbd,
            WedgeKind::Below => Backend::Fuse,
        }
    }
}

/// One real Linux guest (`scripts/lab up --guest …`).
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub vmid: u32,
    pub controller: Controller,
    pub mode: GuestMode,
    pub backend: Backend,
    pub qemu: Qemu,
    /// `io_uring`, `threads` or `native` (`threads` shows the FUSE wait on a QEMU worker)
    pub aio: String,
    /// 0 = no throttle
    pub mbps: u32,
    /// `agent: 1`: qemu-guest-agent runs in the guest on Proxmox's virtio-serial port,
    /// and `up` returns once it answers (`lab up --agent`)
    pub agent: bool,
    /// Disks (`lab up --disks`): the guest writes on the first, `sda`/`vda`; the others
    /// stay idle. On LSI, seven per controller at `scsi-id` 0..6.
    pub disks: u32,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            vmid: 300,
            controller: Controller::VirtioScsiSingle,
            mode: GuestMode::Idle,
            backend: Backend::File,
            qemu: Qemu::Debian72,
            aio: "io_uring".into(),
            mbps: 60,
            agent: false,
            disks: 1,
        }
    }
}

impl GuestSpec {
    fn up_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--vmid".into(),
            self.vmid.to_string(),
            "--name".into(),
            format!("guest{}", self.vmid),
            "--guest".into(),
            self.mode.arg().into(),
            "--controller".into(),
            self.controller.arg().into(),
            "--backend".into(),
            match self.backend {
                Backend::File => "file",
                Backend::Nbd => "nbd",
                Backend::Fuse => "fuse",
            }
            .into(),
            "--aio".into(),
            self.aio.clone(),
            "--mbps".into(),
            self.mbps.to_string(),
            "--qemu".into(),
            match self.qemu {
                Qemu::Debian72 => "7.2",
                Qemu::Bookworm10 => "10",
            }
            .into(),
        ];
        if self.agent {
            a.push("--agent".into());
        }
        a.push("--disks".into());
        a.push(self.disks.to_string());
        a.push("--guest-timeout".into());
        a.push((GUEST_UP_TIMEOUT.as_secs() - 30).to_string());
        a
    }
}

/// Every file of a sealed archive, decompressed: `(path in the tar, bytes)`.
#[allow(dead_code)] // not every test binary reads whole archives
pub fn archive_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let dec = zstd::stream::read::Decoder::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut tar = tar::Archive::new(dec);
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        out.push((name, bytes));
    }
    out
}

/// Which of `secrets` occur anywhere in `bytes`.
#[allow(dead_code)]
pub fn secrets_in<'a>(bytes: &[u8], secrets: &[&'a str]) -> Vec<&'a str> {
    secrets.iter().copied().filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes())).collect()
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

/// `(tid, TracerPid)` of every thread of `pid` (empty when the process is gone).
pub fn thread_tracers(pid: i32) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
        if let Some(t) = st.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok()) {
            out.push((tid, t));
        }
    }
    out
}

/// Catches `tracer_proc` while one of its threads traces a thread of `target`: spins on
/// every target thread's `TracerPid`, and when it names a thread of `tracer_proc`,
/// SIGSTOPs `tracer_proc` and checks again once it is stopped (so the tracer cannot
/// detach between the check and what the caller does next). Returns the tracer thread
/// id, with `tracer_proc` left stopped; `None` if `tracer_proc` ended or `timeout`
/// passed without it being caught tracing.
pub fn stop_while_tracing(tracer_proc: i32, target: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    let is_ours = |tid: i32| tid != 0 && Path::new(&format!("/proc/{tracer_proc}/task/{tid}")).exists();
    while Instant::now() < deadline {
        if !pid_alive(tracer_proc) {
            return None;
        }
        if let Some(&(_, t)) = thread_tracers(target).iter().find(|(_, t)| is_ours(*t)) {
            // SAFETY: SIGSTOP to a child process the caller owns.
            unsafe { libc::kill(tracer_proc, libc::SIGSTOP) };
            let stopped = wait_until(Duration::from_secs(10), || {
                std::fs::read_dir(format!("/proc/{tracer_proc}/task"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .all(|e| proc_state_path(&e.path().join("stat")).is_none_or(|c| c == 'T' || c == 'Z'))
            });
            assert!(stopped, "tracer process {tracer_proc} did not stop on SIGSTOP");
            if thread_tracers(target).iter().any(|(_, tt)| *tt == t && is_ours(t)) {
                return Some(t);
            }
            // It detached between the two reads: let it go on and look again.
            // SAFETY: as above.
            unsafe { libc::kill(tracer_proc, libc::SIGCONT) };
        }
        std::thread::yield_now();
    }
    None
}

fn proc_state_path(stat: &Path) -> Option<char> {
    let s = std::fs::read_to_string(stat).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
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
    /// set for a real Linux guest
    guest: Option<GuestSpec>,
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

    /// The guest's spec (panics on a guest-less VM).
    pub fn guest(&self) -> &GuestSpec {
        self.guest.as_ref().unwrap_or_else(|| panic!("VM {} is not a guest VM", self.vmid))
    }

    /// The guest's serial console log (`<vmid>.serial.log`), lossy UTF-8.
    pub fn serial_log(&self) -> String {
        let p = self.lab_root.join("run/qemu-server").join(format!("{}.serial.log", self.vmid));
        String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
    }

    /// The guest's `LAB-GUEST: …` markers, in order.
    pub fn markers(&self) -> Vec<String> {
        self.serial_log()
            .lines()
            .filter_map(|l| l.split_once("LAB-GUEST: ").map(|(_, m)| m.trim().to_string()))
            .collect()
    }

    /// Wait until the guest printed a marker starting with `prefix`
    /// (`ready`, `wrote 3`, `silent`…); returns it. Panics after `timeout`
    /// naming the marker and the serial log's tail.
    pub fn wait_serial(&self, prefix: &str, timeout: Duration) -> String {
        let mut found = None;
        let ok = wait_until(timeout, || {
            found = self.markers().into_iter().find(|m| m.starts_with(prefix));
            found.is_some()
        });
        if !ok {
            let log = self.serial_log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "VM {}: guest printed no 'LAB-GUEST: {prefix}…' within {timeout:?}; serial tail:\n{}",
                self.vmid,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        found.unwrap()
    }

    /// Highest N of the guest's `wrote N` markers (0 before the first).
    pub fn guest_writes_done(&self) -> u64 {
        self.markers().iter().filter_map(|m| m.strip_prefix("wrote ")?.parse().ok()).max().unwrap_or(0)
    }

    /// Stall the guest's own next write (`scripts/lab wedge --how KIND`, after
    /// it is writing) and return the lab's proof: `wedged`, `stuck_write`,
    /// blockstats `t0`/`t1`, `virtio_t0`/`virtio_t1`, `fuse_write_threads`.
    pub fn wedge_guest(&self, kind: WedgeKind) -> Value {
        self.lab("wedge", &["--how", kind.arg()])
    }

    /// `lab probe`: raw virtio queues, blockstats and threads, as the lab sees them.
    pub fn probe(&self) -> Value {
        self.lab("probe", &[])
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
        // QEMU inherits `lab up`'s environment.
        cmd.envs(opts.qemu_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(q) = &opts.qemu {
            cmd.env("LAB_QEMU", q);
        }
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
        let vm = Vm { lab_root: self.root.clone(), vmid: opts.vmid, up, guest: None };
        self.vms.push(vm.clone());
        vm
    }

    /// A fresh root with one real Linux guest, booted (and, for write-once /
    /// steady, past its first completed write).
    pub fn up_guest(spec: GuestSpec) -> Lab {
        Lab::up_guests(vec![spec])
    }

    /// A fresh root with several guests, all booting at once (each `lab up`
    /// runs in parallel; TCG boots dominate the wall time), kept in the order
    /// given. Panics naming each guest that did not come up; the `Lab` still
    /// cleans up what did.
    pub fn up_guests(specs: Vec<GuestSpec>) -> Lab {
        let dir = fresh_root();
        let root = dir.path().to_path_buf();
        let mut lab = Lab { dir: Some(dir), root, vms: Vec::new(), children: Mutex::new(Vec::new()) };
        let handles: Vec<_> = specs
            .into_iter()
            .map(|spec| {
                let root = lab.root.clone();
                std::thread::spawn(move || {
                    let mut cmd = Command::new("python3");
                    cmd.arg(lab_script()).arg("up").arg("--root").arg(&root).args(spec.up_args());
                    (spec, run_bounded(&mut cmd, GUEST_UP_TIMEOUT))
                })
            })
            .collect();
        let mut failures = Vec::new();
        for h in handles {
            let (spec, out) = h.join().expect("lab up thread");
            let stdout = String::from_utf8_lossy(&out.stdout);
            match serde_json::from_str::<Value>(stdout.trim()) {
                Ok(up) if out.status.success() => {
                    lab.vms.push(Vm { lab_root: lab.root.clone(), vmid: spec.vmid, up, guest: Some(spec) })
                }
                _ => failures.push(format!(
                    "lab up guest {} ({spec:?}) failed ({}):\nstdout: {stdout}\nstderr: {}",
                    spec.vmid,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )),
            }
        }
        if !failures.is_empty() {
            // registers the guests that did start, so Drop tears down their helpers
            let vmids: Vec<u32> = lab.vms.iter().map(|v| v.vmid).collect();
            drop(lab);
            panic!("{} guest(s) did not come up (started: {vmids:?}):\n{}", failures.len(), failures.join("\n"));
        }
        lab
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
        live_pids_where(|argv| pidfile_arg(argv).is_some_and(|p| p.starts_with(&prefix)))
    }
}

impl Deref for Lab {
    type Target = Vm;
    /// The first VM (the one `Lab::start` created).
    fn deref(&self) -> &Vm {
        &self.vms[0]
    }
}

impl Lab {
    /// nbdkit / nbdfuse processes serving this lab's guests (their argv names
    /// a socket or mount point under this lab's unique root).
    fn guest_helper_pids(&self) -> Vec<i32> {
        let root = format!("{}/", self.root.display());
        live_pids_where(|argv| {
            let prog = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a));
            matches!(prog, Some("nbdkit" | "nbdfuse")) && argv.iter().any(|a| a.contains(&root))
        })
    }

    /// Mount points under this lab's root (the guests' FUSE images).
    fn mounts_under_root(&self) -> Vec<String> {
        let root = format!("{}/", self.root.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|m| m.replace("\\040", " ")))
            .filter(|m| m.starts_with(&root))
            .collect()
    }

    /// Guests bring helpers (nbdkit, nbdfuse + a FUSE mount): `lab down`
    /// ends them after QEMU; then anything left is swept by argv and mount.
    fn teardown_guest_helpers(&self) {
        let records = std::fs::read_dir(self.run_dir())
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".lab-guest.json")))
            .unwrap_or(false);
        if !records && self.vms.iter().all(|v| v.guest.is_none()) && self.mounts_under_root().is_empty() {
            return;
        }
        let mut cmd = Command::new("python3");
        cmd.arg(lab_script()).arg("down").arg("--root").arg(&self.root).arg("--all");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            if !wait_until(Duration::from_secs(60), || matches!(child.try_wait(), Ok(Some(_)))) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for m in self.mounts_under_root() {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&m).stdin(Stdio::null()).status();
        }
        for pid in self.guest_helper_pids() {
            sigkill(pid);
        }
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
        // 1b. guests: QEMU first, then their NBD servers and FUSE mounts
        self.teardown_guest_helpers();
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

/// Live processes (not zombies) whose cmdline satisfies `f`.
pub fn live_pids_where(f: impl Fn(&[String]) -> bool) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_cmdline(pid).is_some_and(|a| f(&a)) && pid_alive(pid))
        .collect()
}

/// Whether any live process has exactly this argv.
pub fn proc_cmdline_exists(argv: &[&str]) -> bool {
    !live_pids_where(|a| a == argv).is_empty()
}

/// Mounts a tmpfs of `size` at `dir`. CI runs as root with CAP_SYS_ADMIN, so a refusal
/// fails the test naming what is missing (it must never pass untested).
pub fn tmpfs(dir: &Path, size: &str) -> Mounted {
    std::fs::create_dir_all(dir).unwrap();
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mount(8): {e}; this test needs util-linux mount"));
    assert!(
        o.status.success(),
        "mount -t tmpfs refused ({}): this test needs root with CAP_SYS_ADMIN",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Mounted(dir.to_path_buf())
}

pub struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
