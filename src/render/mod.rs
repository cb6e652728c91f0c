//! Rendering: results are collected into structs elsewhere; this turns them into text
//! for people (stderr progress) and JSON for machines.

pub mod live;
pub mod ui;

/// The summary document moved to [`crate::summary`] (the autopsy seals it); kept here by path.
pub use crate::summary;

use std::io::Write;
use std::time::{Duration, Instant};

use crate::archive::Sealed;
use crate::autopsy::Progress;
use crate::step::StepRecord;

/// One plain line per step on stderr: elapsed, id, status, duration, error.
pub struct StderrLines {
    t0: Instant,
}

impl StderrLines {
    pub fn new() -> Self {
        StderrLines { t0: Instant::now() }
    }
    fn line(&self, text: &str) {
        let _ = writeln!(std::io::stderr(), "[{:>6.2}s] {text}", self.t0.elapsed().as_secs_f64());
    }
}

impl Default for StderrLines {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for StderrLines {
    fn finished(&self, r: &StepRecord) {
        let err = r.error.as_deref().map(|e| format!("  {e}")).unwrap_or_default();
        self.line(&format!("{:<24} {:<11} {:>6} ms{err}", r.id, r.status.as_str(), r.duration_ms));
    }
    fn sealed(&self, sealed: Option<&Sealed>, error: Option<&str>, took: Duration) {
        match (sealed, error) {
            (Some(s), _) => {
                self.line(&format!(
                    "{:<24} {:<11} {:>6} ms  {} files, {} bytes, verified",
                    "seal",
                    "ok",
                    took.as_millis(),
                    s.files,
                    s.size
                ));
                // The archive path is the last line, for scripts that take it from there.
                self.line(&format!("sha256  {}", s.sha256));
                self.line(&format!("archive {}", s.path.display()));
            }
            (None, e) => self.line(&format!(
                "{:<24} {:<11} {:>6} ms  {}",
                "seal",
                "failed",
                took.as_millis(),
                e.unwrap_or("unknown error")
            )),
        }
    }
}

/// [`Progress`] as tracing events: each step's start and end with the step id, VMID and
/// status as fields (journal fields `STEP`, `VMID`, `STATUS`, `DURATION_MS`).
pub struct Traced {
    pub vmid: u32,
}

/// The tracing target of step events, so text logs can leave them to the display.
pub const STEP_TARGET: &str = "wedge_autopsy::steps";

impl Progress for Traced {
    fn started(&self, id: &str) {
        tracing::info!(target: STEP_TARGET, step = id, vmid = self.vmid, status = "started", "step {id} started");
    }
    fn finished(&self, r: &StepRecord) {
        let (id, status, ms) = (r.id.as_str(), r.status.as_str(), r.duration_ms);
        let error = r.error.as_deref().unwrap_or("");
        if r.status.is_problem() && !r.optional {
            tracing::warn!(target: STEP_TARGET, step = id, vmid = self.vmid, status, duration_ms = ms, error, "step {id} {status} after {ms} ms: {error}");
        } else {
            tracing::info!(target: STEP_TARGET, step = id, vmid = self.vmid, status, duration_ms = ms, "step {id} {status} after {ms} ms");
        }
    }
    fn sealed(&self, sealed: Option<&Sealed>, error: Option<&str>, took: Duration) {
        let ms = took.as_millis() as u64;
        match sealed {
            Some(s) => {
                tracing::info!(target: STEP_TARGET, step = "seal", vmid = self.vmid, status = "ok", duration_ms = ms,
                archive = %s.path.display(), sha256 = %s.sha256, bytes = s.size, "sealed {} ({} files, {} bytes)", s.path.display(), s.files, s.size)
            }
            None => {
                tracing::error!(target: STEP_TARGET, step = "seal", vmid = self.vmid, status = "failed", duration_ms = ms,
                error = error.unwrap_or(""), "seal failed: {}", error.unwrap_or("unknown error"))
            }
        }
    }
}

/// Two [`Progress`] sinks as one (the display and the log).
pub struct Tee<'a>(pub &'a dyn Progress, pub &'a dyn Progress);

impl Progress for Tee<'_> {
    fn started(&self, id: &str) {
        self.0.started(id);
        self.1.started(id);
    }
    fn finished(&self, r: &StepRecord) {
        self.0.finished(r);
        self.1.finished(r);
    }
    fn sealed(&self, s: Option<&Sealed>, e: Option<&str>, took: Duration) {
        self.0.sealed(s, e, took);
        self.1.sealed(s, e, took);
    }
}

/// `diagnose` as text: the verdict, then its facts.
pub fn diagnose_text(vmid: crate::target::VmId, pid: i32, d: &crate::diagnose::Diagnosis) -> String {
    let mut o = format!("VM {vmid} (pid {pid}): {}\n", d.verdict);
    for f in &d.facts {
        o.push_str(&format!("  - {f}\n"));
    }
    o
}

/// One VM of `diagnose --all` as one line: verdict, strength, layer, the first fact.
pub fn sweep_line(vmid: crate::target::VmId, pid: i32, d: &crate::diagnose::Diagnosis) -> String {
    let strength = d.strength.and_then(|s| serde_json::to_value(s).ok()).and_then(|v| v.as_str().map(String::from));
    let layer = d.layer.and_then(|l| serde_json::to_value(l).ok()).and_then(|v| v.as_str().map(String::from));
    let qual: Vec<String> = strength.into_iter().chain(layer).collect();
    let qual = if qual.is_empty() { String::new() } else { format!(" ({})", qual.join(", ")) };
    // The status line says little next to the evidence; the first other fact says more.
    let fact = d.facts.iter().find(|f| !f.starts_with("query-status:")).or(d.facts.first());
    let fact = fact.map(|f| format!(": {f}")).unwrap_or_default();
    format!("VM {vmid} (pid {pid}): {}{qual}{fact}\n", d.verdict)
}

/// `audit` as text: one block per VM, what flags it and what to do about pending changes.
pub fn audit_text(vms: &[crate::diagnose::audit::VmAudit]) -> String {
    let mut o = String::new();
    for vm in vms {
        let flags = vm.risks.len() + vm.unlike_neighbours.len() + vm.pending.len();
        let name = vm.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
        o.push_str(&format!("VM {}{name}: {}\n", vm.vmid, if flags == 0 { "ok" } else { "flagged" }));
        for r in &vm.risks {
            o.push_str(&format!("  risk     {}\n", r.what));
        }
        for u in &vm.unlike_neighbours {
            o.push_str(&format!("  unlike   {u}\n"));
        }
        for p in &vm.pending {
            o.push_str(&format!("  pending  {p} (applies only after a full stop→start)\n"));
        }
        if let Some(r) = &vm.running {
            running_lines(&mut o, r);
        }
    }
    o
}

/// `audit`'s lines for one running QEMU: could a wedge be pinned to a line, and why.
fn running_lines(o: &mut String, r: &crate::diagnose::pinnable::RunningQemu) {
    use crate::diagnose::pinnable::{Agent, OnDisk, Pin};
    let pid = r.pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "not proven".into());
    if let Some(e) = &r.error {
        o.push_str(&format!("  running  {pid}: {e}\n"));
        return;
    }
    if let Some(b) = &r.binary {
        let id = b.build_id.as_deref().unwrap_or("none");
        o.push_str(&format!("  running  {pid}, {} build-id {id}\n", b.path));
        let disk = match &b.on_disk {
            OnDisk::Same => "same build as the running one".to_string(),
            OnDisk::Replaced { build_id } => {
                format!(
                    "REPLACED by another build ({}) since the VM started",
                    build_id.as_deref().unwrap_or("no build-id")
                )
            }
            OnDisk::Missing => "DELETED: the running build is no longer installed".into(),
            OnDisk::Unreadable { detail } => format!("unreadable: {detail}"),
        };
        o.push_str(&format!("  on disk  {disk}\n"));
    }
    if let Some(pin) = r.pin {
        let what = match pin {
            Pin::Line => "YES: debug info for the running build, stacks resolve to file:line",
            Pin::Function => "functions only: every function named, no file:line",
            Pin::ExportedOnly => "NO: exported names only (static functions unnamed, no file:line)",
        };
        o.push_str(&format!("  pin      {what}\n"));
    }
    if let Some(d) = &r.debug {
        match &d.found {
            Some(p) => {
                let what = match (d.dwarf, d.symtab) {
                    (true, _) => "",
                    (false, true) => " (symbols, no DWARF)",
                    (false, false) => " (neither symbols nor DWARF: useless)",
                };
                o.push_str(&format!("  debug    {p}{what}\n"))
            }
            None => o.push_str(&format!("  debug    none at {}\n", d.searched.join(", "))),
        }
    }
    if let Some(p) = &r.package {
        let v = p.version.as_deref().unwrap_or("unknown");
        let name = p.name.as_deref().unwrap_or("QEMU");
        let qemu = p.qemu.as_deref().map(|q| format!(", QEMU {q}")).unwrap_or_default();
        o.push_str(&format!("  package  {name} {v}{qemu} (from {})\n", p.source));
    }
    match &r.agent {
        Some(Agent::Answers { ms }) => o.push_str(&format!("  agent    answers guest-ping in {ms} ms\n")),
        Some(Agent::NotConfigured) => o.push_str("  agent    no guest-agent socket (agent not configured)\n"),
        Some(Agent::NoAnswer { detail }) => o.push_str(&format!("  agent    {detail}\n")),
        None => {}
    }
    for a in &r.advice {
        o.push_str(&format!("  do       {a}\n"));
    }
}

/// `inspect` as text: first the decision as it stands now (the recomputed verdict, and
/// the seal as this command checked it, or that it did not), then the sealed summary,
/// the verdict recomputed from the evidence, and every file with the start of its hash.
pub fn inspect_text(
    reader: &crate::archive::ArchiveReader,
    recomputed: &crate::diagnose::Diagnosis,
    verified: Option<&crate::archive::VerifyReport>,
) -> String {
    use crate::archive::Evidence;
    use crate::summary::{decision, Seal};
    let m = &reader.manifest;
    let mut o = match verified {
        Some(v) => format!("Now: {}\n\n", decision(recomputed, Seal::Verified { files: v.files, sha256: &v.sha256 })),
        None => format!(
            "Now: {} — the seal was not re-checked by this command (add --verify).\n\n",
            crate::summary::verdict_head(recomputed)
        ),
    };
    o += &match reader.read_string("summary.md") {
        Some(md) => md,
        None => format!(
            "VM {} pid {} on {} (no summary.md in this archive)\n",
            m.vmid.unwrap_or(0),
            m.pid.unwrap_or(0),
            m.host
        ),
    };
    o.push_str(&format!("\nRecomputed from the archive: {}\n", recomputed.verdict));
    for m in &recomputed.findings.signatures {
        let how = match m.status {
            crate::signatures::Status::Matched => "match",
            crate::signatures::Status::Possible => "possible match (not verified)",
        };
        o.push_str(&format!("Recomputed {} {how}: {} (fixed in: {})\n", m.kind, m.id, m.fixed_in));
    }
    if let Some(note) = crate::signatures::record_note(reader, crate::signatures::active()) {
        o.push_str(&format!("{note}\n"));
    }
    o.push_str(&format!("\nFiles ({}):\n", m.files.len()));
    for f in &m.files {
        o.push_str(&format!("  {:>10}  {}  {}\n", f.size, &f.sha256[..12.min(f.sha256.len())], f.path));
    }
    o
}
