//! The /proc half of an in-flight sample: QEMU's threads in I/O system calls, its
//! io_uring rings and its sockets. Read without stopping anything; a thread that exits
//! or a file that cannot be read is a note, not a failure.

use std::collections::BTreeMap;

use super::{io_syscall, is_storage_path, Ring, Socket, ThreadIo};
use crate::procfs::{self, Syscall};

/// What one pass over `/proc/PID` found.
#[derive(Debug, Default)]
pub struct ProcSample {
    pub threads: Vec<ThreadIo>,
    pub rings: Vec<Ring>,
    pub sockets: Vec<Socket>,
    pub unavailable: Vec<String>,
}

/// Reads the in-flight view of `pid` from /proc. Blocking; callers run it under a deadline
/// (a read of a D-state thread's files can itself block).
pub fn sample(pid: i32) -> ProcSample {
    let mut out = ProcSample::default();
    let fds = fd_targets(pid, &mut out.unavailable);
    threads(pid, &fds, &mut out);
    for (fd, target) in &fds {
        if target == "anon_inode:[io_uring]" {
            if let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) {
                if let Some(r) = parse_ring(*fd, &info) {
                    out.rings.push(r);
                }
            }
        }
    }
    out.sockets = sockets(pid, &fds);
    out
}

fn fd_targets(pid: i32, unavailable: &mut Vec<String>) -> BTreeMap<i32, String> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = BTreeMap::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                if let Ok(t) = std::fs::read_link(e.path()) {
                    out.insert(fd, t.to_string_lossy().into_owned());
                }
            }
        }
        Err(e) => unavailable.push(format!("{dir}: {e}")),
    }
    out
}

fn threads(pid: i32, fds: &BTreeMap<i32, String>, out: &mut ProcSample) {
    let tids = match procfs::tids(pid) {
        Ok(t) => t,
        Err(e) => {
            out.unavailable.push(format!("/proc/{pid}/task: {e}"));
            return;
        }
    };
    for tid in tids {
        let base = format!("/proc/{pid}/task/{tid}");
        let read = |name: &str| std::fs::read_to_string(format!("{base}/{name}")).unwrap_or_default();
        let Some(stat) = procfs::parse_stat(&read("stat")) else { continue };
        let sc = procfs::parse_syscall(&read("syscall"));
        let (nr, args) = match &sc {
            Some(Syscall::In { nr, args, .. }) => (Some(*nr), args.clone()),
            _ => (None, vec![]),
        };
        let io = nr.and_then(io_syscall);
        let fd = match io {
            Some((_, true)) => args.first().map(|a| *a as i32),
            _ => None,
        };
        let file = fd.and_then(|fd| fds.get(&fd).cloned()).unwrap_or_default();
        // read/write/ioctl/lseek/fstat are everyday calls on eventfds, pipes and /dev/kvm:
        // they count only when the fd is storage. The others count whatever the fd.
        let counts = match io {
            Some((name, true)) if ["read", "write", "ioctl", "lseek", "fstat"].contains(&name) => {
                is_storage_path(&file)
            }
            Some(_) => true,
            None => false,
        };
        if !counts && stat.state != 'D' {
            continue;
        }
        let wchan = read("wchan").trim().to_string();
        out.threads.push(ThreadIo {
            tid,
            name: crate::qmp::one_line(read("comm").trim(), 64),
            state: stat.state,
            wchan: if wchan == "0" { String::new() } else { wchan },
            syscall: nr,
            syscall_name: io
                .map(|(n, _)| n.to_string())
                .unwrap_or_else(|| nr.map(|n| format!("#{n}")).unwrap_or_default()),
            fd,
            file,
            run_ns: read("schedstat").split_whitespace().next().and_then(|s| s.parse().ok()),
            kernel_stack: read("stack")
                .lines()
                .take(16)
                .map(|l| l.split_once("] ").map(|(_, r)| r).unwrap_or(l).to_string())
                .collect(),
        });
    }
}

/// `SqHead:`/`SqTail:`/`CqHead:`/`CqTail:` lines of an io_uring fdinfo.
pub fn parse_ring(fd: i32, info: &str) -> Option<Ring> {
    let field = |name: &str| {
        info.lines().find_map(|l| l.trim().strip_prefix(name)?.trim_start_matches(':').trim().parse::<u32>().ok())
    };
    Some(Ring {
        fd,
        sq_head: field("SqHead")?,
        sq_tail: field("SqTail")?,
        cq_head: field("CqHead")?,
        cq_tail: field("CqTail")?,
    })
}

/// Sockets of the process, with TCP queue sizes from the process's own network namespace.
fn sockets(pid: i32, fds: &BTreeMap<i32, String>) -> Vec<Socket> {
    let inodes: BTreeMap<u64, i32> = fds
        .iter()
        .filter_map(|(fd, t)| Some((t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?, *fd)))
        .collect();
    if inodes.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    for proto in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")).unwrap_or_default();
        for (inode, local, remote, tx, rx) in parse_tcp(&text) {
            if let Some(fd) = inodes.get(&inode) {
                out.push(Socket {
                    fd: *fd,
                    proto: proto.into(),
                    local,
                    remote,
                    tx_queue: Some(tx),
                    rx_queue: Some(rx),
                });
            }
        }
    }
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for line in unix.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(inode), path) = (f.get(6).and_then(|s| s.parse::<u64>().ok()), f.get(7).copied().unwrap_or(""))
        else {
            continue;
        };
        if let Some(fd) = inodes.get(&inode) {
            out.push(Socket { fd: *fd, proto: "unix".into(), local: path.to_string(), ..Default::default() });
        }
    }
    out.sort_by_key(|s| s.fd);
    out
}

/// `(inode, local, remote, tx_queue, rx_queue)` per line of /proc/net/tcp{,6}.
pub fn parse_tcp(text: &str) -> Vec<(u64, String, String, u64, u64)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let Some((tx, rx)) = f[4].split_once(':') else { continue };
        let (Ok(tx), Ok(rx), Ok(inode)) = (u64::from_str_radix(tx, 16), u64::from_str_radix(rx, 16), f[9].parse())
        else {
            continue;
        };
        out.push((inode, addr(f[1]), addr(f[2]), tx, rx));
    }
    out
}

/// `0100007F:2A3B` → `127.0.0.1:10811`; IPv6 addresses are kept in hex.
fn addr(hex: &str) -> String {
    let Some((ip, port)) = hex.split_once(':') else { return hex.to_string() };
    let port = u16::from_str_radix(port, 16).map(|p| p.to_string()).unwrap_or_else(|_| port.to_string());
    match u32::from_str_radix(ip, 16) {
        Ok(v) if ip.len() == 8 => format!("{}:{port}", std::net::Ipv4Addr::from(v.swap_bytes())),
        _ => format!("[{ip}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nSqMask:\t0x7f\nSqHead:\t10\nSqTail:\t12\nCachedSqHead:\t12\nCqMask:\t0xff\nCqHead:\t7\nCqTail:\t8\n";
        assert_eq!(parse_ring(11, info), Some(Ring { fd: 11, sq_head: 10, sq_tail: 12, cq_head: 7, cq_tail: 8 }));
        assert_eq!(parse_ring(11, "pos: 0\n"), None);
    }

    #[test]
    fn tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:2A3B 0100007F:D2F0 01 00001000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        let v = parse_tcp(text);
        assert_eq!(v, vec![(4242, "127.0.0.1:10811".into(), "127.0.0.1:54000".into(), 4096, 0)]);
    }

    #[test]
    fn own_process_samples_without_error() {
        // The test binary has no I/O in flight; the sample must still read cleanly.
        let s = sample(std::process::id() as i32);
        assert!(s.unavailable.is_empty(), "{:?}", s.unavailable);
    }
}
