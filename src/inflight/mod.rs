//! In-flight evidence: what is outstanding on a VM's block path, sampled at both ends of
//! the capture window, as typed records that capture writes and diagnosis reads.
//!
//! QMP has no in-flight counter, and completion counters cannot tell "nothing in flight"
//! from "stuck in flight". These records can:
//! - virtio queues (`x-query-virtio-queue-status`): requests the guest posted that QEMU
//!   has not popped, and requests QEMU popped and has not completed (`inuse`);
//! - QEMU's own threads (`/proc/TID/syscall`, `wchan`, state, `schedstat`): a worker
//!   inside `pwrite64` on an image file is I/O outstanding below QEMU;
//! - io_uring rings (fdinfo heads and tails): submissions the kernel has not completed;
//! - TCP sockets of the process (send/receive queues), for network-backed images;
//! - the guest agent (`guest-get-diskstats`): the guest's own count of I/Os in progress,
//!   and once per run (`guest-get-disks`) where each guest disk sits, to map it to a drive.
//!
//! [`topology`] maps block devices to the controller and virtio device that serve them
//! and to their backend (local file or network), so a queue's evidence lands on a disk.

pub mod procs;
pub mod topology;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use topology::{Backend, ControllerKind, Disk, Topology};

use crate::qga::{GuestDisk, GuestDiskAddr};

/// Archive path of sample `n` (1-based).
pub fn sample_path(n: u32) -> String {
    format!("inflight/sample.{n}.json")
}

/// Archive path of the device topology, written with the first sample.
pub const TOPOLOGY_PATH: &str = "inflight/topology.json";

/// Everything outstanding at one instant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub n: u32,
    pub at: Option<DateTime<Utc>>,
    /// Milliseconds since the first sample started (monotonic clock).
    pub t_ms: u64,
    pub virtio: Vec<VirtioDevice>,
    /// QEMU threads that are inside an I/O system call or in D state.
    pub threads: Vec<ThreadIo>,
    pub rings: Vec<Ring>,
    pub sockets: Vec<Socket>,
    /// `None`: no agent socket, so no guest view was attempted.
    pub agent: Option<AgentView>,
    /// Sources that could not be read, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VirtioDevice {
    /// QOM path, e.g. `/machine/peripheral/virtioscsi0/virtio-backend`.
    pub path: String,
    pub name: String,
    pub queues: Vec<Vq>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl VirtioDevice {
    /// Queues that carry block requests: every queue of virtio-blk, queues 2.. of
    /// virtio-scsi (0 is control, 1 is events).
    pub fn request_queues(&self) -> impl Iterator<Item = &Vq> {
        let skip = if self.name == "virtio-scsi" { 2 } else { 0 };
        self.queues.iter().filter(move |q| q.index >= skip)
    }
    /// Popped by QEMU and not completed, over the request queues.
    pub fn inuse(&self) -> u64 {
        self.request_queues().map(|q| q.inuse as u64).sum()
    }
    /// Posted by the guest and not yet popped by QEMU, over the request queues.
    pub fn posted(&self) -> u64 {
        self.request_queues().map(|q| q.posted() as u64).sum()
    }
}

/// One virtqueue's indices (free-running u16 counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vq {
    pub index: u32,
    pub inuse: u32,
    pub last_avail_idx: u16,
    pub shadow_avail_idx: u16,
    pub used_idx: u16,
}

impl Vq {
    /// Requests the guest made available that QEMU has not taken yet. QEMU refreshes
    /// `shadow-avail-idx` only when it looks at the ring, so this is a lower bound.
    pub fn posted(&self) -> u16 {
        self.shadow_avail_idx.wrapping_sub(self.last_avail_idx)
    }
}

/// A QEMU thread that is inside an I/O system call, or in uninterruptible sleep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadIo {
    pub tid: i32,
    pub name: String,
    pub state: char,
    #[serde(default)]
    pub wchan: String,
    /// System call number (x86_64) and its name, when in one.
    pub syscall: Option<i64>,
    #[serde(default)]
    pub syscall_name: String,
    /// The first argument, for the calls whose first argument is a file descriptor.
    pub fd: Option<i32>,
    /// What that fd points at (`readlink /proc/PID/fd/N`).
    #[serde(default)]
    pub file: String,
    /// Time on CPU so far (`schedstat`): unchanged between samples means it never ran.
    pub run_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_stack: Vec<String>,
}

/// An io_uring instance's ring indices from fdinfo (free-running u32 counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub fd: i32,
    pub sq_head: u32,
    pub sq_tail: u32,
    pub cq_head: u32,
    pub cq_tail: u32,
}

impl Ring {
    /// Submissions the kernel consumed and has not posted a completion for: I/O in the
    /// kernel (one completion per submission, which is how QEMU uses its rings).
    pub fn in_kernel(&self) -> u32 {
        self.sq_head.wrapping_sub(self.cq_tail)
    }
    /// Submissions QEMU queued that the kernel has not consumed yet.
    pub fn unsubmitted(&self) -> u32 {
        self.sq_tail.wrapping_sub(self.sq_head)
    }
}

/// A socket of the QEMU process; queue sizes are known for TCP only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Socket {
    pub fd: i32,
    pub proto: String,
    #[serde(default)]
    pub local: String,
    #[serde(default)]
    pub remote: String,
    /// Bytes sent and not acknowledged by the peer.
    pub tx_queue: Option<u64>,
    /// Bytes received and not read by QEMU.
    pub rx_queue: Option<u64>,
}

/// The guest agent's view at one instant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentView {
    pub disks: Vec<GuestDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where each guest disk sits (`guest-get-disks`), asked once per run, at the first
    /// sample: what maps `sdb` to `drive-scsi1`. Empty in later samples.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GuestDiskAddr>,
    /// Why `guest-get-disks` gave nothing (an older agent, or one that blocks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_error: Option<String>,
}

/// x86_64 system calls that move disk data or wait for it, and whether their first
/// argument is a file descriptor.
pub fn io_syscall(nr: i64) -> Option<(&'static str, bool)> {
    Some(match nr {
        0 => ("read", true),
        1 => ("write", true),
        5 => ("fstat", true),
        8 => ("lseek", true),
        16 => ("ioctl", true),
        17 => ("pread64", true),
        18 => ("pwrite64", true),
        19 => ("readv", true),
        20 => ("writev", true),
        74 => ("fsync", true),
        75 => ("fdatasync", true),
        206 => ("io_setup", false),
        208 => ("io_getevents", false),
        209 => ("io_submit", false),
        257 => ("openat", false),
        262 => ("newfstatat", false),
        277 => ("sync_file_range", true),
        285 => ("fallocate", true),
        295 => ("preadv", true),
        296 => ("pwritev", true),
        326 => ("copy_file_range", true),
        327 => ("preadv2", true),
        328 => ("pwritev2", true),
        332 => ("statx", false),
        426 => ("io_uring_enter", true),
        _ => return None,
    })
}

/// Whether an fd target is something a disk image lives on (a file or block device),
/// rather than an eventfd, pipe, socket, tty or QEMU's own device nodes.
pub fn is_storage_path(target: &str) -> bool {
    if !target.starts_with('/') {
        return false;
    }
    const NOT_STORAGE: &[&str] =
        &["/dev/kvm", "/dev/net/", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/vhost", "/dev/pts/"];
    const NOT_STORAGE_EXACT: &[&str] = &["/dev/ptmx", "/dev/tty"];
    !NOT_STORAGE.iter().any(|p| target.starts_with(p)) && !NOT_STORAGE_EXACT.contains(&target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_arithmetic_wraps() {
        let q = Vq { index: 2, inuse: 1, last_avail_idx: 65535, shadow_avail_idx: 1, used_idx: 65534 };
        assert_eq!(q.posted(), 2);
        let r = Ring { fd: 9, sq_head: 2, sq_tail: 3, cq_head: 0, cq_tail: u32::MAX };
        assert_eq!(r.in_kernel(), 3);
        assert_eq!(r.unsubmitted(), 1);
    }

    #[test]
    fn virtio_scsi_control_and_event_queues_are_not_requests() {
        let d = VirtioDevice {
            path: "/machine/peripheral/virtioscsi0/virtio-backend".into(),
            name: "virtio-scsi".into(),
            queues: (0..3).map(|i| Vq { index: i, inuse: 1, ..Default::default() }).collect(),
            error: None,
        };
        assert_eq!(d.inuse(), 1);
        let b = VirtioDevice { name: "virtio-blk".into(), ..d };
        assert_eq!(b.inuse(), 3);
    }

    #[test]
    fn storage_paths() {
        assert!(is_storage_path("/var/lib/vz/images/102/vm-102-disk-0.raw"));
        assert!(is_storage_path("/dev/dm-3"));
        assert!(!is_storage_path("/dev/kvm"));
        assert!(!is_storage_path("anon_inode:[eventfd]"));
        assert!(!is_storage_path("socket:[123]"));
    }
}
