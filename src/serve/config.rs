//! `[serve]` in the shared config file, parsed strictly: an unknown key is an error that
//! names the key, so a typo never silently turns a policy off.
//!
//! In: the raw `serve` table kept by [`crate::config::FileConfig`] and the `--listen` flag.
//! Out: a [`ServeConfig`] with every default resolved and every file (token, secret) read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse_duration;
use crate::diagnose::Verdict;
use crate::target::VmId;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9171";
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Grafana-Alerting-Signature";

/// `[serve]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    hmac_secret_file: Option<PathBuf>,
    signature_header: Option<String>,
    signature_timestamp_header: Option<String>,
    signature_max_skew: Option<String>,
    #[serde(default)]
    allow_loopback_without_token: bool,
    header_timeout: Option<String>,
    max_connections: Option<usize>,
    max_alerts: Option<usize>,
    max_firings_per_vm: Option<usize>,
    #[serde(default)]
    notify: Vec<String>,
    notify_attempts: Option<u32>,
    notify_timeout: Option<String>,
    on_complete: Option<Vec<String>>,
    on_complete_timeout: Option<String>,
    copy_to: Option<PathBuf>,
    vmid_label: Option<String>,
    /// label name -> (label value -> VMID)
    #[serde(default)]
    vm_map: BTreeMap<String, BTreeMap<String, u32>>,
    repeat_window: Option<String>,
    vm_cooldown: Option<String>,
    max_concurrent: Option<usize>,
    max_queue: Option<usize>,
    max_body: Option<usize>,
    keep_jobs: Option<usize>,
    shutdown_grace: Option<String>,
    runbook: Option<String>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
    watch: Option<RawWatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    vmid: Option<u32>,
    #[serde(default, rename = "match")]
    matchers: BTreeMap<String, String>,
    action: Option<String>,
    restart_on: Option<Vec<String>>,
    #[serde(default)]
    watch_autopsy: bool,
    #[serde(default)]
    restart_suspected: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    interval: Option<String>,
    consecutive: Option<u32>,
    window: Option<String>,
}

/// What a policy does once an autopsy is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Capture,
    CaptureThenRestart,
}

/// One `[[serve.policy]]`: which VMs (by VMID or alert labels), and what to do.
#[derive(Debug, Clone)]
pub struct Policy {
    pub vmid: Option<VmId>,
    pub matchers: BTreeMap<String, String>,
    pub action: Action,
    /// Verdicts that allow a restart. Never contains `healthy`.
    pub restart_on: Vec<Verdict>,
    /// A VM the watch finds frozen for `consecutive` checks gets an autopsy.
    pub watch_autopsy: bool,
    /// Also restart on a *suspected* frozen block path (no in-flight view, counters
    /// alone). Off by default: an idle disk on an LSI controller looks the same.
    pub restart_suspected: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            vmid: None,
            matchers: BTreeMap::new(),
            action: Action::Capture,
            restart_on: vec![Verdict::BlockPathFrozen, Verdict::MainLoopWedged],
            watch_autopsy: false,
            restart_suspected: false,
        }
    }
}

impl Policy {
    /// Whether this policy applies to `vmid` with these alert labels (empty for API and
    /// watch runs, so a label-only policy never matches them).
    pub fn matches(&self, vmid: VmId, labels: &BTreeMap<String, String>) -> bool {
        if self.vmid.is_some_and(|v| v != vmid) {
            return false;
        }
        if self.vmid.is_none() && self.matchers.is_empty() {
            return true;
        }
        self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `[serve.watch]`: periodic `diagnose` of every running VM.
#[derive(Debug, Clone)]
pub struct Watch {
    pub interval: Duration,
    pub consecutive: u32,
    /// Blockstats window of each check (`diagnose --window`).
    pub window: Option<Duration>,
}

/// Resolved `[serve]`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Bearer token (file contents, trimmed). `None`: no token required.
    pub token: Option<Vec<u8>>,
    /// HMAC-SHA256 secret for `/v1/grafana` bodies.
    pub hmac_secret: Option<Vec<u8>>,
    pub signature_header: String,
    pub signature_timestamp_header: Option<String>,
    /// A signed timestamp further than this from now is refused (replay window).
    pub signature_max_skew: Duration,
    /// No `token_file`, and the operator allowed state-changing requests without one
    /// (loopback listeners only).
    pub allow_loopback_without_token: bool,
    /// A request head (or the next one on a kept-alive connection) must arrive within this.
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// Alerts per payload at most (413 beyond).
    pub max_alerts: usize,
    /// Firing keys remembered per VM at most (oldest dropped first, that VM's only).
    pub max_firings_per_vm: usize,
    pub notify: Vec<String>,
    pub notify_attempts: u32,
    pub notify_timeout: Duration,
    pub on_complete: Option<Vec<String>>,
    pub on_complete_timeout: Duration,
    pub copy_to: Option<PathBuf>,
    pub vmid_label: String,
    pub vm_map: BTreeMap<String, BTreeMap<String, VmId>>,
    pub repeat_window: Duration,
    pub vm_cooldown: Duration,
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub max_body: usize,
    pub keep_jobs: usize,
    pub shutdown_grace: Duration,
    pub runbook: Option<String>,
    pub policies: Vec<Policy>,
    pub watch: Option<Watch>,
}

impl ServeConfig {
    /// The first policy that matches, or the default (`capture`).
    pub fn policy_for(&self, vmid: VmId, labels: &BTreeMap<String, String>) -> Policy {
        self.policies.iter().find(|p| p.matches(vmid, labels)).cloned().unwrap_or_default()
    }
}

/// Parses `[serve]` (absent = all defaults) and applies `--listen`.
pub fn parse(table: Option<&toml::Table>, listen_flag: Option<&str>) -> Result<ServeConfig, String> {
    let raw: Raw = match table {
        Some(t) => toml::Value::Table(t.clone())
            .try_into()
            .map_err(|e: toml::de::Error| format!("[serve]: {}", e.message()))?,
        None => Raw::default(),
    };
    let dur = |key: &str, v: &Option<String>, default: Duration| -> Result<Duration, String> {
        match v {
            Some(t) => parse_duration(t).map_err(|e| format!("[serve] {key}: {e}")),
            None => Ok(default),
        }
    };
    let listen_text = listen_flag.map(str::to_string).or(raw.listen.clone()).unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| format!("[serve] listen {listen_text:?} is not an address:port; write e.g. \"127.0.0.1:9171\""))?;
    let token = read_secret("token_file", raw.token_file.as_ref())?;
    let hmac_secret = read_secret("hmac_secret_file", raw.hmac_secret_file.as_ref())?;
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "[serve] listen {listen} is beyond loopback but no token_file is set: set token_file, or listen on 127.0.0.1"
        ));
    }
    if raw.allow_loopback_without_token && !listen.ip().is_loopback() {
        return Err(format!(
            "[serve] allow_loopback_without_token applies to loopback only, but listen is {listen}: remove it and set token_file"
        ));
    }
    for url in &raw.notify {
        if !url.starts_with("http://") {
            return Err(format!(
                "[serve] notify {url:?}: only http:// URLs are supported; front https targets with a local relay"
            ));
        }
        url.parse::<hyper::Uri>().map_err(|e| format!("[serve] notify {url:?}: {e}"))?;
    }
    if let Some(argv) = &raw.on_complete {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(
                "[serve] on_complete must be a non-empty argv list, e.g. [\"/usr/local/bin/ticket\", \"--update\"]"
                    .into(),
            );
        }
    }
    let mut vm_map = BTreeMap::new();
    for (label, values) in raw.vm_map {
        let mut m = BTreeMap::new();
        for (value, id) in values {
            let vmid: VmId = id.to_string().parse().map_err(|e| format!("[serve.vm_map.{label}] {value:?}: {e}"))?;
            m.insert(value, vmid);
        }
        vm_map.insert(label, m);
    }
    let mut policies = Vec::new();
    for (i, p) in raw.policy.into_iter().enumerate() {
        let at = format!("[[serve.policy]] #{}", i + 1);
        let vmid = match p.vmid {
            Some(v) => Some(v.to_string().parse::<VmId>().map_err(|e| format!("{at} vmid: {e}"))?),
            None => None,
        };
        let action = match p.action.as_deref().unwrap_or("capture") {
            "capture" => Action::Capture,
            "capture-then-restart" => Action::CaptureThenRestart,
            other => return Err(format!("{at} action {other:?}: use \"capture\" or \"capture-then-restart\"")),
        };
        let mut restart_on = Policy::default().restart_on;
        if let Some(list) = p.restart_on {
            restart_on = Vec::new();
            for v in list {
                let verdict = parse_verdict(&v).ok_or_else(|| {
                    format!("{at} restart_on {v:?}: not a verdict (e.g. \"block-path-frozen\", \"main-loop-wedged\")")
                })?;
                if verdict == Verdict::Healthy {
                    return Err(format!("{at} restart_on may not name \"healthy\": a healthy VM is never restarted"));
                }
                restart_on.push(verdict);
            }
        }
        policies.push(Policy {
            vmid,
            matchers: p.matchers,
            action,
            restart_on,
            watch_autopsy: p.watch_autopsy,
            restart_suspected: p.restart_suspected,
        });
    }
    let watch = match raw.watch {
        None => None,
        Some(w) => {
            let interval = dur("watch.interval", &w.interval, Duration::from_secs(60))?;
            if interval < Duration::from_secs(1) {
                return Err("[serve.watch] interval must be at least 1s".into());
            }
            let window = match &w.window {
                Some(t) => Some(parse_duration(t).map_err(|e| format!("[serve.watch] window: {e}"))?),
                None => None,
            };
            Some(Watch { interval, consecutive: w.consecutive.unwrap_or(3).max(1), window })
        }
    };
    let max_concurrent = raw.max_concurrent.unwrap_or(2);
    if max_concurrent == 0 {
        return Err("[serve] max_concurrent must be at least 1".into());
    }
    Ok(ServeConfig {
        listen,
        token,
        hmac_secret,
        signature_header: raw.signature_header.unwrap_or_else(|| DEFAULT_SIGNATURE_HEADER.into()),
        signature_timestamp_header: raw.signature_timestamp_header,
        signature_max_skew: dur("signature_max_skew", &raw.signature_max_skew, Duration::from_secs(300))?,
        allow_loopback_without_token: raw.allow_loopback_without_token,
        header_timeout: {
            let d = dur("header_timeout", &raw.header_timeout, Duration::from_secs(10))?;
            if d.is_zero() {
                return Err("[serve] header_timeout must be more than 0 (e.g. \"10s\")".into());
            }
            d
        },
        max_connections: raw.max_connections.unwrap_or(256).clamp(4, 65_536),
        max_alerts: raw.max_alerts.unwrap_or(200).max(1),
        max_firings_per_vm: raw.max_firings_per_vm.unwrap_or(256).max(1),
        notify: raw.notify,
        notify_attempts: raw.notify_attempts.unwrap_or(5).clamp(1, 20),
        notify_timeout: dur("notify_timeout", &raw.notify_timeout, Duration::from_secs(10))?,
        on_complete: raw.on_complete,
        on_complete_timeout: dur("on_complete_timeout", &raw.on_complete_timeout, Duration::from_secs(60))?,
        copy_to: raw.copy_to,
        vmid_label: raw.vmid_label.unwrap_or_else(|| "vmid".into()),
        vm_map,
        repeat_window: dur("repeat_window", &raw.repeat_window, Duration::from_secs(4 * 3600))?,
        vm_cooldown: dur("vm_cooldown", &raw.vm_cooldown, Duration::from_secs(600))?,
        max_concurrent,
        max_queue: raw.max_queue.unwrap_or(64).max(1),
        max_body: raw.max_body.unwrap_or(1 << 20).max(1024),
        keep_jobs: raw.keep_jobs.unwrap_or(200).max(1),
        shutdown_grace: dur("shutdown_grace", &raw.shutdown_grace, Duration::from_secs(120))?,
        runbook: raw.runbook,
        policies,
        watch,
    })
}

/// Parses a verdict's kebab-case name.
pub fn parse_verdict(s: &str) -> Option<Verdict> {
    use Verdict::*;
    [BlockPathFrozen, MainLoopWedged, QmpUnreachable, Paused, IoError, ProcessStopped, Healthy, Inconclusive]
        .into_iter()
        .find(|v| v.as_str() == s)
}

fn read_secret(key: &str, path: Option<&PathBuf>) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = path else { return Ok(None) };
    crate::serve::perms::check_secret_file(path).map_err(|e| format!("[serve] {key}: {e}"))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("[serve] {key} {}: {e}; create it (mode 0600) or remove the key", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("[serve] {key} {} is empty: put the secret in it", path.display()));
    }
    Ok(Some(t.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn defaults_without_a_section() {
        let c = parse(None, None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.vmid_label, "vmid");
        assert_eq!(c.repeat_window, Duration::from_secs(4 * 3600));
        assert_eq!(c.policy_for("102".parse().unwrap(), &BTreeMap::new()).action, Action::Capture);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(Some(&table("listn = \"127.0.0.1:1\"")), None).unwrap_err();
        assert!(err.contains("listn"), "{err}");
        let err = parse(Some(&table("[[policy]]\nvmid = 102\nactoin = \"capture\"")), None).unwrap_err();
        assert!(err.contains("actoin"), "{err}");
    }

    #[test]
    fn beyond_loopback_needs_a_token() {
        let err = parse(None, Some("0.0.0.0:9171")).unwrap_err();
        assert!(err.contains("token_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("t");
        std::fs::write(&tok, "s3cret\n").unwrap();
        let t = table(&format!("token_file = {:?}", tok.display().to_string()));
        // A token others can read is refused, and the error names the fix.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = parse(Some(&t), Some("0.0.0.0:9171")).unwrap_err();
        assert!(err.contains("token_file") && err.contains(&format!("`chmod 600 {}`", tok.display())), "{err}");
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(Some(&t), Some("0.0.0.0:9171")).unwrap();
        assert_eq!(c.token.as_deref(), Some(&b"s3cret"[..]));
        let err = parse(Some(&table("allow_loopback_without_token = true")), Some("0.0.0.0:9171")).unwrap_err();
        assert!(err.contains("loopback only") || err.contains("token_file"), "{err}");
        let c = parse(Some(&table("allow_loopback_without_token = true")), None).unwrap();
        assert!(c.allow_loopback_without_token && c.token.is_none());
        assert_eq!(c.signature_max_skew, Duration::from_secs(300));
    }

    #[test]
    fn policies_match_by_vmid_then_labels_and_refuse_healthy() {
        let t = table(
            "[[policy]]\nvmid = 102\naction = \"capture-then-restart\"\nrestart_on = [\"block-path-frozen\"]\n\n[[policy]]\nmatch = { team = \"infra\" }\naction = \"capture-then-restart\"\n",
        );
        let c = parse(Some(&t), None).unwrap();
        let none = BTreeMap::new();
        let p = c.policy_for("102".parse().unwrap(), &none);
        assert_eq!(p.action, Action::CaptureThenRestart);
        assert_eq!(p.restart_on, vec![Verdict::BlockPathFrozen]);
        assert_eq!(c.policy_for("103".parse().unwrap(), &none).action, Action::Capture);
        let infra = BTreeMap::from([("team".to_string(), "infra".to_string())]);
        assert_eq!(c.policy_for("103".parse().unwrap(), &infra).action, Action::CaptureThenRestart);
        let err = parse(Some(&table("[[policy]]\nrestart_on = [\"healthy\"]")), None).unwrap_err();
        assert!(err.contains("healthy"), "{err}");
    }

    #[test]
    fn vm_map_and_notify_urls_are_checked() {
        let c = parse(Some(&table("[vm_map.instance]\ndevvm = 102\n")), None).unwrap();
        assert_eq!(c.vm_map["instance"]["devvm"].get(), 102);
        assert!(parse(Some(&table("[vm_map.instance]\ndevvm = 7\n")), None).is_err());
        assert!(parse(Some(&table("notify = [\"https://x/\"]")), None).unwrap_err().contains("http://"));
    }
}
