//! Which controller and virtio device serve each block device, and what backs it.
//!
//! In: the `query-block` reply, the proven command line (`-device` options, key=value or
//! JSON) and the `x-query-virtio` list. Out: one [`Disk`] per block device. The command
//! line is the authority for the device tree because it is what QEMU was started with;
//! `qm showcmd` is not (the config may have changed since).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::target::split_qemu_opts;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Topology {
    pub disks: Vec<Disk>,
    /// `x-query-virtio`: `(name, path)` of every realized virtio device.
    pub virtio: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Disk {
    /// The BlockBackend name QMP reports (`drive-scsi0`), else the qdev id.
    pub device: String,
    pub qdev: Option<String>,
    pub controller: ControllerKind,
    /// The controller's `-device` id (`virtioscsi0`, `scsihw0`, `virtio0`).
    pub controller_id: Option<String>,
    /// The virtio device whose queues carry this disk's requests.
    pub virtio_path: Option<String>,
    pub backend: Backend,
    /// Local files (or block devices) the image chain opens.
    #[serde(default)]
    pub files: Vec<String>,
    /// QEMU-level throttling on this disk (`-drive` limits or a throttle group).
    #[serde(default)]
    pub throttled: bool,
    /// SCSI target (`scsi-id=`) and LUN (`lun=`) of a SCSI disk, from its `-device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsi_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<u32>,
    /// `serial=` of the disk's `-device` (Proxmox's `serial=` disk option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `(slot, function)` of the controller on the root bus (`bus=pci.0,addr=0x5`): the
    /// guest sees that as PCI 0000:00:05.0. Unknown behind a bridge or without `addr=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_pci: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControllerKind {
    VirtioScsi,
    VirtioBlk,
    Lsi,
    Megasas,
    Pvscsi,
    Ide,
    Sata,
    Other,
    #[default]
    Unknown,
}

impl ControllerKind {
    fn from_driver(driver: &str) -> ControllerKind {
        match driver {
            d if d.starts_with("virtio-scsi") => ControllerKind::VirtioScsi,
            d if d.starts_with("virtio-blk") => ControllerKind::VirtioBlk,
            d if d.starts_with("lsi") => ControllerKind::Lsi,
            d if d.starts_with("megasas") => ControllerKind::Megasas,
            "pvscsi" => ControllerKind::Pvscsi,
            "ahci" | "ich9-ahci" => ControllerKind::Sata,
            d if d.starts_with("piix") || d.starts_with("ide") => ControllerKind::Ide,
            _ => ControllerKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ControllerKind::VirtioScsi => "virtio-scsi",
            ControllerKind::VirtioBlk => "virtio-blk",
            ControllerKind::Lsi => "LSI 53C895A",
            ControllerKind::Megasas => "MegaRAID SAS",
            ControllerKind::Pvscsi => "PVSCSI",
            ControllerKind::Ide => "IDE",
            ControllerKind::Sata => "SATA (AHCI)",
            ControllerKind::Other => "other controller",
            ControllerKind::Unknown => "unknown controller",
        }
    }

    /// Whether QEMU exposes this controller's in-flight requests (virtqueue indices).
    pub fn has_queue_view(self) -> bool {
        matches!(self, ControllerKind::VirtioScsi | ControllerKind::VirtioBlk)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Backend {
    /// A file or block device on this host.
    Local,
    /// A network protocol driver inside QEMU (`nbd`, `iscsi`, `rbd`, `gluster`, …).
    Network { protocol: String, target: String },
    #[default]
    Unknown,
}

const NETWORK_PROTOCOLS: &[&str] = &["nbd", "iscsi", "rbd", "gluster", "ssh", "nfs", "http", "https", "ftp", "ftps"];

/// One `-device` option: driver and key=value options.
#[derive(Debug, Clone, Default)]
struct DeviceOpt {
    driver: String,
    opts: BTreeMap<String, String>,
}

fn devices(cmdline: &[String]) -> Vec<DeviceOpt> {
    let mut out = Vec::new();
    for w in cmdline.windows(2) {
        if w[0] != "-device" {
            continue;
        }
        let v = &w[1];
        if v.trim_start().starts_with('{') {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(v) {
                let mut d = DeviceOpt::default();
                for (k, val) in m {
                    let s = match val {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if k == "driver" {
                        d.driver = s;
                    } else {
                        d.opts.insert(k, s);
                    }
                }
                out.push(d);
            }
            continue;
        }
        let mut parts = split_qemu_opts(v).into_iter();
        let mut d = DeviceOpt::default();
        if let Some(first) = parts.next() {
            match first.split_once('=') {
                Some(("driver", drv)) => d.driver = drv.to_string(),
                Some((k, val)) => {
                    d.opts.insert(k.to_string(), val.to_string());
                }
                None => d.driver = first,
            }
        }
        for p in parts {
            if let Some((k, val)) = p.split_once('=') {
                if k == "driver" {
                    d.driver = val.to_string();
                } else {
                    d.opts.insert(k.to_string(), val.to_string());
                }
            }
        }
        out.push(d);
    }
    out
}

/// Builds the topology. `block` is `query-block`'s return value, `virtio` is
/// `x-query-virtio`'s (either may be missing: then less is known, and the notes say so).
pub fn build(block: Option<&Value>, virtio: Option<&Value>, cmdline: &[String]) -> Topology {
    let mut t = Topology::default();
    for v in virtio.and_then(Value::as_array).into_iter().flatten() {
        if let (Some(n), Some(p)) = (v["name"].as_str(), v["path"].as_str()) {
            t.virtio.push((n.to_string(), p.to_string()));
        }
    }
    let devs = devices(cmdline);
    let by_id: BTreeMap<&str, &DeviceOpt> = devs.iter().filter_map(|d| Some((d.opts.get("id")?.as_str(), d))).collect();
    let Some(blocks) = block.and_then(Value::as_array) else {
        t.notes.push("no query-block reply: disks unknown".into());
        return t;
    };
    for b in blocks {
        let ins = &b["inserted"];
        if ins.is_null() {
            continue; // an empty CD-ROM drive
        }
        let qdev = b["qdev"].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let device = b["device"].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let Some(name) = device.clone().or(qdev.clone()) else { continue };
        let mut disk = Disk { device: name, qdev: qdev.clone(), ..Default::default() };
        // qdev is an id ("scsi0") or a QOM path ("/machine/peripheral/virtio0/virtio-backend").
        let id = qdev.as_deref().map(|q| match q.strip_prefix("/machine/peripheral/") {
            Some(rest) => rest.split('/').next().unwrap_or(rest).to_string(),
            None => q.to_string(),
        });
        let num = |d: &DeviceOpt, k: &str| d.opts.get(k).and_then(|v| parse_num(v));
        match id.as_deref().and_then(|i| by_id.get(i)) {
            Some(dev) if dev.driver.starts_with("virtio-blk") => {
                disk.controller = ControllerKind::VirtioBlk;
                disk.controller_id = id.clone();
                disk.controller_pci = root_pci(dev);
                disk.serial = dev.opts.get("serial").cloned();
            }
            Some(dev) => match dev.opts.get("bus") {
                Some(bus) => {
                    let ctl = bus.rsplit_once('.').map(|(c, _)| c).unwrap_or(bus);
                    disk.controller_id = Some(ctl.to_string());
                    disk.scsi_id = num(dev, "scsi-id");
                    disk.lun = num(dev, "lun");
                    disk.serial = dev.opts.get("serial").cloned();
                    disk.controller_pci = by_id.get(ctl).and_then(|c| root_pci(c));
                    disk.controller = match by_id.get(ctl) {
                        Some(c) => ControllerKind::from_driver(&c.driver),
                        // The built-in IDE buses (`ide.0`) have no -device of their own.
                        None if ctl == "ide" => ControllerKind::Ide,
                        None => ControllerKind::Unknown,
                    };
                }
                None if dev.driver.starts_with("ide") => disk.controller = ControllerKind::Ide,
                None => {}
            },
            None => t.notes.push(format!("{}: no -device with id {:?} on the command line", disk.device, id)),
        }
        if disk.controller.has_queue_view() {
            if let Some(cid) = &disk.controller_id {
                let want = format!("/machine/peripheral/{cid}/");
                disk.virtio_path = t.virtio.iter().find(|(_, p)| p.starts_with(&want)).map(|(_, p)| p.clone());
                if disk.virtio_path.is_none() {
                    t.notes.push(format!("{}: controller {cid} is not in x-query-virtio", disk.device));
                }
            }
        }
        backend(ins, &mut disk);
        disk.throttled = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"]
            .iter()
            .any(|k| ins[*k].as_u64().is_some_and(|v| v > 0))
            || ins["group"].is_string();
        t.disks.push(disk);
    }
    t
}

/// A decimal or `0x` number of a `-device` option.
fn parse_num(v: &str) -> Option<u32> {
    match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// `(slot, function)` of a PCI device placed on the root bus with an explicit `addr=`
/// (`slot` or `slot.function`, hex). A device behind a bridge (`bus=pci.1`) gets a bus
/// number from the guest's firmware, so its guest address is not known here.
fn root_pci(d: &DeviceOpt) -> Option<(u32, u32)> {
    if !matches!(d.opts.get("bus").map(String::as_str), None | Some("pci.0") | Some("pcie.0")) {
        return None;
    }
    let addr = d.opts.get("addr")?;
    let (slot, func) = addr.split_once('.').unwrap_or((addr, "0"));
    let hex = |x: &str| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok();
    Some((hex(slot)?, hex(func)?))
}

/// Classifies the image chain: any network protocol in it makes the disk network-backed.
fn backend(ins: &Value, disk: &mut Disk) {
    let mut names: Vec<String> = Vec::new();
    if let Some(f) = ins["file"].as_str() {
        names.push(f.to_string());
    }
    let mut img = &ins["image"];
    while img.is_object() {
        if let Some(f) = img["filename"].as_str() {
            names.push(f.to_string());
        }
        img = &img["backing-image"];
    }
    for n in &names {
        if let Some(proto) = network_protocol(n) {
            disk.backend = Backend::Network { protocol: proto, target: crate::redact::url_userinfo(n) };
            return;
        }
    }
    for n in &names {
        // Local paths, also inside `blkdebug::/path` or `json:{…"filename": "/path"…}`.
        for part in n.split([':', '"', ',']) {
            if part.starts_with('/') && !disk.files.contains(&part.to_string()) {
                disk.files.push(part.to_string());
            }
        }
    }
    if !disk.files.is_empty() {
        disk.backend = Backend::Local;
    }
}

fn network_protocol(name: &str) -> Option<String> {
    if let Some(json) = name.strip_prefix("json:") {
        let v: Value = serde_json::from_str(json).ok()?;
        let mut found = None;
        walk_drivers(&v, &mut found);
        return found;
    }
    let scheme = name.split([':', '+']).next()?;
    NETWORK_PROTOCOLS.contains(&scheme).then(|| scheme.to_string())
}

fn walk_drivers(v: &Value, found: &mut Option<String>) {
    match v {
        Value::Object(m) => {
            if let Some(d) = m.get("driver").and_then(Value::as_str) {
                if NETWORK_PROTOCOLS.contains(&d) && found.is_none() {
                    *found = Some(d.to_string());
                }
            }
            m.values().for_each(|x| walk_drivers(x, found));
        }
        Value::Array(a) => a.iter().for_each(|x| walk_drivers(x, found)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn proxmox_layouts() {
        let cmd = argv(&[
            "kvm",
            "-device",
            "virtio-scsi-pci,id=virtioscsi0,iothread=iothread-virtioscsi0",
            "-device",
            "scsi-hd,bus=virtioscsi0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0",
            "-device",
            "lsi,id=scsihw0,bus=pci.0,addr=0x5",
            "-device",
            "scsi-hd,bus=scsihw0.0,scsi-id=1,drive=drive-scsi1,id=scsi1",
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"drive-virtio0","id":"virtio0","iothread":"iothread-virtio0"}"#,
        ]);
        let block = json!([
            {"device": "drive-scsi0", "qdev": "scsi0", "inserted": {"file": "/var/lib/vz/images/102/vm-102-disk-0.raw", "bps": 62914560, "image": {"filename": "/var/lib/vz/images/102/vm-102-disk-0.raw"}}},
            {"device": "drive-scsi1", "qdev": "scsi1", "inserted": {"file": "nbd://10.0.0.5:10809/exp", "image": {"filename": "nbd://10.0.0.5:10809/exp"}}},
            {"device": "drive-virtio0", "qdev": "/machine/peripheral/virtio0/virtio-backend", "inserted": {"file": "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"rbd\", \"pool\": \"p\"}}"}},
            {"device": "drive-ide2", "qdev": "ide2", "tray_open": false}
        ]);
        let virtio = json!([
            {"name": "virtio-scsi", "path": "/machine/peripheral/virtioscsi0/virtio-backend"},
            {"name": "virtio-blk", "path": "/machine/peripheral/virtio0/virtio-backend"}
        ]);
        let t = build(Some(&block), Some(&virtio), &cmd);
        assert_eq!(t.disks.len(), 3);
        let d0 = &t.disks[0];
        assert_eq!(d0.controller, ControllerKind::VirtioScsi);
        assert_eq!(d0.virtio_path.as_deref(), Some("/machine/peripheral/virtioscsi0/virtio-backend"));
        assert_eq!(d0.backend, Backend::Local);
        assert_eq!(d0.files, vec!["/var/lib/vz/images/102/vm-102-disk-0.raw".to_string()]);
        assert!(d0.throttled);
        let d1 = &t.disks[1];
        assert_eq!(d1.controller, ControllerKind::Lsi);
        assert_eq!((d1.scsi_id, d1.lun, d1.controller_pci), (Some(1), None, Some((5, 0))));
        assert_eq!((d0.scsi_id, d0.lun, d0.controller_pci), (Some(0), Some(0), None));
        assert_eq!(d1.virtio_path, None);
        assert!(matches!(&d1.backend, Backend::Network { protocol, .. } if protocol == "nbd"));
        let d2 = &t.disks[2];
        assert_eq!(d2.controller, ControllerKind::VirtioBlk);
        assert_eq!(d2.virtio_path.as_deref(), Some("/machine/peripheral/virtio0/virtio-backend"));
        assert!(matches!(&d2.backend, Backend::Network { protocol, .. } if protocol == "rbd"));
    }

    #[test]
    fn lab_blkdebug_filename_yields_the_local_path() {
        let cmd = argv(&["q", "-device", "scsi-hd,bus=virtioscsi0.0,drive=drive-scsi0,id=scsi0"]);
        let block = json!([{"device": "drive-scsi0", "qdev": "scsi0", "inserted": {"file": "blkdebug::/tmp/x/vm-150-disk-0.raw"}}]);
        let t = build(Some(&block), None, &cmd);
        assert_eq!(t.disks[0].files, vec!["/tmp/x/vm-150-disk-0.raw".to_string()]);
        assert_eq!(t.disks[0].controller, ControllerKind::Unknown);
    }
}
