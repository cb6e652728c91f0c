//! Matching signatures against evidence files: pure, so a live run and `inspect` on
//! the sealed archive give the same answer.
//!
//! Every condition a signature states must hold. A condition the evidence cannot
//! decide (no version captured, no layer yet) does not block a match but is listed in
//! `unverified`. A bug's stack rule that the evidence cannot evaluate (no stacks, or
//! the QEMU frames where the rule's functions would be are unnamed because the debug
//! symbols are not installed) makes a `possible` match, never a confirmed one. A bug
//! without a stack rule matches only when its version range and its config rule are
//! both verified; a risk needs its config seen.

use serde::Serialize;
use serde_json::Value;

use super::{ConfigRule, FramePattern, Set, Signature, StackRule};
use crate::archive::Evidence;
use crate::pve::vmconfig::PveConfig;

/// Whether the evidence confirms a signature or only fails to rule it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Every condition that carries the match was seen.
    Matched,
    /// The stack rule could not be evaluated; the other conditions hold or are
    /// unverifiable. Never a confirmed known bug.
    Possible,
}

/// A signature the evidence matches, as the summary shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureMatch {
    pub id: String,
    /// `bug` or `risk`.
    pub kind: String,
    pub status: Status,
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

/// One thread's frames, innermost first (inlined calls expanded as gdb lists them).
struct Thread {
    tid: i64,
    name: String,
    frames: Vec<Frame>,
}

struct Frame {
    symbol: Option<String>,
    module: Option<String>,
    offset: Option<u64>,
    /// No name, in QEMU's own image: any function a rule names could be here.
    unnamed_qemu: bool,
}

const HOST_INFO: &str = "host/info.json";

/// A `versions` string of host info.
fn host_str<'a>(host: Option<&'a Value>, key: &str) -> Option<&'a str> {
    host.and_then(|h| h[key].as_str())
}

/// Where the pve-qemu-kvm version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PveSource {
    /// `query-version` of the running process.
    Running,
    /// Installed (pveversion or dpkg), and the QEMU image on disk is the running one.
    InstalledSameImage,
    /// Installed; the running build may differ.
    Installed,
}

/// Known-bug and risk signatures of `set` that the evidence matches.
/// `verdict` and `layer` are the diagnosis' kebab-case names (`block-path-frozen`,
/// `inside-qemu`); `layer` is `None` when the diagnosis has none.
pub fn matches(ev: &dyn Evidence, verdict: &str, layer: Option<&str>, set: &Set) -> Vec<SignatureMatch> {
    let stacks = ev.read_json("stacks/threads.json");
    let threads = threads(ev, stacks.as_ref());
    // `pve-qemu-kvm: <version>` of `pveversion --verbose`: what is installed.
    let pveversion = ev
        .read_string("commands/pveversion.txt")
        .and_then(|t| t.lines().find_map(|l| l.trim().strip_prefix("pve-qemu-kvm:").map(|v| v.trim().to_string())));
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
    let package = version.as_ref().and_then(|v| v["return"]["package"].as_str().map(str::to_string));
    // host/info.json (hostinfo::PATH), read as JSON: hostinfo imports diagnose, which
    // imports this module.
    let host = ev.read_json(HOST_INFO).map(|h| h["versions"].clone());
    let proxmox = is_proxmox(ev, package.as_deref());
    let (mut pve, mut pve_source) = pve_version(package.as_deref(), pveversion.clone(), host.as_ref());
    // An installed pve-qemu-kvm says nothing of a running QEMU that is not Proxmox's.
    if proxmox == Some(false) && pve_source != Some(PveSource::Running) {
        (pve, pve_source) = (None, None);
    }
    let facts = Facts {
        verdict,
        layer,
        threads: threads.as_deref(),
        config: config.as_ref(),
        qemu,
        pve,
        pve_source,
        proxmox,
        symbols_hint: symbols_hint(stacks.as_ref(), package.as_deref(), pveversion.as_deref(), host.as_ref()),
    };
    set.signatures.iter().filter_map(|s| one(s, &facts)).collect()
}

/// The pve-qemu-kvm build: the running one from `query-version`, else the installed
/// one (`commands/pveversion.txt`, then host info's dpkg record). A main-loop deadlock
/// leaves QMP unanswered, so the installed version is often all there is.
fn pve_version(
    package: Option<&str>,
    from_pveversion: Option<String>,
    host: Option<&Value>,
) -> (Option<String>, Option<PveSource>) {
    if let Some(p) = package.and_then(crate::pve::pve_build) {
        return (Some(p), Some(PveSource::Running));
    }
    let from_dpkg =
        || host_str(host, "qemu_installed").and_then(|i| i.strip_prefix("pve-qemu-kvm ")).map(|v| v.trim().to_string());
    let installed = from_pveversion.or_else(from_dpkg).filter(|v| super::version::is_version(v));
    let same = host_str(host, "qemu_on_disk") == Some("same");
    let source = if same { PveSource::InstalledSameImage } else { PveSource::Installed };
    (installed.clone(), installed.map(|_| source))
}

/// Whether the QEMU is Proxmox's build: `query-proxmox-support` answers only there, and
/// `query-version`'s package names the build. `None` when nothing says.
fn is_proxmox(ev: &dyn Evidence, package: Option<&str>) -> Option<bool> {
    if let Some(v) = ev.read_json("qmp/query-proxmox-support.json") {
        if v.get("return").is_some() {
            return Some(true);
        }
        if v["error"]["class"].as_str() == Some("CommandNotFound") {
            return Some(false);
        }
    }
    let p = package?.trim();
    if p.is_empty() {
        return None;
    }
    Some(crate::pve::pve_build(p).is_some())
}

/// "install the debug symbols for build-id … (pve-qemu-kvm-dbgsym=…)": what would make
/// QEMU's frames named.
fn symbols_hint(
    stacks: Option<&Value>,
    package: Option<&str>,
    pveversion: Option<&str>,
    host: Option<&Value>,
) -> String {
    let from_stacks = stacks.and_then(|v| {
        v["modules"].as_array()?.iter().find_map(|m| {
            let name = m["name"].as_str()?;
            crate::stacks::dbgsym::is_qemu_image(name).then(|| m["build_id"].as_str().map(str::to_string)).flatten()
        })
    });
    let build_id = from_stacks.or_else(|| host_str(host, "qemu_build_id").map(str::to_string));
    let installed = pveversion.map(|v| format!("pve-qemu-kvm_{v}"));
    // The running build's package when QMP named it; else the installed one's, which
    // matches the build-id only if the VM runs the installed build.
    let pkg = match (package, installed.as_deref()) {
        (Some(p), _) => crate::stacks::dbgsym::for_module("qemu-system-x86_64", Some(p)),
        (None, Some(i)) => crate::stacks::dbgsym::for_module("qemu-system-x86_64", Some(i))
            .map(|p| format!("{p} if the VM runs the installed build; else the same package of the running version")),
        (None, None) => crate::stacks::dbgsym::for_module("qemu-system-x86_64", None),
    };
    format!(
        "install the debug symbols for build-id {}{} (see `wedge-autopsy audit`) and re-run `inspect --resymbolize`",
        build_id.map(|b| crate::qmp::one_line(&b, 64)).unwrap_or_else(|| "(not recorded)".into()),
        pkg.map(|p| format!(" ({})", crate::qmp::one_line(&p, 200))).unwrap_or_default()
    )
}

struct Facts<'a> {
    verdict: &'a str,
    layer: Option<&'a str>,
    threads: Option<&'a [Thread]>,
    config: Option<&'a PveConfig>,
    qemu: Option<String>,
    pve: Option<String>,
    pve_source: Option<PveSource>,
    proxmox: Option<bool>,
    symbols_hint: String,
}

/// What a signature's stack rules say of the captured threads.
enum StackFinding {
    Hit(String),
    /// Cannot be evaluated, and why; `unnamed`: because QEMU's frames have no names
    /// (debug symbols would help), else because no stacks were captured.
    NotEvaluable {
        why: String,
        unnamed: bool,
    },
    Miss,
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
    let mut version_verified = false;
    match (&f.pve, &s.pve_qemu_affected, &f.qemu, &s.qemu_affected) {
        // Only the installed build is known (QMP silent) and it is outside the range: an
        // upgrade may have installed the fix while this VM still runs an affected build.
        (Some(p), Some(r), _, _) if !r.contains(p) && f.pve_source == Some(PveSource::Installed) => {
            unverified.push(format!(
                "the running pve-qemu-kvm (the installed {p} is outside the affected range {}, but QMP did not say which build runs; a VM started before an upgrade still runs the old one)",
                r.text
            ));
        }
        (Some(p), Some(r), _, _) => {
            if !r.contains(p) {
                return None;
            }
            let (from, verified) = match f.pve_source {
                Some(PveSource::Running) | None => ("the running build", true),
                Some(PveSource::InstalledSameImage) => ("installed; the QEMU image on disk is the running one", true),
                Some(PveSource::Installed) => ("installed; the running build may differ", false),
            };
            version_verified = verified;
            evidence.push(format!("pve-qemu-kvm {p} ({from}) is in the affected range {}", r.text));
            if !verified {
                unverified.push(format!("the running pve-qemu-kvm (installed is {p}; QMP did not say)"));
            }
        }
        // Not Proxmox's QEMU: a range given only for pve-qemu-kvm (a bug of its patches)
        // does not apply.
        (_, Some(_), _, None) if f.proxmox == Some(false) => return None,
        (_, _, Some(q), Some(r)) => {
            if !r.contains(q) {
                return None;
            }
            version_verified = true;
            evidence.push(format!("QEMU {q} is in the affected range {}", r.text));
        }
        (_, _, None, Some(_)) | (None, Some(_), None, None) => unverified.push("QEMU version (not captured)".into()),
        _ => {}
    }
    let mut config_verified = false;
    if let Some(rule) = &s.config {
        match f.config {
            Some(cfg) => {
                evidence.push(config_holds(rule, cfg)?);
                config_verified = true;
            }
            None if s.kind == "risk" => return None,
            None => unverified.push("VM config (not captured)".into()),
        }
    }
    let mut status = Status::Matched;
    if s.stacks.is_empty() {
        // Without frames, the version and the config are the evidence: both must be seen.
        if s.kind == "bug" && !(version_verified && config_verified) {
            return None;
        }
    } else {
        match stacks_hold(&s.stacks, f.threads) {
            StackFinding::Hit(hit) => evidence.push(hit),
            StackFinding::Miss => return None,
            StackFinding::NotEvaluable { why, unnamed } => {
                status = Status::Possible;
                let next = if unnamed { f.symbols_hint.as_str() } else { "a capture with stacks would decide" };
                unverified.push(format!("stack rule not evaluable: {why}; {next}"));
            }
        }
    }
    Some(SignatureMatch {
        id: s.id.clone(),
        kind: s.kind.clone(),
        status,
        title: s.title.clone(),
        links: s.links.clone(),
        fixed_in: s.fixed_in(),
        advice: s.advice.clone(),
        evidence,
        unverified,
    })
}

/// A thread whose frames contain a rule's frames: a hit. Else, when unnamed QEMU frames
/// could stand for the missing names (or no stacks were captured), not evaluable.
fn stacks_hold(rules: &[StackRule], threads: Option<&[Thread]>) -> StackFinding {
    let Some(threads) = threads.filter(|t| !t.is_empty()) else {
        return StackFinding::NotEvaluable { why: "no stacks were captured".into(), unnamed: false };
    };
    if let Some(hit) = rules.iter().find_map(|rule| threads.iter().find_map(|t| stack_holds(rule, t, false))) {
        return StackFinding::Hit(hit);
    }
    match rules.iter().find_map(|rule| threads.iter().find_map(|t| stack_holds(rule, t, true))) {
        Some(could) => StackFinding::NotEvaluable {
            why: format!("QEMU frames unnamed ({})", could.split_once(':').map(|(t, _)| t).unwrap_or(&could)),
            unnamed: true,
        },
        None => StackFinding::Miss,
    }
}

/// `Some(description)` when the thread's frames contain the rule's frames in order.
/// With `unnamed_any`, an unnamed QEMU frame stands for any named function.
fn stack_holds(rule: &StackRule, t: &Thread, unnamed_any: bool) -> Option<String> {
    if let Some(want) = &rule.thread {
        if !t.name.contains(want.as_str()) {
            return None;
        }
    }
    let mut at = 0;
    let mut seen = Vec::new();
    for p in &rule.frames {
        let i = t.frames[at..].iter().position(|fr| {
            frame_is(p, fr) || (unnamed_any && fr.unnamed_qemu && matches!(p, FramePattern::Names(_)))
        })? + at;
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
    // iothreads as qemu-server applies them (PveConfig::iothread_effective).
    if let Some(min) = rule.iothreads_min {
        let with: Vec<&str> =
            disks.iter().filter(|(k, o)| cfg.iothread_effective(k, o)).map(|(k, _)| k.as_str()).collect();
        (with.len() >= min).then_some(())?;
        why.push(format!("{} disks with an effective iothread ({})", with.len(), with.join(", ")));
    }
    if rule.no_iothread {
        let without: Vec<&str> =
            disks.iter().filter(|(k, o)| !cfg.iothread_effective(k, o)).map(|(k, _)| k.as_str()).collect();
        (!without.is_empty()).then_some(())?;
        why.push(format!("no iothread: {}", without.join(", ")));
    }
    if rule.throttle {
        let t: Vec<&str> = disks
            .iter()
            .filter(|(_, o)| o.keys().any(|k| crate::pve::vmconfig::is_throttle_option(k)))
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
/// The threads of the native capture (`stacks`, the parsed `stacks/threads.json`), else
/// of gdb's text.
fn threads(ev: &dyn Evidence, stacks: Option<&Value>) -> Option<Vec<Thread>> {
    if let Some(v) = stacks {
        let list = v["threads"].as_array()?;
        return Some(
            list.iter()
                .map(|t| Thread {
                    tid: t["tid"].as_i64().unwrap_or(0),
                    name: t["name"].as_str().unwrap_or("").to_string(),
                    frames: t["frames"].as_array().into_iter().flatten().flat_map(native_frames).collect(),
                })
                .collect(),
        );
    }
    ev.read_string("stacks/gdb.txt").map(|t| gdb_threads(&t))
}

/// One native frame as gdb would list it: its inlined calls (recorded innermost
/// first) each as a frame at the same address, then the function they were inlined into.
fn native_frames(fr: &Value) -> Vec<Frame> {
    let module = fr["module"].as_str().map(str::to_string);
    let offset = fr["module_offset"].as_u64();
    let at = |symbol: Option<String>| Frame {
        unnamed_qemu: symbol.is_none() && module.as_deref().is_some_and(crate::stacks::dbgsym::is_qemu_image),
        symbol,
        module: module.clone(),
        offset,
    };
    let mut out: Vec<Frame> = fr["inlined"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["function"].as_str())
        .map(|f| at(Some(f.to_string())))
        .collect();
    out.push(at(fr["symbol"].as_str().map(str::to_string)));
    out
}

/// gdb's `thread apply all bt`: `Thread N (Thread 0x… (LWP tid) "name"):` then
/// `#k  0x… in func (…) at …` or `#k  func (…) at …` lines. `?? ()` is an unnamed
/// frame; gdb adds `from LIB` only for shared libraries, so one without is QEMU's own.
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
        let module = l.split(" from ").nth(1).map(|m| m.trim().to_string());
        let unnamed_qemu = symbol.is_none() && module.as_deref().is_none_or(crate::stacks::dbgsym::is_qemu_image);
        t.frames.push(Frame { symbol, module, offset: None, unnamed_qemu });
    }
    out
}
