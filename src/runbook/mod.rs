//! Runbooks: the capture plan as data (`runbooks/*.toml`), checked before anything runs.
//!
//! A runbook is strict TOML: unknown keys, duplicate ids or outputs, unknown placeholders,
//! a QMP command outside the read-only allowlist, a shell string where an argv belongs,
//! or a timeout over the cap are all load-time errors naming file, line and key. The
//! default runbook is embedded, so the tool works with nothing installed.

mod template;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use template::{Template, Vars};

use crate::exit::Exit;
use crate::units::parse_duration;
pub use crate::units::parse_size;

/// Runbooks compiled into the binary: `(name, text)`.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("qemu-wedge", include_str!("../../runbooks/qemu-wedge.toml")),
    ("qemu-wedge-full", include_str!("../../runbooks/qemu-wedge-full.toml")),
    ("qemu-wedge-core", include_str!("../../runbooks/qemu-wedge-core.toml")),
    ("diagnose", include_str!("../../runbooks/diagnose.toml")),
    ("libvirt-qemu", include_str!("../../runbooks/libvirt-qemu.toml")),
];
pub const DEFAULT: &str = "qemu-wedge";
/// No single step may wait longer than this; no runbook longer than `MAX_DEADLINE`.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_DEADLINE: Duration = Duration::from_secs(1800);
const KINDS: &[&str] = &[
    "proc",
    "host",
    "host-info",
    "qmp",
    "qom-throttle",
    "inflight",
    "stacks",
    "file",
    "command",
    "core",
    "minicore",
    "pve-tasks",
];
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "fish", "csh", "tcsh", "busybox"];

/// A runbook file (`runbooks/*.toml`). Durations are strings like "2s", "500ms".
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRunbook {
    /// Format version; must be 1.
    schema: u32,
    /// Name used with `--runbook NAME`.
    name: String,
    description: String,
    /// Deadline for the whole capture (default 120s, at most 1800s).
    deadline: Option<String>,
    /// Where the VM's process and monitor live, when not in Proxmox's layout.
    target: Option<RawTarget>,
    /// The steps, run in order.
    #[serde(default)]
    step: Vec<RawStep>,
}

/// Every key any step kind may use; which keys a kind accepts is checked after parsing,
/// so a misplaced key gets a message naming the kind.
/// `[target]`: templates take {vmid} {domain} {run_dir} {pve_dir}. The process is
/// trusted only if its command line names `pidfile` (after -pidfile) or the `qmp` socket.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    /// The VM's pidfile, e.g. "/run/libvirt/qemu/{domain}.pid".
    pidfile: Option<String>,
    /// The monitor socket; `*` matches within one path component,
    /// e.g. "/var/lib/libvirt/qemu/domain-*-{domain}/monitor.sock".
    qmp: Option<String>,
    /// The libvirt domain name for a VMID, e.g. "vm-{vmid}".
    domain: Option<String>,
    /// "socket" (connect to `qmp`) or "virsh" (`virsh qemu-monitor-command`, for
    /// libvirt, whose daemon holds the socket).
    monitor: Option<String>,
    /// The virsh program (default "virsh").
    virsh: Option<String>,
    /// Check Proxmox's .vmlist for the VM's node (default false with a [target]).
    cluster: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawStep {
    /// Unique step id, shown in progress and the manifest.
    id: String,
    /// proc | host | host-info | qmp | qom-throttle | inflight | stacks | file | command | core | minicore | pve-tasks
    #[schemars(regex(
        pattern = r"^(proc|host|host-info|qmp|qom-throttle|inflight|stacks|file|command|core|minicore|pve-tasks)$"
    ))]
    kind: String,
    /// Step deadline (default 10s, at most 600s).
    timeout: Option<String>,
    /// A failure of an optional step does not make the run partial.
    #[serde(default)]
    optional: bool,
    /// Archive path of the output; placeholders {vmid} {pid}.
    output: Option<String>,
    /// qmp: the read-only QMP command, e.g. "query-block".
    #[schemars(with = "Option<String>")]
    command: Option<toml::Value>,
    /// qmp: the command's arguments.
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    arguments: Option<toml::Table>,
    /// qmp, inflight: how many samples (1-10; inflight 2-10), `interval` apart.
    samples: Option<u32>,
    /// qmp, inflight: time between samples (default: the run's sample_interval).
    interval: Option<String>,
    /// stacks: methods in order of preference, first that works: "native", "gdb".
    methods: Option<Vec<String>>,
    /// stacks: gdb's "bt" or "bt full".
    backtrace: Option<String>,
    /// file: the path to copy; placeholders {vmid} {pid} {run_dir} {pve_dir} {qmp}.
    path: Option<String>,
    /// file: extra keys whose values are redacted (secret-looking keys always are).
    redact: Option<Vec<String>>,
    /// file: keep only the last this-many bytes (a log), e.g. "256K"; the text is
    /// redacted as a log (secret-looking `key=value` tokens), not as a config.
    tail: Option<String>,
    /// file: a missing file is recorded as unavailable (skipped), not as a failure.
    if_exists: Option<bool>,
    /// command: run only when this holds; "ha-managed" (the VM is in HA's resources.cfg).
    when: Option<String>,
    /// pve-tasks: bytes kept of each task log's tail (default "256K").
    log_cap: Option<String>,
    /// command: program and arguments as a list; never a shell string.
    #[schemars(with = "Option<Vec<String>>")]
    argv: Option<toml::Value>,
    /// command: bytes of output kept (default 8 MiB).
    output_cap: Option<u64>,
    /// core, minicore: free space to leave on the output filesystem, e.g. "2G".
    min_free: Option<String>,
}

/// A step's `interval`: at most 60 s; `None` means the run's sample_interval.
fn sample_interval(text: Option<&str>, err: &mut dyn FnMut(&str, String)) -> Option<Duration> {
    match text.map(parse_duration) {
        None => None,
        Some(Ok(d)) if d <= Duration::from_secs(60) => Some(d),
        Some(Ok(_)) => {
            err("interval", "at most 60s".into());
            None
        }
        Some(Err(e)) => {
            err("interval", e);
            None
        }
    }
}

/// JSON Schema of the runbook format, for editors (`runbook schema`).
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(RawRunbook)).expect("schema serializes")
}

/// A checked runbook.
#[derive(Debug, Clone)]
pub struct Runbook {
    pub name: String,
    pub description: String,
    /// `built-in` or the file it was read from.
    pub source: String,
    pub deadline: Duration,
    /// Where the VM lives; Proxmox's layout unless the runbook has a `[target]`.
    pub target: crate::target::TargetSpec,
    pub steps: Vec<Step>,
}

impl Runbook {
    /// Free space a run of this runbook may need under `<out>`, generously: each step's
    /// output bound (a core dump: its own `min_free`, gigabytes), twice (the staging files
    /// and the archive exist together until the archive verifies).
    pub fn space_estimate(&self) -> u64 {
        const MIB: u64 = 1 << 20;
        let step = |k: &StepKind| match k {
            StepKind::Core { min_free, .. } | StepKind::Minicore { min_free, .. } => *min_free,
            StepKind::Command { output_cap, .. } => *output_cap as u64,
            StepKind::File { tail, .. } => tail.unwrap_or(MIB),
            StepKind::PveTasks { log_cap, .. } => 8 * log_cap,
            StepKind::Stacks { .. } | StepKind::Proc | StepKind::Host => 8 * MIB,
            StepKind::Qmp { samples, .. } => *samples as u64 * MIB,
            StepKind::Inflight { samples, .. } => *samples as u64 * 2 * MIB,
            StepKind::QomThrottle { .. } | StepKind::HostInfo => MIB,
        };
        2 * self.steps.iter().map(|s| step(&s.kind)).sum::<u64>()
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    pub timeout: Duration,
    pub optional: bool,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    Proc,
    Host,
    /// Versions, each disk's storage backend and backing device, and host I/O over the
    /// window (`host/info.json`). Reads what earlier steps captured: runs late.
    HostInfo,
    Qmp {
        command: String,
        arguments: Option<serde_json::Value>,
        samples: u32,
        /// `None`: the run's `sample_interval`.
        interval: Option<Duration>,
        output: Template,
    },
    QomThrottle {
        output: Template,
    },
    /// In-flight evidence (virtio queues, I/O threads, rings, sockets, guest agent) and
    /// `query-blockstats`, sampled at both ends of the window.
    Inflight {
        samples: u32,
        /// `None`: the run's `sample_interval`.
        interval: Option<Duration>,
    },
    Stacks {
        methods: Vec<String>,
        backtrace: String,
    },
    File {
        path: Template,
        output: Template,
        redact: Vec<String>,
        /// `Some(n)`: a log; keep its last `n` bytes.
        tail: Option<u64>,
        if_exists: bool,
    },
    Command {
        argv: Vec<Template>,
        output: Template,
        output_cap: usize,
        /// Run only when the VM is HA-managed.
        only_ha: bool,
    },
    /// The VM's entries of Proxmox's active task list and their logs' tails.
    PveTasks {
        output: Template,
        log_cap: u64,
    },
    Core {
        output: Template,
        min_free: u64,
    },
    /// A core of QEMU without guest RAM, written by the tool itself ([`crate::minicore`]).
    Minicore {
        output: Template,
        min_free: u64,
    },
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Proc => "proc",
            StepKind::Host => "host",
            StepKind::HostInfo => "host-info",
            StepKind::Qmp { .. } => "qmp",
            StepKind::QomThrottle { .. } => "qom-throttle",
            StepKind::Inflight { .. } => "inflight",
            StepKind::Stacks { .. } => "stacks",
            StepKind::File { .. } => "file",
            StepKind::Command { .. } => "command",
            StepKind::Core { .. } => "core",
            StepKind::Minicore { .. } => "minicore",
            StepKind::PveTasks { .. } => "pve-tasks",
        }
    }
}

/// One problem in a runbook, located as precisely as the text allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default(), key.as_ref().map(|k| format!(": {k}")).unwrap_or_default())]
pub struct RunbookError {
    pub file: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

/// All the problems found in one runbook.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct RunbookErrors(pub Vec<RunbookError>);

impl RunbookErrors {
    /// Exit class: a runbook that does not load is bad input; nothing was touched.
    pub fn exit(&self) -> Exit {
        Exit::BadInput
    }
}

/// Finds a runbook by name (operator dir first, then built-in) or by path.
pub fn load(name_or_path: &str, operator_dir: &Path) -> Result<Runbook, RunbookErrors> {
    let one = |message: String| {
        RunbookErrors(vec![RunbookError { file: name_or_path.into(), line: None, key: None, message }])
    };
    let is_path = name_or_path.contains('/') || name_or_path.ends_with(".toml");
    let path = if is_path { PathBuf::from(name_or_path) } else { operator_dir.join(format!("{name_or_path}.toml")) };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) if is_path => Err(one(format!("cannot read: {e}"))),
        Err(_) => match BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            Some((_, text)) => parse(text, "built-in"),
            None => Err(one(format!(
                "no runbook named {name_or_path:?} in {} or built in; `wedge-autopsy runbook list` shows them",
                operator_dir.display()
            ))),
        },
    }
}

/// Names of every runbook reachable by name: `(name, source)`, operator's shadowing built-ins.
pub fn list(operator_dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(operator_dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                if let Some(stem) = p.file_stem() {
                    out.push((stem.to_string_lossy().into_owned(), p.display().to_string()));
                }
            }
        }
    }
    for (name, _) in BUILT_IN {
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), "built-in".into()));
        }
    }
    out.sort();
    out
}

/// Parses and checks a runbook's text. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Runbook, RunbookErrors> {
    let raw: RawRunbook = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        RunbookErrors(vec![RunbookError {
            file: file.into(),
            line,
            key: None,
            message: e.message().trim().to_string(),
        }])
    })?;
    let mut errs = Vec::new();
    let mut err = |step: Option<usize>, key: &str, message: String| {
        let line = match step {
            Some(i) => locate(text, i, key),
            None => locate_top(text, key).or_else(|| locate_in_table(text, "[target]", key)),
        };
        errs.push(RunbookError { file: file.into(), line, key: Some(key.into()), message });
    };
    if raw.schema != 1 {
        err(None, "schema", format!("schema {} is not supported by this version (expected 1)", raw.schema));
    }
    let deadline = match raw.deadline.as_deref().map(parse_duration) {
        None => Duration::from_secs(120),
        Some(Ok(d)) if d <= MAX_DEADLINE && !d.is_zero() => d,
        Some(Ok(_)) => {
            err(None, "deadline", format!("must be between 1s and {}s", MAX_DEADLINE.as_secs()));
            Duration::ZERO
        }
        Some(Err(e)) => {
            err(None, "deadline", e);
            Duration::ZERO
        }
    };
    if raw.step.is_empty() {
        err(None, "step", "a runbook needs at least one [[step]]".into());
    }
    let target = match &raw.target {
        None => crate::target::TargetSpec::proxmox(),
        Some(t) => {
            for (key, v) in [("pidfile", &t.pidfile), ("qmp", &t.qmp), ("domain", &t.domain)] {
                if let Some(v) = v {
                    match Template::parse(v) {
                        Ok(tmpl) if tmpl.uses_only(&["vmid", "domain", "run_dir", "pve_dir"]) => {}
                        Ok(_) => err(
                            None,
                            key,
                            format!("{v:?}: [target] templates take {{vmid}} {{domain}} {{run_dir}} {{pve_dir}} only"),
                        ),
                        Err(e) => err(None, key, e),
                    }
                }
            }
            if t.pidfile.is_none() && t.qmp.is_none() {
                err(None, "target", "[target] needs `pidfile` or `qmp`: the process is proven by one of them".into());
            }
            let monitor = match t.monitor.as_deref() {
                None | Some("socket") => crate::target::Monitor::Socket,
                Some("virsh") if t.domain.is_some() => {
                    crate::target::Monitor::Virsh { program: t.virsh.clone().unwrap_or_else(|| "virsh".into()) }
                }
                Some("virsh") => {
                    err(None, "monitor", "monitor = \"virsh\" needs `domain` (the libvirt domain name)".into());
                    crate::target::Monitor::Socket
                }
                Some(other) => {
                    err(None, "monitor", format!("{other:?}: \"socket\" or \"virsh\""));
                    crate::target::Monitor::Socket
                }
            };
            crate::target::TargetSpec {
                pidfile: t.pidfile.clone(),
                qmp: t.qmp.clone(),
                domain: t.domain.clone(),
                monitor,
                cluster: t.cluster.unwrap_or(false),
            }
        }
    };
    let mut ids = BTreeSet::new();
    let mut outputs = BTreeSet::new();
    let mut steps = Vec::new();
    for (i, s) in raw.step.iter().enumerate() {
        if !ids.insert(s.id.clone()) {
            err(Some(i), "id", format!("duplicate step id {:?}", s.id));
        }
        if s.id.is_empty() || !s.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            err(Some(i), "id", format!("{:?}: use letters, digits, '-' and '_'", s.id));
        }
        if !KINDS.contains(&s.kind.as_str()) {
            err(Some(i), "kind", format!("unknown kind {:?}; one of {}", s.kind, KINDS.join(", ")));
            continue;
        }
        let timeout = match s.timeout.as_deref().map(parse_duration) {
            None => Duration::from_secs(10),
            Some(Ok(d)) if d <= MAX_STEP_TIMEOUT && !d.is_zero() => d,
            Some(Ok(_)) => {
                err(Some(i), "timeout", format!("must be between 1ms and {}s", MAX_STEP_TIMEOUT.as_secs()));
                continue;
            }
            Some(Err(e)) => {
                err(Some(i), "timeout", e);
                continue;
            }
        };
        let allowed: &[&str] = match s.kind.as_str() {
            "proc" | "host" | "host-info" => &[],
            "qmp" => &["command", "arguments", "samples", "interval", "output"],
            "qom-throttle" => &["output"],
            "inflight" => &["samples", "interval"],
            "stacks" => &["methods", "backtrace"],
            "file" => &["path", "output", "redact", "tail", "if_exists"],
            "command" => &["argv", "output", "output_cap", "when"],
            "core" | "minicore" => &["output", "min_free"],
            "pve-tasks" => &["output", "log_cap"],
            _ => unreachable!(),
        };
        for (key, set) in [
            ("output", s.output.is_some()),
            ("command", s.command.is_some()),
            ("arguments", s.arguments.is_some()),
            ("samples", s.samples.is_some()),
            ("interval", s.interval.is_some()),
            ("methods", s.methods.is_some()),
            ("backtrace", s.backtrace.is_some()),
            ("path", s.path.is_some()),
            ("redact", s.redact.is_some()),
            ("argv", s.argv.is_some()),
            ("output_cap", s.output_cap.is_some()),
            ("min_free", s.min_free.is_some()),
            ("tail", s.tail.is_some()),
            ("if_exists", s.if_exists.is_some()),
            ("when", s.when.is_some()),
            ("log_cap", s.log_cap.is_some()),
        ] {
            if set && !allowed.contains(&key) {
                let hint = if s.kind == "command" && key == "command" {
                    "; a command step takes `argv = [\"program\", \"arg\", …]`, never a shell string"
                } else {
                    ""
                };
                err(Some(i), key, format!("not a key of a {} step{hint}", s.kind));
            }
        }
        let mut output = |default: String, err: &mut dyn FnMut(Option<usize>, &str, String)| -> Option<Template> {
            let text = s.output.clone().unwrap_or(default);
            let t = match Template::parse(&text) {
                Ok(t) => t,
                Err(e) => {
                    err(Some(i), "output", e);
                    return None;
                }
            };
            if !t.is_relative_path() {
                err(Some(i), "output", format!("{text:?}: must be a relative path inside the archive, without '..'"));
            }
            if !outputs.insert(text.clone()) {
                err(Some(i), "output", format!("duplicate output {text:?}"));
            }
            Some(t)
        };
        let kind = match s.kind.as_str() {
            "proc" => Some(StepKind::Proc),
            "host" => Some(StepKind::Host),
            "host-info" => Some(StepKind::HostInfo),
            "qmp" => {
                let command = match &s.command {
                    Some(toml::Value::String(c)) => c.clone(),
                    _ => {
                        err(Some(i), "command", "a qmp step needs `command = \"query-…\"`".into());
                        continue;
                    }
                };
                let arguments = s.arguments.as_ref().map(|t| serde_json::to_value(t).expect("toml table is json"));
                if let Err(refusal) = crate::qmp::policy::check(&command, arguments.as_ref()) {
                    err(Some(i), "command", refusal.to_string());
                }
                let samples = s.samples.unwrap_or(1);
                if !(1..=10).contains(&samples) {
                    err(Some(i), "samples", "must be 1 to 10".into());
                }
                let interval = sample_interval(s.interval.as_deref(), &mut |k, m| err(Some(i), k, m));
                output(format!("qmp/{command}.json"), &mut err).map(|output| StepKind::Qmp {
                    command,
                    arguments,
                    samples,
                    interval,
                    output,
                })
            }
            "inflight" => {
                let samples = s.samples.unwrap_or(2);
                if !(2..=10).contains(&samples) {
                    err(Some(i), "samples", "must be 2 to 10 (the window needs two ends)".into());
                }
                let interval = sample_interval(s.interval.as_deref(), &mut |k, m| err(Some(i), k, m));
                Some(StepKind::Inflight { samples, interval })
            }
            "qom-throttle" => {
                output("qmp/throttle-groups.json".into(), &mut err).map(|output| StepKind::QomThrottle { output })
            }
            "stacks" => {
                let methods = s.methods.clone().unwrap_or_else(|| vec!["native".into(), "gdb".into()]);
                for m in &methods {
                    if !["native", "gdb"].contains(&m.as_str()) {
                        err(Some(i), "methods", format!("unknown method {m:?}; native or gdb"));
                    }
                }
                let backtrace = s.backtrace.clone().unwrap_or_else(|| "bt".into());
                if !["bt", "bt full"].contains(&backtrace.as_str()) {
                    err(Some(i), "backtrace", "\"bt\" or \"bt full\"".into());
                }
                Some(StepKind::Stacks { methods, backtrace })
            }
            "file" => {
                let path = match s.path.as_deref().map(Template::parse) {
                    Some(Ok(t)) => Some(t),
                    Some(Err(e)) => {
                        err(Some(i), "path", e);
                        None
                    }
                    None => {
                        err(Some(i), "path", "a file step needs `path`".into());
                        None
                    }
                };
                let name = s.path.as_deref().and_then(|p| p.rsplit('/').next()).unwrap_or("file").to_string();
                let out = output(format!("files/{name}"), &mut err);
                let tail = match s.tail.as_deref().map(parse_size) {
                    None => None,
                    Some(Ok(n)) if n > 0 && n <= 16 << 20 => Some(n),
                    Some(Ok(_)) => {
                        err(Some(i), "tail", "must be between 1 byte and 16M".into());
                        None
                    }
                    Some(Err(e)) => {
                        err(Some(i), "tail", e);
                        None
                    }
                };
                match (path, out) {
                    (Some(path), Some(output)) => Some(StepKind::File {
                        path,
                        output,
                        redact: s.redact.clone().unwrap_or_default(),
                        tail,
                        if_exists: s.if_exists.unwrap_or(false),
                    }),
                    _ => None,
                }
            }
            "command" => {
                let argv = match &s.argv {
                    Some(toml::Value::Array(a)) if !a.is_empty() => {
                        let strs: Option<Vec<String>> = a.iter().map(|v| v.as_str().map(str::to_string)).collect();
                        match strs {
                            Some(v) => v,
                            None => {
                                err(Some(i), "argv", "every argv element must be a string".into());
                                continue;
                            }
                        }
                    }
                    Some(toml::Value::String(_)) => {
                        err(Some(i), "argv", "is a shell string; write it as a list: argv = [\"program\", \"arg\", …] (no shell is ever used)".into());
                        continue;
                    }
                    _ => {
                        err(Some(i), "argv", "a command step needs a non-empty `argv` list".into());
                        continue;
                    }
                };
                let prog = argv[0].rsplit('/').next().unwrap_or_default();
                if SHELLS.contains(&prog) {
                    err(
                        Some(i),
                        "argv",
                        format!("runs a shell ({prog}); run the program directly with its arguments as a list"),
                    );
                }
                let mut tmpl = Vec::new();
                for a in &argv {
                    match Template::parse(a) {
                        Ok(t) => tmpl.push(t),
                        Err(e) => err(Some(i), "argv", e),
                    }
                }
                let only_ha = match s.when.as_deref() {
                    None => false,
                    Some("ha-managed") => true,
                    Some(other) => {
                        err(Some(i), "when", format!("{other:?}: the only condition is \"ha-managed\""));
                        false
                    }
                };
                let name = prog.to_string();
                output(format!("commands/{name}.txt"), &mut err).map(|output| StepKind::Command {
                    argv: tmpl,
                    output,
                    output_cap: s.output_cap.unwrap_or(8 << 20) as usize,
                    only_ha,
                })
            }
            "core" | "minicore" => {
                // gcore writes all of RAM; a minicore is QEMU's own memory only.
                let (default_free, default_out) =
                    if s.kind == "core" { (2u64 << 30, "core/core") } else { (1 << 30, "core/qemu.core") };
                let min_free = match s.min_free.as_deref().map(parse_size) {
                    None => default_free,
                    Some(Ok(n)) => n,
                    Some(Err(e)) => {
                        err(Some(i), "min_free", e);
                        0
                    }
                };
                output(default_out.into(), &mut err).map(|output| match s.kind.as_str() {
                    "core" => StepKind::Core { output, min_free },
                    _ => StepKind::Minicore { output, min_free },
                })
            }
            "pve-tasks" => {
                let log_cap = match s.log_cap.as_deref().map(parse_size) {
                    None => 256 << 10,
                    Some(Ok(n)) if n > 0 && n <= 16 << 20 => n,
                    Some(Ok(_)) => {
                        err(Some(i), "log_cap", "must be between 1 byte and 16M".into());
                        0
                    }
                    Some(Err(e)) => {
                        err(Some(i), "log_cap", e);
                        0
                    }
                };
                output("pve/tasks.json".into(), &mut err).map(|output| StepKind::PveTasks { output, log_cap })
            }
            _ => unreachable!(),
        };
        if let Some(kind) = kind {
            steps.push(Step { id: s.id.clone(), timeout, optional: s.optional, kind });
        }
    }
    if !errs.is_empty() {
        return Err(RunbookErrors(errs));
    }
    Ok(Runbook { name: raw.name, description: raw.description, source: file.into(), deadline, target, steps })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line of `key` inside the `index`-th `[[step]]` table (or of the table header).
fn locate(text: &str, index: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().enumerate().filter(|(_, l)| l.trim() == "[[step]]").nth(index).map(|(n, _)| n)?;
    for (n, l) in lines.iter().enumerate().skip(header + 1) {
        let t = l.trim_start();
        if t.starts_with('[') {
            break;
        }
        if t.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')) {
            return Some(n + 1);
        }
    }
    Some(header + 1)
}

/// Line of `key` inside the table whose header is `header` (e.g. `[target]`).
fn locate_in_table(text: &str, header: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim() == header)?;
    for (n, l) in lines.iter().enumerate().skip(start + 1) {
        let t = l.trim_start();
        if t.starts_with('[') {
            break;
        }
        if t.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')) {
            return Some(n + 1);
        }
    }
    Some(start + 1)
}

fn locate_top(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
        .map(|n| n + 1)
}

#[cfg(test)]
mod tests;
