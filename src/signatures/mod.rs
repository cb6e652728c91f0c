//! Known-bug signatures as data (`signatures/*.toml`): upstream wedges recognised from
//! the evidence, each with its links and the versions that fix it.
//!
//! Like runbooks, the built-in files are compiled in and an operator directory
//! (`/etc/wedge-autopsy/signatures/`, key `signature_dir`) overrides them by id. Files
//! are strict TOML: an unknown key, a bad version range or frame pattern, or a duplicate
//! id is a load-time error naming file, line and key. Matching ([`matches`]) is pure over
//! the evidence files and the verdict, so `inspect` recomputes it from an archive.

mod matching;
mod version;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use matching::{matches, SignatureMatch, Status};
pub use version::{compare as compare_versions, Range};

use crate::runbook::{RunbookError as SignatureError, RunbookErrors as SignatureErrors};

/// Signatures compiled into the binary: `(file name, text)`.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("qemu-3144-throttle-group-iothreads", include_str!("../../signatures/qemu-3144-throttle-group-iothreads.toml")),
    ("pve-6810-virtio-scsi-tmf-deadlock", include_str!("../../signatures/pve-6810-virtio-scsi-tmf-deadlock.toml")),
    ("pve-lsi-reentrancy-regression", include_str!("../../signatures/pve-lsi-reentrancy-regression.toml")),
    ("qemu-ide-trim-drain-deadlock", include_str!("../../signatures/qemu-ide-trim-drain-deadlock.toml")),
    ("incident-2026-06-11-risk-stack", include_str!("../../signatures/incident-2026-06-11-risk-stack.toml")),
];
pub const DEFAULT_DIR: &str = "/etc/wedge-autopsy/signatures";

/// Verdicts and layers a rule may name (the diagnosis serializes them kebab-case).
const VERDICTS: &[&str] = &[
    "block-path-frozen",
    "main-loop-wedged",
    "qmp-unreachable",
    "paused",
    "io-error",
    "process-stopped",
    "healthy",
    "inconclusive",
];
const LAYERS: &[&str] = &["inside-qemu", "below-qemu", "network-backend", "guest-not-submitting", "unknown"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    schema: u32,
    id: String,
    /// `bug` (an upstream defect with a fix) or `risk` (a configuration that wedges).
    kind: String,
    title: String,
    /// What the matched evidence means and what to do about it.
    advice: String,
    #[serde(default)]
    links: Vec<String>,
    #[serde(default)]
    versions: RawVersions,
    #[serde(rename = "match")]
    rules: RawMatch,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersions {
    qemu_affected: Option<String>,
    qemu_fixed: Option<String>,
    pve_qemu_affected: Option<String>,
    pve_qemu_fixed: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    verdict: Vec<String>,
    #[serde(default)]
    layer: Vec<String>,
    #[serde(default)]
    stack: Vec<RawStack>,
    config: Option<RawConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStack {
    /// Frames, innermost first, that one thread's stack must contain in this order.
    /// `a|b` accepts either name; `module+0xSTART-0xEND` an offset range in a module.
    frames: Vec<String>,
    /// A thread name fragment (e.g. "iothread", "CPU"), optional.
    thread: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    scsihw: Vec<String>,
    /// Disk buses, e.g. ["ide", "sata"].
    #[serde(default)]
    bus: Vec<String>,
    /// At least this many disks with iothread=1.
    iothreads_min: Option<usize>,
    /// At least one disk without an iothread.
    #[serde(default)]
    no_iothread: bool,
    /// At least one disk with a QEMU-level throttle (mbps*/iops*).
    #[serde(default)]
    throttle: bool,
    #[serde(default)]
    aio: Vec<String>,
    /// Options one disk must carry, e.g. ["discard=on"].
    #[serde(default)]
    disk_options: Vec<String>,
}

/// A frame pattern of a stack rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FramePattern {
    /// Any of these symbol names.
    Names(Vec<String>),
    /// `module` (its file name) with an offset in `start..end`.
    Offset { module: String, start: u64, end: u64 },
}

#[derive(Debug, Clone, Serialize)]
pub struct StackRule {
    pub frames: Vec<FramePattern>,
    pub thread: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigRule {
    pub scsihw: Vec<String>,
    pub bus: Vec<String>,
    pub iothreads_min: Option<usize>,
    pub no_iothread: bool,
    pub throttle: bool,
    pub aio: Vec<String>,
    pub disk_options: Vec<(String, String)>,
}

impl ConfigRule {
    fn is_empty(&self) -> bool {
        self.scsihw.is_empty()
            && self.bus.is_empty()
            && self.iothreads_min.is_none()
            && !self.no_iothread
            && !self.throttle
            && self.aio.is_empty()
            && self.disk_options.is_empty()
    }
}

/// A checked signature.
#[derive(Debug, Clone, Serialize)]
pub struct Signature {
    pub id: String,
    /// `bug` or `risk`.
    pub kind: String,
    pub title: String,
    pub advice: String,
    pub links: Vec<String>,
    pub qemu_affected: Option<Range>,
    pub qemu_fixed: Option<String>,
    pub pve_qemu_affected: Option<Range>,
    pub pve_qemu_fixed: Option<String>,
    pub verdicts: Vec<String>,
    pub layers: Vec<String>,
    pub stacks: Vec<StackRule>,
    pub config: Option<ConfigRule>,
    /// `built-in` or the file it came from.
    pub source: String,
    /// SHA-256 of the file's text, recorded in the archive (`signatures.json`) so
    /// `inspect` can tell whether it recomputes against the same set.
    pub sha256: String,
}

impl Signature {
    /// "QEMU 11.0.0, pve-qemu-kvm 10.2.1-1", or "no fix" / "not a bug".
    pub fn fixed_in(&self) -> String {
        let mut v = Vec::new();
        if let Some(q) = &self.qemu_fixed {
            v.push(format!("QEMU {q}"));
        }
        if let Some(p) = &self.pve_qemu_fixed {
            v.push(format!("pve-qemu-kvm {p}"));
        }
        match (v.is_empty(), self.kind.as_str()) {
            (false, _) => v.join(", "),
            (true, "risk") => "not a bug: a configuration to change".into(),
            (true, _) => "no fixed version known".into(),
        }
    }
}

/// Parses and checks one signature file's text. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Signature, SignatureErrors> {
    let raw: RawSignature = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        SignatureErrors(vec![SignatureError { file: file.into(), line, key: None, message: e.message().trim().into() }])
    })?;
    let mut errs = Vec::new();
    let mut err = |key: &str, message: String| {
        errs.push(SignatureError { file: file.into(), line: locate(text, key), key: Some(key.into()), message });
    };
    if raw.schema != 1 {
        err("schema", format!("schema {} is not supported by this version (expected 1)", raw.schema));
    }
    if raw.id.is_empty() || !raw.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        err("id", format!("{:?}: use letters, digits, '-' and '_'", raw.id));
    }
    if !["bug", "risk"].contains(&raw.kind.as_str()) {
        err("kind", format!("{:?}: \"bug\" or \"risk\"", raw.kind));
    }
    for l in &raw.links {
        if !l.starts_with("https://") || l.chars().any(|c| c.is_whitespace() || c.is_control()) {
            err("links", format!("{l:?}: links are https:// URLs without spaces"));
        }
    }
    if raw.kind == "bug" && raw.links.is_empty() {
        err("links", "a bug signature needs at least one upstream link".into());
    }
    let mut range = |key: &str, v: &Option<String>| match v.as_deref().map(Range::parse) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            err(key, e);
            None
        }
    };
    let qemu_affected = range("qemu_affected", &raw.versions.qemu_affected);
    let pve_qemu_affected = range("pve_qemu_affected", &raw.versions.pve_qemu_affected);
    for (key, v) in [("qemu_fixed", &raw.versions.qemu_fixed), ("pve_qemu_fixed", &raw.versions.pve_qemu_fixed)] {
        if let Some(v) = v {
            if !version::is_version(v) {
                err(key, format!("{v:?} is not a version (e.g. \"10.2.1\" or \"10.2.1-1\")"));
            }
        }
    }
    let m = &raw.rules;
    for v in &m.verdict {
        if !VERDICTS.contains(&v.as_str()) {
            err("verdict", format!("unknown verdict {v:?}; one of {}", VERDICTS.join(", ")));
        }
    }
    for l in &m.layer {
        if !LAYERS.contains(&l.as_str()) {
            err("layer", format!("unknown layer {l:?}; one of {}", LAYERS.join(", ")));
        }
    }
    let mut stacks = Vec::new();
    for s in &m.stack {
        if s.frames.is_empty() {
            err("frames", "a stack rule needs at least one frame".into());
        }
        let mut frames = Vec::new();
        for f in &s.frames {
            match frame_pattern(f) {
                Ok(p) => frames.push(p),
                Err(e) => err("frames", e),
            }
        }
        stacks.push(StackRule { frames, thread: s.thread.clone() });
    }
    let config = m.config.as_ref().map(|c| {
        let mut opts = Vec::new();
        for o in &c.disk_options {
            match o.split_once('=') {
                Some((k, v)) if !k.is_empty() => opts.push((k.to_string(), v.to_string())),
                _ => err("disk_options", format!("{o:?}: write key=value, e.g. \"discard=on\"")),
            }
        }
        ConfigRule {
            scsihw: c.scsihw.clone(),
            bus: c.bus.clone(),
            iothreads_min: c.iothreads_min,
            no_iothread: c.no_iothread,
            throttle: c.throttle,
            aio: c.aio.clone(),
            disk_options: opts,
        }
    });
    let config = config.filter(|c| !c.is_empty());
    match raw.kind.as_str() {
        // Without frames, the version and the config are the evidence: both must be stated
        // (and, when matching, verified).
        "bug"
            if stacks.is_empty() && (config.is_none() || (qemu_affected.is_none() && pve_qemu_affected.is_none())) =>
        {
            err(
                "stack",
                "a bug signature without a [[match.stack]] rule needs an affected version range and a \
                 [match.config] rule: they are its evidence"
                    .into(),
            )
        }
        "risk" if config.is_none() => err("config", "a risk signature needs a [match.config] rule".into()),
        _ => {}
    }
    if !errs.is_empty() {
        return Err(SignatureErrors(errs));
    }
    Ok(Signature {
        id: raw.id,
        kind: raw.kind,
        title: raw.title,
        advice: raw.advice,
        links: raw.links,
        qemu_affected,
        qemu_fixed: raw.versions.qemu_fixed,
        pve_qemu_affected,
        pve_qemu_fixed: raw.versions.pve_qemu_fixed,
        verdicts: m.verdict.clone(),
        layers: m.layer.clone(),
        stacks,
        config,
        source: file.into(),
        sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())),
    })
}

/// `name`, `a|b`, or `module+0xSTART-0xEND`.
fn frame_pattern(text: &str) -> Result<FramePattern, String> {
    let bad = |why: &str| format!("frame {text:?}: {why}");
    if let Some((module, range)) = text.split_once("+0x") {
        let (a, b) = range.split_once("-0x").ok_or_else(|| bad("write an offset range as module+0xSTART-0xEND"))?;
        let start = u64::from_str_radix(a, 16).map_err(|_| bad("START is not hex"))?;
        let end = u64::from_str_radix(b, 16).map_err(|_| bad("END is not hex"))?;
        if module.is_empty() || module.contains('/') || start >= end {
            return Err(bad("needs a module file name and START < END"));
        }
        return Ok(FramePattern::Offset { module: module.into(), start, end });
    }
    let names: Vec<String> = text.split('|').map(str::to_string).collect();
    if names.iter().any(|n| n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_.:$@".contains(c))) {
        return Err(bad("symbol names are [A-Za-z0-9_.:$@], alternatives separated by '|'"));
    }
    Ok(FramePattern::Names(names))
}

/// Line of the first `key = …` in the text.
fn locate(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
        .map(|n| n + 1)
}

/// A loaded set: every signature, operator files shadowing built-ins by id.
#[derive(Debug, Clone, Default)]
pub struct Set {
    pub signatures: Vec<Signature>,
    /// Operator files that did not load (each with file:line), kept out of the set.
    pub errors: Vec<String>,
}

/// Loads the built-ins and `dir/*.toml`. A broken operator file is reported in
/// `errors` and skipped: a typo there must not stop a capture.
pub fn load(dir: &Path) -> Set {
    let mut set = Set::default();
    for (name, text) in BUILT_IN {
        match parse(text, &format!("built-in {name}.toml")) {
            Ok(s) => set.signatures.push(Signature { source: "built-in".into(), ..s }),
            Err(e) => set.errors.push(e.to_string()),
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect())
        .unwrap_or_default();
    files.sort();
    let mut seen = std::collections::BTreeSet::new();
    for p in files {
        let text = match crate::procfs::read_capped(&p, 1 << 20) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) => {
                set.errors.push(format!("{}: cannot read: {e}", p.display()));
                continue;
            }
        };
        match parse(&text, &p.display().to_string()) {
            Ok(s) if !seen.insert(s.id.clone()) => {
                set.errors.push(format!("{}: duplicate id {:?} in {}", p.display(), s.id, dir.display()))
            }
            Ok(s) => {
                set.signatures.retain(|b| b.id != s.id);
                set.signatures.push(s);
            }
            Err(e) => set.errors.push(e.to_string()),
        }
    }
    set.signatures.sort_by(|a, b| a.id.cmp(&b.id));
    set
}

/// Where a capture records the set it matched against.
pub const RECORD_PATH: &str = "signatures.json";

/// One signature of the set a capture used: `signatures.json` in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    pub id: String,
    /// `built-in` or the operator file's path.
    pub source: String,
    /// SHA-256 of the file's text.
    pub sha256: String,
}

/// The set as recorded in an archive.
pub fn record(set: &Set) -> Vec<RecordEntry> {
    set.signatures
        .iter()
        .map(|s| RecordEntry { id: s.id.clone(), source: s.source.clone(), sha256: s.sha256.clone() })
        .collect()
}

/// `inspect`'s one-line note when the archive's recorded set differs from `set` (the
/// recomputed matches may then differ from the summary's). `None` when they are the
/// same; a note too when the archive predates the record.
pub fn record_note(ev: &dyn crate::archive::Evidence, set: &Set) -> Option<String> {
    let Some(bytes) = ev.read(RECORD_PATH) else {
        return Some(format!(
            "note: this archive does not record its signature set ({RECORD_PATH}); recomputed matches use this \
             host's {} signatures",
            set.signatures.len()
        ));
    };
    let Ok(then) = serde_json::from_slice::<Vec<RecordEntry>>(&bytes) else {
        return Some(format!("note: {RECORD_PATH} in the archive is unreadable; recomputed with this host's set"));
    };
    let now = record(set);
    let sha = |v: &[RecordEntry], id: &str| v.iter().find(|e| e.id == id).map(|e| e.sha256.clone());
    let mut ids: Vec<&str> = then.iter().chain(&now).map(|e| e.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    let differ: Vec<&str> = ids.into_iter().filter(|id| sha(&then, id) != sha(&now, id)).collect();
    (!differ.is_empty()).then(|| {
        format!(
            "note: the signature set differs from the capture's ({}: {}); recomputed matches use this host's set",
            differ.len(),
            crate::qmp::one_line(&differ.join(", "), 200)
        )
    })
}

static ACTIVE: OnceLock<Set> = OnceLock::new();

/// Loads the set every diagnosis of this process uses; returns the load errors.
/// Called once at start-up; later calls change nothing.
pub fn configure(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    ACTIVE.get_or_init(|| {
        let set = load(dir);
        errors = set.errors.clone();
        set
    });
    errors
}

/// The set in use: what [`configure`] loaded, else the built-ins.
pub fn active() -> &'static Set {
    ACTIVE.get_or_init(|| load(Path::new("/nonexistent/wedge-autopsy/signatures")))
}

/// `signatures list`: one line per signature.
pub fn list_text(set: &Set) -> String {
    let mut o = String::new();
    for s in &set.signatures {
        o.push_str(&format!("{:<40} {:<5} {:<10} {}\n", s.id, s.kind, s.source, s.title));
    }
    for e in &set.errors {
        o.push_str(&format!("INVALID: {e}\n"));
    }
    o
}

/// `signatures show ID`: the file's text (operator file first, then built-in).
pub fn show_text(id: &str, dir: &Path) -> Option<String> {
    let set = load(dir);
    let s = set.signatures.iter().find(|s| s.id == id)?;
    if s.source == "built-in" {
        BUILT_IN.iter().find_map(|(_, t)| parse(t, "").ok().filter(|p| p.id == id).map(|_| t.to_string()))
    } else {
        std::fs::read_to_string(&s.source).ok()
    }
}

#[cfg(test)]
mod tests;
