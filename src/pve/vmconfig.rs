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

    /// Whether disk `key`'s `iothread=1` takes effect, as qemu-server applies it:
    /// virtio-blk disks honour it; SCSI disks only under scsihw virtio-scsi-single (it is
    /// ignored with a warning otherwise); SATA and IDE have none.
    pub fn iothread_effective(&self, key: &str, o: &Options) -> bool {
        let on = o.get("iothread").is_some_and(|v| matches!(v.as_str(), "1" | "on" | "true" | "yes"));
        on && (key.starts_with("virtio") || (key.starts_with("scsi") && self.scsihw() == "virtio-scsi-single"))
    }

    /// The normalized form used for comparisons: every value as an option set.
    pub fn normalized(&self) -> BTreeMap<String, Options> {
        self.keys.iter().map(|(k, v)| (k.clone(), options(v))).collect()
    }
}

/// Whether a disk option is a QEMU-level I/O limit: `mbps*`, `iops*` (with their `_max`
/// bursts and `_max_length`s) and the legacy byte-based `bps`, `bps_rd`, `bps_wr` (and
/// their lengths), which qemu-server still accepts and converts to `mbps*`.
pub fn is_throttle_option(key: &str) -> bool {
    ["mbps", "iops", "bps"].iter().any(|p| key.strip_prefix(p).is_some_and(|r| r.is_empty() || r.starts_with('_')))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_options_include_the_legacy_byte_keys() {
        for k in ["mbps", "mbps_rd", "mbps_wr_max", "iops", "iops_rd_max_length", "bps", "bps_rd", "bps_wr_length"] {
            assert!(is_throttle_option(k), "{k}");
        }
        for k in ["file", "iothread", "bpsx", "mbpsfoo", "size", "aio"] {
            assert!(!is_throttle_option(k), "{k}");
        }
    }

    /// qemu-server: virtio-blk honours iothread=1; SCSI only under virtio-scsi-single.
    #[test]
    fn iothread_takes_effect_as_qemu_server_applies_it() {
        let cfg = |hw: &str| PveConfig::parse(&format!("scsihw: {hw}\n"));
        let on = options("local-lvm:vm-1-disk-0,iothread=1");
        assert!(cfg("virtio-scsi-single").iothread_effective("scsi0", &on));
        assert!(!cfg("virtio-scsi-pci").iothread_effective("scsi0", &on));
        assert!(!cfg("lsi").iothread_effective("scsi0", &on));
        assert!(!PveConfig::parse("").iothread_effective("scsi0", &on), "lsi is the default");
        assert!(cfg("lsi").iothread_effective("virtio0", &on));
        assert!(!cfg("virtio-scsi-single").iothread_effective("sata0", &on));
        assert!(!cfg("virtio-scsi-single").iothread_effective("scsi0", &options("local-lvm:vm-1-disk-0")));
    }
}
