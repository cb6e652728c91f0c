//! Proxmox VE context around a wedge: the VM's task and backup logs (captured as
//! bounded, redacted data), and what the captured files say about versions, backups, HA,
//! pending changes and an imminent stop.
//!
//! In: files under `log_dir` at capture time; evidence files afterwards. Out: archive
//! files under `pve/` and a [`PveFindings`] recomputable from any archive. Nothing read
//! from a log is ever interpreted beyond the UPID fields: it is text to show, escaped.

mod upid;
pub mod vmconfig;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

pub use upid::Upid;

use crate::archive::Evidence;
use crate::step::{StepOutcome, StepSink};

/// Task types that end with the VM's QEMU gone (qm stop/shutdown/reboot, HA's and
/// vzdump's stop mode use these too).
const STOPPING_TASKS: &[&str] = &["qmstop", "qmshutdown", "qmreboot", "qmdestroy", "hastop"];
/// HA service states in which the running QEMU on this node is about to end, and how.
const HA_STOP_STATES: &[(&str, &str)] = &[
    ("stopped", "its resource manager will stop the running QEMU"),
    ("request_stop", "its resource manager will stop the running QEMU"),
    ("disabled", "its resource manager will stop the running QEMU"),
    ("relocate", "its resource manager will stop the running QEMU and start the VM on another node"),
    ("migrate", "it is being migrated: this QEMU ends when the migration completes"),
    ("freeze", "the node is shutting down (shutdown policy freeze), which stops its guests"),
    ("fence", "this node is being fenced (its watchdog resets it)"),
    ("recovery", "the VM is being recovered on another node"),
];
/// Most task logs taken per run, newest first.
const MAX_TASK_LOGS: usize = 8;
/// Lines of the active task list read at most (the file is rewritten, not appended).
const MAX_ACTIVE_BYTES: u64 = 4 << 20;

/// The last `cap` bytes of `path`, starting at a line boundary when cut.
/// Returns the bytes and whether the file was longer.
pub fn tail(path: &Path, cap: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let cut = len > cap;
    if cut {
        f.seek(SeekFrom::Start(len - cap))?;
    }
    let mut buf = Vec::new();
    f.take(cap).read_to_end(&mut buf)?;
    if cut {
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            buf.drain(..=nl);
        }
    }
    Ok((buf, cut))
}

/// Log text with secret-looking values replaced: `key=value` and `key: value` tokens
/// whose key looks secret (password, token, …), and the value after `--password`-like
/// flags. Everything else is kept as written.
pub fn redact_log(text: &str) -> String {
    use crate::redact::{is_secret_key, REDACTED};
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut hide_next = false;
        let words: Vec<String> = line
            .split(' ')
            .map(|w| {
                if std::mem::take(&mut hide_next) && !w.is_empty() {
                    return REDACTED.to_string();
                }
                if let Some((k, _)) = w.split_once('=') {
                    if is_secret_key(k.trim_start_matches('-')) {
                        return format!("{k}={REDACTED}");
                    }
                }
                let bare = w.trim_start_matches('-').trim_end_matches(':');
                if !bare.is_empty()
                    && bare.len() < 40
                    && is_secret_key(bare)
                    && (w.starts_with("--") || w.ends_with(':'))
                {
                    hide_next = true;
                }
                w.to_string()
            })
            .collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// One task of the active list that concerns the VM.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEntry {
    pub upid: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub user: String,
    pub node: String,
    /// Unix time the task started.
    pub starttime: i64,
    /// `running`, or the end status the list records (`OK`, an error text).
    pub status: String,
    /// Archive path of the task log's tail, when it was read.
    pub log: Option<String>,
}

/// The `pve-tasks` step: the VM's lines of `<log_dir>/pve/tasks/active` (and running
/// vzdump jobs, whose id may name no VM) into `pve/tasks/active.txt`, the tail of each
/// such task's log into `pve/tasks/<upid>.log`, and the parsed entries into `output`.
pub fn capture_tasks(log_dir: &Path, vmid: &str, output: &str, log_cap: u64, sink: &StepSink) -> StepOutcome {
    let tasks_dir = log_dir.join("pve/tasks");
    let active = tasks_dir.join("active");
    let text = match crate::procfs::read_capped(&active, MAX_ACTIVE_BYTES) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return StepOutcome::Skipped(format!(
                "unavailable: no {} (not a Proxmox VE node, or a different --log-dir)",
                active.display()
            ))
        }
        Err(e) => return StepOutcome::Failed(format!("cannot read {}: {e}", active.display())),
    };
    let mut lines = Vec::new();
    let mut entries: Vec<TaskEntry> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(u) = parts.next().and_then(Upid::parse) else { continue };
        if u.id != vmid && !(u.kind == "vzdump" && (u.id.is_empty() || u.id.split(',').any(|i| i == vmid))) {
            continue;
        }
        // `active` holds the UPID, then (once finished) the end time in hex and the status.
        let rest: Vec<&str> = parts.collect();
        let status = if rest.len() >= 2 { rest[1..].join(" ") } else { "running".to_string() };
        lines.push(line.to_string());
        entries.push(TaskEntry {
            upid: u.text.clone(),
            kind: u.kind.clone(),
            id: u.id.clone(),
            user: u.user.clone(),
            node: u.node.clone(),
            starttime: u.starttime,
            status,
            log: None,
        });
    }
    if let Err(e) = sink.write("pve/tasks/active.txt", redact_log(&lines.join("\n")).as_bytes()) {
        return StepOutcome::Failed(e.to_string());
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.starttime));
    for e in entries.iter_mut().take(MAX_TASK_LOGS) {
        let Some(u) = Upid::parse(&e.upid) else { continue };
        let Some(path) = u.log_path(&tasks_dir) else {
            sink.note(format!("{}: not a usable log path; not read", u.file_name()));
            continue;
        };
        match tail(&path, log_cap) {
            Ok((bytes, cut)) => {
                let rel = format!("pve/tasks/{}.log", u.file_name());
                if cut {
                    sink.note(format!("{rel}: last {log_cap} bytes kept"));
                }
                match sink.write(&rel, redact_log(&String::from_utf8_lossy(&bytes)).as_bytes()) {
                    Ok(()) => e.log = Some(rel),
                    Err(err) => sink.note(format!("{rel}: {err}")),
                }
            }
            Err(err) => sink.note(format!("task log of {}: {err}", u.file_name())),
        }
    }
    if entries.len() > MAX_TASK_LOGS {
        sink.note(format!("{} tasks; logs of the newest {MAX_TASK_LOGS} kept", entries.len()));
    }
    let doc = json!({ "vmid": vmid, "tasks": entries });
    match sink.write(output, &serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
        Ok(()) => StepOutcome::Ok,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

/// What the archive says about the VM as a Proxmox VE guest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PveFindings {
    /// `major.minor.micro` from query-version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// query-version's `package`, e.g. `pve-qemu-kvm_10.1.2-1` or `Debian 1:7.2+dfsg-7`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// The pve-qemu-kvm build (`10.1.2-1`), when the package names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pve_qemu_build: Option<String>,
    /// Key lines of `pveversion --verbose` (proxmox-ve, pve-manager, qemu-server, pve-qemu-kvm).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pveversion: Vec<String>,
    /// Whether QEMU is Proxmox's build, from query-proxmox-support's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxmox_qemu: Option<String>,
    /// query-backup, one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// Last lines of the VM's vzdump log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vzdump_tail: Vec<String>,
    /// The VM's line of `ha-manager status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha: Option<String>,
    /// `[PENDING]` changes, compared as option sets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// The config's `lock:` (backup, migrate, snapshot, …) and what it means here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    /// Something is about to stop this QEMU (qmeventd, a stop task, HA), with what to do.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_imminent: Vec<String>,
    /// query-stats samples captured (vm and vcpu targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
}

/// Lines kept of the vzdump log in the findings (the archive has the whole tail).
const VZDUMP_LINES: usize = 5;

/// Computes [`PveFindings`] from evidence files alone (live run and archive alike).
pub fn findings(ev: &dyn Evidence) -> PveFindings {
    let mut f = PveFindings::default();
    let vmid = ev
        .list()
        .iter()
        .find_map(|p| p.strip_prefix("config/")?.strip_suffix(".conf").map(str::to_string))
        .unwrap_or_default();
    if let Some(v) = ev.read_json("qmp/query-version.json") {
        let q = &v["return"]["qemu"];
        if let (Some(a), Some(b), Some(c)) = (q["major"].as_u64(), q["minor"].as_u64(), q["micro"].as_u64()) {
            f.qemu_version = Some(format!("{a}.{b}.{c}"));
        }
        if let Some(p) = v["return"]["package"].as_str().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            f.pve_qemu_build = pve_build(p);
            f.package = Some(p.to_string());
        }
    }
    if let Some(text) = ev.read_string("commands/pveversion.txt") {
        f.pveversion = text
            .lines()
            .filter(|l| {
                ["proxmox-ve:", "pve-manager/", "pve-manager:", "qemu-server:", "pve-qemu-kvm:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(str::to_string)
            .collect();
    }
    if let Some(v) = ev.read_json("qmp/query-proxmox-support.json") {
        f.proxmox_qemu = Some(match (&v["return"], &v["error"]) {
            (r, _) if r.is_object() => {
                let pbs = r["pbs-library-version"].as_str().map(|s| format!(", pbs-library {s}")).unwrap_or_default();
                format!("yes (query-proxmox-support answered{pbs})")
            }
            (_, e) if e.is_object() => format!("no ({})", e["class"].as_str().unwrap_or("error")),
            _ => "unknown".into(),
        });
    }
    let backup_active = match ev.read_json("qmp/query-backup.json") {
        Some(v) => {
            f.backup = backup(&v);
            v["return"]["status"].as_str() == Some("active")
        }
        None => false,
    };
    if let Some(v) = ev.read_json("pve/tasks.json") {
        for t in v["tasks"].as_array().into_iter().flatten() {
            let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
            let started = chrono::DateTime::from_timestamp(t["starttime"].as_i64().unwrap_or(0), 0)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            f.tasks.push(format!("{} {} by {} started {started}: {}", s("type"), s("id"), s("user"), s("status")));
            if s("status") == "running" && STOPPING_TASKS.contains(&s("type").as_str()) {
                f.stop_imminent.push(format!(
                    "a {} task is running for this VM ({}): it sends QMP quit, then SIGTERM, then SIGKILL, and the process with its evidence will be gone; the archive holds what was captured, so take anything else (a core: --runbook qemu-wedge-full) now",
                    s("type"),
                    s("upid")
                ));
            }
        }
    }
    if let Some(text) = ev.read_string("logs/vzdump.log") {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        f.vzdump_tail = lines[lines.len().saturating_sub(VZDUMP_LINES)..].iter().map(|l| l.to_string()).collect();
    }
    if let Some(text) = ev.read_string("commands/ha-manager.txt") {
        let key = format!("vm:{vmid}");
        if let Some(line) = text.lines().find(|l| !vmid.is_empty() && l.split_whitespace().any(|w| w == key)) {
            f.ha = Some(line.trim().to_string());
            // `service vm:102 (pve1, started)`
            let state = line.rsplit_once(',').map(|(_, s)| s.trim().trim_end_matches(')').trim()).unwrap_or("");
            if let Some((_, what)) = HA_STOP_STATES.iter().find(|(s, _)| *s == state) {
                f.stop_imminent.push(format!(
                    "HA has this VM in state {state}: {what}, destroying the evidence; to hold HA off: `ha-manager set vm:{vmid} --state ignored` until you are done"
                ));
            }
        }
    }
    if let Some(text) = ev.read_string(&format!("config/{vmid}.conf")) {
        let cfg = vmconfig::PveConfig::parse(&text);
        f.pending = vmconfig::pending_section(&text).map(|p| vmconfig::pending_changes(&cfg, &p)).unwrap_or_default();
        if let Some(lock) = cfg.keys.get("lock") {
            let vzdump_running = f.tasks.iter().any(|t| t.starts_with("vzdump") && t.ends_with(": running"));
            f.lock = Some(lock_meaning(&crate::qmp::one_line(lock, 40), backup_active || vzdump_running));
        }
    }
    if ev.read_json("qmp/query-status.json").and_then(|v| v["return"]["status"].as_str().map(str::to_string)).as_deref()
        == Some("shutdown")
    {
        // qemu-server's qmeventd: on SHUTDOWN it checks query-status and, unless a vzdump
        // backup is attached, sends QMP quit (SIGTERM only if that write fails), then
        // SIGKILLs after its -t timeout (60 s by default).
        f.stop_imminent.push(if backup_active {
            "the guest shut itself down (status shutdown) while a vzdump backup runs: qmeventd keeps QEMU alive until the backup ends, then sends QMP quit and SIGKILLs it 60 s later (qmeventd -t), which destroys the evidence; take anything else now (a core: --runbook qemu-wedge-full)".into()
        } else {
            "the guest shut itself down (status shutdown): qmeventd sends QMP quit (SIGTERM only if it cannot) and SIGKILLs the process 60 s later (qmeventd -t), which destroys the evidence; take anything else now (a core: --runbook qemu-wedge-full); only stopping qmeventd.service holds it off, and that affects every VM on this node".into()
        });
    }
    f.stats = stats(ev);
    f
}

/// What a config lock means for this wedge. `qm stop`/`qm start` (and so a restart
/// through Proxmox) refuse while the VM is locked; a `backup` lock with no backup running
/// is the classic leftover of a vzdump that hung with the VM. `backup_running`: QMP's
/// query-backup says active, or a vzdump task for the VM is running.
fn lock_meaning(lock: &str, backup_running: bool) -> String {
    let what = match lock {
        "backup" if backup_running => "a vzdump backup holds it and is running (see Backup and the vzdump log)",
        "backup" => {
            "set by vzdump, but no running backup was seen: most likely left behind by a backup that hung with this VM; remove it with `qm unlock <vmid>` only once the capture is sealed and no vzdump process remains"
        }
        "migrate" => "a migration holds it (a wedged VM's migration may never finish)",
        "snapshot" | "snapshot-delete" | "rollback" => "a snapshot operation holds it",
        "suspending" | "suspended" => "the VM is being or was suspended to disk",
        _ => "a Proxmox operation holds it",
    };
    format!("{lock}: {what}; qm stop/start (and a restart through Proxmox) refuse while it is set")
}

/// `pve-qemu-kvm_10.1.2-1` → `10.1.2-1`.
pub fn pve_build(package: &str) -> Option<String> {
    let rest = package.trim().trim_start_matches('(').strip_prefix("pve-qemu-kvm_")?;
    let v: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || ".-+~:".contains(*c)).collect();
    (!v.is_empty()).then_some(v)
}

fn backup(v: &Value) -> Option<String> {
    if let Some(e) = v["error"].as_object() {
        return Some(format!(
            "unavailable: {} (query-backup exists only in Proxmox's QEMU)",
            e.get("class").and_then(Value::as_str).unwrap_or("error")
        ));
    }
    let r = &v["return"];
    let status = r["status"].as_str()?;
    let mut s = format!("status {}", crate::qmp::one_line(status, 40));
    if let (Some(done), Some(total)) = (r["transferred"].as_u64(), r["total"].as_u64()) {
        s.push_str(&format!(", {done} of {total} bytes transferred"));
    }
    if let Some(start) = r["start-time"].as_i64().and_then(|t| chrono::DateTime::from_timestamp(t, 0)) {
        s.push_str(&format!(", started {}", start.format("%Y-%m-%d %H:%M:%S UTC")));
    }
    if status == "active" {
        s.push_str(
            ": a backup is running against this VM (wedges cluster around vzdump/PBS backups; see the vzdump log)",
        );
    }
    Some(s)
}

fn stats(ev: &dyn Evidence) -> Option<String> {
    let count = |p: &str| -> Option<usize> {
        let v = ev.read_json(p)?;
        Some(
            v["return"]
                .as_array()
                .map(|a| a.iter().map(|r| r["stats"].as_array().map_or(0, Vec::len)).sum())
                .unwrap_or(0),
        )
    };
    let vm = count("qmp/query-stats-vm.1.json");
    let vcpu = count("qmp/query-stats-vcpu.1.json");
    if vm.is_none() && vcpu.is_none() {
        return None;
    }
    let mut s = format!(
        "query-stats (KVM): {} VM and {} vCPU values per sample{}",
        vm.unwrap_or(0),
        vcpu.unwrap_or(0),
        if vm == Some(0) && vcpu == Some(0) { " (none: not running under KVM)" } else { "" }
    );
    if let (Some(a), Some(b)) =
        (ev.read_json("qmp/query-stats-vcpu.1.json"), ev.read_json("qmp/query-stats-vcpu.2.json"))
    {
        if let Some(d) = vcpu_activity(&a, &b) {
            s.push_str(&format!("; {d}"));
        }
    }
    Some(s)
}

/// What the guest's vCPUs did between two `query-stats` vCPU samples (cumulative KVM
/// counters summed over vCPUs): exits, those handed to QEMU's device emulation (port I/O,
/// MMIO), and time halted. Context for a reader (is the guest running, halted, poking an
/// emulated controller?), not an input to the verdict.
fn vcpu_activity(a: &Value, b: &Value) -> Option<String> {
    let sum = |v: &Value, name: &str| -> Option<u64> {
        let mut total = None;
        for cpu in v["return"].as_array()? {
            for st in cpu["stats"].as_array().into_iter().flatten() {
                if st["name"] == name {
                    *total.get_or_insert(0) += st["value"].as_u64()?;
                }
            }
        }
        total
    };
    let delta = |name: &str| Some(sum(b, name)?.saturating_sub(sum(a, name)?));
    let cpus = b["return"].as_array().map(Vec::len).unwrap_or(0);
    let exits = delta("exits")?;
    // KVM counts in io_exits/mmio_exits only the accesses it hands to QEMU (an emulated
    // device's registers, e.g. LSI's); a virtio queue kick through ioeventfd ends in the
    // kernel and is not among them.
    let to_qemu = match (delta("io_exits"), delta("mmio_exits")) {
        (Some(io), Some(mmio)) => {
            format!(" ({io} port I/O and {mmio} MMIO handed to QEMU's device emulation; virtio kicks through ioeventfd are not counted)")
        }
        _ => String::new(),
    };
    let halted_ms = delta("halt_wait_ns").map(|ns| ns / 1_000_000);
    Some(format!(
        "between the two samples, {cpus} vCPU{}: {exits} exits{to_qemu}{}",
        if cpus == 1 { "" } else { "s" },
        halted_ms.map(|ms| format!(", halted {ms} ms in total")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests;
