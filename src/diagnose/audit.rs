//! `audit`: every VM config on the node, read as option sets, for the incident's risk
//! stack, for what makes a VM unlike its neighbours, and for `[PENDING]` changes that a
//! running QEMU has not picked up (only a full stop→start applies them). Running VMs
//! also say whether a wedge could be pinned to a line ([`super::pinnable`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::config::{self, PveConfig, Risk};
use super::pinnable::RunningQemu;
use crate::pve::vmconfig::{pending_changes, pending_section};

#[derive(Debug, Clone, Serialize)]
pub struct VmAudit {
    pub vmid: String,
    pub name: Option<String>,
    pub risks: Vec<Risk>,
    /// Traits this VM alone (or nearly alone) has on the node.
    pub unlike_neighbours: Vec<String>,
    /// Keys whose pending value differs from the current one, as `key: old → new`.
    pub pending: Vec<String>,
    /// The VM's QEMU, when one runs on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<RunningQemu>,
}

/// Attaches each running QEMU to its VM's config entry; one with no config on this node
/// (a plain QEMU host, a config moved away) gets an entry of its own.
pub fn attach_running(vms: &mut Vec<VmAudit>, running: Vec<RunningQemu>) {
    for r in running {
        match vms.iter_mut().find(|v| v.vmid == r.vmid) {
            Some(v) => v.running = Some(r),
            None => vms.push(VmAudit {
                vmid: r.vmid.clone(),
                name: None,
                risks: vec![],
                unlike_neighbours: vec![],
                pending: vec![],
                running: Some(r),
            }),
        }
    }
}

/// Audits `<dir>/*.conf`. Unreadable files are reported as an error string.
pub fn audit_dir(dir: &Path) -> Result<Vec<VmAudit>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}; point --pve-dir at the cluster filesystem", dir.display()))?;
    let mut configs: Vec<(String, String)> = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "conf") {
            if let (Some(stem), Ok(text)) = (p.file_stem(), std::fs::read_to_string(&p)) {
                configs.push((stem.to_string_lossy().into_owned(), text));
            }
        }
    }
    configs.sort_by_key(|(id, _)| id.parse::<u64>().unwrap_or(u64::MAX));
    Ok(audit(&configs))
}

/// The traits compared across VMs.
fn traits(cfg: &PveConfig) -> Vec<(&'static str, String)> {
    let disks = cfg.disks();
    let iothread = disks.iter().any(|(k, o)| cfg.iothread_effective(k, o));
    let throttled = disks.iter().any(|(_, o)| o.keys().any(|k| crate::pve::vmconfig::is_throttle_option(k)));
    let aio: Vec<&str> = disks.iter().filter_map(|(_, o)| o.get("aio").map(String::as_str)).collect();
    vec![
        ("scsihw", cfg.scsihw().to_string()),
        ("iothread", if iothread { "yes" } else { "no" }.to_string()),
        ("QEMU throttle", if throttled { "yes" } else { "no" }.to_string()),
        ("aio", aio.first().map(|s| s.to_string()).unwrap_or_else(|| "default".into())),
    ]
}

pub fn audit(configs: &[(String, String)]) -> Vec<VmAudit> {
    let parsed: Vec<(String, PveConfig, Option<PveConfig>)> =
        configs.iter().map(|(id, text)| (id.clone(), PveConfig::parse(text), pending_section(text))).collect();
    let mut counts: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (_, cfg, _) in &parsed {
        for t in traits(cfg) {
            *counts.entry(t).or_default() += 1;
        }
    }
    let n = parsed.len();
    parsed
        .iter()
        .map(|(id, cfg, pending)| {
            let unlike = if n >= 3 {
                traits(cfg)
                    .into_iter()
                    .filter(|t| counts[t] == 1)
                    .map(|(k, v)| {
                        let others: Vec<String> = counts
                            .iter()
                            .filter(|((ok, ov), _)| *ok == k && *ov != v)
                            .map(|((_, ov), c)| format!("{c} with {ov}"))
                            .collect();
                        format!("the only VM with {k} {v} (others: {})", others.join(", "))
                    })
                    .collect()
            } else {
                vec![]
            };
            VmAudit {
                vmid: id.clone(),
                name: cfg.keys.get("name").cloned(),
                risks: config::risks(cfg),
                unlike_neighbours: unlike,
                pending: pending.as_ref().map(|p| pending_changes(cfg, p)).unwrap_or_default(),
                running: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfgs() -> Vec<(String, String)> {
        vec![
            ("101".into(), "name: web\nscsihw: virtio-scsi-single\nscsi0: local-lvm:vm-101-disk-0,iothread=1,size=32G\n".into()),
            ("102".into(), "name: devvm\nscsihw: lsi\nscsi0: local-lvm:vm-102-disk-0,mbps_rd=60,mbps_wr=60,size=64G\n[PENDING]\nscsi0: local-lvm:vm-102-disk-0,size=64G,mbps_wr=60,mbps_rd=60\nscsihw: virtio-scsi-single\n".into()),
            ("103".into(), "name: db\nscsi0: local-lvm:vm-103-disk-0,size=32G,iothread=1\nscsihw: virtio-scsi-single\n[PENDING]\nscsihw: virtio-scsi-single\nscsi0: local-lvm:vm-103-disk-0,iothread=1,size=32G\n".into()),
        ]
    }

    #[test]
    fn odd_one_out_and_pending_as_option_sets() {
        let a = audit(&cfgs());
        let devvm = &a[1];
        assert!(
            devvm.unlike_neighbours.iter().any(|u| u.starts_with("the only VM with scsihw lsi")),
            "{:?}",
            devvm.unlike_neighbours
        );
        // Reordered scsi0 options compare equal; the scsihw change is real.
        assert_eq!(devvm.pending, vec!["scsihw: lsi → virtio-scsi-single".to_string()]);
        // VM 103's pending section only reorders keys and options: no change.
        assert!(a[2].pending.is_empty(), "{:?}", a[2].pending);
        assert!(a[2].risks.is_empty() && a[0].risks.is_empty());
        assert!(devvm.risks.len() >= 2);
    }
}
