//! Host I/O over the capture window, for the disks' backing devices: `/proc/diskstats`
//! at the host step (start) and now (end), `/sys/block/*/inflight` now, I/O pressure at
//! both ends, and the kernel's hung-task messages from the captured logs.

use serde::{Deserialize, Serialize};

use super::{read_trim, HostInfo};
use crate::archive::Evidence;

/// Hung-task lines kept (the newest).
const MAX_HUNG: usize = 10;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostIo {
    /// One entry per backing device (and the devices below it).
    pub devices: Vec<DeviceIo>,
    /// `/proc/pressure/io` at the host step and now.
    pub pressure_start: Option<Pressure>,
    pub pressure_end: Option<Pressure>,
    /// `INFO: task …blocked for more than N seconds` lines (newest last) and where looked.
    pub hung_tasks: Vec<String>,
    pub hung_task_sources: Vec<String>,
    pub hung_task_timeout_secs: Option<u64>,
}

/// One device's `/proc/diskstats` counters at both ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIo {
    pub name: String,
    pub start: Option<DiskCounters>,
    pub end: Option<DiskCounters>,
    /// `/sys/block/<name>/inflight` now: (reads, writes).
    pub sys_inflight: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    pub reads: u64,
    pub writes: u64,
    /// I/Os currently in progress (field 12 of diskstats).
    pub in_flight: u64,
    /// Milliseconds spent doing I/O (field 13).
    pub io_ms: u64,
}

/// One `/proc/pressure/io` reading: `some`/`full` 10 s averages (%) and totals (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub some_avg10: f64,
    pub some_total_us: u64,
    pub full_avg10: Option<f64>,
    pub full_total_us: Option<u64>,
}

/// Parses `/proc/diskstats` into `name → counters`.
pub fn parse_diskstats(text: &str) -> Vec<(String, DiskCounters)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
            Some((
                f.get(2)?.to_string(),
                DiskCounters { reads: n(3)?, writes: n(7)?, in_flight: n(11)?, io_ms: n(12)? },
            ))
        })
        .collect()
}

pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let field = |line: &str, key: &str| -> Option<String> {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(key).map(str::to_string))
    };
    let some = text.lines().find(|l| l.starts_with("some "))?;
    let full = text.lines().find(|l| l.starts_with("full "));
    Some(Pressure {
        some_avg10: field(some, "avg10=")?.parse().ok()?,
        some_total_us: field(some, "total=")?.parse().ok()?,
        full_avg10: full.and_then(|l| field(l, "avg10=")?.parse().ok()),
        full_total_us: full.and_then(|l| field(l, "total=")?.parse().ok()),
    })
}

/// Kernel hung-task reports (`blocked for more than`), from `/dev/kmsg` records
/// (`6,1234,5678,-;INFO: task …`) or journal lines, as one-line strings.
pub fn hung_task_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains("blocked for more than"))
        .map(|l| {
            let msg = match l.split_once(';') {
                Some((head, m)) if head.split(',').count() >= 3 => m,
                _ => l,
            };
            crate::qmp::one_line(msg.trim(), 240)
        })
        .collect()
}

pub(super) fn collect(ev: &dyn Evidence, info: &mut HostInfo) {
    let io = &mut info.io;
    let mut names: Vec<String> = Vec::new();
    for d in &info.disks {
        for n in d.backing.iter().flat_map(|b| b.io_names()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let start = ev.read_string("host/diskstats").map(|t| parse_diskstats(&t));
    if start.is_none() {
        info.unavailable.push("host/diskstats: not captured by a host step; no start-of-window sample".into());
    }
    let end = match std::fs::read_to_string("/proc/diskstats") {
        Ok(t) => Some(parse_diskstats(&t)),
        Err(e) => {
            info.unavailable.push(format!("/proc/diskstats: {e}"));
            None
        }
    };
    let find = |s: &Option<Vec<(String, DiskCounters)>>, n: &str| {
        s.as_ref().and_then(|v| v.iter().find(|(x, _)| x == n).map(|(_, c)| *c))
    };
    for n in names {
        let sys_inflight =
            read_trim(&std::path::Path::new("/sys/class/block").join(&n).join("inflight")).and_then(|t| {
                let mut it = t.split_whitespace().map(|x| x.parse::<u64>().ok());
                Some((it.next()??, it.next()??))
            });
        io.devices.push(DeviceIo { start: find(&start, &n), end: find(&end, &n), sys_inflight, name: n });
    }
    io.pressure_start = ev.read_string("host/pressure_io").and_then(|t| parse_pressure(&t));
    match std::fs::read_to_string("/proc/pressure/io") {
        Ok(t) => io.pressure_end = parse_pressure(&t),
        Err(e) => info.unavailable.push(format!("/proc/pressure/io: {e} (kernel without PSI, or psi=0)")),
    }
    io.hung_task_timeout_secs =
        ev.read_string("host/sys_kernel_hung_task_timeout_secs").and_then(|t| t.trim().parse().ok());
    let mut hung: Vec<String> = Vec::new();
    for src in ["host/kmsg.txt", "host/journal.txt"] {
        if let Some(t) = ev.read_string(src) {
            io.hung_task_sources.push(src.into());
            for l in hung_task_lines(&t) {
                if !hung.contains(&l) {
                    hung.push(l);
                }
            }
        }
    }
    if io.hung_task_sources.is_empty() {
        info.unavailable.push("kernel log: neither host/kmsg.txt nor host/journal.txt was captured".into());
    }
    let skip = hung.len().saturating_sub(MAX_HUNG);
    io.hung_tasks = hung.split_off(skip);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diskstats_pressure_and_hung_tasks_parse() {
        let ds = "   8      32 sdc 1200 3 9600 50 88211 10 705688 9000 3 1500 9050 0 0 0 0\n 253       3 dm-3 10 0 80 1 20 0 160 2 0 3 3\n";
        let v = parse_diskstats(ds);
        assert_eq!(v[0], ("sdc".into(), DiskCounters { reads: 1200, writes: 88211, in_flight: 3, io_ms: 1500 }));
        assert_eq!(v[1].1.in_flight, 0);
        let p = parse_pressure(
            "some avg10=1.53 avg60=4.14 avg300=3.09 total=90838810\nfull avg10=0.84 avg60=1.67 avg300=1.73 total=30553548\n",
        )
        .unwrap();
        assert_eq!((p.some_avg10, p.some_total_us, p.full_total_us), (1.53, 90838810, Some(30553548)));
        assert_eq!(parse_pressure("garbage"), None);
        let log = "3,812,5203401,-;INFO: task kworker/u8:2:123 blocked for more than 120 seconds.\n\
                   6,813,5203402,-;unrelated\n\
                   2026-06-11T18:21:07+0300 pve1 kernel: INFO: task qemu:4242 blocked for more than 241 seconds.\n";
        assert_eq!(
            hung_task_lines(log),
            [
                "INFO: task kworker/u8:2:123 blocked for more than 120 seconds.",
                "2026-06-11T18:21:07+0300 pve1 kernel: INFO: task qemu:4242 blocked for more than 241 seconds."
            ]
        );
    }
}
