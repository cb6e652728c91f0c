//! Which process is VM `<VMID>`'s QEMU, proven the way Proxmox proves it.
//!
//! In: a VMID and the Proxmox layout (run dir, pve dir, node name). Out: a [`Target`] whose
//! pid has been checked against `/proc/PID/cmdline`: the command line must name this VM's
//! pidfile (`-pidfile <path>`, Proxmox's own `vm_running_locally` rule) or its QMP socket.
//! Nothing is signalled, traced or sent QMP before that proof, and [`Target::still_same`]
//! repeats it (plus the start time, against pid reuse) before anything invasive.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::exit::Exit;
use crate::procfs;

/// A Proxmox VMID: an integer from 100 to 999999999, written without sign or leading zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct VmId(u32);

impl VmId {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for VmId {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TargetError::BadVmid(s.chars().take(40).collect());
        if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
            return Err(bad());
        }
        let n: u32 = s.parse().map_err(|_| bad())?;
        if n < 100 {
            return Err(bad());
        }
        Ok(VmId(n))
    }
}

/// Where Proxmox keeps a VM's runtime and config files.
#[derive(Debug, Clone)]
pub struct Layout {
    pub run_dir: PathBuf,
    pub pve_dir: PathBuf,
    pub node: String,
}

impl Layout {
    pub fn pidfile(&self, vmid: VmId) -> PathBuf {
        self.run_dir.join(format!("{vmid}.pid"))
    }
    pub fn qmp_socket(&self, vmid: VmId) -> PathBuf {
        self.run_dir.join(format!("{vmid}.qmp"))
    }
    pub fn config(&self, vmid: VmId) -> PathBuf {
        self.pve_dir.join("qemu-server").join(format!("{vmid}.conf"))
    }
    pub fn vmlist(&self) -> PathBuf {
        self.pve_dir.join(".vmlist")
    }
}

/// Why a VMID did not resolve to a process we may touch. Each message is one line that
/// says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid VMID {0:?}: expected an integer from 100 to 999999999, as `qm list` shows it")]
    BadVmid(String),
    #[error("VM {vmid} runs on node {node}, not on this node ({local}): run wedge-autopsy on {node}")]
    OtherNode { vmid: VmId, node: String, local: String },
    #[error("VM {vmid} is not in the cluster's VM list ({path}): check the VMID with `qm list` or `pvesh get /cluster/resources`")]
    UnknownVm { vmid: VmId, path: String },
    #[error("no {dir}: is this a Proxmox node? QEMU's pidfiles are not where {what} puts them; use --run-dir DIR (or run_dir in the config)")]
    LayoutMissing { dir: String, what: &'static str },
    #[error("VM {vmid} is not running on this node (no pidfile at {pidfile}): nothing to capture; confirm with `qm status {vmid}` or point --run-dir at the right place")]
    NotRunning { vmid: VmId, pidfile: String },
    #[error("VM {vmid} is not running: pidfile {pidfile} names pid {pid}, which does not exist (stale pidfile); confirm with `qm status {vmid}`")]
    StalePidfile { vmid: VmId, pidfile: String, pid: i32 },
    #[error("refusing pid {pid}: {reason}; nothing was signalled, traced or queried. Check `cat /proc/{pid}/cmdline | tr '\\0' ' '` and the pidfile {pidfile}")]
    NotProven { pid: i32, pidfile: String, reason: String },
    #[error("cannot read pidfile {pidfile}: {detail}; run as root or check --run-dir")]
    Pidfile { pidfile: String, detail: String },
    #[error("QMP socket {path} is missing although pid {pid} is VM {vmid}'s QEMU: capture without QMP using --no-qmp, or check the VM's -chardev option")]
    SocketMissing { vmid: VmId, pid: i32, path: String },
    #[error("reading /proc/{pid}/cmdline did not finish within {secs}s (the process's memory lock is held): capture with `--stacks none` is not possible without proof; see `cat /proc/{pid}/stack`")]
    CmdlineTimeout { pid: i32, secs: u64 },
}

impl TargetError {
    pub fn exit(&self) -> Exit {
        match self {
            TargetError::BadVmid(_) | TargetError::LayoutMissing { .. } => Exit::BadInput,
            _ => Exit::Refused,
        }
    }
}

/// How the pid was proven to be the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proof {
    Pidfile,
    QmpSocket,
}

/// A process proven to be VM `vmid`'s QEMU.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub vmid: VmId,
    pub pid: i32,
    /// `/proc/PID/stat` start time: (pid, starttime) names one process for good.
    pub starttime: u64,
    pub proof: Proof,
    pub pidfile: PathBuf,
    pub qmp_socket: PathBuf,
    pub config_path: PathBuf,
    pub cmdline: Vec<String>,
    /// Whether the QMP socket file exists.
    pub qmp_present: bool,
    pub node: String,
    /// The libvirt domain, when the runbook's target names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// How QMP is reached: the socket itself, or through `virsh` (libvirtd owns it).
    #[serde(default)]
    pub monitor: Monitor,
}

impl Target {
    /// The VM's name from `-name <name>[,debug-threads=on]`, if given.
    pub fn name(&self) -> Option<String> {
        let i = self.cmdline.iter().position(|a| a == "-name")?;
        name_from_opts(self.cmdline.get(i + 1)?)
    }

    /// Re-proves the target: same start time (no pid reuse) and a command line that still
    /// names the pidfile or socket. Call right before any signal, ptrace or kill.
    pub fn still_same(&self) -> bool {
        let stat = procfs::parse_stat_file(&format!("/proc/{}/stat", self.pid));
        if !matches!(stat, Ok(ref s) if s.starttime == self.starttime) {
            return false;
        }
        match read_cmdline_bounded(self.pid, Duration::from_secs(2)) {
            Ok(Some(argv)) => proof(&argv, &self.pidfile, &self.qmp_socket).is_some(),
            _ => false,
        }
    }
}

/// How the tool reaches a VM's QMP monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Monitor {
    /// Connect to the socket (Proxmox, plain QEMU).
    #[default]
    Socket,
    /// `virsh qemu-monitor-command <domain> <json>`: libvirtd holds the socket for good.
    Virsh { program: String },
}

/// Where a runbook says a VM's process and monitor live, when not in Proxmox's layout.
/// Templates take `{vmid}`, `{domain}`, `{run_dir}` and `{pve_dir}`; `qmp` may hold `*`
/// within one path component (libvirt's `domain-<boot id>-<name>` directory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSpec {
    pub pidfile: Option<String>,
    pub qmp: Option<String>,
    pub domain: Option<String>,
    pub monitor: Monitor,
    /// Check Proxmox's `.vmlist` for the node (off for libvirt and plain QEMU hosts).
    pub cluster: bool,
}

impl TargetSpec {
    /// Proxmox VE: `<run_dir>/<vmid>.pid`, `<run_dir>/<vmid>.qmp`, `.vmlist` checked.
    pub fn proxmox() -> TargetSpec {
        TargetSpec { cluster: true, ..Default::default() }
    }

    fn render(&self, template: &str, vmid: VmId, layout: &Layout, domain: &str) -> String {
        template
            .replace("{vmid}", &vmid.to_string())
            .replace("{domain}", domain)
            .replace("{run_dir}", &layout.run_dir.display().to_string())
            .replace("{pve_dir}", &layout.pve_dir.display().to_string())
    }
}

/// Resolves and proves VM `vmid`'s QEMU process in Proxmox's layout. Reads files only.
pub fn resolve(vmid: VmId, layout: &Layout) -> Result<Target, TargetError> {
    resolve_with(vmid, layout, &TargetSpec::proxmox())
}

/// [`resolve`] for a runbook's target layout. The proof rule is the same: the command
/// line must name the pidfile or the monitor socket (which may be a `*` pattern here).
pub fn resolve_with(vmid: VmId, layout: &Layout, spec: &TargetSpec) -> Result<Target, TargetError> {
    if spec.cluster {
        check_vmlist(vmid, layout)?;
    }
    let domain = spec.domain.as_deref().map(|d| spec.render(d, vmid, layout, ""));
    let dom = domain.clone().unwrap_or_default();
    let pidfile = spec
        .pidfile
        .as_deref()
        .map(|t| PathBuf::from(spec.render(t, vmid, layout, &dom)))
        .unwrap_or_else(|| layout.pidfile(vmid));
    let mut qmp_socket = spec
        .qmp
        .as_deref()
        .map(|t| PathBuf::from(spec.render(t, vmid, layout, &dom)))
        .unwrap_or_else(|| layout.qmp_socket(vmid));
    let shown = pidfile.display().to_string();
    let text = match std::fs::read_to_string(&pidfile) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No directory at all is a wrong layout (or host), not a stopped VM.
            if let Some(dir) = pidfile.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                let what = if spec.pidfile.is_some() { "the runbook's [target]" } else { "Proxmox VE" };
                return Err(TargetError::LayoutMissing { dir: dir.display().to_string(), what });
            }
            return Err(TargetError::NotRunning { vmid, pidfile: shown });
        }
        Err(e) => return Err(TargetError::Pidfile { pidfile: shown, detail: e.to_string() }),
    };
    let pid: i32 = match text.trim().parse() {
        Ok(p) if p > 1 => p,
        _ => {
            return Err(TargetError::Pidfile {
                pidfile: shown,
                detail: format!("content {:?} is not a pid", text.trim().chars().take(20).collect::<String>()),
            })
        }
    };
    let stat = match procfs::parse_stat_file(&format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return Err(TargetError::StalePidfile { vmid, pidfile: shown, pid }),
    };
    let argv = match read_cmdline_bounded(pid, Duration::from_secs(3)) {
        Ok(Some(a)) => a,
        Ok(None) => return Err(TargetError::CmdlineTimeout { pid, secs: 3 }),
        Err(_) => return Err(TargetError::StalePidfile { vmid, pidfile: shown, pid }),
    };
    // A `*` in the monitor path is resolved from the command line itself.
    if qmp_socket.to_string_lossy().contains('*') {
        if let Some(found) = socket_paths(&argv).into_iter().find(|p| glob_match(&qmp_socket.to_string_lossy(), p)) {
            qmp_socket = PathBuf::from(found);
        }
    }
    let Some(proof) = proof(&argv, &pidfile, &qmp_socket) else {
        let what = argv.first().map(String::as_str).unwrap_or("a kernel thread");
        return Err(TargetError::NotProven {
            pid,
            pidfile: shown,
            reason: format!(
                "its command line ({what} …) names neither {} nor {}, so it is not proven to be VM {vmid}'s QEMU (the pid may have been reused)",
                pidfile.display(),
                qmp_socket.display()
            ),
        });
    };
    // The start time read before the cmdline might belong to a process that exited
    // and whose pid was reused in between; read it again.
    match procfs::parse_stat_file(&format!("/proc/{pid}/stat")) {
        Ok(s) if s.starttime == stat.starttime => {}
        _ => return Err(TargetError::StalePidfile { vmid, pidfile: shown, pid }),
    }
    Ok(Target {
        vmid,
        pid,
        starttime: stat.starttime,
        proof,
        qmp_present: qmp_socket.exists(),
        pidfile,
        qmp_socket,
        config_path: layout.config(vmid),
        cmdline: argv,
        node: layout.node.clone(),
        domain,
        monitor: spec.monitor.clone(),
    })
}

/// Every unix socket path named in `-chardev`/`-qmp`/`-monitor` options.
fn socket_paths(argv: &[String]) -> Vec<String> {
    argv.windows(2)
        .filter(|w| matches!(w[0].as_str(), "-chardev" | "-qmp" | "-monitor" | "--chardev" | "--qmp" | "--monitor"))
        .flat_map(|w| option_paths(&w[1]))
        .collect()
}

/// `*` matches any run of characters except `/`; everything else literally.
fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else { return false };
            (0..=rest.len())
                .take_while(|&i| !rest[..i].contains('/'))
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// Cluster check: a VM listed for another node is refused with that node's name.
fn check_vmlist(vmid: VmId, layout: &Layout) -> Result<(), TargetError> {
    let path = layout.vmlist();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(()); // standalone host or plain QEMU: no cluster map
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(()); // an unreadable map must not block an autopsy; the pid proof still holds
    };
    let Some(ids) = json.get("ids").and_then(|v| v.as_object()) else { return Ok(()) };
    match ids.get(&vmid.to_string()) {
        None => Err(TargetError::UnknownVm { vmid, path: path.display().to_string() }),
        Some(entry) => match entry.get("node").and_then(|n| n.as_str()) {
            Some(node) if node != layout.node => {
                Err(TargetError::OtherNode { vmid, node: node.to_string(), local: layout.node.clone() })
            }
            _ => Ok(()),
        },
    }
}

/// Whether `argv` names `pidfile` after `-pidfile`, or `qmp` as a unix socket path in a
/// `-chardev`/`-qmp` option. Paths compare literally or after resolving symlinks
/// (`/var/run` is a link to `/run`).
pub fn proof(argv: &[String], pidfile: &Path, qmp: &Path) -> Option<Proof> {
    let same = |a: &str, b: &Path| {
        Path::new(a) == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    };
    let mut it = argv.iter().skip(1).peekable();
    let mut socket_named = false;
    while let Some(arg) = it.next() {
        let opt = arg.trim_start_matches('-');
        let takes_value = arg.starts_with('-');
        if takes_value && opt == "pidfile" {
            if it.peek().is_some_and(|v| same(v, pidfile)) {
                return Some(Proof::Pidfile);
            }
        } else if takes_value && (opt == "chardev" || opt == "qmp" || opt == "monitor") {
            if let Some(value) = it.peek() {
                socket_named |= option_paths(value).iter().any(|p| same(p, qmp));
            }
        }
    }
    socket_named.then_some(Proof::QmpSocket)
}

/// A QEMU option value split at its commas: `socket,id=qmp,path=/x` → `["socket",
/// "id=qmp", "path=/x"]`. QEMU escapes a literal comma as `,,`.
pub fn split_qemu_opts(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// The name in a `-name` value: `devvm,debug-threads=on` or `guest=devvm,…`.
pub fn name_from_opts(value: &str) -> Option<String> {
    let first = split_qemu_opts(value).into_iter().next()?;
    let name = first.strip_prefix("guest=").map(str::to_string).unwrap_or(first);
    (!name.is_empty()).then_some(name)
}

/// Paths in a QEMU option value: `socket,id=qmp,path=/x,server=on` or `unix:/x,server`.
fn option_paths(value: &str) -> Vec<String> {
    split_qemu_opts(value)
        .into_iter()
        .filter_map(|p| p.strip_prefix("path=").or_else(|| p.strip_prefix("unix:")).map(str::to_string))
        .collect()
}

/// Reads `/proc/PID/cmdline` on a helper thread: the read takes the target's mmap lock
/// and can block behind a stuck thread. `Ok(None)` means it did not finish in time.
pub fn read_cmdline_bounded(pid: i32, limit: Duration) -> std::io::Result<Option<Vec<String>>> {
    static STUCK: std::sync::OnceLock<std::sync::Arc<crate::stuck::Stuck>> = std::sync::OnceLock::new();
    // A read still stuck from an earlier call gets the same answer as a timeout, without
    // another thread (repeated proofs of a hung process must not pile threads up).
    let stuck = STUCK.get_or_init(|| crate::stuck::Stuck::new(64));
    match crate::stuck::bounded_blocking(stuck, &format!("/proc/{pid}/cmdline"), limit, move || {
        procfs::read_cmdline(pid)
    }) {
        Ok(r) => r.map(Some),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn vmid_bounds() {
        for ok in ["100", "102", "999999999"] {
            assert!(ok.parse::<VmId>().is_ok(), "{ok}");
        }
        for bad in ["", "99", "0102", "1000000000", "-102", "+102", "10 2", "abc", "102;rm", "１０２"] {
            assert!(bad.parse::<VmId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn proof_by_pidfile_or_socket_only() {
        let pf = Path::new("/var/run/qemu-server/102.pid");
        let qmp = Path::new("/var/run/qemu-server/102.qmp");
        let by_pidfile = argv("/usr/bin/kvm -id 102 -pidfile /var/run/qemu-server/102.pid -daemonize");
        assert_eq!(proof(&by_pidfile, pf, qmp), Some(Proof::Pidfile));
        let by_socket =
            argv("/usr/bin/kvm -chardev socket,id=qmp,path=/var/run/qemu-server/102.qmp,server=on,wait=off");
        assert_eq!(proof(&by_socket, pf, qmp), Some(Proof::QmpSocket));
        let other_vm = argv("/usr/bin/kvm -pidfile /var/run/qemu-server/1020.pid -chardev socket,id=qmp,path=/var/run/qemu-server/1020.qmp");
        assert_eq!(proof(&other_vm, pf, qmp), None);
        // The path must be the value of -pidfile, not merely appear somewhere.
        let mention = argv("/usr/bin/sleep /var/run/qemu-server/102.pid");
        assert_eq!(proof(&mention, pf, qmp), None);
        let name_only = argv("/usr/bin/kvm -name path=/var/run/qemu-server/102.qmp");
        assert_eq!(proof(&name_only, pf, qmp), None);
    }

    #[test]
    fn globs_stay_within_one_component() {
        assert!(glob_match("/l/domain-*-web/monitor.sock", "/l/domain-12-web/monitor.sock"));
        assert!(!glob_match("/l/domain-*-web/monitor.sock", "/l/domain-1/x-web/monitor.sock"));
        assert!(!glob_match("/l/domain-*-web/monitor.sock", "/l/domain-1-web2/monitor.sock"));
    }

    #[test]
    fn names_with_escaped_commas() {
        assert_eq!(name_from_opts("guest=a,,b,debug-threads=on").as_deref(), Some("a,b"));
        assert_eq!(name_from_opts("devvm,debug-threads=on").as_deref(), Some("devvm"));
        assert_eq!(name_from_opts(",debug-threads=on"), None);
    }

    #[test]
    fn escaped_commas_in_paths() {
        assert_eq!(option_paths("socket,id=q,path=/a,,b.qmp,server=on"), vec!["/a,b.qmp".to_string()]);
        assert_eq!(option_paths("unix:/x.qmp,server,nowait"), vec!["/x.qmp".to_string()]);
    }

    #[test]
    fn vmlist_other_node_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(".vmlist"),
            r#"{"version": 3, "ids": {"102": {"node": "pve2", "type": "qemu", "version": 1}}}"#,
        )
        .unwrap();
        let layout = Layout { run_dir: dir.path().join("run"), pve_dir: dir.path().into(), node: "pve1".into() };
        let e = resolve("102".parse().unwrap(), &layout).unwrap_err();
        assert!(matches!(e, TargetError::OtherNode { ref node, .. } if node == "pve2"), "{e}");
        assert!(e.to_string().contains("run wedge-autopsy on pve2"));
        let e = resolve("103".parse().unwrap(), &layout).unwrap_err();
        assert!(matches!(e, TargetError::UnknownVm { .. }), "{e}");
    }

    #[test]
    fn a_missing_run_dir_is_named_not_reported_as_a_stopped_vm() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout { run_dir: dir.path().join("nope"), pve_dir: dir.path().into(), node: "n".into() };
        let e = resolve("102".parse().unwrap(), &layout).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("no {}: is this a Proxmox node?", dir.path().join("nope").display())),
            "{msg}"
        );
        assert!(msg.contains("--run-dir") && !msg.contains("not running"), "{msg}");
        assert_eq!(e.exit(), Exit::BadInput);
        std::fs::create_dir(dir.path().join("nope")).unwrap();
        let e = resolve("102".parse().unwrap(), &layout).unwrap_err();
        assert!(matches!(e, TargetError::NotRunning { .. }), "{e}");
    }

    #[test]
    fn unrelated_process_in_pidfile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        // This test process is certainly not VM 102's QEMU.
        std::fs::write(run.join("102.pid"), format!("{}\n", std::process::id())).unwrap();
        let layout = Layout { run_dir: run, pve_dir: dir.path().into(), node: "n".into() };
        let e = resolve("102".parse().unwrap(), &layout).unwrap_err();
        assert!(matches!(e, TargetError::NotProven { .. }), "{e}");
        assert_eq!(e.exit(), Exit::Refused);
    }
}
