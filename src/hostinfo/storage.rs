//! Per disk: which storage backend holds it and which host block device backs it.
//!
//! QEMU's own view (`query-block`: the image chain's file names and protocol drivers) is
//! the authority for what is opened; the VM config names the Proxmox storage, and
//! `storage.cfg` says its type. Local paths are `stat`ed (each under a budget) and their
//! device resolved through `/sys/dev/block` (dm name, LVM uuid, slaves) or, for
//! filesystems without a block device (NFS, FUSE, ZFS datasets), `/proc/self/mountinfo`.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{bounded, dev_split, read_trim, HostInfo, Input};
use crate::archive::Evidence;
use crate::inflight::topology::{self, Backend};
use crate::pve::vmconfig::PveConfig;

/// Where one disk's data lives.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskStorage {
    /// The BlockBackend (`drive-scsi0`) or qdev id.
    pub device: String,
    /// The VM config key (`scsi0`) and its volume (`local-lvm:vm-102-disk-0`).
    pub config_key: Option<String>,
    pub volume: Option<String>,
    /// The Proxmox storage the volume names, as `storage.cfg` declares it.
    pub storage: Option<StorageEntry>,
    pub kind: StorageKind,
    /// What QEMU opens: a local path, or a network target (credentials removed).
    pub target: Option<String>,
    /// The host block device behind it (the device itself, or the one the file's
    /// filesystem lives on).
    pub backing: Option<BlockDev>,
    /// Filesystem of a file-backed image (`ext4`, `nfs4`, `zfs`, `fuse.nbdfuse`) and its mount.
    pub fstype: Option<String>,
    pub mount: Option<String>,
    /// Why the backing device is unknown.
    pub note: Option<String>,
}

/// A `storage.cfg` section: `<type>: <id>` and the keys that locate the data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageEntry {
    pub id: String,
    /// `dir`, `lvm`, `lvmthin`, `zfspool`, `rbd`, `cephfs`, `nfs`, `cifs`, `iscsi`, …
    pub kind: String,
    /// Only location keys (path, pool, vgname, thinpool, server, export, portal, target,
    /// monhost): never credentials.
    pub keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageKind {
    File,
    Lvm,
    LvmThin,
    ZfsZvol,
    CephRbd,
    Nfs,
    Cifs,
    Iscsi,
    Nbd,
    Gluster,
    Fuse,
    BlockDevice,
    /// Another network protocol inside QEMU (ssh, http, …).
    Network,
    #[default]
    Unknown,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::File => "file",
            StorageKind::Lvm => "LVM",
            StorageKind::LvmThin => "LVM-thin",
            StorageKind::ZfsZvol => "ZFS zvol",
            StorageKind::CephRbd => "Ceph RBD",
            StorageKind::Nfs => "NFS",
            StorageKind::Cifs => "CIFS/SMB",
            StorageKind::Iscsi => "iSCSI",
            StorageKind::Nbd => "NBD",
            StorageKind::Gluster => "GlusterFS",
            StorageKind::Fuse => "FUSE",
            StorageKind::BlockDevice => "block device",
            StorageKind::Network => "network",
            StorageKind::Unknown => "unknown",
        }
    }
}

/// A host block device, resolved through sysfs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDev {
    pub major: u32,
    pub minor: u32,
    /// Kernel name (`dm-3`, `sda1`, `zd16`, `nbd0`), when it is a block device.
    pub name: Option<String>,
    /// Device-mapper name (`pve-vm--102--disk--0`) and uuid prefix (`LVM`, `CRYPT`).
    pub dm_name: Option<String>,
    pub dm_uuid_prefix: Option<String>,
    /// Devices below it (`slaves/`), and the whole disk of a partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slaves: Vec<String>,
    pub parent: Option<String>,
    /// It hangs off an iSCSI session (`/sys/block/X/device` path).
    #[serde(default)]
    pub iscsi: bool,
}

impl BlockDev {
    /// `dm-3 (pve-vm--102--disk--0) 253:3 on sdc`.
    pub fn describe(&self) -> String {
        let mut s = self.name.clone().unwrap_or_else(|| "no block device".into());
        if let Some(d) = &self.dm_name {
            s.push_str(&format!(" ({d})"));
        }
        s.push_str(&format!(" {}:{}", self.major, self.minor));
        if let Some(p) = &self.parent {
            s.push_str(&format!(" on {p}"));
        }
        if !self.slaves.is_empty() {
            s.push_str(&format!(" on {}", self.slaves.join("+")));
        }
        s
    }

    /// Kernel names whose `/proc/diskstats` lines matter for this device.
    pub fn io_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.name.iter().cloned().collect();
        v.extend(self.slaves.iter().cloned());
        v.extend(self.parent.iter().cloned());
        v
    }
}

const LOCATION_KEYS: &[&str] =
    &["path", "pool", "vgname", "thinpool", "server", "export", "portal", "target", "monhost", "share", "datastore"];

/// Parses `storage.cfg`: `<type>: <id>` headers, indented `key value` lines.
pub fn parse_storage_cfg(text: &str) -> Vec<StorageEntry> {
    let mut out: Vec<StorageEntry> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            if let Some((kind, id)) = line.split_once(':') {
                out.push(StorageEntry { id: id.trim().into(), kind: kind.trim().into(), keys: BTreeMap::new() });
            }
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        let l = line.trim();
        let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        if LOCATION_KEYS.contains(&k) {
            cur.keys.insert(k.into(), crate::qmp::one_line(v.trim(), 200));
        }
    }
    out
}

pub(super) fn collect(input: &Input, ev: &dyn Evidence, info: &mut HostInfo) {
    let Some(block) = ev.read_json("qmp/query-block.json").map(|v| v["return"].clone()) else {
        info.unavailable.push("disks: no query-block reply in this capture".into());
        return;
    };
    let cmdline = ev.read("proc/cmdline").map(|b| crate::procfs::split_nul(&b)).unwrap_or_default();
    let topo = topology::build(Some(&block), None, &cmdline);
    let conf = ev.read_string(&format!("config/{}.conf", input.vmid)).map(|t| PveConfig::parse(&t));
    let cfg_path = input.pve_dir.join("storage.cfg");
    let storages = match std::fs::read_to_string(&cfg_path) {
        Ok(t) => parse_storage_cfg(&t),
        Err(e) => {
            info.unavailable.push(format!("{}: {e}", cfg_path.display()));
            Vec::new()
        }
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // One budget for every stat: disks on one hung mount must not add up past the step's deadline.
    let stat_deadline = std::time::Instant::now() + input.stat_budget;
    for d in &topo.disks {
        let key = d.device.strip_prefix("drive-").map(str::to_string).or(d.qdev.clone());
        let volume = key.as_ref().and_then(|k| conf.as_ref()?.options(k)?.get("file").cloned());
        let storage = volume
            .as_deref()
            .filter(|v| !v.starts_with('/'))
            .and_then(|v| v.split_once(':'))
            .and_then(|(id, _)| storages.iter().find(|s| s.id == id).cloned());
        let mut ds = DiskStorage { device: d.device.clone(), config_key: key, volume, storage, ..Default::default() };
        match &d.backend {
            Backend::Network { protocol, target } => {
                ds.kind = network_kind(protocol);
                ds.target = Some(target.clone());
            }
            Backend::Local => {
                // The last path of the chain is the protocol layer (blkdebug::/x → /x).
                if let Some(path) = d.files.first() {
                    ds.target = Some(path.clone());
                    let budget = stat_deadline
                        .saturating_duration_since(std::time::Instant::now())
                        .max(std::time::Duration::from_millis(50));
                    local(path, budget, &mounts, &mut ds);
                }
            }
            Backend::Unknown => ds.note = Some("query-block names no file".into()),
        }
        refine_by_storage(&mut ds);
        info.disks.push(ds);
    }
}

fn network_kind(protocol: &str) -> StorageKind {
    match protocol {
        "nbd" => StorageKind::Nbd,
        "rbd" => StorageKind::CephRbd,
        "iscsi" => StorageKind::Iscsi,
        "gluster" => StorageKind::Gluster,
        "nfs" => StorageKind::Nfs,
        _ => StorageKind::Network,
    }
}

/// A local path: `stat` it (bounded), then name the device or the filesystem.
fn local(path: &str, budget: std::time::Duration, mounts: &str, ds: &mut DiskStorage) {
    let p = PathBuf::from(path);
    let stat = bounded(&format!("stat {path}"), budget, move || {
        std::fs::metadata(&p).map(|m| (m.file_type().is_block_device(), m.rdev(), m.dev()))
    });
    let (is_block, rdev, dev) = match stat {
        Err(why) => {
            ds.note = Some(format!("stat {path}: {why}"));
            return;
        }
        Ok(Err(e)) => {
            ds.note = Some(format!("stat {path}: {e}"));
            return;
        }
        Ok(Ok(x)) => x,
    };
    let (major, minor) = dev_split(if is_block { rdev } else { dev });
    let bd = sysfs_block(major, minor);
    if is_block {
        ds.kind = if path.starts_with("/dev/zvol/") || bd.name.as_deref().is_some_and(|n| n.starts_with("zd")) {
            StorageKind::ZfsZvol
        } else if path.starts_with("/dev/rbd") || bd.name.as_deref().is_some_and(|n| n.starts_with("rbd")) {
            StorageKind::CephRbd
        } else if bd.name.as_deref().is_some_and(|n| n.starts_with("nbd")) {
            StorageKind::Nbd
        } else if bd.dm_uuid_prefix.as_deref() == Some("LVM") {
            StorageKind::Lvm
        } else if bd.iscsi {
            StorageKind::Iscsi
        } else {
            StorageKind::BlockDevice
        };
    } else {
        let (fstype, mount) = mount_of(mounts, major, minor, path);
        ds.kind = match fstype.as_deref() {
            Some(t) if t.starts_with("nfs") => StorageKind::Nfs,
            Some(t) if t.starts_with("cifs") || t.starts_with("smb") => StorageKind::Cifs,
            Some(t) if t.starts_with("fuse") => StorageKind::Fuse,
            Some("ceph") => StorageKind::CephRbd,
            _ => StorageKind::File,
        };
        ds.fstype = fstype;
        ds.mount = mount;
    }
    if bd.name.is_none() && !is_block {
        ds.note = Some(format!("{major}:{minor} is not a block device (a network or virtual filesystem)"));
    }
    ds.backing = Some(bd);
}

/// LVM-thin and the like are only visible in `storage.cfg` (sysfs shows a dm device);
/// a declaration that contradicts what QEMU opens is kept as a note (QEMU wins).
fn refine_by_storage(ds: &mut DiskStorage) {
    use StorageKind::*;
    let Some(s) = &ds.storage else { return };
    let declared = match s.kind.as_str() {
        "dir" | "btrfs" => File,
        "lvmthin" => LvmThin,
        "lvm" => Lvm,
        "zfspool" => ZfsZvol,
        "rbd" => CephRbd,
        "iscsi" | "iscsidirect" => Iscsi,
        "nfs" => Nfs,
        "cifs" => Cifs,
        _ => return,
    };
    let refine = matches!((ds.kind, declared), (Lvm, LvmThin))
        || (ds.kind == BlockDevice && matches!(declared, Lvm | LvmThin | ZfsZvol | CephRbd | Iscsi));
    // A directory storage may sit on any filesystem, NFS and FUSE included; an LVM
    // storage on iSCSI shows as LVM.
    let consistent = ds.kind == declared
        || (declared == File && matches!(ds.kind, Nfs | Cifs | Fuse))
        || (declared == Iscsi && ds.kind == Lvm);
    if refine {
        ds.kind = declared;
    } else if !consistent && ds.kind != Unknown {
        let note = format!("storage.cfg declares {} ({}), QEMU opens {}", s.id, s.kind, ds.kind.as_str());
        ds.note = Some(match ds.note.take() {
            Some(n) => format!("{n}; {note}"),
            None => note,
        });
    }
}

/// Resolves `major:minor` through `/sys/dev/block`.
fn sysfs_block(major: u32, minor: u32) -> BlockDev {
    sysfs_block_in(Path::new("/sys"), major, minor)
}

fn sysfs_block_in(sys: &Path, major: u32, minor: u32) -> BlockDev {
    let mut bd = BlockDev { major, minor, ..Default::default() };
    let node = sys.join(format!("dev/block/{major}:{minor}"));
    let Ok(link) = std::fs::read_link(&node) else { return bd };
    let name = link.file_name().map(|n| n.to_string_lossy().into_owned());
    bd.dm_name = read_trim(&node.join("dm/name"));
    bd.dm_uuid_prefix = read_trim(&node.join("dm/uuid")).and_then(|u| u.split('-').next().map(str::to_string));
    if node.join("partition").exists() {
        bd.parent = link.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    }
    if let Ok(rd) = std::fs::read_dir(node.join("slaves")) {
        bd.slaves = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        bd.slaves.sort();
    }
    let disk = bd.parent.clone().or(name.clone()).unwrap_or_default();
    bd.iscsi = std::fs::read_link(sys.join(format!("block/{disk}/device")))
        .is_ok_and(|l| l.to_string_lossy().contains("/session"));
    bd.name = name;
    bd
}

/// `(fstype, mount point)` of the mount with device `major:minor` that holds `path`
/// (the longest matching mount point).
fn mount_of(mountinfo: &str, major: u32, minor: u32, path: &str) -> (Option<String>, Option<String>) {
    let want = format!("{major}:{minor}");
    let mut best: Option<(String, String)> = None;
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else { continue };
        if f.len() < sep + 2 || f.get(2) != Some(&want.as_str()) {
            continue;
        }
        let mnt = f[4].replace("\\040", " ");
        let inside = path == mnt || path.starts_with(&format!("{}/", mnt.trim_end_matches('/'))) || mnt == "/";
        if inside && best.as_ref().is_none_or(|(m, _)| mnt.len() > m.len()) {
            best = Some((mnt, f[sep + 1].to_string()));
        }
    }
    match best {
        Some((m, t)) => (Some(t), Some(m)),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_cfg_keeps_location_keys_only() {
        let cfg = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,backup\n\nlvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\
                   \trbd: ceph\n\nrbd: ceph\n\tmonhost 10.0.0.1 10.0.0.2\n\tpool vms\n\tusername admin\n\tkeyring secret\n";
        let s = parse_storage_cfg(cfg);
        assert_eq!(
            s.iter().map(|e| (e.kind.as_str(), e.id.as_str())).collect::<Vec<_>>(),
            [("dir", "local"), ("lvmthin", "local-lvm"), ("rbd", "ceph")]
        );
        assert_eq!(s[1].keys.get("vgname").map(String::as_str), Some("pve"));
        assert!(!s[2].keys.contains_key("keyring") && !s[2].keys.contains_key("username"), "{:?}", s[2]);
        assert_eq!(s[2].keys.get("monhost").map(String::as_str), Some("10.0.0.1 10.0.0.2"));
    }

    #[test]
    fn mountinfo_picks_the_longest_mount_of_the_device() {
        let mi = "22 1 0:21 / / rw - ext4 /dev/root rw\n\
                  40 22 0:45 / /mnt/pve/nfs rw,relatime - nfs4 10.0.0.9:/export rw\n\
                  41 22 0:45 / /mnt/other rw - nfs4 10.0.0.9:/export rw\n";
        assert_eq!(
            mount_of(mi, 0, 45, "/mnt/pve/nfs/images/102/vm-102-disk-0.qcow2"),
            (Some("nfs4".into()), Some("/mnt/pve/nfs".into()))
        );
        assert_eq!(mount_of(mi, 0, 99, "/x"), (None, None));
    }

    #[test]
    fn lvm_thin_comes_from_storage_cfg_and_a_mismatch_is_noted() {
        let entry = |kind: &str| StorageEntry { id: "s".into(), kind: kind.into(), keys: BTreeMap::new() };
        let mut ds = DiskStorage { kind: StorageKind::Lvm, storage: Some(entry("lvmthin")), ..Default::default() };
        refine_by_storage(&mut ds);
        assert_eq!(ds.kind, StorageKind::LvmThin);
        let mut ds = DiskStorage { kind: StorageKind::File, storage: Some(entry("lvmthin")), ..Default::default() };
        refine_by_storage(&mut ds);
        assert_eq!(ds.kind, StorageKind::File, "what QEMU opens wins");
        assert!(ds.note.as_deref().unwrap_or("").contains("declares s (lvmthin), QEMU opens file"), "{ds:?}");
    }

    #[test]
    fn a_real_block_device_resolves_through_sysfs() {
        // Whatever the root filesystem's device is on this machine, sysfs names it when
        // it is a block device; a virtual one (major 0) has no sysfs node.
        let (major, minor) = dev_split(std::fs::metadata("/").unwrap().dev());
        let bd = sysfs_block(major, minor);
        assert_eq!((bd.major, bd.minor), (major, minor));
        assert_eq!(bd.name.is_some(), Path::new(&format!("/sys/dev/block/{major}:{minor}")).exists(), "{bd:?}");
    }
}
