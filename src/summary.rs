//! The ticket-ready summary: one struct (`summary.json`), rendered as markdown
//! (`summary.md`). Every time is UTC with the host's offset beside it, because host logs
//! are local time and guest logs are often UTC.

use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;

use crate::archive::manifest::Trigger;
use crate::diagnose::Diagnosis;
use crate::step::StepRecord;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub vmid: Option<u32>,
    pub name: Option<String>,
    pub host: String,
    pub node: String,
    pub pid: Option<i32>,
    pub proof: Option<String>,
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub utc_offset: String,
    pub diagnosis: Diagnosis,
    /// The idle threshold the verdict used, so `inspect` recomputes it with the same rule.
    pub min_idle_secs: f64,
    pub steps: Vec<StepRecord>,
    /// Versions, per-disk storage and host I/O (`host/info.json`), when captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_info: Option<crate::hostinfo::HostInfo>,
    /// Known only after sealing (sealing reads the archive back and checks every file's
    /// SHA-256 before it counts as sealed); absent from the copy inside the archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveFacts>,
    /// Why sealing failed, after the run; absent from the copy inside the archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<serde_json::Value>,
}

impl From<&crate::archive::Sealed> for ArchiveFacts {
    fn from(s: &crate::archive::Sealed) -> Self {
        ArchiveFacts { name: s.path.display().to_string(), size: s.size, sha256: s.sha256.clone(), files: s.files }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveFacts {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// Files whose SHA-256 the read-back check compared with the manifest.
    pub files: usize,
}

/// Where the evidence stands when a summary is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal<'a> {
    /// Written before sealing (the copy inside the archive): it cannot know the result.
    Pending,
    /// Sealed, read back, every file's SHA-256 checked against the manifest.
    Verified { files: usize, sha256: &'a str },
    /// Sealing failed: the evidence is not safe.
    Failed(&'a str),
}

impl Summary {
    /// The seal state this summary can truthfully state.
    pub fn seal(&self) -> Seal<'_> {
        match (&self.archive, &self.seal_error) {
            (Some(a), _) => Seal::Verified { files: a.files, sha256: &a.sha256 },
            (None, Some(e)) => Seal::Failed(e),
            (None, None) => Seal::Pending,
        }
    }
}

/// `2026-06-11 15:21:07 UTC (18:21:07 +03:00)`.
pub fn when(t: DateTime<Utc>, offset: &str) -> String {
    let local = DateTime::parse_from_rfc3339(&format!("2000-01-01T00:00:00{offset}"))
        .map(|d| *d.offset())
        .unwrap_or_else(|_| FixedOffset::east_opt(0).expect("zero offset"));
    format!("{} UTC ({} {offset})", t.format("%Y-%m-%d %H:%M:%S"), t.with_timezone(&local).format("%H:%M:%S"))
}

/// `s` on one line: every control character (C0, DEL, C1, U+2028/9) written as an escape
/// (`\n`, `\r`, `\t`, `\u{1b}`), and a backslash doubled so an escape in the input is
/// not read as one of ours. For any text from outside that lands in a log or a summary.
pub fn escape_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// A sentence that mixes our words with text from outside (a thread name, a build-id, a
/// config value) as plain prose: control characters escaped and every character that
/// could start markdown structure (emphasis, links, HTML, code, tables) backslash-escaped,
/// so it renders as the same characters and never as structure. Not cut.
pub fn prose(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in escape_control(s).chars() {
        if matches!(c, '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '!' | '~' | '&') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Text from outside (an API reason, an alert label, a thread name) as an inline code
/// span: on one line, fenced by more backticks than it contains, so it cannot open a
/// heading, start a list, close an HTML comment or end its own span.
pub fn literal(s: &str) -> String {
    let e = escape_control(s);
    let mut longest = 0;
    let mut run = 0;
    for c in e.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if e.is_empty() || e.starts_with('`') || e.ends_with('`') { " " } else { "" };
    format!("{fence}{pad}{e}{pad}{fence}")
}

/// A fenced block's fence for `lines`: longer than any backtick run they contain.
fn fence_for<'a>(lines: impl Iterator<Item = &'a String>) -> String {
    let longest = lines.flat_map(|l| l.split(|c| c != '`')).map(str::len).max().unwrap_or(0);
    "`".repeat(longest.max(2) + 1)
}

fn cell(s: &str) -> String {
    escape_control(s).replace('|', "\\|")
}

/// Text from outside (logs, command output, thread names) as inline code on one line:
/// control characters escaped, backticks neutralised, bounded, so it can never become
/// markdown structure.
fn data(s: &str) -> String {
    format!("`{}`", crate::qmp::one_line(&s.replace('`', "'"), 200).replace('|', "\\|"))
}

/// The Proxmox VE section: versions, backup, tasks, HA, pending changes, and first
/// whatever is about to stop the VM.
fn pve_section(o: &mut String, p: &crate::pve::PveFindings) {
    let any = !p.pveversion.is_empty()
        || p.backup.is_some()
        || !p.tasks.is_empty()
        || !p.vzdump_tail.is_empty()
        || p.ha.is_some()
        || !p.pending.is_empty()
        || p.lock.is_some()
        || !p.stop_imminent.is_empty();
    if !any {
        return;
    }
    o.push_str("## Proxmox VE\n\n");
    for w in &p.stop_imminent {
        o.push_str(&format!("- **About to be stopped:** {w}\n"));
    }
    if let Some(x) = &p.proxmox_qemu {
        o.push_str(&format!("- **Proxmox QEMU:** {x}\n"));
    }
    for l in &p.pveversion {
        o.push_str(&format!("- pveversion: {}\n", data(l)));
    }
    if let Some(b) = &p.backup {
        o.push_str(&format!("- **Backup (query-backup):** {b}\n"));
    }
    if let Some(st) = &p.stats {
        o.push_str(&format!("- {st}\n"));
    }
    for t in &p.tasks {
        o.push_str(&format!("- task: {}\n", data(t)));
    }
    if !p.vzdump_tail.is_empty() {
        o.push_str("- vzdump log, last lines:\n");
        for l in &p.vzdump_tail {
            o.push_str(&format!("  - {}\n", data(l)));
        }
    }
    if let Some(h) = &p.ha {
        o.push_str(&format!("- HA: {}\n", data(h)));
    }
    if let Some(l) = &p.lock {
        o.push_str(&format!("- **Config lock:** {}\n", prose(l)));
    }
    for c in &p.pending {
        o.push_str(&format!("- pending (applies only at the next full stop→start): {}\n", data(c)));
    }
    o.push('\n');
}

/// Known bugs and risk stacks matched, each with its links and "fixed in".
fn signatures_section(o: &mut String, matches: &[crate::signatures::SignatureMatch]) {
    if matches.is_empty() {
        return;
    }
    use crate::signatures::Status;
    o.push_str("## Known bugs and risk stacks\n\n");
    for m in matches {
        let what = match (m.kind.as_str(), m.status) {
            ("bug", Status::Matched) => "Known bug",
            // The stack rule could not be evaluated: never shown as a confirmed bug.
            ("bug", Status::Possible) => "Possible known bug, not verified",
            (_, Status::Matched) => "Risk stack",
            (_, Status::Possible) => "Possible risk stack, not verified",
        };
        o.push_str(&format!("- **{what}: {}** (`{}`)\n", m.title, m.id));
        o.push_str(&format!("  - fixed in: {}\n", m.fixed_in));
        for l in &m.links {
            o.push_str(&format!("  - <{l}>\n"));
        }
        for e in &m.evidence {
            o.push_str(&format!("  - matched: {}\n", data(e)));
        }
        for u in &m.unverified {
            o.push_str(&format!("  - not verified: {}\n", prose(u)));
        }
        let todo = if m.status == Status::Possible { "what to do if confirmed" } else { "what to do" };
        o.push_str(&format!("  - {todo}: {}\n", m.advice));
    }
    o.push('\n');
}

fn kebab<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// `block-path-frozen (proven, inside-qemu): …` — the verdict with what it rests on and
/// what a restart would do.
pub fn verdict_line(d: &Diagnosis) -> String {
    use crate::diagnose::RestartAdvice;
    let line = verdict_head(d);
    let advice = match d.restart_advice() {
        RestartAdvice::Helps => {
            d.layer.map(|l| l.sentence()).unwrap_or("a full stop→start replaces the wedged process").to_string()
        }
        RestartAdvice::Unproven(why) | RestartAdvice::WontHelp(why) => why,
        RestartAdvice::NotWedged(_) => return line,
    };
    format!("{line} — {advice}")
}

/// `block-path-frozen (proven, inside-qemu)`.
pub fn verdict_head(d: &Diagnosis) -> String {
    match (d.strength, d.layer) {
        (Some(st), Some(l)) => format!("{} ({}, {})", d.verdict, kebab(&st), l.as_str()),
        (Some(st), None) => format!("{} ({})", d.verdict, kebab(&st)),
        _ => d.verdict.to_string(),
    }
}

/// The line an incident commander acts on: where the evidence stands and what a
/// restart would do. It states only what is true when it is rendered: the copy written
/// into the archive (before sealing) says what the seal will check, not that it passed.
pub fn decision(d: &Diagnosis, seal: Seal<'_>) -> String {
    use crate::diagnose::RestartAdvice;
    let evidence = match seal {
        Seal::Verified { files, sha256 } => format!(
            "evidence sealed and verified (read back, {files} files' SHA-256 match the manifest; archive sha256 {}…)",
            &sha256[..12.min(sha256.len())]
        ),
        Seal::Pending => "evidence: this summary was written before sealing; the seal then reads the archive back and checks every file's SHA-256 (`wedge-autopsy inspect --verify ARCHIVE` repeats the check)".into(),
        Seal::Failed(e) => format!("evidence NOT sealed: {}", escape_control(e)),
    };
    let restart = match (d.restart_advice(), seal) {
        (RestartAdvice::Helps, Seal::Verified { .. }) => "safe to restart (a full stop→start; a guest reboot keeps the wedged QEMU)".to_string(),
        (RestartAdvice::Helps, Seal::Pending) => {
            "a full stop→start helps, once the seal is reported verified".to_string()
        }
        (RestartAdvice::Helps, Seal::Failed(_)) => {
            "a full stop→start would help, but it destroys the live state that was not sealed: seal first (free space, --out) or accept the loss".to_string()
        }
        (RestartAdvice::WontHelp(why), _) => format!("restart would not help: {why}"),
        (RestartAdvice::Unproven(why), _) => format!("restart not proven to help: {why}"),
        (RestartAdvice::NotWedged(why), _) => format!("no restart needed ({why})"),
    };
    format!("**{}** — {evidence}; {restart}.", verdict_head(d))
}

pub fn markdown(s: &Summary) -> String {
    let d = &s.diagnosis;
    let f = &d.findings;
    let mut o = String::new();
    let vm = match (&s.vmid, &s.name) {
        (Some(v), Some(n)) => format!("VM {v} ({n})"),
        (Some(v), None) => format!("VM {v}"),
        _ => "process".into(),
    };
    o.push_str(&format!("# wedge-autopsy: {vm} on {} — {}\n\n", s.node, verdict_head(d)));
    o.push_str(&format!("**Decision:** {}\n\n", decision(d, s.seal())));
    let took = (s.ended_at - s.started_at).num_milliseconds();
    o.push_str(&format!(
        "- **Captured:** {} → {} ({took} ms)\n",
        when(s.started_at, &s.utc_offset),
        when(s.ended_at, &s.utc_offset)
    ));
    let mut trig = escape_control(&s.trigger.kind);
    if let Some(u) = &s.trigger.user {
        trig.push_str(&format!(" by {}", escape_control(u)));
    }
    if let Some(t) = &s.trigger.tty {
        trig.push_str(&format!(" on {}", escape_control(t)));
    }
    // The reason comes from an API caller or an alert: data, never structure.
    if let Some(r) = &s.trigger.reason {
        trig.push_str(&format!(" — {}", literal(r)));
    }
    o.push_str(&format!("- **Trigger:** {trig}\n"));
    if let Some(pid) = s.pid {
        o.push_str(&format!(
            "- **Process:** QEMU pid {pid} on host {}{}\n",
            s.host,
            s.proof.as_ref().map(|p| format!(", proven by {p}")).unwrap_or_default()
        ));
    }
    if let Some(a) = &s.archive {
        o.push_str(&format!("- **Archive:** `{}` ({} bytes)\n- **SHA-256:** `{}`\n", a.name, a.size, a.sha256));
    }
    o.push_str(&format!("\n## Verdict: {}\n\n", verdict_line(d)));
    for fact in &d.facts {
        o.push_str(&format!("- {fact}\n"));
    }
    if !d.disks.is_empty() {
        o.push_str("\nIn flight, per disk (both ends of the window):\n\n| disk | controller | backend | condition | layer |\n|---|---|---|---|---|\n");
        for x in &d.disks {
            let backend = match &x.backend {
                crate::inflight::Backend::Local => "local".to_string(),
                crate::inflight::Backend::Network { protocol, .. } => protocol.clone(),
                crate::inflight::Backend::Unknown => "?".to_string(),
            };
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                cell(&x.device),
                x.controller.as_str(),
                cell(&backend),
                kebab(&x.condition),
                x.layer.map(|l| l.as_str()).unwrap_or("")
            ));
        }
        for x in d.disks.iter().filter_map(|x| x.no_view.as_ref().map(|w| (x, w))) {
            o.push_str(&format!("\n- {}: no in-flight view: {}\n", cell(&x.0.device), x.1));
        }
    }
    o.push('\n');
    versions_section(&mut o, &f.pve, s.host_info.as_ref(), &s.host);
    if let Some(h) = &s.host_info {
        storage_section(&mut o, h);
        host_io_section(&mut o, h, &s.steps);
    }
    signatures_section(&mut o, &f.signatures);
    pve_section(&mut o, &f.pve);
    o.push_str("## Findings\n\n");
    if !f.devices.is_empty() {
        o.push_str(&format!("Block devices, two samples {} ms apart:\n\n", f.sample_window_ms));
        o.push_str("| device | rd ops | wr ops | flush ops | wr_highest_offset | idle |\n|---|---|---|---|---|---|\n");
        for dd in &f.devices {
            let pair = |p: (u64, u64)| if p.0 == p.1 { format!("{} (=)", p.1) } else { format!("{} → {}", p.0, p.1) };
            let idle = dd.idle_secs().map(|s| format!("{s:.1} s")).unwrap_or_else(|| "no I/O yet".into());
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} | {idle} |\n",
                cell(&dd.device),
                pair(dd.rd_ops),
                pair(dd.wr_ops),
                pair(dd.flush_ops),
                pair(dd.wr_highest)
            ));
        }
        o.push('\n');
    }
    if !f.throttle.is_empty() {
        o.push_str("Throttle limits live in QEMU:\n\n");
        for (dev, lim) in &f.throttle {
            let l: Vec<String> = lim.iter().map(|(k, v)| format!("{k}={v}")).collect();
            o.push_str(&format!("- {dev}: {}\n", l.join(", ")));
        }
        o.push('\n');
    }
    for dr in &f.throttle_drift {
        o.push_str(&format!("- **Config drift:** {dr}\n"));
    }
    if !f.threads.is_empty() {
        let mut states: std::collections::BTreeMap<char, usize> = Default::default();
        for t in &f.threads {
            *states.entry(t.state).or_default() += 1;
        }
        let st: Vec<String> = states.iter().map(|(s, n)| format!("{n}×{s}")).collect();
        o.push_str(&format!("Threads: {} ({})\n", f.threads.len(), st.join(" ")));
        if let Some(m) = &f.main_thread {
            o.push_str(&format!(
                "- main thread {} {}: state {}, in {}\n",
                m.tid,
                literal(&m.name),
                m.state,
                literal(if m.wchan.is_empty() { "-" } else { &m.wchan })
            ));
        }
        for t in &f.blocked {
            o.push_str(&format!(
                "- **D state** {} {} in {}: {}\n",
                t.tid,
                literal(&t.name),
                literal(&t.wchan),
                escape_control(&t.kernel_stack.iter().take(6).cloned().collect::<Vec<_>>().join(" < "))
            ));
        }
        o.push('\n');
    }
    if !f.stacks.is_empty() {
        let fence = fence_for(f.stacks.iter().take(30));
        o.push_str(&format!("Stacks (top frames, identical stacks grouped):\n\n{fence}\n"));
        for s in f.stacks.iter().take(30) {
            // Lines stay lines; other control characters are escaped.
            for line in s.split('\n') {
                o.push_str(&escape_control(line));
                o.push('\n');
            }
        }
        o.push_str(&format!("{fence}\n\n"));
    }
    unnamed_section(&mut o, &f.unnamed);
    for u in &f.io_uring {
        o.push_str(&format!("- io_uring {u}\n"));
    }
    if !f.io_uring.is_empty() {
        o.push('\n');
    }
    if !f.risks.is_empty() {
        o.push_str("Risk factors in the VM's config:\n\n");
        for r in &f.risks {
            o.push_str(&format!("- {}\n", r.what));
        }
        o.push('\n');
    }
    o.push_str("## Steps\n\n| step | status | ms | detail |\n|---|---|---|---|\n");
    for st in &s.steps {
        o.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            st.id,
            st.status,
            st.duration_ms,
            cell(st.error.as_deref().unwrap_or(""))
        ));
    }
    if let Some(r) = &s.restart {
        restart_section(&mut o, r);
    }
    o
}

/// QEMU build (query-version, the running image and its build-id), pve-qemu-kvm, and
/// the host (name, OS, kernel).
fn versions_section(o: &mut String, p: &crate::pve::PveFindings, h: Option<&crate::hostinfo::HostInfo>, host: &str) {
    let v = h.map(|h| &h.versions);
    if p.qemu_version.is_none() && v.is_none() {
        return;
    }
    o.push_str("## Versions\n\n");
    let mut qemu = p.qemu_version.clone().unwrap_or_else(|| "version unknown (no query-version reply)".into());
    if let Some(pkg) = &p.package {
        qemu.push_str(&format!(" ({})", data(pkg)));
    }
    if let Some(v) = v {
        if let Some(b) = &v.qemu_binary {
            qemu.push_str(&format!(", running {}", data(b)));
        }
        if let Some(id) = &v.qemu_build_id {
            qemu.push_str(&format!(", build-id `{id}`"));
        }
        match v.qemu_on_disk.as_deref() {
            Some("same") | None => {}
            Some(other) => qemu.push_str(&format!(" (**file on disk: {}**)", escape_control(other))),
        }
    }
    o.push_str(&format!("- **QEMU:** {qemu}\n"));
    let from_pveversion = p.pveversion.iter().find_map(|l| l.strip_prefix("pve-qemu-kvm:")).map(str::trim);
    let pve = match (&p.pve_qemu_build, from_pveversion, v.and_then(|v| v.qemu_installed.as_deref())) {
        // An upgrade installed another build while this VM kept the old one: a fix in the
        // installed build reaches this VM only with a full stop→start.
        (Some(b), Some(i), _) if i.split_whitespace().next() != Some(b.as_str()) => {
            let installed = i.split_whitespace().next().unwrap_or(i);
            let newer = crate::signatures::compare_versions(installed, b) == std::cmp::Ordering::Greater;
            format!(
                "{} (query-version), but **{} is installed**: {}",
                data(b),
                data(i),
                if newer {
                    "this VM runs the older build until a full stop→start"
                } else {
                    "this VM runs another build than the installed one (a downgrade, or a build installed by hand)"
                }
            )
        }
        (Some(b), _, _) => format!("{} (query-version)", data(b)),
        (None, Some(b), _) => format!("{} (pveversion; installed, not necessarily running)", data(b)),
        (None, None, Some(i)) if i.starts_with("pve-qemu-kvm ") => {
            format!("{} (dpkg; installed, not necessarily running)", data(&i["pve-qemu-kvm ".len()..]))
        }
        (None, None, Some(i)) => format!("not installed (dpkg: {})", data(i)),
        (None, None, None) => "not installed (neither query-version, pveversion nor dpkg names it)".into(),
    };
    o.push_str(&format!("- **pve-qemu-kvm:** {pve}\n"));
    if let Some(v) = v {
        let mut hostline = data(v.hostname.as_deref().unwrap_or(host));
        if let Some(os) = &v.os {
            hostline.push_str(&format!(", {}", data(os)));
        }
        if let Some(k) = &v.kernel {
            hostline.push_str(&format!(", kernel {}", data(k)));
        }
        if let Some(b) = &v.kernel_build {
            hostline.push_str(&format!(" ({})", data(b)));
        }
        o.push_str(&format!("- **Host:** {hostline}\n"));
    }
    o.push('\n');
}

/// Per disk: the Proxmox volume and storage, the backend QEMU opens, the backing device.
fn storage_section(o: &mut String, h: &crate::hostinfo::HostInfo) {
    if h.disks.is_empty() {
        return;
    }
    o.push_str("## Storage\n\n| disk | volume (config) | storage (storage.cfg) | backend | opens | backing device |\n|---|---|---|---|---|---|\n");
    for d in &h.disks {
        let vol = match (&d.config_key, &d.volume) {
            (Some(k), Some(v)) => format!("{k}: {v}"),
            (Some(k), None) => format!("{k}: not in the config"),
            _ => String::new(),
        };
        let st = d.storage.as_ref().map(|s| format!("{} ({})", s.id, s.kind)).unwrap_or_default();
        let mut backing = d.backing.as_ref().map(|b| b.describe()).unwrap_or_default();
        if let (Some(t), Some(m)) = (&d.fstype, &d.mount) {
            backing.push_str(&format!(", {t} at {m}"));
        }
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            cell(&d.device),
            cell(&vol),
            cell(&st),
            d.kind.as_str(),
            cell(d.target.as_deref().unwrap_or("")),
            cell(&backing)
        ));
    }
    let mut notes = h.disks.iter().filter_map(|d| Some((d, d.note.as_deref()?))).peekable();
    if notes.peek().is_some() {
        o.push('\n');
    }
    for (d, note) in notes {
        o.push_str(&format!("- {}: {}\n", cell(&d.device), escape_control(note)));
    }
    o.push('\n');
}

/// One paragraph: in-flight I/O of the backing devices at both ends of the window, I/O
/// pressure, hung-task messages; every source that was unavailable says so.
fn host_io_section(o: &mut String, h: &crate::hostinfo::HostInfo, steps: &[StepRecord]) {
    let io = &h.io;
    let window = match (steps.iter().find(|s| s.kind == "host").map(|s| s.start), h.collected_at) {
        (Some(a), Some(b)) => format!(", {:.1} s", (b - a).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    };
    let mut parts: Vec<String> = Vec::new();
    if io.devices.is_empty() {
        parts.push(if h.disks.iter().any(|d| d.backing.as_ref().is_some_and(|b| b.name.is_some())) {
            "no diskstats line for the backing devices".into()
        } else {
            "no local block device backs the disks (network backends, or not resolved): no host in-flight count".into()
        });
    }
    for d in &io.devices {
        let inflight = match (d.start, d.end) {
            (Some(a), Some(b)) => format!(
                "{} → {} in flight, +{} reads +{} writes completed, busy {} ms",
                a.in_flight,
                b.in_flight,
                b.reads.saturating_sub(a.reads),
                b.writes.saturating_sub(a.writes),
                b.io_ms.saturating_sub(a.io_ms)
            ),
            (None, Some(b)) => format!("{} in flight at the end (no start sample)", b.in_flight),
            (Some(a), None) => format!("{} in flight at the start (no end sample)", a.in_flight),
            (None, None) => "not in /proc/diskstats".into(),
        };
        let sys = d.sys_inflight.map(|(r, w)| format!(" (inflight now: {r} reads, {w} writes)")).unwrap_or_default();
        parts.push(format!("{}: {inflight}{sys}", data(&d.name)));
    }
    let pressure = match (io.pressure_start, io.pressure_end) {
        (Some(a), Some(b)) => {
            let full = match (a.full_total_us, b.full_total_us) {
                (Some(x), Some(y)) => format!(", all tasks stalled {} ms", y.saturating_sub(x) / 1000),
                _ => String::new(),
            };
            format!(
                "I/O pressure (avg10) {:.2}% → {:.2}%, some task stalled on I/O {} ms of the window{full}",
                a.some_avg10,
                b.some_avg10,
                b.some_total_us.saturating_sub(a.some_total_us) / 1000
            )
        }
        (None, Some(b)) => format!("I/O pressure (avg10) {:.2}% at the end (no start sample)", b.some_avg10),
        _ => "I/O pressure unavailable".into(),
    };
    parts.push(pressure);
    let timeout = io.hung_task_timeout_secs.map(|t| format!(", hung_task_timeout_secs {t}")).unwrap_or_default();
    parts.push(if io.hung_task_sources.is_empty() {
        "hung tasks: unknown (no kernel log captured)".into()
    } else if io.hung_tasks.is_empty() {
        format!("no hung-task message in {}{timeout}", io.hung_task_sources.join(", "))
    } else {
        format!(
            "**{} hung-task message(s)** in {}{timeout}: {}",
            io.hung_tasks.len(),
            io.hung_task_sources.join(", "),
            io.hung_tasks.iter().map(|l| data(l)).collect::<Vec<_>>().join("; ")
        )
    });
    o.push_str(&format!(
        "## Host I/O\n\nOver the window (host step → host-info step{window}): {}.\n",
        parts.join("; ")
    ));
    for u in &h.unavailable {
        o.push_str(&format!("- unavailable: {}\n", escape_control(u)));
    }
    o.push('\n');
}

/// Each module with unnamed frames, once: its build-id and what would name the frames.
fn unnamed_section(o: &mut String, unnamed: &[crate::diagnose::UnnamedFrames]) {
    for u in unnamed {
        let more = if u.frames > 1 { format!(" and {} more", u.frames - 1) } else { String::new() };
        let dbg = u.debug_file.as_ref().map(|d| format!("; debug file {} was used", data(d))).unwrap_or_default();
        o.push_str(&format!(
            "- Unnamed frames such as {}{more} are static functions of {} (build-id `{}`){dbg}. To name them: {}\n",
            data(&u.example),
            data(&u.path),
            u.build_id.as_deref().unwrap_or("unknown"),
            u.hint
        ));
    }
    if !unnamed.is_empty() {
        o.push('\n');
    }
}

/// The restart outcome as a short table (the full record is `<archive>.restart.json`).
/// The service's restarter reports only `attempted`, `ok` and `detail`: one row.
fn restart_section(o: &mut String, r: &serde_json::Value) {
    if r.get("actions").is_none() {
        let result = match (r["attempted"].as_bool(), r["ok"].as_bool()) {
            (Some(false), _) => "not attempted",
            (_, Some(true)) => "ok",
            _ => "FAILED",
        };
        o.push_str(&format!(
            "\n## Restart\n\n| action | result | ms | detail |\n|---|---|---|---|\n| restart | {result} | - | {} |\n",
            cell(&crate::qmp::one_line(r["detail"].as_str().unwrap_or(""), 300))
        ));
        return;
    }
    let s = |k: &str| r[k].as_str().map(escape_control).unwrap_or_default();
    let pid = |k: &str| r[k].as_i64().map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    o.push_str(&format!(
        "\n## Restart\n\n{} via {}: VM {}, old pid {} → new pid {}, {} ms{}\n\n",
        if r["performed"].as_bool() == Some(true) { "**Performed**" } else { "**Not performed**" },
        s("method"),
        s("vm_state"),
        pid("old_pid"),
        pid("new_pid"),
        r["duration_ms"].as_u64().unwrap_or(0),
        r["error"].as_str().map(|e| format!(" — {}", escape_control(e))).unwrap_or_default()
    ));
    o.push_str("| action | result | ms | detail |\n|---|---|---|---|\n");
    for a in r["actions"].as_array().into_iter().flatten() {
        let result = match (a["ok"].as_bool(), a["timed_out"].as_bool()) {
            (_, Some(true)) => "timed out",
            (Some(true), _) => "ok",
            _ => "FAILED",
        };
        o.push_str(&format!(
            "| {} | {result} | {} | {} |\n",
            cell(a["action"].as_str().unwrap_or("?")),
            a["duration_ms"].as_u64().unwrap_or(0),
            cell(&crate::qmp::one_line(a["detail"].as_str().unwrap_or(""), 160))
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::{DeviceDelta, Findings, Verdict};
    use crate::step::StepStatus;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The incident, as the tool would have reported it. Changes to the rendering show up
    /// as a diff of `tests/snapshots/summary-frozen.md`; `UPDATE_SNAPSHOTS=1` rewrites it.
    #[test]
    fn snapshot_frozen_block_path() {
        let step = |id: &str, status: StepStatus, ms: u64, err: Option<&str>| StepRecord {
            id: id.into(),
            kind: "qmp".into(),
            status,
            start: at("2026-06-11T16:40:00Z"),
            duration_ms: ms,
            error: err.map(str::to_string),
            notes: vec![],
            files: vec![],
            optional: false,
            qmp_failure: None,
        };
        let s = Summary {
            vmid: Some(102),
            name: Some("devvm".into()),
            host: "pve1".into(),
            node: "pve1".into(),
            pid: Some(4242),
            proof: Some("pidfile /var/run/qemu-server/102.pid".into()),
            trigger: Trigger {
                kind: "manual".into(),
                user: Some("wizard".into()),
                tty: Some("/dev/pts/3".into()),
                reason: Some("INC-2026-06-11".into()),
            },
            started_at: at("2026-06-11T16:40:00Z"),
            ended_at: at("2026-06-11T16:40:02.500Z"),
            utc_offset: "+03:00".into(),
            diagnosis: Diagnosis {
                verdict: Verdict::BlockPathFrozen,
                strength: Some(crate::diagnose::Strength::Proven),
                layer: Some(crate::diagnose::Layer::InsideQemu),
                disks: vec![],
                facts: vec![
                    "query-status: running".into(),
                    "drive-scsi0: 0 I/O operations completed across 2000 ms".into(),
                ],
                findings: Findings {
                    devices: vec![DeviceDelta {
                        device: "drive-scsi0".into(),
                        rd_ops: (812, 812),
                        wr_ops: (90211, 90211),
                        flush_ops: (4410, 4410),
                        wr_highest: (30064771072, 30064775168),
                        idle_ns: (Some(5_220_000_000_000), Some(5_222_000_000_000)),
                        ..Default::default()
                    }],
                    sample_window_ms: 2000,
                    stacks: vec!["1 thread(s) [worker]: qemu-system-x86_64+0x837c39 < start_thread".into()],
                    unnamed: vec![crate::diagnose::UnnamedFrames {
                        module: "qemu-system-x86_64".into(),
                        path: "/usr/bin/qemu-system-x86_64".into(),
                        build_id: Some("5f0d1c".into()),
                        frames: 3,
                        example: "qemu-system-x86_64+0x837c39".into(),
                        debug_file: None,
                        hint: "`apt install pve-qemu-kvm-dbgsym=9.2.0-5` (matches this build-id)".into(),
                    }],
                    pve: crate::pve::PveFindings {
                        qemu_version: Some("9.2.0".into()),
                        package: Some("pve-qemu-kvm_9.2.0-5".into()),
                        pve_qemu_build: Some("9.2.0-5".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
            min_idle_secs: 30.0,
            host_info: Some(host_info()),
            seal_error: None,
            steps: vec![
                step("qmp-status", StepStatus::Ok, 1, None),
                step("qmp-block", StepStatus::Timeout, 4000, Some("did not finish | abandoned")),
            ],
            archive: Some(ArchiveFacts {
                name: "autopsy-102-20260611T164000Z-pve1.tar.zst".into(),
                size: 123456,
                sha256: "ab".repeat(32),
                files: 42,
            }),
            restart: Some(serde_json::json!({
                "performed": true, "method": "qm", "vm_state": "restarted", "old_pid": 4242, "new_pid": 5151,
                "duration_ms": 12400, "error": null,
                "actions": [
                    {"action": "verify-archive", "ok": true, "duration_ms": 40, "detail": "42 files match"},
                    {"action": "stop", "ok": false, "timed_out": true, "duration_ms": 10000, "detail": "`qm stop 102 --timeout 10` did not finish | killed"},
                    {"action": "kill", "ok": true, "duration_ms": 3, "detail": "SIGKILL to proven pid 4242"},
                    {"action": "start", "ok": true, "duration_ms": 2300, "detail": "exit 0"}
                ]
            })),
        };
        let got = markdown(&s);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/summary-frozen.md");
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("snapshot exists (UPDATE_SNAPSHOTS=1 to create)");
        assert_eq!(got, want, "summary.md changed; review and UPDATE_SNAPSHOTS=1 if intended");
    }

    fn host_info() -> crate::hostinfo::HostInfo {
        use crate::hostinfo::*;
        let c = |in_flight, writes| DiskCounters { reads: 812, writes, in_flight, io_ms: 9000 };
        HostInfo {
            collected_at: Some(at("2026-06-11T16:40:02.400Z")),
            versions: Versions {
                hostname: Some("pve1".into()),
                os: Some("Debian GNU/Linux 12 (bookworm)".into()),
                kernel: Some("6.8.12-9-pve".into()),
                kernel_build: Some("#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-9".into()),
                qemu_binary: Some("/usr/bin/qemu-system-x86_64".into()),
                qemu_build_id: Some("5f0d1c".into()),
                qemu_on_disk: Some("same".into()),
                qemu_debug_file: None,
                qemu_installed: Some("pve-qemu-kvm 9.2.0-5".into()),
            },
            disks: vec![
                DiskStorage {
                    device: "drive-scsi0".into(),
                    config_key: Some("scsi0".into()),
                    volume: Some("local-lvm:vm-102-disk-0".into()),
                    storage: Some(StorageEntry {
                        id: "local-lvm".into(),
                        kind: "lvmthin".into(),
                        ..Default::default()
                    }),
                    kind: StorageKind::LvmThin,
                    target: Some("/dev/pve/vm-102-disk-0".into()),
                    backing: Some(BlockDev {
                        major: 253,
                        minor: 7,
                        name: Some("dm-7".into()),
                        dm_name: Some("pve-vm--102--disk--0".into()),
                        dm_uuid_prefix: Some("LVM".into()),
                        slaves: vec!["dm-4".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                DiskStorage {
                    device: "drive-scsi1".into(),
                    config_key: Some("scsi1".into()),
                    kind: StorageKind::Nbd,
                    target: Some("nbd://10.0.0.5:10809/exp".into()),
                    ..Default::default()
                },
            ],
            io: HostIo {
                devices: vec![
                    DeviceIo {
                        name: "dm-7".into(),
                        start: Some(c(0, 90211)),
                        end: Some(c(0, 90211)),
                        sys_inflight: Some((0, 0)),
                    },
                    DeviceIo { name: "dm-4".into(), start: Some(c(1, 100)), end: Some(c(1, 100)), sys_inflight: None },
                ],
                pressure_start: Some(Pressure {
                    some_avg10: 0.5,
                    some_total_us: 1_000_000,
                    full_avg10: Some(0.1),
                    full_total_us: Some(500_000),
                }),
                pressure_end: Some(Pressure {
                    some_avg10: 0.6,
                    some_total_us: 1_040_000,
                    full_avg10: Some(0.1),
                    full_total_us: Some(510_000),
                }),
                hung_tasks: vec![],
                hung_task_sources: vec!["host/kmsg.txt".into()],
                hung_task_timeout_secs: Some(120),
            },
            unavailable: vec![],
        }
    }

    /// The first line never claims more than is true when it is rendered.
    #[test]
    fn the_decision_states_only_what_is_true_at_rendering() {
        use crate::diagnose::{Layer, Strength};
        let inside = Diagnosis::bare(Verdict::BlockPathFrozen, Some(Strength::Proven), Some(Layer::InsideQemu));
        let below = Diagnosis::bare(Verdict::BlockPathFrozen, Some(Strength::Proven), Some(Layer::BelowQemu));
        let healthy = Diagnosis::bare(Verdict::Healthy, None, None);
        let sha = "cd".repeat(32);
        let ok = Seal::Verified { files: 9, sha256: &sha };
        let d = decision(&inside, ok);
        assert!(d.starts_with("**block-path-frozen (proven, inside-qemu)** — evidence sealed and verified"), "{d}");
        assert!(d.contains("safe to restart"), "{d}");
        let d = decision(&inside, Seal::Pending);
        assert!(
            d.contains("written before sealing")
                && !d.contains("sealed and verified")
                && !d.contains("safe to restart"),
            "{d}"
        );
        let d = decision(&inside, Seal::Failed("no space left\n## x"));
        assert!(d.contains("evidence NOT sealed: no space left\\n## x") && !d.contains("safe to restart"), "{d}");
        let d = decision(&below, ok);
        assert!(d.contains("restart would not help: stuck below QEMU") && !d.contains("safe to restart"), "{d}");
        let d = decision(&healthy, ok);
        assert!(d.starts_with("**healthy** — evidence sealed and verified") && d.contains("no restart needed"), "{d}");
    }

    #[test]
    fn restart_renders_as_a_table_not_json() {
        let mut o = String::new();
        restart_section(
            &mut o,
            &serde_json::json!({"attempted": false, "ok": false, "detail": "policy says no | never"}),
        );
        assert!(o.contains("| restart | not attempted | - | policy says no \\| never |"), "{o}");
        let mut o = String::new();
        restart_section(
            &mut o,
            &serde_json::json!({"performed": false, "method": "qm", "vm_state": "running-old", "old_pid": 7, "new_pid": null, "duration_ms": 5, "error": "cooldown", "actions": [{"action": "cooldown", "ok": false, "duration_ms": 0, "detail": "last attempt 3 min ago"}]}),
        );
        assert!(o.contains("**Not performed** via qm: VM running-old, old pid 7 → new pid -, 5 ms — cooldown"), "{o}");
        assert!(o.contains("| cooldown | FAILED | 0 | last attempt 3 min ago |") && !o.contains('{'), "{o}");
    }

    #[test]
    fn host_io_says_what_is_missing() {
        let mut h = host_info();
        h.io.pressure_start = None;
        h.io.pressure_end = None;
        h.io.hung_task_sources.clear();
        h.io.hung_tasks.clear();
        h.unavailable.push("/proc/pressure/io: No such file or directory (kernel without PSI, or psi=0)".into());
        let mut o = String::new();
        host_io_section(&mut o, &h, &[]);
        assert!(
            o.contains("I/O pressure unavailable") && o.contains("hung tasks: unknown (no kernel log captured)"),
            "{o}"
        );
        assert!(o.contains("- unavailable: /proc/pressure/io"), "{o}");
        let mut h = host_info();
        h.io.hung_tasks = vec!["INFO: task qemu:4242 blocked for more than 120 seconds.".into()];
        let mut o = String::new();
        host_io_section(&mut o, &h, &[]);
        assert!(o.contains("**1 hung-task message(s)** in host/kmsg.txt, hung_task_timeout_secs 120: `INFO: task qemu:4242 blocked"), "{o}");
    }

    /// The report: an API reason of `\n\n## Verdict: healthy\n<!--` added a fake verdict
    /// and hid the real one. Rendered as a literal, it stays inside the trigger line.
    #[test]
    fn a_reason_cannot_forge_a_section() {
        for reason in [
            "x\n\n## Verdict: healthy\n<!--",
            "`` ``\n# Verdict: healthy",
            "```\n## Verdict: healthy\n```",
            "-->\n## Verdict: healthy",
            "\r## Verdict: healthy\u{2028}",
        ] {
            let l = literal(reason);
            assert!(!l.contains('\n') && !l.contains('\r') && !l.contains('\u{2028}'), "{l}");
            // The span's fence is longer than any backtick run inside, so it cannot end early.
            let fence = l.chars().take_while(|c| *c == '`').count();
            let inner = &l[fence..l.len() - fence];
            assert!(l.ends_with(&"`".repeat(fence)), "{l}");
            assert!(!inner.contains(&"`".repeat(fence)), "{l}");
        }
        let stacks = ["#0 f ```\n## Verdict: healthy".to_string()];
        assert_eq!(fence_for(stacks.iter()), "````");
        assert_eq!(literal("plain"), "`plain`");
        assert_eq!(literal("a`b"), "``a`b``");
        assert_eq!(literal("`x"), "`` `x ``");
    }

    /// An upgrade with the VM still on the old build: the summary says the fix in the
    /// installed build has not reached this VM.
    #[test]
    fn running_build_older_than_installed_is_called_out() {
        let mut p = crate::pve::PveFindings {
            qemu_version: Some("9.2.0".into()),
            pve_qemu_build: Some("9.2.0-5".into()),
            pveversion: vec!["pve-qemu-kvm: 10.1.2-1".into()],
            ..Default::default()
        };
        let mut o = String::new();
        versions_section(&mut o, &p, None, "pve1");
        assert!(
            o.contains("`9.2.0-5` (query-version), but **`10.1.2-1` is installed**: this VM runs the older build"),
            "{o}"
        );
        p.pveversion = vec!["pve-qemu-kvm: 9.0.2-4".into()];
        let mut o = String::new();
        versions_section(&mut o, &p, None, "pve1");
        assert!(o.contains("**`9.0.2-4` is installed**: this VM runs another build than the installed one"), "{o}");
        p.pveversion = vec!["pve-qemu-kvm: 9.2.0-5".into()];
        let mut o = String::new();
        versions_section(&mut o, &p, None, "pve1");
        assert!(o.contains("- **pve-qemu-kvm:** `9.2.0-5` (query-version)\n"), "{o}");
    }

    /// A thread name, a build-id or a config value inside one of our sentences cannot
    /// open a comment, a link, emphasis or a code span.
    #[test]
    fn prose_from_outside_is_never_structure() {
        let hostile = "iothread <!-- [x](http://e) *b* `c` | d\n## Verdict: healthy";
        let p = prose(hostile);
        assert!(!p.contains('\n'), "{p}");
        for raw in ["<!--", "[x]", "*b*", "`c`"] {
            assert!(!p.contains(raw), "{raw} survives in {p}");
        }
        assert_eq!(p, "iothread \\<\\!-- \\[x\\](http://e) \\*b\\* \\`c\\` \\| d\\n\\#\\# Verdict: healthy");
    }

    #[test]
    fn times_show_utc_and_local() {
        let t = DateTime::parse_from_rfc3339("2026-06-11T15:21:07Z").unwrap().with_timezone(&Utc);
        assert_eq!(when(t, "+03:00"), "2026-06-11 15:21:07 UTC (18:21:07 +03:00)");
        assert_eq!(when(t, "+00:00"), "2026-06-11 15:21:07 UTC (15:21:07 +00:00)");
    }
}
