//! `minicore`: an ELF core of a live QEMU without its guest RAM, small enough to attach
//! to a ticket, that `gdb <qemu binary> <core>` opens (and QEMU's gdb scripts read:
//! coroutines, timers, see [`qemu_state`]).
//!
//! 1. Before anything is stopped: `/proc/PID/smaps` decides what goes in ([`plan`]:
//!    no guest RAM, no `MADV_DONTDUMP`, no device memory, only touched pages from
//!    `/proc/PID/pagemap`), the free space is checked against that exact size, and the
//!    modules are loaded (for the stacks of the same instant).
//! 2. The freeze: the same SEIZE/INTERRUPT snapshot as the native stacks
//!    ([`crate::stacks::native::capture`]), which copies every thread's general and FPU
//!    registers and its stack from SP to the top of the stack's mapping. When the
//!    memory to copy is at most [`FROZEN_BUDGET`], it is copied too while frozen
//!    (`process_vm_readv`), so the whole core is one instant. Otherwise the threads run
//!    again first and the rest (heap, data, coroutine stacks) is copied afterwards: the
//!    registers and thread stacks are of the freeze instant, the heap is up to the copy
//!    time later (recorded as `copy_ms`). For a wedged VM the state that matters (a
//!    parked request, a stuck coroutine) does not move; on a busy one, a pointer read
//!    from the heap may already be stale.
//! 3. The file is written after the threads run again: header, notes (NT_PRPSINFO,
//!    NT_PRSTATUS + NT_FPREGSET per thread, NT_AUXV, NT_FILE), then memory.
//!
//! A core holds whatever QEMU had in memory: disk encryption keys, passwords, guest
//! data in flight. It is opt-in (the `qemu-wedge-core` runbook), never in the default.

pub mod elf;
pub mod plan;
pub mod qemu_state;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cancel::Cancel;
use crate::procfs::Syscall;
use crate::stacks::native::modules::{read_remote, DebugSearch};
use crate::stacks::native::snapshot::Capture;
use crate::stacks::native::{self, FreezeOptions, NativeOptions, StacksReport};
use crate::stacks::StackError;

/// Memory copied while the threads are stopped when the core's memory is at most this.
/// Measured on this lab (QEMU 7.2, 2 shared cores): copying a guest-less QEMU's 11 MiB
/// inside the freeze took 53–80 ms, over the "few tens of ms" a freeze may cost, so only
/// tiny processes are copied frozen; QEMU's heap is copied after the threads run again
/// (docs/minicore.md).
pub const FROZEN_BUDGET: u64 = 4 << 20;
/// Touched runs closer than this are merged into one segment (fewer program headers).
const MERGE_GAP: u64 = 8 * 4096;
/// Bytes of stack copied per thread from SP (clipped to the stack's mapping).
const STACK_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MinicoreError {
    /// Not enough free space, or another reason not to start; nothing was touched.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Stack(#[from] StackError),
    #[error("{0}")]
    Io(String),
}

/// Options of a minicore.
#[derive(Debug, Clone)]
pub struct MinicoreOptions {
    /// Guest RAM sizes from QMP ([`plan::ram_sizes`]).
    pub ram_sizes: Vec<u64>,
    /// Free space that must remain on the core's filesystem after writing it.
    pub min_free: u64,
    pub frozen_budget: u64,
    pub debug_dirs: Vec<PathBuf>,
    pub labels: BTreeMap<i32, String>,
    pub stop_timeout: Duration,
}

impl Default for MinicoreOptions {
    fn default() -> Self {
        MinicoreOptions {
            ram_sizes: Vec::new(),
            min_free: 1 << 30,
            frozen_budget: FROZEN_BUDGET,
            debug_dirs: vec![native::DEFAULT_DEBUG_DIR.into()],
            labels: BTreeMap::new(),
            stop_timeout: Duration::from_millis(50),
        }
    }
}

/// What a minicore contains and what it cost (`core/minicore.json`).
#[derive(Debug, Clone, Serialize)]
pub struct MinicoreReport {
    pub pid: i32,
    /// The core's path in the archive (set by the step).
    pub archive_path: String,
    /// The QEMU binary that ran, and its build-id (gdb needs the same file).
    pub exe: String,
    pub exe_build_id: Option<String>,
    /// Threads in the core (NT_PRSTATUS), and how many were stopped for it.
    pub threads: usize,
    pub threads_stopped: usize,
    pub segments: usize,
    /// Size of the core file, and of the memory in it.
    pub core_bytes: u64,
    pub memory_bytes: u64,
    /// Mappings left out as guest RAM, and their total size.
    pub guest_ram_bytes: u64,
    /// First stop to last detach, µs: how long the VM was frozen.
    pub freeze_us: u64,
    pub stopping_us: u64,
    /// `frozen` (all memory copied while stopped) or `after_resume` (heap copied after).
    pub memory_copy: &'static str,
    /// Time spent copying memory, ms (inside the freeze when `memory_copy` is `frozen`).
    pub copy_ms: u64,
    pub write_ms: u64,
    /// Bytes that could not be read (unmapped since the plan); written as zeros.
    pub unreadable_bytes: u64,
    pub excluded: Vec<plan::Excluded>,
    pub notes: Vec<String>,
}

/// Memory copied inside the freeze: the bytes per segment, unreadable bytes, time taken.
type FrozenCopy = Arc<Mutex<Option<(Vec<Vec<u8>>, u64, Duration)>>>;

/// A planned memory range and its mapping's permissions.
struct Segment {
    run: plan::Run,
    perms: String,
}

fn copy_runs(pid: i32, segs: &[Segment]) -> (Vec<Vec<u8>>, u64) {
    let mut bad = 0u64;
    let data = segs
        .iter()
        .map(|s| {
            let mut buf = vec![0u8; (s.run.1 - s.run.0) as usize];
            let mut at = 0usize;
            while at < buf.len() {
                let end = (at + (1 << 20)).min(buf.len());
                let got = read_remote(pid, s.run.0 + at as u64, &mut buf[at..end]);
                if got == 0 {
                    // Unreadable page (unmapped since the plan): leave zeros, go on.
                    bad += 4096.min((end - at) as u64);
                    at += 4096;
                } else {
                    at += got;
                }
            }
            buf
        })
        .collect();
    (data, bad)
}

fn free_bytes(dir: &Path) -> Result<u64, MinicoreError> {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .map_err(|e| MinicoreError::Io(format!("cannot check free space of {}: {e}", dir.display())))
}

/// Writes a minicore of `pid` to `path` (created 0600, must not exist). Returns its
/// report and the stacks of the same freeze (for comparing with gdb's view of the core).
pub fn dump(
    pid: i32,
    path: &Path,
    opts: &MinicoreOptions,
    cancel: &Cancel,
) -> Result<(MinicoreReport, StacksReport), MinicoreError> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => MinicoreError::Stack(StackError::NoProcess(pid)),
        _ => MinicoreError::Stack(StackError::Permission { pid, detail: format!("/proc/{pid}/smaps: {e}") }),
    })?;
    let regions = plan::parse_smaps(&smaps);
    let (included, excluded) = plan::select(&regions, &opts.ram_sizes);
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| MinicoreError::Io(format!("/proc/{pid}/pagemap: {e}")))?;
    let mut gap = MERGE_GAP;
    let segs = loop {
        let mut segs = Vec::new();
        for inc in &included {
            let m = &inc.region.map;
            let runs = if inc.header_only {
                vec![(m.start, (m.start + 4096).min(m.end))]
            } else {
                plan::touched_runs(&pagemap, m.start, m.end, gap)
                    .map_err(|e| MinicoreError::Io(format!("pagemap: {e}")))?
            };
            segs.extend(runs.into_iter().map(|run| Segment { run, perms: m.perms.clone() }));
        }
        if segs.len() < elf::MAX_PHNUM {
            break segs;
        }
        gap *= 4;
    };
    let memory_bytes: u64 = segs.iter().map(|s| s.run.1 - s.run.0).sum();
    let guest_ram_bytes = excluded.iter().filter(|e| e.reason.starts_with("guest RAM")).map(|e| e.end - e.start).sum();
    let dir = path.parent().unwrap_or(Path::new("."));
    let free = free_bytes(dir)?;
    let need = memory_bytes + (1 << 20);
    if free < opts.min_free + need {
        return Err(MinicoreError::Refused(format!(
            "{} MiB free under {}, the core needs {} MiB plus the {} MiB floor; free space or lower min_free",
            free >> 20,
            dir.display(),
            need >> 20,
            opts.min_free >> 20
        )));
    }

    // The freeze, with the memory copy inside it when it is small enough.
    let frozen = memory_bytes <= opts.frozen_budget;
    let copied: FrozenCopy = Arc::new(Mutex::new(None));
    let during: Option<native::snapshot::WhileFrozen> = if frozen {
        let (cell, runs) =
            (copied.clone(), segs.iter().map(|s| Segment { run: s.run, perms: String::new() }).collect::<Vec<_>>());
        Some(Box::new(move || {
            let t = Instant::now();
            let (data, bad) = copy_runs(pid, &runs);
            *cell.lock().unwrap() = Some((data, bad, t.elapsed()));
        }))
    } else {
        None
    };
    let nopts = NativeOptions {
        freeze: FreezeOptions { stack_bytes: STACK_BYTES, stop_timeout: opts.stop_timeout, fpregs: true },
        debug: DebugSearch { dirs: opts.debug_dirs.clone() },
        lines: false,
        max_depth: 256,
        labels: opts.labels.clone(),
    };
    let captured = native::capture(pid, &nopts, cancel, during)?;
    let (data, unreadable, copy_time, mode) = match copied.lock().unwrap().take() {
        Some((d, bad, t)) => (d, bad, t, "frozen"),
        None => {
            let t = Instant::now();
            let (d, bad) = copy_runs(pid, &segs);
            (d, bad, t.elapsed(), "after_resume")
        }
    };

    // Notes: the process, each thread (the main thread first, as gdb expects), auxv, files.
    let t_write = Instant::now();
    let mut notes = Vec::new();
    let (pgrp, sid) = unsafe { (libc::getpgid(pid), libc::getsid(pid)) };
    let stat = crate::procfs::parse_stat_file(&format!("/proc/{pid}/stat")).ok();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let psargs = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim_end().to_string();
    let ps = elf::PrPsInfo {
        state: 0,
        sname: stat.as_ref().map_or(b'R', |s| s.state as u8),
        nice: 0,
        flag: 0,
        uid: 0,
        gid: 0,
        pid,
        ppid: stat.as_ref().map_or(0, |s| s.ppid),
        pgrp,
        sid,
        fname: stat.as_ref().map_or(String::new(), |s| s.comm.clone()),
        psargs,
    };
    elf::note(&mut notes, elf::NT_PRPSINFO, &ps.bytes());
    let mut threads: Vec<&native::snapshot::ThreadCapture> =
        captured.snapshot.threads.iter().filter(|t| t.capture != Capture::Vanished).collect();
    threads.sort_by_key(|t| (t.tid != pid, t.tid));
    let mut report_notes = captured.notes.clone();
    for t in &threads {
        let regs = match (&t.regs, &t.syscall) {
            (Some(r), _) => native::raw::regs_array(r),
            (None, Some(Syscall::In { sp, pc, .. } | Syscall::Blocked { sp, pc })) => {
                report_notes.push(format!("thread {} was not stopped: only its PC and SP are in the core", t.tid));
                let mut a = [0u64; 27];
                a[16] = *pc;
                a[19] = *sp;
                a
            }
            _ => {
                report_notes.push(format!("thread {} was not stopped and has no registers in the core", t.tid));
                [0u64; 27]
            }
        };
        let st = elf::PrStatus { tid: t.tid, ppid: ps.ppid, pgrp, sid, regs, fpvalid: t.fpregs.is_some() };
        elf::note(&mut notes, elf::NT_PRSTATUS, &st.bytes());
        if let Some(fp) = &t.fpregs {
            // SAFETY: user_fpregs_struct is 512 bytes of plain data.
            let bytes =
                unsafe { std::slice::from_raw_parts((&**fp as *const libc::user_fpregs_struct).cast::<u8>(), 512) };
            elf::note(&mut notes, elf::NT_FPREGSET, bytes);
        }
    }
    if let Ok(auxv) = std::fs::read(format!("/proc/{pid}/auxv")) {
        elf::note(&mut notes, elf::NT_AUXV, &auxv);
    }
    let files: Vec<elf::FileMapping> = regions
        .iter()
        .filter(|r| r.map.inode != 0 && r.map.path.starts_with('/'))
        .map(|r| elf::FileMapping {
            start: r.map.start,
            end: r.map.end,
            offset: r.map.offset,
            path: r.map.path.trim_end_matches(" (deleted)").to_string(),
        })
        .collect();
    elf::note(&mut notes, elf::NT_FILE, &elf::nt_file(&files));
    let loads: Vec<elf::Load> = segs
        .iter()
        .map(|s| {
            let p = s.perms.as_bytes();
            elf::Load {
                vaddr: s.run.0,
                len: s.run.1 - s.run.0,
                read: p.first() == Some(&b'r'),
                write: p.get(1) == Some(&b'w'),
                exec: p.get(2) == Some(&b'x'),
            }
        })
        .collect();
    let (head, offsets) = elf::layout(&notes, &loads);
    let io = |e: std::io::Error| MinicoreError::Io(format!("writing {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    file.write_all(&head).map_err(io)?;
    for d in &data {
        file.write_all(d).map_err(io)?;
    }
    if mode == "after_resume" {
        // Thread stacks as of the freeze, over the later copy.
        for t in &threads {
            let (lo, hi) = (t.stack_base, t.stack_base + t.stack.len() as u64);
            for (s, off) in segs.iter().zip(&offsets) {
                let (a, b) = (s.run.0.max(lo), s.run.1.min(hi));
                if a < b {
                    let src = &t.stack[(a - lo) as usize..(b - lo) as usize];
                    file.write_at(src, off + (a - s.run.0)).map_err(io)?;
                }
            }
        }
    }
    file.sync_all().map_err(io)?;
    let core_bytes = head.len() as u64 + memory_bytes;
    let stacks = captured.report(&nopts);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string().trim_end_matches(" (deleted)").to_string())
        .unwrap_or_default();
    let exe_build_id = captured.modules.list.iter().find(|m| m.name == exe).and_then(|m| m.build_id_hex());
    let report = MinicoreReport {
        pid,
        archive_path: String::new(),
        exe,
        exe_build_id,
        threads: threads.len(),
        threads_stopped: threads.iter().filter(|t| t.capture == Capture::Stopped).count(),
        segments: segs.len(),
        core_bytes,
        memory_bytes,
        guest_ram_bytes,
        freeze_us: captured.snapshot.freeze_us,
        stopping_us: captured.snapshot.stopping_us,
        memory_copy: mode,
        copy_ms: copy_time.as_millis() as u64,
        write_ms: t_write.elapsed().as_millis() as u64,
        unreadable_bytes: unreadable,
        excluded,
        notes: report_notes,
    };
    Ok((report, stacks))
}
