//! Alert payloads (Alertmanager webhook v4, Grafana webhook v1) and the mapping from an
//! alert to a local VM.
//!
//! Parsing is lenient: unknown fields are ignored (both senders keep adding them) and
//! absent ones default. Mapping is strict: a firing alert either names a VM that the
//! cluster map places on this node, or it is refused with a reason the sender will log.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::ServeConfig;
use crate::target::VmId;

/// One alert, as both senders shape it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

/// The webhook body (the fields this tool reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Payload {
    pub version: String,
    pub status: String,
    pub receiver: String,
    pub group_key: String,
    pub common_labels: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

/// What is kept of a request, whatever it carries (documented in docs/serve.md): at most
/// this many labels (and annotations) per alert…
pub const MAX_LABELS: usize = 32;
/// …label names cut at this many bytes…
pub const MAX_LABEL_NAME: usize = 128;
/// …label values, reasons and descriptions cut at this many bytes…
pub const MAX_TEXT: usize = 1024;
/// …and firing keys longer than this are kept as their SHA-256.
pub const MAX_KEY: usize = 160;

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A label or annotation map as kept in a job: [`MAX_LABELS`] entries, names and values cut.
pub fn bounded(m: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    m.iter().take(MAX_LABELS).map(|(k, v)| (cut(k, MAX_LABEL_NAME), cut(v, MAX_TEXT))).collect()
}

/// Which sender a payload must come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Alertmanager,
    Grafana,
}

/// Parses a webhook body. A wrong `version` is an error: the shape may differ.
pub fn parse(body: &[u8], source: Source) -> Result<Payload, String> {
    let p: Payload = serde_json::from_slice(body).map_err(|e| format!("malformed JSON payload: {e}"))?;
    let want = match source {
        Source::Alertmanager => "4",
        Source::Grafana => "1",
    };
    if p.version != want {
        return Err(format!(
            "payload version {:?} is not the {} webhook's version {want:?}: point this receiver at the right endpoint",
            p.version,
            match source {
                Source::Alertmanager => "Alertmanager",
                Source::Grafana => "Grafana",
            }
        ));
    }
    Ok(p)
}

/// Why an alert does not lead to an autopsy here. The HTTP status is a 4xx: a retry of
/// the same alert would get the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlertRefusal {
    #[error("alert {alert} carries no VMID: no label {label:?} and no [serve.vm_map] entry matches its labels")]
    NoVmid { alert: String, label: String },
    #[error("alert {alert}: label {label}={value:?} is not a VMID (100–999999999)")]
    BadVmid { alert: String, label: String, value: String },
    #[error("VM {vmid} is not in the cluster's VM list: check the alert's labels or [serve.vm_map]")]
    UnknownVm { vmid: VmId },
    #[error("VM {vmid} runs on node {node}: send this alert to wedge-autopsy on {node}")]
    OtherNode { vmid: VmId, node: String },
    #[error("VM {vmid} is not running on this node (no pidfile {pidfile}): nothing to capture")]
    NotRunning { vmid: VmId, pidfile: String },
}

impl AlertRefusal {
    /// 422 for an alert that names no VM, 404 for an unknown VM, 421 (misdirected) for a
    /// VM on another node, 409 for a VM that is not running.
    pub fn status(&self) -> u16 {
        match self {
            AlertRefusal::NoVmid { .. } | AlertRefusal::BadVmid { .. } => 422,
            AlertRefusal::UnknownVm { .. } => 404,
            AlertRefusal::OtherNode { .. } => 421,
            AlertRefusal::NotRunning { .. } => 409,
        }
    }
    pub fn node(&self) -> Option<&str> {
        match self {
            AlertRefusal::OtherNode { node, .. } => Some(node),
            _ => None,
        }
    }
}

impl Alert {
    /// A short name for messages: `alertname` and fingerprint.
    /// Both parts are cut (the name at [`MAX_LABEL_NAME`], the fingerprint at 64 bytes):
    /// this text lands in answers, job records, logs and the archive's trigger reason.
    pub fn describe(&self) -> String {
        let name = cut(self.labels.get("alertname").map(String::as_str).unwrap_or("(no alertname)"), MAX_LABEL_NAME);
        if self.fingerprint.is_empty() {
            name
        } else {
            format!("{name} [{}]", cut(&self.fingerprint, 64))
        }
    }

    pub fn is_firing(&self) -> bool {
        self.status == "firing"
    }

    /// The identity of one firing: fingerprint and start. Grafana may omit the
    /// fingerprint; the sorted labels stand in for it then. A key longer than [`MAX_KEY`]
    /// is kept as `sha256:<hex>`, so memory per remembered firing is bounded.
    pub fn firing_key(&self) -> String {
        let id = if self.fingerprint.is_empty() {
            self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        } else {
            self.fingerprint.clone()
        };
        let key = format!("{id}@{}", self.starts_at);
        if key.len() <= MAX_KEY {
            return key;
        }
        format!("sha256:{:x}", Sha256::digest(key.as_bytes()))
    }
}

/// The VMID an alert is about: the `vmid_label` first, then `[serve.vm_map]`.
pub fn vmid_of(alert: &Alert, cfg: &ServeConfig) -> Result<VmId, AlertRefusal> {
    if let Some(v) = alert.labels.get(&cfg.vmid_label) {
        return v.parse().map_err(|_| AlertRefusal::BadVmid {
            alert: alert.describe(),
            label: cfg.vmid_label.clone(),
            value: v.chars().take(40).collect(),
        });
    }
    for (label, values) in &cfg.vm_map {
        if let Some(id) = alert.labels.get(label).and_then(|v| values.get(v)) {
            return Ok(*id);
        }
    }
    Err(AlertRefusal::NoVmid { alert: alert.describe(), label: cfg.vmid_label.clone() })
}

/// Checks that `vmid` runs here: listed on this node in `<pve_dir>/.vmlist` (when that
/// map exists) and with a pidfile in `run_dir`. Reads two small files; the proof of the
/// process itself happens in the job (it may block on a wedged process).
pub fn locate(vmid: VmId, pve_dir: &Path, run_dir: &Path, node: &str) -> Result<(), AlertRefusal> {
    if let Ok(text) = std::fs::read_to_string(pve_dir.join(".vmlist")) {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(ids) = json.get("ids").and_then(|v| v.as_object()) {
                match ids.get(&vmid.to_string()).map(|e| e.get("node").and_then(|n| n.as_str())) {
                    None => return Err(AlertRefusal::UnknownVm { vmid }),
                    Some(Some(n)) if n != node => return Err(AlertRefusal::OtherNode { vmid, node: n.to_string() }),
                    _ => {}
                }
            }
        }
    }
    let pidfile = run_dir.join(format!("{vmid}.pid"));
    if !pidfile.exists() {
        return Err(AlertRefusal::NotRunning { vmid, pidfile: pidfile.display().to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AM: &str = r#"{"version":"4","status":"firing","receiver":"wa","groupKey":"{}:{}","truncatedAlerts":0,
      "groupLabels":{},"commonLabels":{"alertname":"VmDiskWritesFlat"},"commonAnnotations":{},"externalURL":"http://am",
      "alerts":[{"status":"firing","labels":{"alertname":"VmDiskWritesFlat","vmid":"102"},"annotations":{},
      "startsAt":"2026-06-11T15:24:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom/graph","fingerprint":"abc","newField":1}]}"#;

    fn cfg(extra: &str) -> ServeConfig {
        super::super::config::parse(Some(&extra.parse().unwrap()), None).unwrap()
    }

    #[test]
    fn alertmanager_v4_parses_leniently() {
        let p = parse(AM.as_bytes(), Source::Alertmanager).unwrap();
        assert_eq!(p.alerts.len(), 1);
        let a = &p.alerts[0];
        assert!(a.is_firing());
        assert_eq!(a.generator_url, "http://prom/graph");
        assert_eq!(a.firing_key(), "abc@2026-06-11T15:24:00Z");
        assert_eq!(vmid_of(a, &cfg("")).unwrap().get(), 102);
        assert!(parse(AM.as_bytes(), Source::Grafana).unwrap_err().contains("version"));
        assert!(parse(b"{", Source::Alertmanager).unwrap_err().contains("malformed"));
    }

    #[test]
    fn kept_text_is_bounded_whatever_the_payload_carries() {
        let huge = "é".repeat(1 << 20);
        let a = Alert {
            fingerprint: huge.clone(),
            starts_at: "t".into(),
            labels: (0..1000).map(|i| (format!("{i}{huge}"), huge.clone())).collect(),
            ..Default::default()
        };
        let k = a.firing_key();
        assert!(k.starts_with("sha256:") && k.len() == 7 + 64, "{}", k.len());
        let other = Alert { fingerprint: format!("{huge}x"), ..a.clone() };
        assert_ne!(other.firing_key(), k, "distinct long fingerprints stay distinct");
        assert_eq!(Alert { fingerprint: "abc".into(), ..a.clone() }.firing_key(), "abc@t");
        let b = bounded(&a.labels);
        assert_eq!(b.len(), MAX_LABELS);
        assert!(b.iter().all(|(k, v)| k.len() <= MAX_LABEL_NAME && v.len() <= MAX_TEXT && v.ends_with('…')));
        assert!(a.describe().len() < 300, "{}", a.describe().len());
        assert_eq!(cut("short", 10), "short");
    }

    #[test]
    fn vm_map_and_refusals() {
        let c = cfg("[vm_map.instance]\ndevvm = 102\n");
        let mut a = Alert { labels: BTreeMap::from([("instance".into(), "devvm".into())]), ..Default::default() };
        assert_eq!(vmid_of(&a, &c).unwrap().get(), 102);
        a.labels.insert("instance".into(), "other".into());
        assert_eq!(vmid_of(&a, &c).unwrap_err().status(), 422);
        a.labels.insert("vmid".into(), "12".into());
        assert!(matches!(vmid_of(&a, &c), Err(AlertRefusal::BadVmid { .. })));
    }

    #[test]
    fn locate_uses_vmlist_and_pidfile() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(".vmlist"),
            r#"{"version":1,"ids":{"102":{"node":"pve1"},"103":{"node":"pve2"}}}"#,
        )
        .unwrap();
        let id = |n: &str| n.parse::<VmId>().unwrap();
        assert_eq!(locate(id("104"), d.path(), d.path(), "pve1").unwrap_err().status(), 404);
        let e = locate(id("103"), d.path(), d.path(), "pve1").unwrap_err();
        assert_eq!((e.status(), e.node()), (421, Some("pve2")));
        assert_eq!(locate(id("102"), d.path(), d.path(), "pve1").unwrap_err().status(), 409);
        std::fs::write(d.path().join("102.pid"), "1\n").unwrap();
        assert!(locate(id("102"), d.path(), d.path(), "pve1").is_ok());
    }
}
