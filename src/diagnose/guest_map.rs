//! Which guest disk is which QEMU drive, so the guest agent's view can decide per drive.
//!
//! In: the [`Topology`] (from the proven command line and `query-block`) and the agent's
//! `guest-get-disks` addresses. Out: the guest disks that map to exactly one drive, each
//! with the key it was mapped by. A guest disk that could be more than one drive, or a
//! drive two guest disks could be, maps to nothing: it must not decide anything.
//!
//! Keys, firmest first:
//! - the serial: udev's `ID_SERIAL` of a QEMU SCSI disk ends in its device id, which is the
//!   `-device serial=` when set and the drive id (`drive-scsi1`) otherwise; a virtio-blk
//!   disk's is the serial itself;
//! - the address: on the LSI 53C895A the agent reports the SCSI target as `unit`, and the
//!   controller's PCI address; qemu-server puts the disk at `scsi-id=<unit>`, lun 0, on
//!   `scsihw<N>` at a fixed slot of the root bus. On virtio-scsi `unit` is the LUN.
//!   An address counts only when the controller's slot is known (`bus=pci.0,addr=`), and
//!   not at all while any drive's controller is unknown (it could be the same address).

use std::collections::BTreeMap;

use crate::inflight::{ControllerKind, Disk, Topology};
use crate::qga::GuestDiskAddr;

/// A guest disk mapped to one drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Guest kernel name (`sdb`).
    pub guest: String,
    /// How it was mapped, for the evidence sentence.
    pub by: String,
}

/// Drive (`Disk::device`) → the one guest disk that is it.
pub fn map(topo: &Topology, addrs: &[GuestDiskAddr]) -> BTreeMap<String, Link> {
    let addresses_usable =
        !topo.disks.iter().any(|d| matches!(d.controller, ControllerKind::Unknown | ControllerKind::Other));
    let mut found: BTreeMap<String, Vec<Link>> = BTreeMap::new();
    for g in addrs {
        let by_serial: Vec<&Disk> = topo.disks.iter().filter(|d| serial_matches(g, d)).collect();
        let by_addr: Vec<&Disk> =
            if addresses_usable { topo.disks.iter().filter(|d| address_matches(g, d)).collect() } else { vec![] };
        let candidates: Vec<&Disk> = match (by_serial.is_empty(), by_addr.is_empty()) {
            (false, false) => by_serial.into_iter().filter(|d| by_addr.iter().any(|a| a.device == d.device)).collect(),
            (false, true) => by_serial,
            (true, _) => by_addr,
        };
        let [d] = candidates.as_slice() else { continue };
        let by = match (serial_matches(g, d), address_matches(g, d)) {
            (true, true) => format!("serial {} and {}", g.serial.as_deref().unwrap_or(""), describe_addr(g)),
            (true, false) => format!("serial {}", g.serial.as_deref().unwrap_or("")),
            _ => describe_addr(g),
        };
        found.entry(d.device.clone()).or_default().push(Link { guest: g.name.clone(), by });
    }
    // Two guest disks on one drive: neither is known to be it.
    found.into_iter().filter_map(|(dev, mut links)| (links.len() == 1).then(|| (dev, links.remove(0)))).collect()
}

fn describe_addr(g: &GuestDiskAddr) -> String {
    let pci = g.pci.map(|(d, b, s, f)| format!("{d:04x}:{b:02x}:{s:02x}.{f:x}")).unwrap_or_default();
    format!("SCSI unit {} on the controller at PCI {pci}", g.unit)
}

/// The guest's `ID_SERIAL` names this drive: it is the drive's device id, or ends in it
/// after udev's `_` (`0QEMU_QEMU_HARDDISK_drive-scsi1`).
fn serial_matches(g: &GuestDiskAddr, d: &Disk) -> bool {
    let Some(serial) = g.serial.as_deref() else { return false };
    // QEMU's scsi-hd takes at most 20 characters of `serial=` as its device id.
    let key: String = match &d.serial {
        Some(s) => s.chars().take(20).collect::<String>().replace(' ', "_"),
        None if d.controller == ControllerKind::VirtioBlk => return false,
        None => d.device.clone(),
    };
    !key.is_empty() && (serial == key || serial.strip_suffix(key.as_str()).is_some_and(|p| p.ends_with('_')))
}

/// The guest address is where qemu-server put this drive (see the module doc).
fn address_matches(g: &GuestDiskAddr, d: &Disk) -> bool {
    let (Some((slot, func)), Some((0, 0, gslot, gfunc))) = (d.controller_pci, g.pci) else { return false };
    if g.bus_type != "scsi" || (slot, func) != (gslot, gfunc) {
        return false;
    }
    match d.controller {
        // sym53c8xx: `target<h>:0:<id>` gives `unit`; the guest cannot name a LUN here.
        ControllerKind::Lsi => d.lun.unwrap_or(0) == 0 && d.scsi_id.is_some_and(|id| id == g.unit) && g.target == 0,
        ControllerKind::VirtioScsi => d.lun.unwrap_or(0) == g.unit,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsi(n: u32, slot: u32) -> Disk {
        Disk {
            device: format!("drive-scsi{n}"),
            qdev: Some(format!("scsi{n}")),
            controller: ControllerKind::Lsi,
            controller_id: Some("scsihw0".into()),
            scsi_id: Some(n),
            lun: Some(0),
            controller_pci: Some((slot, 0)),
            ..Default::default()
        }
    }

    fn guest(name: &str, unit: u32, slot: u32) -> GuestDiskAddr {
        GuestDiskAddr {
            name: name.into(),
            bus_type: "scsi".into(),
            unit,
            pci: Some((0, 0, slot, 0)),
            ..Default::default()
        }
    }

    fn topo(disks: Vec<Disk>) -> Topology {
        Topology { disks, ..Default::default() }
    }

    #[test]
    fn lsi_disks_map_by_target_on_the_controller_slot() {
        let t = topo(vec![lsi(0, 5), lsi(1, 5)]);
        let m = map(&t, &[guest("sda", 0, 5), guest("sdb", 1, 5)]);
        assert_eq!(m["drive-scsi0"].guest, "sda");
        assert_eq!(m["drive-scsi1"].guest, "sdb");
        assert_eq!(m["drive-scsi1"].by, "SCSI unit 1 on the controller at PCI 0000:00:05.0");
        // A guest disk on another controller (a passed-through HBA at slot 9) is nobody.
        let m = map(&t, &[guest("sdc", 0, 9)]);
        assert!(m.is_empty(), "{m:?}");
    }

    #[test]
    fn ambiguous_addresses_map_nothing() {
        // Two LSI controllers whose slots the command line does not give: target 0 is both.
        let mut a = lsi(0, 5);
        let mut b = lsi(7, 6);
        b.scsi_id = Some(0);
        a.controller_pci = None;
        b.controller_pci = None;
        assert!(map(&topo(vec![a.clone(), b.clone()]), &[guest("sda", 0, 5)]).is_empty());
        // The same slot twice (a config the tool cannot tell apart): neither decides.
        a.controller_pci = Some((5, 0));
        b.controller_pci = Some((5, 0));
        assert!(map(&topo(vec![a, b]), &[guest("sda", 0, 5), guest("sdb", 0, 5)]).is_empty());
        // A drive whose controller is unknown could sit at any address: no address counts.
        let unknown = Disk { device: "drive-scsi3".into(), ..Default::default() };
        assert!(map(&topo(vec![lsi(0, 5), unknown]), &[guest("sda", 0, 5)]).is_empty());
        // Two guest disks claiming one drive: neither is known to be it.
        let m = map(&topo(vec![lsi(0, 5)]), &[guest("sda", 0, 5), guest("sdz", 0, 5)]);
        assert!(m.is_empty(), "{m:?}");
    }

    #[test]
    fn serial_is_the_firmer_key() {
        let mut with_serial = lsi(1, 5);
        with_serial.serial = Some("DATA-01".into());
        let t = topo(vec![lsi(0, 5), with_serial]);
        // No address (udev gives the serial, sysfs not parsed): the serial alone maps.
        let g = GuestDiskAddr {
            name: "sdb".into(),
            serial: Some("0QEMU_QEMU_HARDDISK_DATA-01".into()),
            ..Default::default()
        };
        let m = map(&t, std::slice::from_ref(&g));
        assert_eq!(
            (m["drive-scsi1"].guest.as_str(), m["drive-scsi1"].by.as_str()),
            ("sdb", "serial 0QEMU_QEMU_HARDDISK_DATA-01")
        );
        // Without `serial=`, the device id is the drive id; `drive-scsi1` is not `drive-scsi11`.
        let g0 = GuestDiskAddr { serial: Some("0QEMU_QEMU_HARDDISK_drive-scsi0".into()), ..guest("sda", 0, 5) };
        let g11 = GuestDiskAddr {
            name: "sdk".into(),
            serial: Some("0QEMU_QEMU_HARDDISK_drive-scsi01".into()),
            ..Default::default()
        };
        let m = map(&t, &[g0, g11]);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m["drive-scsi0"].by.starts_with("serial 0QEMU_QEMU_HARDDISK_drive-scsi0 and SCSI unit 0"), "{m:?}");
        // Serial and address disagree: nothing is mapped.
        let g = GuestDiskAddr { serial: Some("0QEMU_QEMU_HARDDISK_DATA-01".into()), ..guest("sda", 0, 5) };
        assert!(map(&t, &[g]).is_empty());
    }
}
