//! Read-only evidence from `/proc` and the host. Taken first: reading it perturbs nothing.
//!
//! Every file is best-effort: an unreadable file or a thread that exited mid-read is a
//! note on the step, never an abort. Reads of `cmdline`, `environ`, `maps` and `smaps*`
//! take the target's mmap lock and can block behind a D-state thread, which is why the
//! executor runs this collector under a deadline on its own thread.

use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::cancel::Cancel;
use crate::redact;
use crate::step::StepSink;

/// Files copied for the whole process (`proc/<name>`).
pub const PROCESS_FILES: &[&str] = &[
    "cmdline",
    "status",
    "stat",
    "io",
    "limits",
    "cgroup",
    "sched",
    "smaps_rollup",
    "maps",
    "wchan",
    "syscall",
    "stack",
    "mountinfo",
    "oom_score",
    "timerslack_ns",
];
/// Files copied for every thread (`proc/task/<tid>/<name>`).
pub const THREAD_FILES: &[&str] = &["comm", "stat", "status", "wchan", "syscall", "stack", "sched"];
/// Host files (`host/<name>`), read as they are.
pub const HOST_FILES: &[&str] = &[
    "/proc/loadavg",
    "/proc/meminfo",
    "/proc/vmstat",
    "/proc/diskstats",
    "/proc/uptime",
    "/proc/version",
    "/proc/pressure/cpu",
    "/proc/pressure/io",
    "/proc/pressure/memory",
    "/proc/sys/kernel/hung_task_timeout_secs",
    "/proc/cmdline",
    "/proc/mdstat",
];
/// Upper bound for one /proc file; `maps` of a big QEMU is well under this.
const MAX_FILE: u64 = 16 << 20;

/// The parsed fields of `/proc/<pid>/stat` that callers branch on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    /// Clock ticks after boot; with the pid it identifies a process across pid reuse.
    pub starttime: u64,
}

/// Parses one `stat` line. `comm` may hold spaces and parentheses, so the fields after it
/// are found from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); starttime is field 22, i.e. rest[19].
    Some(Stat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        starttime: rest.get(19)?.parse().ok()?,
    })
}

pub fn parse_stat_file(path: &str) -> std::io::Result<Stat> {
    let text = std::fs::read_to_string(path)?;
    parse_stat(&text).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unparsable {path}")))
}

/// The thread ids of `pid`, sorted.
pub fn tids(pid: i32) -> std::io::Result<Vec<i32>> {
    let mut out: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// `/proc/<pid>/cmdline` split at NULs.
pub fn read_cmdline(pid: i32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(split_nul(&raw))
}

pub fn split_nul(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// `/proc/TID/syscall`: what a thread is blocked in, readable without stopping it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Syscall {
    /// In a system call: number, six arguments, user stack pointer and program counter.
    In {
        nr: i64,
        args: Vec<u64>,
        sp: u64,
        pc: u64,
    },
    /// Blocked but not in a syscall (e.g. a page fault): only SP and PC are known.
    Blocked {
        sp: u64,
        pc: u64,
    },
    Running,
}

pub fn parse_syscall(text: &str) -> Option<Syscall> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    match f.as_slice() {
        ["running"] => Some(Syscall::Running),
        [nr, a @ .., sp, pc] if a.len() == 6 => Some(Syscall::In {
            nr: nr.parse().ok()?,
            args: a.iter().map(|s| hex(s)).collect::<Option<_>>()?,
            sp: hex(sp)?,
            pc: hex(pc)?,
        }),
        [_neg, sp, pc] => Some(Syscall::Blocked { sp: hex(sp)?, pc: hex(pc)? }),
        _ => None,
    }
}

/// Reads at most `cap` bytes of `path`: a file that keeps growing cannot exhaust memory.
pub(crate) fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Copies `src` to archive path `rel`; a failure becomes a note. Returns whether it worked.
fn copy_into(sink: &StepSink, src: &Path, rel: &str) -> bool {
    match read_capped(src, MAX_FILE) {
        Ok(bytes) => match sink.write(rel, &bytes) {
            Ok(()) => true,
            Err(e) => {
                sink.note(format!("{rel}: {e}"));
                false
            }
        },
        Err(e) => {
            sink.note(format!("{}: {}", src.display(), e));
            false
        }
    }
}

/// Captures the process-level and per-thread files of `pid` under `proc/`.
///
/// Returns an error only if the process itself is gone or unreadable (no `status`).
pub fn capture_process(pid: i32, sink: &StepSink, cancel: &Cancel) -> Result<String, String> {
    let base = format!("/proc/{pid}");
    if !copy_into(sink, Path::new(&format!("{base}/status")), "proc/status") {
        return Err(format!("cannot read /proc/{pid}/status: process gone or not readable"));
    }
    for name in PROCESS_FILES.iter().filter(|n| **n != "status" && **n != "cmdline") {
        if cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        copy_into(sink, Path::new(&format!("{base}/{name}")), &format!("proc/{name}"));
    }
    // cmdline: secrets in QEMU's options (`-object secret,…,data=`, `password=`…) redacted.
    match read_capped(Path::new(&format!("{base}/cmdline")), MAX_FILE) {
        Ok(raw) => {
            let (args, _) = redact::argv(&split_nul(&raw));
            let mut text = args.join("\0");
            text.push('\0');
            if let Err(e) = sink.write("proc/cmdline", text.as_bytes()) {
                sink.note(format!("proc/cmdline: {e}"));
            }
        }
        Err(e) => sink.note(format!("{base}/cmdline: {e}")),
    }
    // environ: values of secret-looking keys redacted.
    match read_capped(Path::new(&format!("{base}/environ")), MAX_FILE) {
        Ok(raw) => {
            let text = redact::environ(&split_nul(&raw));
            if let Err(e) = sink.write("proc/environ", text.as_bytes()) {
                sink.note(format!("proc/environ: {e}"));
            }
        }
        Err(e) => sink.note(format!("{base}/environ: {e}")),
    }
    capture_fds(pid, sink);
    let tids = tids(pid).map_err(|e| format!("cannot list threads of {pid}: {e}"))?;
    for tid in &tids {
        if cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        for name in THREAD_FILES {
            copy_into(sink, Path::new(&format!("{base}/task/{tid}/{name}")), &format!("proc/task/{tid}/{name}"));
        }
    }
    Ok(format!("{} threads", tids.len()))
}

/// fd targets and fdinfo (io_uring rings show their SQ/CQ heads there) as one text file each.
fn capture_fds(pid: i32, sink: &StepSink) {
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => return sink.note(format!("{dir}: {e}")),
    };
    let mut fds: Vec<i32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    fds.sort_unstable();
    let mut links = String::new();
    let mut infos = String::new();
    for fd in fds {
        let target = std::fs::read_link(format!("{dir}/{fd}")).map(|p| p.display().to_string());
        links.push_str(&format!("{fd} -> {}\n", target.unwrap_or_else(|e| format!("<{e}>"))));
        if let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) {
            infos.push_str(&format!("== fd {fd}\n{info}"));
        }
    }
    let _ = sink.write("proc/fd.txt", links.as_bytes());
    let _ = sink.write("proc/fdinfo.txt", infos.as_bytes());
}

/// Host-wide files under `host/`, the kernel version and the tail of the kernel log.
pub fn capture_host(sink: &StepSink) -> Result<String, String> {
    let mut n = 0;
    for src in HOST_FILES {
        let rel = format!("host/{}", src.trim_start_matches("/proc/").replace('/', "_"));
        if Path::new(src).exists() && copy_into(sink, Path::new(src), &rel) {
            n += 1;
        }
    }
    match read_kmsg_tail(256 << 10) {
        Ok(text) => {
            let _ = sink.write("host/kmsg.txt", text.as_bytes());
            n += 1;
        }
        Err(e) => sink.note(format!("/dev/kmsg: {e}")),
    }
    if n == 0 {
        return Err("no host file was readable".into());
    }
    Ok(format!("{n} files"))
}

/// Reads what the kernel ring buffer holds, without blocking, keeping the last `cap` bytes.
fn read_kmsg_tail(cap: usize) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg")?;
    let mut out: std::collections::VecDeque<String> = Default::default();
    let mut size = 0usize;
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                size += line.len();
                out.push_back(line);
                while size > cap {
                    size -= out.pop_front().map_or(0, |l| l.len());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let s =
            parse_stat("4242 (CPU 0/KVM) (x) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 9 0 987654 0 0").unwrap();
        assert_eq!(s.comm, "CPU 0/KVM) (x");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.starttime, 987654);
    }

    #[test]
    fn own_stat_parses() {
        let me = std::process::id() as i32;
        let s = parse_stat_file(&format!("/proc/{me}/stat")).unwrap();
        assert_eq!(s.pid, me);
        assert!(tids(me).unwrap().contains(&me));
    }

    #[test]
    fn syscall_forms() {
        assert_eq!(parse_syscall("running\n"), Some(Syscall::Running));
        assert_eq!(
            parse_syscall("7 0x5 0x2 0xffffffff 0x0 0x0 0x0 0x7ffd10 0x7f00aa\n"),
            Some(Syscall::In { nr: 7, args: vec![5, 2, 0xffffffff, 0, 0, 0], sp: 0x7ffd10, pc: 0x7f00aa })
        );
        assert_eq!(parse_syscall("-1 0x7ffd10 0x7f00aa"), Some(Syscall::Blocked { sp: 0x7ffd10, pc: 0x7f00aa }));
        assert_eq!(parse_syscall("garbage"), None);
    }
}
