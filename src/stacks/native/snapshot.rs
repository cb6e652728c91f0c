//! The freeze: PTRACE_SEIZE (no options) + PTRACE_INTERRUPT every thread, copy registers
//! and the top of each stack, detach. Everything a stopped thread needs (modules, /proc
//! files) is read before the first interrupt, so the freeze is only ptrace and memcpy.
//!
//! Safety properties:
//! - No `PTRACE_ATTACH`/SIGSTOP and no `PTRACE_O_EXITKILL`: if this process dies at any
//!   point, the kernel detaches and the target keeps running.
//! - All ptrace calls are made from one dedicated OS thread that exits when the snapshot
//!   ends. A tracer thread's exit detaches whatever it still traces (`exit_ptrace`), and
//!   that also drops a pending interrupt of a thread that never stopped (D state), so no
//!   thread can stop later while we are still running.
//! - [`Tracer`] detaches every stopped thread in `Drop`: errors, cancel and panics too.
//! - A signal that arrived during the freeze (signal-delivery-stop) is re-injected on
//!   detach.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::modules::{read_remote, Mapping};
use crate::cancel::Cancel;
use crate::procfs::{self, Syscall};
use crate::stacks::StackError;

/// Per-thread state as captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// Stopped, registers and stack copied.
    Stopped,
    /// In D state before the freeze: not seized, not waited on.
    SkippedD,
    /// Seized and interrupted, but did not stop before the deadline.
    NotStopped,
    /// Exited during the snapshot.
    Vanished,
    /// Seize or register read failed.
    Failed,
}

/// What the snapshot took of one thread.
#[derive(Debug, Clone)]
pub struct ThreadCapture {
    pub tid: i32,
    pub comm: String,
    /// Scheduler state just before the freeze.
    pub state: char,
    pub wchan: Option<String>,
    pub syscall: Option<Syscall>,
    pub kernel_stack: Option<Vec<String>>,
    pub capture: Capture,
    pub regs: Option<libc::user_regs_struct>,
    /// `PTRACE_GETFPREGS` (the 512-byte FXSAVE area), when [`FreezeOptions::fpregs`] asked for it.
    pub fpregs: Option<Box<libc::user_fpregs_struct>>,
    /// Copied stack bytes and the address of the first byte.
    pub stack_base: u64,
    pub stack: Vec<u8>,
    /// Interrupt to detach, µs (an upper bound of the time this thread was stopped).
    pub stopped_us: Option<u64>,
    pub errors: Vec<String>,
}

/// The raw result of a snapshot, before unwinding.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub threads: Vec<ThreadCapture>,
    /// First interrupt to last detach, µs.
    pub freeze_us: u64,
    /// First interrupt to the last stop seen, µs: the part of the freeze spent waiting
    /// for threads to reach their stops (on a busy host, for the CPU).
    pub stopping_us: u64,
    pub notes: Vec<String>,
    first_interrupt: Option<Instant>,
}

/// Tuning for the freeze.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// Bytes of stack copied from SP (clipped to the stack's mapping).
    pub stack_bytes: usize,
    /// How long to wait for all threads to stop after the interrupts.
    pub stop_timeout: Duration,
    /// Also copy each thread's FPU/SSE registers (for a core file's NT_FPREGSET).
    pub fpregs: bool,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        FreezeOptions { stack_bytes: 64 << 10, stop_timeout: Duration::from_millis(50), fpregs: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TState {
    /// Seized, not yet interrupted (still running).
    Seized,
    /// Seized and interrupted, stop not yet seen.
    Pending,
    /// In a ptrace stop; `sig` is to be re-injected on detach.
    Stopped {
        sig: i32,
    },
    Detached,
    Gone,
}

/// RAII ownership of the threads we trace: detaches every stopped one when dropped.
struct Tracer {
    threads: BTreeMap<i32, (TState, Instant)>,
    last_detach: Option<Instant>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Tracer {
    fn new() -> Self {
        Tracer { threads: BTreeMap::new(), last_detach: None }
    }

    /// PTRACE_SEIZE without options: the thread keeps running. Returns errno on failure.
    fn seize(&mut self, tid: i32) -> Result<(), i32> {
        // SAFETY: plain ptrace request with integer arguments.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) } != 0 {
            return Err(errno());
        }
        self.threads.insert(tid, (TState::Seized, Instant::now()));
        Ok(())
    }

    /// PTRACE_INTERRUPT a seized thread: it stops at its next chance (not in D state).
    fn interrupt(&mut self, tid: i32) -> Result<(), i32> {
        // SAFETY: plain ptrace request with integer arguments.
        let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) };
        let e = errno();
        let entry = self.threads.get_mut(&tid).ok_or(libc::ESRCH)?;
        *entry = if r == 0 { (TState::Pending, Instant::now()) } else { (TState::Gone, Instant::now()) };
        if r != 0 {
            return Err(e);
        }
        Ok(())
    }

    /// Non-blocking wait for any of our tracees: `Some((tid, stopped))`, or None when
    /// no stop is waiting. One syscall however many threads are pending; `__WNOTHREAD`
    /// limits it to this thread's tracees (never the host program's children).
    fn poll_any(&mut self) -> Option<(i32, bool)> {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG) };
        if r <= 0 {
            return None;
        }
        let entry = self.threads.get_mut(&r)?;
        if libc::WIFSTOPPED(status) {
            let sig = libc::WSTOPSIG(status);
            let event = status >> 16;
            // PTRACE_EVENT_STOP: our interrupt (or a group-stop); anything else with no
            // event is a signal about to be delivered, which must be handed back.
            let inject = if event == 0 { sig } else { 0 };
            entry.0 = TState::Stopped { sig: inject };
            Some((r, true))
        } else {
            entry.0 = TState::Gone;
            Some((r, false))
        }
    }

    fn getregs(&self, tid: i32) -> Result<libc::user_regs_struct, i32> {
        // SAFETY: user_regs_struct is plain data; the kernel fills it.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0usize, &mut regs as *mut _) };
        if r != 0 {
            return Err(errno());
        }
        Ok(regs)
    }

    fn getfpregs(&self, tid: i32) -> Option<Box<libc::user_fpregs_struct>> {
        // SAFETY: user_fpregs_struct is plain data; the kernel fills it.
        let mut fp: Box<libc::user_fpregs_struct> = Box::new(unsafe { std::mem::zeroed() });
        let r = unsafe { libc::ptrace(libc::PTRACE_GETFPREGS, tid, 0usize, &mut *fp as *mut _) };
        (r == 0).then_some(fp)
    }

    fn detach(&mut self, tid: i32) -> Option<Duration> {
        let (st, since) = self.threads.get_mut(&tid)?;
        if let TState::Stopped { sig } = *st {
            // SAFETY: plain ptrace request; `sig` re-injects an intercepted signal.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, sig as usize) };
            *st = TState::Detached;
            let now = Instant::now();
            self.last_detach = Some(now);
            return Some(now - *since);
        }
        None
    }

    fn detach_all(&mut self) -> BTreeMap<i32, Duration> {
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        tids.into_iter().filter_map(|t| Some((t, self.detach(t)?))).collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Threads still Pending cannot be detached (PTRACE_DETACH needs a stopped
        // tracee); the exit of the tracer thread releases them.
        self.detach_all();
    }
}

/// Pre-freeze reads of one thread's /proc files.
fn read_thread(pid: i32, tid: i32) -> Option<ThreadCapture> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let stat = procfs::parse_stat_file(&format!("{dir}/stat")).ok()?;
    let wchan = std::fs::read_to_string(format!("{dir}/wchan")).ok().filter(|w| !w.is_empty() && w != "0");
    let syscall = std::fs::read_to_string(format!("{dir}/syscall")).ok().and_then(|s| procfs::parse_syscall(&s));
    let kernel_stack = std::fs::read_to_string(format!("{dir}/stack"))
        .ok()
        .map(|s| s.lines().map(|l| l.split_once("] ").map_or(l, |(_, f)| f).to_string()).collect());
    Some(ThreadCapture {
        tid,
        comm: stat.comm,
        state: stat.state,
        wchan,
        syscall,
        kernel_stack,
        capture: Capture::Failed,
        regs: None,
        fpregs: None,
        stack_base: 0,
        stack: Vec::new(),
        stopped_us: None,
        errors: Vec::new(),
    })
}

/// Copies up to `len` bytes of stack from `sp`, clipped to the mapping that holds it.
pub fn copy_stack(pid: i32, sp: u64, len: usize, maps: &[Mapping]) -> Vec<u8> {
    let end = maps.iter().find(|m| m.contains(sp)).map_or(sp.saturating_add(len as u64), |m| m.end);
    let n = (end.saturating_sub(sp) as usize).min(len);
    let mut buf = vec![0u8; n];
    let got = read_remote(pid, sp, &mut buf);
    buf.truncate(got);
    buf
}

fn tracer_pid(path: &str) -> Option<i32> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok())
}

/// Work done while every thread is still stopped (after the last register and stack
/// copy, before the first detach), e.g. a core's memory copy. It runs on the ptrace
/// thread; whatever it takes adds to the freeze.
pub type WhileFrozen = Box<dyn FnOnce() + Send>;

/// Takes the snapshot on a dedicated OS thread (see the module docs for why), running
/// `during` while the threads are stopped. Also returns that thread's id: until the
/// kernel has finished its exit, threads it still held may show it as their TracerPid
/// for a moment.
pub fn take_with(
    pid: i32,
    maps: &[Mapping],
    opts: &FreezeOptions,
    cancel: &Cancel,
    during: Option<WhileFrozen>,
) -> (Result<Snapshot, StackError>, i32) {
    let (maps_copy, opts_copy) = (maps, opts);
    let maps = maps.to_vec();
    let opts = opts.clone();
    let cancel = cancel.clone();
    let tracer_tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let cell = tracer_tid.clone();
    let handle = std::thread::Builder::new().name("wedge-ptrace".into()).spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        cell.store(unsafe { libc::gettid() }, std::sync::atomic::Ordering::SeqCst);
        freeze(pid, &maps, &opts, &cancel, during)
    });
    let result = match handle {
        Err(e) => Err(StackError::Failed(format!("cannot start the ptrace thread: {e}"))),
        Ok(h) => match h.join() {
            Ok(r) => r,
            Err(_) => Err(StackError::Failed("the ptrace thread panicked (every stopped thread was detached)".into())),
        },
    };
    let result = result.map(|mut snap| {
        fill_unstopped(pid, &mut snap, maps_copy, opts_copy);
        snap
    });
    (result, tracer_tid.load(std::sync::atomic::Ordering::SeqCst))
}

/// After the ptrace thread is gone (so nothing of ours can hold a thread stopped any
/// more): what the threads that were not stopped are doing, read without stopping
/// them, and their stacks from the SP `/proc/TID/syscall` shows. A thread blocked in
/// the kernel does not touch its user stack, so that copy is stable.
fn fill_unstopped(pid: i32, snap: &mut Snapshot, maps: &[Mapping], opts: &FreezeOptions) {
    let mut late = 0;
    for c in snap.threads.iter_mut() {
        if c.capture == Capture::NotStopped {
            late += 1;
            if let Some(fresh) = read_thread(pid, c.tid) {
                c.state = fresh.state;
                c.wchan = fresh.wchan.or(c.wchan.take());
                c.syscall = fresh.syscall.or(c.syscall.take());
                c.kernel_stack = fresh.kernel_stack.or(c.kernel_stack.take());
            }
        }
        if matches!(c.capture, Capture::SkippedD | Capture::NotStopped) {
            if let Some(Syscall::In { sp, .. } | Syscall::Blocked { sp, .. }) = c.syscall {
                c.stack_base = sp;
                c.stack = copy_stack(pid, sp, opts.stack_bytes, maps);
            }
        }
    }
    if late > 0 {
        // One of them may have reached its stop after we stopped waiting; the ptrace
        // thread's exit released it. Count the freeze up to that exit.
        if let Some(t0) = snap.first_interrupt {
            snap.freeze_us = snap.freeze_us.max(t0.elapsed().as_micros() as u64);
        }
        snap.notes.push(format!(
            "{late} thread(s) did not stop in time; any that stopped later was released when the ptrace thread exited (counted in freeze_us)"
        ));
    }
}

fn freeze(
    pid: i32,
    maps: &[Mapping],
    opts: &FreezeOptions,
    cancel: &Cancel,
    during: Option<WhileFrozen>,
) -> Result<Snapshot, StackError> {
    // Short sleeps while polling for stops must stay short (this thread only).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if let Some(t) = tracer_pid(&format!("/proc/{pid}/status")).filter(|t| *t != 0) {
        return Err(StackError::Unavailable(format!("pid {pid} is already traced by pid {t} (a debugger?)")));
    }
    let mut tracer = Tracer::new();
    let mut caps: BTreeMap<i32, ThreadCapture> = BTreeMap::new();
    let mut notes = Vec::new();
    let mut first_interrupt: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    let mut last_stop: Option<Instant> = None;
    // Rounds: a thread created before its creator stopped shows up in a re-read.
    for round in 0..16 {
        let tids = match procfs::tids(pid) {
            Ok(t) => t,
            Err(_) if round == 0 => return Err(StackError::NoProcess(pid)),
            Err(e) => {
                notes.push(format!("re-reading the task list failed: {e}"));
                break;
            }
        };
        let new: Vec<i32> = tids.into_iter().filter(|t| !caps.contains_key(t)).collect();
        if new.is_empty() {
            break;
        }
        // Pre-freeze reads for the new threads.
        let mut to_seize = Vec::new();
        for tid in new {
            let Some(mut cap) = read_thread(pid, tid) else { continue };
            if matches!(cap.state, 'Z' | 'X') {
                cap.capture = Capture::Vanished;
                cap.errors.push("exiting (zombie): nothing to capture".into());
            } else if cap.state == 'D' {
                cap.capture = Capture::SkippedD;
                cap.errors.push("in D state (uninterruptible): not stopped; PC/SP from /proc syscall".into());
            } else {
                to_seize.push(tid);
            }
            caps.insert(tid, cap);
        }
        // Seize all first (they keep running), then interrupt them back to back, so
        // the freeze starts as late and ends as early as possible.
        let mut seized = Vec::new();
        for tid in to_seize {
            if cancel.is_cancelled() {
                return Err(StackError::Interrupted);
            }
            match tracer.seize(tid) {
                Ok(()) => seized.push(tid),
                // EPERM is also what an exiting thread answers; only a live one means
                // we lack the privilege.
                Err(libc::EPERM)
                    if tracer.threads.is_empty()
                        && read_thread(pid, tid).is_some_and(|t| !matches!(t.state, 'Z' | 'X')) =>
                {
                    return Err(StackError::Permission { pid, detail: "PTRACE_SEIZE: EPERM".into() });
                }
                Err(e) => {
                    let c = caps.get_mut(&tid).unwrap();
                    if e == libc::ESRCH
                        || e == libc::EPERM && read_thread(pid, tid).is_none_or(|t| matches!(t.state, 'Z' | 'X'))
                    {
                        c.capture = Capture::Vanished;
                        c.errors.push("exited before it could be seized".into());
                    } else {
                        c.capture = Capture::Failed;
                        c.errors.push(format!("PTRACE_SEIZE: {}", std::io::Error::from_raw_os_error(e)));
                    }
                }
            }
        }
        if cancel.is_cancelled() {
            return Err(StackError::Interrupted);
        }
        first_interrupt.get_or_insert_with(Instant::now);
        for tid in seized {
            if let Err(e) = tracer.interrupt(tid) {
                let c = caps.get_mut(&tid).unwrap();
                c.capture = if e == libc::ESRCH { Capture::Vanished } else { Capture::Failed };
                c.errors.push(format!("PTRACE_INTERRUPT: {}", std::io::Error::from_raw_os_error(e)));
            }
        }
        let dl = *deadline.get_or_insert_with(|| Instant::now() + opts.stop_timeout);
        // Collect stops; copy each thread as soon as it stops. Nobody is released
        // before everybody is captured, so the picture is one instant.
        let mut idle = 0u32;
        loop {
            if cancel.is_cancelled() {
                return Err(StackError::Interrupted);
            }
            if !tracer.threads.values().any(|(s, _)| *s == TState::Pending) || Instant::now() >= dl {
                break;
            }
            match tracer.poll_any() {
                None => {
                    // Sleep rather than spin: the stopping threads need the CPU more
                    // than we do (on a busy host a spinning tracer delays their stops).
                    idle += 1;
                    if idle > 2 {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
                Some((tid, true)) => {
                    idle = 0;
                    last_stop = Some(Instant::now());
                    let c = caps.get_mut(&tid).unwrap();
                    match tracer.getregs(tid) {
                        Ok(regs) => {
                            c.stack_base = regs.rsp;
                            c.stack = copy_stack(pid, regs.rsp, opts.stack_bytes, maps);
                            c.regs = Some(regs);
                            if opts.fpregs {
                                c.fpregs = tracer.getfpregs(tid);
                            }
                            c.capture = Capture::Stopped;
                        }
                        Err(e) => {
                            c.capture = Capture::Failed;
                            c.errors.push(format!("PTRACE_GETREGS: {}", std::io::Error::from_raw_os_error(e)));
                        }
                    }
                }
                Some((tid, false)) => {
                    let c = caps.get_mut(&tid).unwrap();
                    c.capture = Capture::Vanished;
                    c.errors.push("exited during the snapshot".into());
                }
            }
        }
        if tracer.threads.values().any(|(s, _)| *s == TState::Pending) {
            break;
        }
    }
    if let Some(f) = during {
        f();
    }
    let stopped = tracer.detach_all();
    for (tid, d) in &stopped {
        if let Some(c) = caps.get_mut(tid) {
            c.stopped_us = Some(d.as_micros() as u64);
        }
    }
    let freeze_us = match (first_interrupt, tracer.last_detach) {
        (Some(a), Some(b)) => (b - a).as_micros() as u64,
        _ => 0,
    };
    let stopping_us = match (first_interrupt, last_stop) {
        (Some(a), Some(b)) => (b - a).as_micros() as u64,
        _ => 0,
    };
    let pending: Vec<i32> =
        tracer.threads.iter().filter(|(_, (s, _))| *s == TState::Pending).map(|(t, _)| *t).collect();
    for tid in pending {
        let c = caps.get_mut(&tid).unwrap();
        c.capture = Capture::NotStopped;
        c.errors.push(format!(
            "did not stop within {} ms: not waited on; the interrupt is dropped when the tracer thread exits",
            opts.stop_timeout.as_millis()
        ));
    }
    drop(tracer);
    // Nothing alive (gone, or only a zombie left): the process is gone.
    if caps.values().all(|c| c.capture == Capture::Vanished) {
        return Err(StackError::NoProcess(pid));
    }
    Ok(Snapshot { threads: caps.into_values().collect(), freeze_us, stopping_us, notes, first_interrupt })
}

/// Tracer of each thread of `pid` that has one (should be empty after a snapshot).
pub fn traced_threads(pid: i32) -> Vec<(i32, i32)> {
    procfs::tids(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| {
            let tp = tracer_pid(&format!("/proc/{pid}/task/{t}/status"))?;
            (tp != 0).then_some((t, tp))
        })
        .collect()
}
