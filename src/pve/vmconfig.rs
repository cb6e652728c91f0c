//! Proxmox VM configs (`/etc/pve/qemu-server/<vmid>.conf`) as option sets.
//!
//! `qm config` prints keys in its own order, so configs are compared as normalized option
//! sets (`key -> {option -> value}`), never as strings. A leaf: the diagnosis, the
//! signatures and the Proxmox findings all read configs through it.

use std::collections::BTreeMap;

use serde::Serialize;

/// A VM config's main section: `key -> value`, with snapshot sections dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PveConfig {
    pub keys: BTreeMap<String, String>,
}

/// A property string (`local-lvm:vm-102-disk-0,iothread=1,mbps_rd=60`) as a set. The
/// leading element without `=` is the volume, stored under `file`.
pub type Options = BTreeMap<String, String>;

impl PveConfig {
    pub fn parse(text: &str) -> PveConfig {
        let mut keys = BTreeMap::new();
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with('[') {
                break; // snapshots and pending sections follow the main section
            }
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = l.split_once(':') {
                keys.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        PveConfig { keys }
    }

    pub fn options(&self, key: &str) -> Option<Options> {
        self.keys.get(key).map(|v| options(v))
    }

    /// Disk keys (`scsi0`, `virtio1`, …), CD-ROMs excluded.
    pub fn disks(&self) -> Vec<(String, Options)> {
        self.keys
            .keys()
            .filter(|k| {
                let base = k.trim_end_matches(|c: char| c.is_ascii_digit());
                k.len() > base.len() && matches!(base, "scsi" | "virtio" | "sata" | "ide")
            })
            .filter_map(|k| Some((k.clone(), self.options(k)?)))
            .filter(|(_, o)| o.get("media").map(String::as_str) != Some("cdrom"))
            .collect()
    }

    /// `scsihw`, with Proxmox's default when unset.
    pub fn scsihw(&self) -> &str {
        self.keys.get("scsihw").map(String::as_str).unwrap_or("lsi")
    }

    /// The normalized form used for comparisons: every value as an option set.
    pub fn normalized(&self) -> BTreeMap<String, Options> {
        self.keys.iter().map(|(k, v)| (k.clone(), options(v))).collect()
    }
}

/// One property string as an option set; the leading bare element becomes `file`.
pub fn options(value: &str) -> Options {
    let mut out = Options::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => out.insert(k.trim().to_string(), v.trim().to_string()),
            None => out.insert("file".to_string(), part.trim().to_string()),
        };
    }
    out
}

/// The `[PENDING]` changes of one config's text, as `key: old → new` (option sets, so
/// a reordering is no change). Used by `audit` and by the autopsy's Proxmox findings.
pub fn pending(text: &str) -> Vec<String> {
    pending_section(text).map(|p| pending_changes(&PveConfig::parse(text), &p)).unwrap_or_default()
}

/// The `[PENDING]` section, if any: changes written to the config but not yet applied.
pub fn pending_section(text: &str) -> Option<PveConfig> {
    let start = text.lines().position(|l| l.trim() == "[PENDING]")?;
    let rest: Vec<&str> = text.lines().skip(start + 1).take_while(|l| !l.trim_start().starts_with('[')).collect();
    Some(PveConfig::parse(&rest.join("\n")))
}

/// What `pend` changes against `cur`, as `key: old → new` lines (`delete k` for deletions).
pub fn pending_changes(cur: &PveConfig, pend: &PveConfig) -> Vec<String> {
    let cur_n = cur.normalized();
    let mut out = Vec::new();
    for (k, v) in pend.normalized() {
        if k == "delete" {
            out.push(format!("delete {}", pend.keys[&k]));
            continue;
        }
        let show = |o: &Options| {
            o.iter()
                .map(|(a, b)| if a == "file" { b.clone() } else { format!("{a}={b}") })
                .collect::<Vec<_>>()
                .join(",")
        };
        match cur_n.get(&k) {
            Some(c) if *c == v => {}
            Some(c) => out.push(format!("{k}: {} → {}", show(c), show(&v))),
            None => out.push(format!("{k}: (unset) → {}", show(&v))),
        }
    }
    out
}
