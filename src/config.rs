//! Settings: built-in defaults, overridden by `/etc/wedge-autopsy/config.toml` (or
//! `--config`), overridden by flags. The file is strict: an unknown key is an error, so a
//! typo does not silently fall back to a default on the night it matters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;

pub const DEFAULT_CONFIG: &str = "/etc/wedge-autopsy/config.toml";
pub const DEFAULT_RUN_DIR: &str = "/var/run/qemu-server";
pub const DEFAULT_PVE_DIR: &str = "/etc/pve";
pub const DEFAULT_OUT: &str = "/var/lib/wedge-autopsy";
/// Where separate debug files are searched by build-id (`<dir>/.build-id/xx/yyyy.debug`).
pub use crate::stacks::native::DEFAULT_DEBUG_DIR;
pub const DEFAULT_LOG_DIR: &str = "/var/log";

/// The config file, as written. Sections other subcommands own (`serve`, `restart`)
/// are kept as raw tables and validated by their owners. The JSON Schema derived from
/// this struct is what the shipped, commented config file is checked against ([`KEYS`]).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub run_dir: Option<PathBuf>,
    pub pve_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub sample_interval: Option<String>,
    pub node: Option<String>,
    pub qm: Option<PathBuf>,
    pub runbook: Option<String>,
    pub runbook_dir: Option<PathBuf>,
    pub min_idle: Option<String>,
    pub debug_dirs: Option<Vec<PathBuf>>,
    pub log_dir: Option<PathBuf>,
    pub signature_dir: Option<PathBuf>,
    pub retention: Option<RetentionFile>,
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub serve: Option<toml::Table>,
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub restart: Option<toml::Table>,
}

/// `[retention]`: how many archives `<out>` may hold, and the free-space floor.
/// `0` (or `"0"`) switches a limit off.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    pub keep: Option<usize>,
    pub max_age: Option<String>,
    pub max_bytes: Option<String>,
    pub min_free: Option<String>,
}

/// Flag values; `None` means "not given on the command line".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub pve_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub sample_interval: Option<String>,
    pub node: Option<String>,
    /// `--debug-dir`, repeatable; empty means "not given".
    pub debug_dirs: Vec<PathBuf>,
    pub log_dir: Option<PathBuf>,
}

/// Resolved settings every subcommand uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub run_dir: PathBuf,
    pub pve_dir: PathBuf,
    pub out: PathBuf,
    pub sample_interval: Duration,
    /// This node's name as Proxmox knows it (short hostname unless configured).
    pub node: String,
    pub qm: PathBuf,
    pub runbook: Option<String>,
    pub runbook_dir: PathBuf,
    /// Idle time beyond which frozen I/O counters alone mean a frozen block path.
    pub min_idle: Duration,
    /// Directories searched for separate debug files, in order (`--debug-dir`, `debug_dirs`).
    pub debug_dirs: Vec<PathBuf>,
    /// Where Proxmox writes its logs (vzdump/, pve/tasks/).
    pub log_dir: PathBuf,
    /// Operator signatures, found by id before the built-in ones.
    pub signature_dir: PathBuf,
    /// Retention limits for `<out>` and the free-space floor prune keeps.
    pub retention: crate::retention::Limits,
    /// `[retention] min_free` when the file sets it: then also the floor a capture needs
    /// (unset: the runbook's own estimate).
    pub min_free_set: Option<u64>,
    /// The file the settings came from, if any.
    pub config_file: Option<PathBuf>,
    /// The raw `[restart]` table; validated by `restart::RestartConfig`.
    pub restart: Option<toml::Table>,
    /// The raw `[serve]` table; validated by `serve::config`.
    pub serve: Option<toml::Table>,
}

pub use crate::units::parse_duration;

impl Settings {
    /// Loads the config file (the default path may be absent; an explicit `--config` must
    /// exist) and applies the flags on top.
    pub fn load(o: &Overrides) -> Result<Settings, Error> {
        let (file, config_file) = match &o.config {
            Some(p) => (read_file(p)?, Some(p.clone())),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                (read_file(Path::new(DEFAULT_CONFIG))?, Some(PathBuf::from(DEFAULT_CONFIG)))
            }
            None => (FileConfig::default(), None),
        };
        let interval_text = o.sample_interval.clone().or(file.sample_interval.clone()).unwrap_or_else(|| "2s".into());
        let sample_interval =
            parse_duration(&interval_text).map_err(|e| Error::BadInput(format!("sample_interval: {e}")))?;
        if sample_interval > Duration::from_secs(60) {
            return Err(Error::BadInput(format!(
                "sample_interval {interval_text} is too long: the VM is down while you wait; use at most 60s"
            )));
        }
        // `[retention] min_free` written out (else a runbook's estimate sets the floor).
        let min_free_given = file.retention.as_ref().is_some_and(|r| r.min_free.is_some());
        let retention = retention_limits(file.retention.unwrap_or_default())?;
        Ok(Settings {
            run_dir: o.run_dir.clone().or(file.run_dir).unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            pve_dir: o.pve_dir.clone().or(file.pve_dir).unwrap_or_else(|| DEFAULT_PVE_DIR.into()),
            out: o.out.clone().or(file.out).unwrap_or_else(|| DEFAULT_OUT.into()),
            sample_interval,
            node: o.node.clone().or(file.node).unwrap_or_else(local_node_name),
            qm: file.qm.unwrap_or_else(|| "qm".into()),
            runbook: file.runbook,
            runbook_dir: file.runbook_dir.unwrap_or_else(|| "/etc/wedge-autopsy/runbooks".into()),
            min_idle: match file.min_idle.as_deref() {
                Some(t) => parse_duration(t).map_err(|e| Error::BadInput(format!("min_idle: {e}")))?,
                None => Duration::from_secs(30),
            },
            debug_dirs: match (o.debug_dirs.is_empty(), file.debug_dirs) {
                (false, _) => o.debug_dirs.clone(),
                (true, Some(d)) => d,
                (true, None) => vec![DEFAULT_DEBUG_DIR.into()],
            },
            log_dir: o.log_dir.clone().or(file.log_dir).unwrap_or_else(|| DEFAULT_LOG_DIR.into()),
            signature_dir: file.signature_dir.unwrap_or_else(|| crate::signatures::DEFAULT_DIR.into()),
            min_free_set: min_free_given.then_some(retention.min_free),
            retention,
            config_file,
            restart: file.restart,
            serve: file.serve,
        })
    }
}

/// `[retention]` as written → limits; `0` switches a limit off. Errors name the key.
fn retention_limits(r: RetentionFile) -> Result<crate::retention::Limits, Error> {
    use crate::retention::Limits;
    let d = Limits::default();
    let dur = |key: &str, v: Option<String>, default: Option<Duration>| -> Result<Option<Duration>, Error> {
        match v {
            None => Ok(default),
            Some(t) => parse_duration(&t)
                .map(|d| (!d.is_zero()).then_some(d))
                .map_err(|e| Error::BadInput(format!("retention.{key}: {e}"))),
        }
    };
    let size = |key: &str, v: Option<String>, default: u64| -> Result<u64, Error> {
        match v {
            None => Ok(default),
            Some(t) => crate::units::parse_size(&t).map_err(|e| Error::BadInput(format!("retention.{key}: {e}"))),
        }
    };
    Ok(Limits {
        keep: r.keep.map(|k| (k > 0).then_some(k)).unwrap_or(d.keep),
        max_age: dur("max_age", r.max_age, d.max_age)?,
        max_bytes: Some(size("max_bytes", r.max_bytes, d.max_bytes.unwrap_or(0))?).filter(|b| *b > 0),
        min_free: size("min_free", r.min_free, d.min_free)?,
    })
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::BadInput(format!("cannot read config {}: {e}; fix the path given to --config", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        Error::BadInput(match line {
            Some(l) => format!("config {}:{l}: {msg}", path.display()),
            None => format!("config {}: {msg}", path.display()),
        })
    })
}

/// The short host name, which is what Proxmox uses as the node name.
pub fn local_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| "localhost".into())
}

/// One documented config key: what the shipped `/etc/wedge-autopsy/config.toml` says
/// about it. `value` is a TOML literal that the real parser accepts; for every key but
/// `node` (whose default is the host name) it is the default itself.
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    /// `None` for top-level keys, else the `[section]` the key lives in.
    pub section: Option<&'static str>,
    pub key: &'static str,
    pub value: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every key of [`FileConfig`] the shipped config file documents, in file order. A test
/// checks this list against the schema derived from `FileConfig` itself, so a key added
/// to the parser without documentation fails the build's tests.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc { section: None, key: "run_dir", value: "\"/var/run/qemu-server\"", default: "/var/run/qemu-server",
        meaning: "Where QEMU's pidfiles (<vmid>.pid) and QMP sockets (<vmid>.qmp) live. Flag: --run-dir." },
    KeyDoc { section: None, key: "pve_dir", value: "\"/etc/pve\"", default: "/etc/pve",
        meaning: "The Proxmox cluster filesystem; VM configs are read from <pve_dir>/qemu-server. Flag: --pve-dir." },
    KeyDoc { section: None, key: "out", value: "\"/var/lib/wedge-autopsy\"", default: "/var/lib/wedge-autopsy",
        meaning: "Where sealed archives are written (created 0700). Flag: --out." },
    KeyDoc { section: None, key: "sample_interval", value: "\"2s\"", default: "2s",
        meaning: "Time between the two query-blockstats samples (at most 60s; \"0\" takes both at once). Flag: --sample-interval." },
    KeyDoc { section: None, key: "node", value: "\"pve1\"", default: "this host's short hostname",
        meaning: "This node's name as the cluster knows it; VMs owned by another node are refused. Flag: --node." },
    KeyDoc { section: None, key: "qm", value: "\"qm\"", default: "qm (looked up in PATH)",
        meaning: "The qm program used for VM config and status." },
    KeyDoc { section: None, key: "runbook", value: "\"qemu-wedge\"", default: "qemu-wedge (built in)",
        meaning: "Runbook used when --runbook is not given: a name or a path to a .toml file." },
    KeyDoc { section: None, key: "runbook_dir", value: "\"/etc/wedge-autopsy/runbooks\"", default: "/etc/wedge-autopsy/runbooks",
        meaning: "Operator runbooks, found by name before the built-in ones. Templates: /usr/share/wedge-autopsy/runbooks." },
    KeyDoc { section: None, key: "min_idle", value: "\"30s\"", default: "30s",
        meaning: "Idle time beyond which frozen I/O counters alone mean a frozen block path (diagnosis)." },
    KeyDoc { section: None, key: "debug_dirs", value: "[\"/usr/lib/debug\"]", default: "[\"/usr/lib/debug\"]",
        meaning: "Where separate debug files are searched, by build-id (<dir>/.build-id/xx/yyyy.debug) and debuglink, by audit, the stacks of a capture and inspect --resymbolize/--qemu-state. Flag: --debug-dir DIR (repeatable; replaces this list)." },
    KeyDoc { section: None, key: "log_dir", value: "\"/var/log\"", default: "/var/log",
        meaning: "Where Proxmox VE writes its logs: the VM's vzdump/qemu-<vmid>.log and pve/tasks/ are captured from here. Flag: --log-dir." },
    KeyDoc { section: None, key: "signature_dir", value: "\"/etc/wedge-autopsy/signatures\"", default: "/etc/wedge-autopsy/signatures",
        meaning: "Operator known-bug signatures (*.toml), found by id before the built-in ones. Check them with `wedge-autopsy signatures check FILE`." },
    KeyDoc { section: Some("retention"), key: "keep", value: "0", default: "0 (no count limit)",
        meaning: "Keep at most this many archives in <out>, newest first; older ones are pruned after each autopsy." },
    KeyDoc { section: Some("retention"), key: "max_age", value: "\"0\"", default: "\"0\" (no age limit)",
        meaning: "Prune archives older than this, e.g. \"90d\". The newest archive is never pruned." },
    KeyDoc { section: Some("retention"), key: "max_bytes", value: "\"10G\"", default: "10G",
        meaning: "Prune the oldest archives once all of them (with sidecars) take more than this; \"0\" = no limit." },
    KeyDoc { section: Some("retention"), key: "min_free", value: "\"1G\"", default: "1G",
        meaning: "Free-space floor of <out>'s filesystem: prune removes the oldest archives to get back above it. When set, a capture is also refused below it (unset: a capture needs what its runbook may write, megabytes by default, gigabytes with a core dump); \"0\" = no floor. Flag: --min-free." },
];

/// The shipped `/etc/wedge-autopsy/config.toml`: every key of [`KEYS`] commented out
/// with its default and meaning. `packaging/config.toml` is this text (a test checks);
/// `wedge-autopsy generate config` prints it.
pub fn example_config() -> String {
    let mut out = String::from(
        "# wedge-autopsy configuration (/etc/wedge-autopsy/config.toml).\n\
         #\n\
         # Every key is commented out and shows its default: uncomment a line (remove the\n\
         # leading '#') to change it. Command-line flags win over this file; `--config FILE`\n\
         # reads another one. The file is strict: an unknown key is an error naming its line,\n\
         # so a typo cannot silently fall back to a default on the night it matters.\n\
         # Durations: \"500ms\", \"2s\", \"5min\", \"90d\", \"6mo\"; a bare \"m\" is refused (write min or mo).\n\
         # Sizes: \"512M\", \"10G\", \"1T\".\n",
    );
    let mut section = None;
    for k in KEYS {
        if k.section != section {
            section = k.section;
            if let Some(s) = section {
                out.push_str(&format!("\n#[{s}]\n"));
            }
        }
        out.push_str(&format!("\n# {}\n# Default: {}\n#{} = {}\n", k.meaning, k.default, k.key, k.value));
    }
    out.push_str(SERVE_AND_RESTART);
    out
}

/// The `[restart]` and `[serve]` part of the shipped config: every key with its default,
/// indented (`#   key = value`) so that uncommenting the file's own keys leaves them alone.
/// Every command checks both sections when the file is loaded.
const SERVE_AND_RESTART: &str = r#"
# [restart]: how --then-restart (and a serve policy) stops and starts a VM; see
# docs/restart.md. Checked by every command when this file is loaded.
#  [restart]
#   method = "qm"                 # "qm", "libvirt" or "command"
#   timeout = "30s"               # graceful stop time (qm stop --timeout); flag --restart-timeout
#   stop_deadline = "75s"         # the tool's own deadline on the stop (default timeout + 45s)
#   kill_wait = "10s"             # how long a SIGKILLed QEMU gets to disappear
#   start_timeout = "60s"
#   verify_timeout = "60s"        # the new QEMU proven and answering QMP within this
#   verify_qmp = true             # false for libvirt (libvirtd holds the monitor)
#   cooldown = "30min"            # no second restart of one VM within this; --force overrides
#   ha_manager = "ha-manager"
#   # method = "libvirt" only: virsh = "virsh"
#   # method = "command" only: argv templates with {vmid} and {pid}
#   # stop = ["/usr/local/bin/vm-stop", "{vmid}"]
#   # start = ["/usr/local/bin/vm-start", "{vmid}"]

# [serve]: the alert webhook service (`wedge-autopsy serve`); see docs/serve.md for every
# key. Checked by every command when this file is loaded; secrets are read by serve only.
#  [serve]
#   listen = "127.0.0.1:9171"     # beyond loopback needs token_file
#   token_file = "/etc/wedge-autopsy/token"          # bearer token (file mode 0600)
#   hmac_secret_file = "/etc/wedge-autopsy/hmac"     # Grafana webhook signatures
#   signature_header = "X-Grafana-Alerting-Signature"
#   signature_timestamp_header = "X-Grafana-Alerting-Signature-Timestamp"
#   signature_max_skew = "5min"
#   allow_loopback_without_token = false
#   header_timeout = "10s"
#   max_connections = 256
#   max_alerts = 200
#   max_firings_per_vm = 256
#   notify = ["http://127.0.0.1:8080/ticket"]      # results POSTed here
#   notify_attempts = 5
#   notify_timeout = "10s"
#   on_complete = ["/usr/local/bin/ticket", "--update"]  # argv hook, result JSON on stdin
#   on_complete_timeout = "60s"
#   copy_to = "/mnt/pve/cephfs/autopsies"          # copy each archive here, hash-checked
#   vmid_label = "vmid"
#   repeat_window = "4h"          # a firing repeated within this is the same job
#   vm_cooldown = "10min"
#   max_concurrent = 2
#   max_queue = 64
#   max_body = 1048576
#   keep_jobs = 200
#   shutdown_grace = "120s"
#   runbook = "qemu-wedge"
#  [serve.vm_map.instance]        # label value -> VMID
#   devvm = 102
#  [[serve.policy]]               # first match wins; default: capture
#   vmid = 102
#   action = "capture-then-restart"   # or "capture"
#   restart_on = ["block-path-frozen", "main-loop-wedged"]
#  [serve.watch]                  # poll running VMs with diagnose
#   interval = "60s"
#   consecutive = 3
#   window = "2s"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "run_dir = \"/file/run\"\nout = \"/file/out\"\nsample_interval = \"500ms\"\n").unwrap();
        let s = Settings::load(&Overrides {
            config: Some(cfg.clone()),
            out: Some("/flag/out".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.run_dir, PathBuf::from("/file/run"));
        assert_eq!(s.out, PathBuf::from("/flag/out"));
        assert_eq!(s.pve_dir, PathBuf::from(DEFAULT_PVE_DIR));
        assert_eq!(s.sample_interval, Duration::from_millis(500));
    }

    #[test]
    fn debug_dirs_flags_replace_the_file_list_which_replaces_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        let none = Settings::load(&Overrides { config: Some(cfg.clone()), ..Default::default() });
        assert!(none.is_err(), "an explicit --config must exist");
        std::fs::write(&cfg, "").unwrap();
        let s = Settings::load(&Overrides { config: Some(cfg.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.debug_dirs, vec![PathBuf::from(DEFAULT_DEBUG_DIR)]);
        std::fs::write(&cfg, "debug_dirs = [\"/a\", \"/b\"]\n").unwrap();
        let s = Settings::load(&Overrides { config: Some(cfg.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.debug_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        let flags = vec![PathBuf::from("/c")];
        let s =
            Settings::load(&Overrides { config: Some(cfg), debug_dirs: flags.clone(), ..Default::default() }).unwrap();
        assert_eq!(s.debug_dirs, flags);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "out = \"/x\"\nrundir = \"/typo\"\n").unwrap();
        let err = Settings::load(&Overrides { config: Some(cfg), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("rundir"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("two").is_err());
    }

    /// `packaging/config.toml` is exactly what `example_config()` produces.
    #[test]
    fn shipped_config_is_generated() {
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.toml")).unwrap();
        assert!(
            shipped == example_config(),
            "packaging/config.toml is stale: run `cargo run -- generate config > packaging/config.toml`"
        );
    }

    /// Every key the parser accepts is documented, and nothing else is.
    #[test]
    fn every_parser_key_is_documented() {
        let schema = serde_json::to_value(schemars::schema_for!(FileConfig)).unwrap();
        let mut parser: Vec<String> = Vec::new();
        for (k, _) in schema["properties"].as_object().unwrap() {
            if k == "serve" || k == "restart" {
                continue; // owned and documented by those features
            }
            if k == "retention" {
                let r = &schema["definitions"]["RetentionFile"]["properties"];
                parser.extend(r.as_object().unwrap().keys().map(|k| format!("retention.{k}")));
            } else {
                parser.push(k.clone());
            }
        }
        let mut documented: Vec<String> = KEYS
            .iter()
            .map(|k| k.section.map(|s| format!("{s}.{}", k.key)).unwrap_or_else(|| k.key.to_string()))
            .collect();
        parser.sort();
        documented.sort();
        assert_eq!(parser, documented);
    }

    /// Uncommenting every key of the shipped file gives a file the real loader accepts,
    /// with the documented defaults.
    #[test]
    fn shipped_config_uncommented_parses() {
        let uncommented: String = example_config()
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with('[')
                        || rest
                            .split_once(" = ")
                            .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let keys = uncommented.lines().filter(|l| l.contains(" = ") && !l.starts_with('#')).count();
        assert_eq!(keys, KEYS.len(), "{uncommented}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, &uncommented).unwrap();
        let s = Settings::load(&Overrides { config: Some(cfg), ..Default::default() }).unwrap();
        assert_eq!(s.node, "pve1");
        assert_eq!(s.out, PathBuf::from(DEFAULT_OUT));
        assert_eq!(s.sample_interval, Duration::from_secs(2));
        assert_eq!(s.min_idle, Duration::from_secs(30));
        assert_eq!(s.retention, crate::retention::Limits::default());
    }

    #[test]
    fn retention_keys_parse_and_zero_switches_off() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "[retention]\nkeep = 5\nmax_age = \"90d\"\nmax_bytes = \"0\"\nmin_free = \"512M\"\n")
            .unwrap();
        let s = Settings::load(&Overrides { config: Some(cfg.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.retention.keep, Some(5));
        assert_eq!(s.retention.max_age, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(s.retention.max_bytes, None);
        assert_eq!(s.retention.min_free, 512 << 20);
        std::fs::write(&cfg, "[retention]\nmax_bytes = \"lots\"\n").unwrap();
        let err = Settings::load(&Overrides { config: Some(cfg), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("retention.max_bytes"), "{err}");
    }
}
