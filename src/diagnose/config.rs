//! The risk stack of the 2026-06-11 incident, read from a VM config
//! ([`crate::pve::vmconfig`] parses it).

use std::collections::BTreeMap;

use serde::Serialize;

pub use crate::pve::vmconfig::{options, Options, PveConfig};

/// One risk factor of the incident's stack, found in a config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Risk {
    pub key: String,
    pub what: String,
}

/// The incident's risk stack: the legacy LSI controller, disks without an iothread,
/// QEMU-level bandwidth/IOPS limits, and `aio=io_uring`.
pub fn risks(cfg: &PveConfig) -> Vec<Risk> {
    let mut out = Vec::new();
    let hw = cfg.scsihw();
    if hw == "lsi" || hw == "lsi53c810" {
        out.push(Risk {
            key: "scsihw".into(),
            what: format!(
                "scsihw {hw}{}: the emulated LSI controller, documented as hang-prone under heavy I/O; virtio-scsi-single is the paravirtual alternative",
                if cfg.keys.contains_key("scsihw") { "" } else { " (the default, not set explicitly)" }
            ),
        });
    }
    for (key, o) in cfg.disks() {
        let is_scsi = key.starts_with("scsi");
        if (key.starts_with("virtio") || (is_scsi && hw == "virtio-scsi-single")) && !cfg.iothread_effective(&key, &o) {
            out.push(Risk {
                key: key.clone(),
                what: format!("{key}: no iothread; disk emulation shares the main loop with timers and QMP"),
            });
        } else if is_scsi && hw != "virtio-scsi-single" {
            out.push(Risk {
                key: key.clone(),
                what: format!("{key}: no iothread possible with scsihw {hw}; disk emulation runs on the main loop"),
            });
        }
        let limits: Vec<String> = o
            .iter()
            .filter(|(k, _)| crate::pve::vmconfig::is_throttle_option(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !limits.is_empty() {
            out.push(Risk {
                key: key.clone(),
                what: format!(
                    "{key}: QEMU-level throttle {}; queued I/O completes only when the throttle timer fires",
                    limits.join(",")
                ),
            });
        }
        if o.get("aio").map(String::as_str) == Some("io_uring") {
            out.push(Risk { key: key.clone(), what: format!("{key}: aio=io_uring") });
        }
    }
    out
}

/// Throttle limits a config asks for, in QMP's units (bytes/s, ops/s), per disk key.
/// `mbps_wr=60` becomes `bps_wr = 62914560`.
pub fn configured_limits(cfg: &PveConfig) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (key, o) in cfg.disks() {
        let mut lim = BTreeMap::new();
        for (name, qmp, mult) in [
            // The legacy byte-based keys (qemu-server converts them to mbps*).
            ("bps", "bps", 1.0),
            ("bps_rd", "bps_rd", 1.0),
            ("bps_wr", "bps_wr", 1.0),
            ("mbps", "bps", 1048576.0),
            ("mbps_rd", "bps_rd", 1048576.0),
            ("mbps_wr", "bps_wr", 1048576.0),
            ("iops", "iops", 1.0),
            ("iops_rd", "iops_rd", 1.0),
            ("iops_wr", "iops_wr", 1.0),
        ] {
            if let Some(v) = o.get(name).and_then(|v| v.parse::<f64>().ok()) {
                lim.insert(qmp.to_string(), (v * mult).round() as u64);
            }
        }
        out.insert(key, lim);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reordered_keys_and_options_compare_equal_drift_does_not() {
        let a = PveConfig::parse(
            "scsihw: lsi\nscsi0: local-lvm:vm-102-disk-0,mbps_rd=60,mbps_wr=60,size=32G\nmemory: 4096\n",
        );
        let b = PveConfig::parse(
            "memory: 4096\nscsi0: local-lvm:vm-102-disk-0,size=32G,mbps_wr=60,mbps_rd=60\nscsihw: lsi\n",
        );
        assert_eq!(a.normalized(), b.normalized());
        let drift = PveConfig::parse(
            "memory: 4096\nscsi0: local-lvm:vm-102-disk-0,size=32G,mbps_wr=50,mbps_rd=60\nscsihw: lsi\n",
        );
        assert_ne!(a.normalized(), drift.normalized());
    }

    #[test]
    fn incident_stack_is_flagged() {
        let cfg = PveConfig::parse("scsihw: lsi\nscsi0: local-lvm:vm-102-disk-0,aio=io_uring,mbps_rd=60,mbps_wr=60\nide2: none,media=cdrom\n[snap1]\nscsihw: virtio-scsi-single\n");
        let r = risks(&cfg);
        let text: Vec<&str> = r.iter().map(|r| r.what.as_str()).collect();
        assert!(text.iter().any(|t| t.starts_with("scsihw lsi")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("no iothread")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("mbps_rd=60,mbps_wr=60")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("io_uring")), "{text:?}");
        assert!(!text.iter().any(|t| t.contains("ide2")), "cdrom is not a disk: {text:?}");
        assert_eq!(configured_limits(&cfg)["scsi0"]["bps_wr"], 62914560);
    }

    /// An old config still written with the byte-based keys qemu-server converts.
    #[test]
    fn legacy_byte_limits_count_as_a_throttle() {
        let cfg =
            PveConfig::parse("scsihw: virtio-scsi-single\nscsi0: local-lvm:vm-1-disk-0,iothread=1,bps_wr=1048576\n");
        let r = risks(&cfg);
        assert!(r.iter().any(|r| r.what.contains("QEMU-level throttle bps_wr=1048576")), "{r:?}");
        assert_eq!(configured_limits(&cfg)["scsi0"]["bps_wr"], 1048576);
    }

    #[test]
    fn healthy_neighbour_has_no_risk() {
        let cfg = PveConfig::parse(
            "scsihw: virtio-scsi-single\nscsi0: local-lvm:vm-101-disk-0,iothread=1,aio=threads,size=32G\n",
        );
        assert!(risks(&cfg).is_empty(), "{:?}", risks(&cfg));
    }
}
