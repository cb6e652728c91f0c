//! Matching signatures against evidence files: pure, so a live run and `inspect` on
//! the sealed archive give the same answer.
//!
//! Every condition a signature states must hold. A condition the evidence cannot
//! decide (no version captured, no layer yet) does not block a match but is listed in
//! `unverified`. The condition that carries the match (a bug's stack, a risk's config)
//! must be positively seen: no stacks, no bug match.

use serde::Serialize;
use serde_json::Value;

use super::{ConfigRule, FramePattern, Set, Signature, StackRule};
use crate::archive::Evidence;
use crate::pve::vmconfig::{Options, PveConfig};

/// A signature the evidence matches, as the summary shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureMatch {
    pub id: String,
    /// `bug` or `risk`.
    pub kind: String,
    pub title: String,
    pub links: Vec<String>,
    pub fixed_in: String,
    pub advice: String,
    /// What matched, e.g. the thread and its frames.
    pub evidence: Vec<String>,
    /// Conditions the evidence could not decide.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unverified: Vec<String>,
}

/// One thread's frames, innermost first.
struct Thread {
    tid: i64,
    name: String,
    frames: Vec<Frame>,
}

struct Frame {
    symbol: Option<String>,
    module: Option<String>,
    offset: Option<u64>,
}

/// Known-bug and risk signatures of `set` that the evidence matches.
/// `verdict` and `layer` are the diagnosis' kebab-case names (`block-path-frozen`,
/// `inside-qemu`); `layer` is `None` when the diagnosis has none.
pub fn matches(ev: &dyn Evidence, verdict: &str, layer: Option<&str>, set: &Set) -> Vec<SignatureMatch> {
    let threads = threads(ev);
    let config = ev
        .list()
        .iter()
        .find(|p| p.starts_with("config/") && p.ends_with(".conf"))
        .and_then(|p| ev.read_string(p))
        .map(|t| PveConfig::parse(&t));
    let version = ev.read_json("qmp/query-version.json");
    let qemu = version.as_ref().and_then(|v| {
        let q = &v["return"]["qemu"];
        Some(format!("{}.{}.{}", q["major"].as_u64()?, q["minor"].as_u64()?, q["micro"].as_u64()?))
    });
    let pve = version.as_ref().and_then(|v| v["return"]["package"].as_str()).and_then(crate::pve::pve_build);
    let facts = Facts { verdict, layer, threads: threads.as_deref(), config: config.as_ref(), qemu, pve };
    set.signatures.iter().filter_map(|s| one(s, &facts)).collect()
}

struct Facts<'a> {
    verdict: &'a str,
    layer: Option<&'a str>,
    threads: Option<&'a [Thread]>,
    config: Option<&'a PveConfig>,
    qemu: Option<String>,
    pve: Option<String>,
}

fn one(s: &Signature, f: &Facts<'_>) -> Option<SignatureMatch> {
    let mut evidence = Vec::new();
    let mut unverified = Vec::new();
    if !s.verdicts.is_empty() {
        if !s.verdicts.iter().any(|v| v == f.verdict) {
            return None;
        }
        evidence.push(format!("verdict {}", f.verdict));
    }
    if !s.layers.is_empty() {
        match f.layer {
            Some(l) if s.layers.iter().any(|x| x == l) => evidence.push(format!("layer {l}")),
            Some(_) => return None,
            None => unverified.push(format!("layer (wants {})", s.layers.join(" or "))),
        }
    }
    // A Proxmox build is judged by its own range: pve-qemu-kvm carries fixes before upstream.
    match (&f.pve, &s.pve_qemu_affected, &f.qemu, &s.qemu_affected) {
        (Some(p), Some(r), _, _) => {
            if !r.contains(p) {
                return None;
            }
            evidence.push(format!("pve-qemu-kvm {p} is in the affected range {}", r.text));
        }
        (_, _, Some(q), Some(r)) => {
            if !r.contains(q) {
                return None;
            }
            evidence.push(format!("QEMU {q} is in the affected range {}", r.text));
        }
        (_, _, None, Some(_)) | (None, Some(_), None, None) => unverified.push("QEMU version (not captured)".into()),
        _ => {}
    }
    if let Some(rule) = &s.config {
        match f.config {
            Some(cfg) => evidence.push(config_holds(rule, cfg)?),
            None if s.kind == "risk" => return None,
            None => unverified.push("VM config (not captured)".into()),
        }
    }
    if !s.stacks.is_empty() {
        let threads = f.threads?;
        let hit = s.stacks.iter().find_map(|rule| threads.iter().find_map(|t| stack_holds(rule, t)))?;
        evidence.push(hit);
    }
    Some(SignatureMatch {
        id: s.id.clone(),
        kind: s.kind.clone(),
        title: s.title.clone(),
        links: s.links.clone(),
        fixed_in: s.fixed_in(),
        advice: s.advice.clone(),
        evidence,
        unverified,
    })
}

/// `Some(description)` when the thread's frames contain the rule's frames in order.
fn stack_holds(rule: &StackRule, t: &Thread) -> Option<String> {
    if let Some(want) = &rule.thread {
        if !t.name.contains(want.as_str()) {
            return None;
        }
    }
    let mut at = 0;
    let mut seen = Vec::new();
    for p in &rule.frames {
        let i = t.frames[at..].iter().position(|fr| frame_is(p, fr))? + at;
        seen.push(format!("#{i} {}", shown(&t.frames[i])));
        at = i + 1;
    }
    Some(format!("thread {} ({}): {}", t.tid, crate::qmp::one_line(&t.name, 40), seen.join(" < ")))
}

fn shown(fr: &Frame) -> String {
    match (&fr.symbol, &fr.module, fr.offset) {
        (Some(s), _, _) => s.clone(),
        (None, Some(m), Some(o)) => format!("{m}+{o:#x}"),
        _ => "?".into(),
    }
}

fn frame_is(p: &FramePattern, fr: &Frame) -> bool {
    match p {
        FramePattern::Names(names) => fr.symbol.as_deref().is_some_and(|s| {
            // Native stacks may carry `name+0x12`; gdb names plain.
            let base = s.split('+').next().unwrap_or(s);
            names.iter().any(|n| n == base)
        }),
        FramePattern::Offset { module, start, end } => {
            fr.module.as_deref().is_some_and(|m| m.rsplit('/').next() == Some(module.as_str()))
                && fr.offset.is_some_and(|o| (*start..*end).contains(&o))
        }
    }
}

fn config_holds(rule: &ConfigRule, cfg: &PveConfig) -> Option<String> {
    let disks = cfg.disks();
    let mut why = Vec::new();
    if !rule.scsihw.is_empty() {
        let hw = cfg.scsihw();
        rule.scsihw.iter().any(|w| w == hw).then_some(())?;
        why.push(format!("scsihw {hw}"));
    }
    if !rule.bus.is_empty() {
        let on: Vec<&str> = disks
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| rule.bus.iter().any(|b| k.trim_end_matches(|c: char| c.is_ascii_digit()) == b))
            .collect();
        (!on.is_empty()).then_some(())?;
        why.push(format!("disks on {}: {}", rule.bus.join("/"), on.join(", ")));
    }
    let iothread = |o: &Options| o.get("iothread").map(String::as_str) == Some("1");
    if let Some(min) = rule.iothreads_min {
        let n = disks.iter().filter(|(_, o)| iothread(o)).count();
        (n >= min).then_some(())?;
        why.push(format!("{n} disks with an iothread"));
    }
    if rule.no_iothread {
        let without: Vec<&str> = disks.iter().filter(|(_, o)| !iothread(o)).map(|(k, _)| k.as_str()).collect();
        (!without.is_empty()).then_some(())?;
        why.push(format!("no iothread: {}", without.join(", ")));
    }
    if rule.throttle {
        let t: Vec<&str> = disks
            .iter()
            .filter(|(_, o)| o.keys().any(|k| k.starts_with("mbps") || k.starts_with("iops")))
            .map(|(k, _)| k.as_str())
            .collect();
        (!t.is_empty()).then_some(())?;
        why.push(format!("QEMU throttle on {}", t.join(", ")));
    }
    if !rule.aio.is_empty() {
        let a: Vec<&str> = disks
            .iter()
            .filter(|(_, o)| o.get("aio").is_some_and(|v| rule.aio.contains(v)))
            .map(|(k, _)| k.as_str())
            .collect();
        (!a.is_empty()).then_some(())?;
        why.push(format!("aio {} on {}", rule.aio.join("/"), a.join(", ")));
    }
    if !rule.disk_options.is_empty() {
        let d: Vec<&str> = disks
            .iter()
            .filter(|(_, o)| rule.disk_options.iter().all(|(k, v)| o.get(k) == Some(v)))
            .map(|(k, _)| k.as_str())
            .collect();
        (!d.is_empty()).then_some(())?;
        let opts: Vec<String> = rule.disk_options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        why.push(format!("{} on {}", opts.join(","), d.join(", ")));
    }
    Some(format!("config: {}", why.join("; ")))
}

/// Threads from the native `stacks/threads.json`, else gdb's `stacks/gdb.txt`.
/// `None` when no stacks were captured.
fn threads(ev: &dyn Evidence) -> Option<Vec<Thread>> {
    if let Some(v) = ev.read_json("stacks/threads.json") {
        let list = v["threads"].as_array()?;
        return Some(
            list.iter()
                .map(|t| Thread {
                    tid: t["tid"].as_i64().unwrap_or(0),
                    name: t["name"].as_str().unwrap_or("").to_string(),
                    frames: t["frames"].as_array().into_iter().flatten().map(native_frame).collect(),
                })
                .collect(),
        );
    }
    ev.read_string("stacks/gdb.txt").map(|t| gdb_threads(&t))
}

fn native_frame(fr: &Value) -> Frame {
    Frame {
        symbol: fr["symbol"].as_str().map(str::to_string),
        module: fr["module"].as_str().map(str::to_string),
        offset: fr["module_offset"].as_u64(),
    }
}

/// gdb's `thread apply all bt`: `Thread N (Thread 0x… (LWP tid) "name"):` then
/// `#k  0x… in func (…) at …` or `#k  func (…) at …` lines.
fn gdb_threads(text: &str) -> Vec<Thread> {
    let mut out: Vec<Thread> = Vec::new();
    for line in text.lines() {
        if line.starts_with("Thread ") && line.contains("(LWP ") {
            let tid = line.split("(LWP ").nth(1).and_then(|r| r.split(')').next()).and_then(|n| n.trim().parse().ok());
            let name = line.split('"').nth(1).unwrap_or("").to_string();
            out.push(Thread { tid: tid.unwrap_or(0), name, frames: Vec::new() });
            continue;
        }
        let l = line.trim_start();
        if !l.starts_with('#') {
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        let mut words = l.split_whitespace().skip(1);
        let mut w = words.next().unwrap_or("");
        if w.starts_with("0x") {
            if words.next() != Some("in") {
                continue;
            }
            w = words.next().unwrap_or("");
        }
        let symbol = (!w.is_empty() && w != "??").then(|| w.to_string());
        t.frames.push(Frame { symbol, module: None, offset: None });
    }
    out
}
