//! A read-only QEMU guest agent client, for the guest's own view of its disks.
//!
//! In: the agent's host-side socket (`<run_dir>/<VMID>.qga`, a chardev QEMU forwards to
//! virtio-serial in the guest). Out: replies of allowlisted commands, or a [`QgaError`].
//!
//! The agent runs *inside* the guest, so everything here is bounded by one deadline: an
//! agent that is not running, or a guest too wedged to schedule it, never answers, and
//! the socket still accepts. Only commands that neither change the guest nor wait on its
//! disks are sent ([`ALLOWED`]); `guest-exec`, `guest-file-*`, `guest-fsfreeze-*`,
//! `guest-shutdown` and the rest are refused before anything is written.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Commands that read state the agent already has in memory or from /proc in the guest.
/// `guest-get-diskstats` reads the guest's /proc/diskstats: no guest disk I/O.
/// `guest-get-disks` walks /sys/block and udev's database (device node, serial, the
/// sysfs path that gives the controller's PCI address and the SCSI target); on NVMe disks
/// it also reads the SMART log page (an admin command that changes nothing): no guest disk
/// I/O on SCSI or virtio disks.
pub const ALLOWED: &[&str] = &[
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-get-diskstats",
    "guest-get-disks",
    "guest-get-osinfo",
    "guest-get-time",
];

/// Largest reply line accepted; diskstats of a guest with many disks is a few KiB.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("guest agent command `{0}` refused: not read-only (allowed: {allowed})", allowed = ALLOWED.join(", "))]
    Refused(String),
    #[error("no guest agent socket at {0}")]
    NoSocket(String),
    #[error("guest agent socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the guest agent did not answer within {0} ms (not running in the guest, or the guest is not scheduling it)"
    )]
    Timeout(u128),
    #[error("guest agent: {0}")]
    Protocol(String),
    #[error("guest agent error for `{command}`: {desc}")]
    Command { command: String, desc: String },
}

/// One connection, synchronised with `guest-sync-delimited` so stale bytes from an
/// earlier client cannot be taken for our answer.
pub struct Qga {
    reader: BufReader<UnixStream>,
    deadline: Instant,
    /// When `connect` began: a timeout reports how long was waited in all.
    since: Instant,
}

impl Qga {
    /// Connects and resynchronises; every later call shares the same `deadline`.
    pub fn connect(socket: &Path, deadline: Instant) -> Result<Qga, QgaError> {
        if !socket.exists() {
            return Err(QgaError::NoSocket(socket.display().to_string()));
        }
        let since = Instant::now();
        let stream = UnixStream::connect(socket)?;
        let mut q = Qga { reader: BufReader::new(stream), deadline, since };
        // The id only has to differ from what an earlier client may have left behind.
        let id = (std::process::id() as u64) << 20 | (Instant::now().elapsed().subsec_nanos() as u64 & 0xfffff);
        q.send("guest-sync-delimited", Some(json!({ "id": id })))?;
        // The answer is preceded by 0xFF; skip anything before it.
        loop {
            let line = q.line_after_sentinel()?;
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                if v["return"].as_u64() == Some(id) {
                    return Ok(q);
                }
            }
        }
    }

    /// Runs one allowlisted command and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QgaError> {
        self.send(command, args)?;
        loop {
            let line = self.line()?;
            let v: Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if let Some(e) = v.get("error") {
                let desc = e["desc"].as_str().unwrap_or("?");
                return Err(QgaError::Command { command: command.into(), desc: crate::qmp::one_line(desc, 200) });
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    fn send(&mut self, command: &str, args: Option<Value>) -> Result<(), QgaError> {
        if !ALLOWED.contains(&command) {
            return Err(QgaError::Refused(crate::qmp::one_line(command, 80)));
        }
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        self.arm()?;
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.reader.get_mut().write_all(&bytes)?;
        Ok(())
    }

    /// Sets the socket timeout to what is left of the deadline.
    fn arm(&mut self) -> Result<(), QgaError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QgaError::Timeout(self.since.elapsed().as_millis()));
        }
        self.reader.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        self.reader.get_ref().set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        Ok(())
    }

    fn line(&mut self) -> Result<Vec<u8>, QgaError> {
        self.arm()?;
        let mut buf = Vec::new();
        let res = (&mut self.reader).take(MAX_LINE as u64).read_until(b'\n', &mut buf);
        match res {
            Ok(0) => Err(QgaError::Protocol("the agent closed the connection".into())),
            Ok(_) if !buf.ends_with(b"\n") => Err(QgaError::Protocol("reply line too long".into())),
            Ok(_) => Ok(buf),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(QgaError::Timeout(self.since.elapsed().as_millis()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn line_after_sentinel(&mut self) -> Result<Vec<u8>, QgaError> {
        let line = self.line()?;
        Ok(match line.iter().rposition(|&b| b == 0xff) {
            Some(i) => line[i + 1..].to_vec(),
            None => line,
        })
    }
}

/// `guest-ping` on a fresh connection: `Ok(round trip)` when the agent answers within
/// `deadline` (used by `audit` to say whether the agent answers at all).
pub fn ping(socket: &Path, deadline: Duration) -> Result<Duration, QgaError> {
    let t = Instant::now();
    let mut q = Qga::connect(socket, t + deadline)?;
    q.execute("guest-ping", None)?;
    Ok(t.elapsed())
}

/// The guest's per-disk counters from `guest-get-diskstats` (QEMU 7.1+ agents).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestDisk {
    pub name: String,
    /// I/Os the guest kernel has issued to the device and not seen complete (`ios-pgr`).
    pub in_progress: u64,
    /// Completed reads + writes + flushes + discards, to see progress between samples.
    pub completed: u64,
}

/// Parses a `guest-get-diskstats` return value; partitions, loop and ram devices are
/// left out (they duplicate or do not reach a virtual disk).
pub fn parse_diskstats(v: &Value) -> Vec<GuestDisk> {
    let mut out = Vec::new();
    for d in v.as_array().into_iter().flatten() {
        let Some(name) = d["name"].as_str() else { continue };
        if ["loop", "ram", "zram", "dm-", "md", "sr"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let s = &d["stats"];
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        out.push(GuestDisk {
            name: crate::qmp::one_line(name, 64),
            in_progress: n("ios-pgr"),
            completed: n("read-ios") + n("write-ios") + n("flush-ios") + n("discard-ios"),
        });
    }
    out
}

/// Where a whole guest disk sits, from `guest-get-disks` (QEMU 5.2+ agents): what maps it
/// to a QEMU drive. For a disk on the LSI 53C895A (guest driver `sym53c8xx`) the agent
/// reports the SCSI target id as `unit`; on virtio-scsi, `unit` is the LUN.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestDiskAddr {
    /// Kernel name (`sda`), as `guest-get-diskstats` names it.
    pub name: String,
    /// `scsi`, `virtio`, `sata`, `ide`, `nvme`, `unknown`, …
    #[serde(default)]
    pub bus_type: String,
    #[serde(default)]
    pub bus: u32,
    #[serde(default)]
    pub target: u32,
    #[serde(default)]
    pub unit: u32,
    /// The controller's PCI address `(domain, bus, slot, function)`, when the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<(u32, u32, u32, u32)>,
    /// udev's `ID_SERIAL` (`0QEMU_QEMU_HARDDISK_drive-scsi1`), when the guest runs udev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// Parses a `guest-get-disks` return value: whole disks with an address, partitions and
/// device-mapper volumes left out (they are not a QEMU drive of their own).
pub fn parse_disks(v: &Value) -> Vec<GuestDiskAddr> {
    let mut out = Vec::new();
    for d in v.as_array().into_iter().flatten() {
        if d["partition"].as_bool() == Some(true) {
            continue;
        }
        let (Some(name), Some(a)) = (d["name"].as_str(), d.get("address").filter(|a| a.is_object())) else { continue };
        let name = name.strip_prefix("/dev/").unwrap_or(name);
        let n = |v: &Value, k: &str| v[k].as_i64().and_then(|x| u32::try_from(x).ok());
        let p = &a["pci-controller"];
        // The agent writes -1 for a PCI field it could not read.
        let pci = match (n(p, "domain"), n(p, "bus"), n(p, "slot"), n(p, "function")) {
            (Some(d), Some(b), Some(s), Some(f)) => Some((d, b, s, f)),
            _ => None,
        };
        out.push(GuestDiskAddr {
            name: crate::qmp::one_line(name, 64),
            bus_type: crate::qmp::one_line(a["bus-type"].as_str().unwrap_or("unknown"), 16),
            bus: n(a, "bus").unwrap_or(0),
            target: n(a, "target").unwrap_or(0),
            unit: n(a, "unit").unwrap_or(0),
            pci,
            serial: a["serial"].as_str().filter(|s| !s.is_empty()).map(|s| crate::qmp::one_line(s, 128)),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qga");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // The refusal comes before a single byte is written, even with a listener there.
        let stream = UnixStream::connect(&path).unwrap();
        let now = Instant::now();
        let mut q = Qga { reader: BufReader::new(stream), deadline: now + Duration::from_secs(5), since: now };
        // Allowed and read-only: the disks' addresses (sysfs and udev in the guest).
        assert!(ALLOWED.contains(&"guest-get-disks"));
        for cmd in ["guest-exec", "guest-file-open", "guest-fsfreeze-freeze", "guest-shutdown", "guest-set-time"] {
            assert!(matches!(q.execute(cmd, None), Err(QgaError::Refused(_))), "{cmd}");
        }
    }

    #[test]
    fn silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qga");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let r = Qga::connect(&path, Instant::now() + Duration::from_millis(200));
        // The time waited in all, not the overshoot past the deadline.
        assert!(matches!(r, Err(QgaError::Timeout(ms)) if ms >= 200), "{:?}", r.err());
    }

    #[test]
    fn diskstats_keep_whole_disks() {
        let v = json!([
            {"name": "loop0", "stats": {"ios-pgr": 0}},
            {"name": "sda", "stats": {"ios-pgr": 2, "write-ios": 10, "read-ios": 5}},
        ]);
        assert_eq!(parse_diskstats(&v), vec![GuestDisk { name: "sda".into(), in_progress: 2, completed: 15 }]);
    }

    #[test]
    fn disks_give_the_address_of_whole_disks() {
        // As qemu-ga 7.2 answers for an LSI disk at scsi-id 1 on the controller at 00:05.0.
        let v = json!([
            {"name": "/dev/sdb", "partition": false, "address": {"bus-type": "scsi", "bus": 0, "target": 0, "unit": 1,
             "pci-controller": {"domain": 0, "bus": 0, "slot": 5, "function": 0}, "dev": "/dev/sdb"}},
            {"name": "/dev/sdb1", "partition": true, "dependencies": ["/dev/sdb"]},
            {"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/sdb1"]},
            {"name": "/dev/sdc", "partition": false, "address": {"bus-type": "unknown", "bus": 0, "target": 0, "unit": 0,
             "pci-controller": {"domain": -1, "bus": -1, "slot": -1, "function": -1}, "serial": "0QEMU_QEMU_HARDDISK_drive-scsi2"}},
        ]);
        let d = parse_disks(&v);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(
            d[0],
            GuestDiskAddr {
                name: "sdb".into(),
                bus_type: "scsi".into(),
                bus: 0,
                target: 0,
                unit: 1,
                pci: Some((0, 0, 5, 0)),
                serial: None
            }
        );
        assert_eq!((d[1].pci, d[1].serial.as_deref()), (None, Some("0QEMU_QEMU_HARDDISK_drive-scsi2")));
    }
}
