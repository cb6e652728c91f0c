//! The guest lab against real parts: real Linux guests (Debian's kernel, a
//! busybox initramfs) under TCG in the lab's QEMU, checked with raw QMP from
//! this file. Every later in-flight verdict test trusts what these pin down:
//! an idle or write-once guest has nothing in flight, a steady one makes
//! progress, and each wedge kind leaves the guest's write in flight with no
//! progress (and, below QEMU, a worker blocked in a FUSE write).
//!
//! Guests boot in parallel inside one `Lab` per test (TCG boots dominate the
//! wall time). Needs the lab's cache (kernel + initramfs; QEMU 10 for the last
//! test), built on first use from Debian packages.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Backend, Controller, GuestMode, GuestSpec, Lab, Qemu, Qmp, Vm, WedgeKind};
use serde_json::{json, Value};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// A steady guest writes every 0.5 s; under load TCG can be much slower.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);

/// One request queue's counters, read with raw QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueStatus {
    inuse: u64,
    last_avail: u64,
    shadow_avail: u64,
    used: u64,
}

fn qmp(vm: &Vm) -> Qmp {
    Qmp::connect(&vm.qmp_path(), QMP_TIMEOUT).unwrap_or_else(|e| panic!("VM {}: QMP: {e}", vm.vmid()))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn queue_status(q: &mut Qmp, path: &str, queue: u64) -> QueueStatus {
    let s = q
        .execute("x-query-virtio-queue-status", Some(json!({"path": path, "queue": queue})))
        .unwrap_or_else(|e| panic!("x-query-virtio-queue-status {path} {queue}: {e}"));
    QueueStatus {
        inuse: num(&s, "inuse"),
        last_avail: num(&s, "last-avail-idx"),
        shadow_avail: num(&s, "shadow-avail-idx"),
        used: num(&s, "used-idx"),
    }
}

/// The guest's request queue (asserting the device list and queue count first).
fn request_queue(vm: &Vm, q: &mut Qmp) -> QueueStatus {
    let c = vm.guest().controller;
    let path = c.virtio_path().expect("a virtio controller");
    let (nvqs, req) = c.virtio_queues().unwrap();
    let devs = q.execute("x-query-virtio", None).expect("x-query-virtio");
    let paths: Vec<&str> = devs.as_array().unwrap().iter().filter_map(|d| d["path"].as_str()).collect();
    assert_eq!(paths, vec![path], "VM {}: x-query-virtio lists {devs}", vm.vmid());
    let st = q.execute("x-query-virtio-status", Some(json!({"path": path}))).expect("x-query-virtio-status");
    assert_eq!(num(&st, "num-vqs"), nvqs, "VM {} ({c:?}): {st}", vm.vmid());
    queue_status(q, path, req)
}

fn wr_ops(q: &mut Qmp, drive: &str) -> u64 {
    num(&q.blockstats(drive).unwrap_or_else(|e| panic!("blockstats {drive}: {e}")), "wr_operations")
}

fn spec(vmid: u32, controller: Controller, mode: GuestMode) -> GuestSpec {
    GuestSpec { vmid, controller, mode, ..GuestSpec::default() }
}

/// Idle, write-once and steady guests on LSI, virtio-scsi-single and
/// virtio-blk: nothing in flight when quiet, progress when writing.
#[test]
fn guest_modes_on_each_controller() {
    let mut specs = Vec::new();
    for (ci, c) in Controller::ALL.iter().enumerate() {
        for (mi, m) in GuestMode::ALL.iter().enumerate() {
            specs.push(spec(400 + 10 * ci as u32 + mi as u32, *c, *m));
        }
    }
    let lab = Lab::up_guests(specs);
    for vm in lab.vms() {
        let g = vm.guest().clone();
        assert_eq!(vm.accel(), "tcg", "guests run under TCG");
        let ready = vm.wait_serial("ready", Duration::from_secs(5));
        let disk = if g.controller == Controller::VirtioBlk { "/dev/vda" } else { "/dev/sda" };
        assert!(ready.contains(&format!("disk={disk}")), "VM {}: {ready}", vm.vmid());
        let conf = std::fs::read_to_string(vm.conf_path()).unwrap();
        match g.controller {
            Controller::Lsi => assert!(conf.lines().any(|l| l == "scsihw: lsi"), "{conf}"),
            Controller::VirtioScsiSingle => {
                assert!(conf.lines().any(|l| l == "scsihw: virtio-scsi-single"), "{conf}");
                assert!(conf.lines().any(|l| l.starts_with("scsi0: ") && l.contains("iothread=1")), "{conf}");
            }
            Controller::VirtioBlk => {
                assert!(conf.lines().any(|l| l.starts_with("virtio0: ") && l.contains("iothread=1")), "{conf}")
            }
        }
        match g.mode {
            GuestMode::Idle | GuestMode::WriteOnce => {
                vm.wait_serial("silent", Duration::from_secs(60));
                let mut q = qmp(vm);
                let ops1 = wr_ops(&mut q, g.controller.drive());
                let expect_ops = if g.mode == GuestMode::Idle { 0 } else { 1 };
                assert_eq!(ops1, expect_ops, "VM {} ({:?} {:?}) wr_operations", vm.vmid(), g.controller, g.mode);
                if g.controller.virtio_path().is_some() {
                    let a = request_queue(vm, &mut q);
                    std::thread::sleep(Duration::from_millis(1500));
                    let b = request_queue(vm, &mut q);
                    for s in [a, b] {
                        assert_eq!(
                            s.inuse,
                            0,
                            "VM {} ({:?} {:?}): nothing in flight: {s:?}",
                            vm.vmid(),
                            g.controller,
                            g.mode
                        );
                        assert_eq!(s.last_avail, s.used, "VM {}: {s:?}", vm.vmid());
                        assert_eq!(s.shadow_avail, s.last_avail, "VM {}: nothing posted unpopped: {s:?}", vm.vmid());
                    }
                    assert_eq!(a, b, "VM {}: a quiet guest's queue does not move", vm.vmid());
                } else {
                    let devs = q.execute("x-query-virtio", None).unwrap();
                    assert_eq!(devs, json!([]), "LSI has no virtio device to ask");
                }
                assert_eq!(wr_ops(&mut q, g.controller.drive()), ops1, "VM {}: still quiet", vm.vmid());
            }
            GuestMode::Steady => {
                let mut q = qmp(vm);
                let ops1 = wr_ops(&mut q, g.controller.drive());
                let done1 = vm.guest_writes_done();
                let q1 = g.controller.virtio_path().map(|_| request_queue(vm, &mut q));
                let moved = common::wait_until(PROGRESS_DEADLINE, || {
                    wr_ops(&mut q, g.controller.drive()) > ops1 && vm.guest_writes_done() > done1
                });
                assert!(moved, "VM {}: a steady guest's writes complete (wr_operations > {ops1})", vm.vmid());
                if let Some(q1) = q1 {
                    let q2 = request_queue(vm, &mut q);
                    assert!(q2.used > q1.used, "VM {}: used-idx advances: {q1:?} -> {q2:?}", vm.vmid());
                }
            }
        }
    }
}

/// The three wedge kinds on virtio-scsi-single: the guest's write stays in
/// flight (inuse >= 1, used-idx frozen) while QMP answers. Below QEMU with
/// aio=threads a pool worker sits in a write syscall waiting on FUSE; with
/// aio=io_uring (Proxmox's default) no thread waits, and the write is an
/// io_uring request the kernel took and never completed.
#[test]
fn wedged_guest_writes_stay_in_flight_on_virtio_scsi_single() {
    let cases = [
        (WedgeKind::Inside, "threads"),
        (WedgeKind::Nbd, "threads"),
        (WedgeKind::Below, "threads"),
        (WedgeKind::Below, "io_uring"),
    ];
    let specs = cases
        .iter()
        .enumerate()
        .map(|(i, (k, aio))| GuestSpec {
            vmid: 500 + i as u32,
            mode: GuestMode::Steady,
            backend: k.backend(),
            aio: aio.to_string(),
            ..GuestSpec::default()
        })
        .collect();
    let lab = Lab::up_guests(specs);
    // up_guests keeps the order of the specs
    for (vm, (kind, _)) in lab.vms().iter().zip(cases) {
        assert_eq!(vm.guest().backend, kind.backend());
        let r = vm.wedge_guest(kind);
        assert_eq!(r["wedged"], true, "lab wedge --how {}: {r}", kind.arg());
        assert_stuck(vm, kind);
    }
}

/// (fd, SqHead - CqTail) of every io_uring of pid, from /proc/PID/fdinfo.
fn io_uring_in_flight(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_ring = std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"));
        if !is_ring {
            continue;
        }
        let fd = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let field = |k: &str| -> Option<u64> {
            info.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(':')?.trim().parse().ok())
        };
        if let (Some(sq_head), Some(cq_tail)) = (field("SqHead"), field("CqTail")) {
            out.push((fd, sq_head.wrapping_sub(cq_tail) & 0xffff_ffff));
        }
    }
    out
}

fn assert_stuck(vm: &Vm, kind: WedgeKind) {
    let drive = vm.guest().controller.drive();
    let mut q = qmp(vm);
    let a = request_queue(vm, &mut q);
    let ops_a = wr_ops(&mut q, drive);
    std::thread::sleep(Duration::from_secs(2));
    let b = request_queue(vm, &mut q);
    let ops_b = wr_ops(&mut q, drive);
    assert!(a.inuse >= 1, "VM {} ({kind:?}): a request in flight: {a:?}", vm.vmid());
    assert_eq!(a.used, b.used, "VM {} ({kind:?}): used-idx frozen: {a:?} -> {b:?}", vm.vmid());
    assert_eq!(a.inuse, b.inuse, "VM {} ({kind:?}): {a:?} -> {b:?}", vm.vmid());
    assert_eq!(b.last_avail, b.used + b.inuse, "VM {}: popped = completed + in flight: {b:?}", vm.vmid());
    assert_eq!(ops_a, ops_b, "VM {} ({kind:?}): no write completes", vm.vmid());
    assert_eq!(q.execute("query-status", None).unwrap()["status"], "running");
    let workers = fuse_writers(vm.pid());
    let rings = io_uring_in_flight(vm.pid());
    match (kind, vm.guest().aio.as_str()) {
        (WedgeKind::Below, "threads") => {
            assert!(!workers.is_empty(), "VM {}: a QEMU thread blocked in a FUSE write", vm.vmid())
        }
        (WedgeKind::Below, _) => {
            assert!(workers.is_empty(), "VM {}: io_uring: no thread blocks: {workers:?}", vm.vmid());
            assert!(
                rings.iter().any(|(_, n)| *n >= 1),
                "VM {}: an io_uring request taken and not completed: {rings:?}",
                vm.vmid()
            );
        }
        _ => assert!(workers.is_empty(), "VM {} ({kind:?}): no thread in a FUSE write: {workers:?}", vm.vmid()),
    }
}

/// QEMU threads whose `/proc/TID/syscall` is pwrite64 (18) or pwritev (296)
/// / pwritev2 (328) and whose kernel wait channel names FUSE: (tid, comm, wchan, state).
fn fuse_writers(pid: i32) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let t = e.path();
        let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default().trim().to_string();
        let nr = read("syscall").split(' ').next().unwrap_or("").to_string();
        let wchan = read("wchan");
        if matches!(nr.as_str(), "18" | "296" | "328") && (wchan.contains("fuse") || wchan == "request_wait_answer") {
            let stat = read("stat");
            let state = stat.rsplit(") ").next().unwrap_or("").chars().next().unwrap_or('?').to_string();
            out.push((e.file_name().to_string_lossy().into_owned(), read("comm"), wchan, state));
        }
    }
    out
}

/// The same lab on QEMU 10.0 (bookworm-backports, unpacked beside 7.2):
/// a steady guest makes progress, then a write held inside QEMU is in flight.
#[test]
fn qemu10_guest_shows_the_same_in_flight_evidence() {
    let lab = Lab::up_guest(GuestSpec {
        vmid: 600,
        mode: GuestMode::Steady,
        qemu: Qemu::Bookworm10,
        backend: Backend::File,
        ..GuestSpec::default()
    });
    let vm = &lab.vms()[0];
    let mut q = qmp(vm);
    let version = q.execute("query-version", None).unwrap();
    assert_eq!(version["qemu"]["major"], 10, "{version}");
    let bin = &common::proc_cmdline(vm.pid()).unwrap()[0];
    assert!(!Path::new(bin).starts_with("/usr/bin"), "QEMU 10 runs from the lab cache, not {bin}");
    let q1 = request_queue(vm, &mut q);
    assert!(
        common::wait_until(PROGRESS_DEADLINE, || request_queue(vm, &mut q).used > q1.used),
        "used-idx advances on a steady guest"
    );
    drop(q);
    let r = vm.wedge_guest(WedgeKind::Inside);
    assert_eq!(r["wedged"], true, "{r}");
    assert_stuck(vm, WedgeKind::Inside);
}
