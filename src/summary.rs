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
    /// Known only after sealing; absent from the copy inside the archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveFacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveFacts {
    pub name: String,
    pub size: u64,
    pub sha256: String,
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
    let any = p.qemu_version.is_some()
        || !p.pveversion.is_empty()
        || p.backup.is_some()
        || !p.tasks.is_empty()
        || !p.vzdump_tail.is_empty()
        || p.ha.is_some()
        || !p.pending.is_empty()
        || !p.stop_imminent.is_empty();
    if !any {
        return;
    }
    o.push_str("## Proxmox VE\n\n");
    for w in &p.stop_imminent {
        o.push_str(&format!("- **About to be stopped:** {w}\n"));
    }
    if let Some(v) = &p.qemu_version {
        let build = match (&p.pve_qemu_build, &p.package) {
            (Some(b), _) => format!(", pve-qemu-kvm {}", data(b)),
            (None, Some(pkg)) => format!(", package {}", data(pkg)),
            _ => String::new(),
        };
        o.push_str(&format!("- **QEMU:** {v}{build}\n"));
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
    o.push_str("## Known bugs and risk stacks\n\n");
    for m in matches {
        let what = if m.kind == "bug" { "Known bug" } else { "Risk stack" };
        o.push_str(&format!("- **{what}: {}** (`{}`)\n", m.title, m.id));
        o.push_str(&format!("  - fixed in: {}\n", m.fixed_in));
        for l in &m.links {
            o.push_str(&format!("  - <{l}>\n"));
        }
        for e in &m.evidence {
            o.push_str(&format!("  - matched: {}\n", data(e)));
        }
        for u in &m.unverified {
            o.push_str(&format!("  - not verified: {u}\n"));
        }
        o.push_str(&format!("  - what to do: {}\n", m.advice));
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
    let mut line = d.verdict.to_string();
    match (d.strength, d.layer) {
        (Some(st), Some(l)) => line.push_str(&format!(" ({}, {})", kebab(&st), l.as_str())),
        (Some(st), None) => line.push_str(&format!(" ({})", kebab(&st))),
        _ => {}
    }
    let advice = match d.restart_advice() {
        RestartAdvice::Helps => {
            d.layer.map(|l| l.sentence()).unwrap_or("a full stop→start replaces the wedged process").to_string()
        }
        RestartAdvice::Unproven(why) | RestartAdvice::WontHelp(why) => why,
        RestartAdvice::NotWedged(_) => return line,
    };
    format!("{line} — {advice}")
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
    o.push_str(&format!("# wedge-autopsy: {vm} on {} — **{}**\n\n", s.node, d.verdict));
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
            "- **QEMU:** pid {pid} on host {}{}\n",
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
        o.push_str(&format!("\n## Restart\n\n```json\n{}\n```\n", serde_json::to_string_pretty(r).unwrap_or_default()));
    }
    o
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
                    ..Default::default()
                },
            },
            min_idle_secs: 30.0,
            steps: vec![
                step("qmp-status", StepStatus::Ok, 1, None),
                step("qmp-block", StepStatus::Timeout, 4000, Some("did not finish | abandoned")),
            ],
            archive: Some(ArchiveFacts {
                name: "autopsy-102-20260611T164000Z-pve1.tar.zst".into(),
                size: 123456,
                sha256: "ab".repeat(32),
            }),
            restart: None,
        };
        let got = markdown(&s);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/summary-frozen.md");
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("snapshot exists (UPDATE_SNAPSHOTS=1 to create)");
        assert_eq!(got, want, "summary.md changed; review and UPDATE_SNAPSHOTS=1 if intended");
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

    #[test]
    fn times_show_utc_and_local() {
        let t = DateTime::parse_from_rfc3339("2026-06-11T15:21:07Z").unwrap().with_timezone(&Utc);
        assert_eq!(when(t, "+03:00"), "2026-06-11 15:21:07 UTC (18:21:07 +03:00)");
        assert_eq!(when(t, "+00:00"), "2026-06-11 15:21:07 UTC (15:21:07 +00:00)");
    }
}
