//! Runs an external program: argv only (never a shell), in its own process group, under a
//! deadline, with capped output. On timeout or cancel the whole group is SIGKILLed, so a
//! step that forked helpers does not leave them behind.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    pub timeout: Duration,
    /// Bytes kept per stream; the rest is read and dropped so the child never blocks.
    pub output_cap: usize,
    pub env: Vec<(String, String)>,
    pub env_remove: Vec<String>,
}

impl Spec {
    pub fn new(argv: Vec<String>, timeout: Duration) -> Self {
        Spec { argv, timeout, output_cap: 8 << 20, env: Vec::new(), env_remove: Vec::new() }
    }
}

#[derive(Debug)]
pub struct Output {
    /// `None` when the program was killed at the deadline or on cancel.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub timed_out: bool,
    pub cancelled: bool,
    pub duration: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}: not installed (not found on PATH)")]
    NotFound(String),
    #[error("empty argv")]
    Empty,
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `spec` to completion, the deadline, or `cancel`.
pub fn run(spec: &Spec, cancel: &Cancel) -> Result<Output, ExecError> {
    let (program, args) = spec.argv.split_first().ok_or(ExecError::Empty)?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    for k in &spec.env_remove {
        cmd.env_remove(k);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ExecError::NotFound(program.clone())
        } else {
            ExecError::Spawn { program: program.clone(), source }
        }
    })?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    for (idx, stream) in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(mut stream) = stream else { continue };
        let tx = tx.clone();
        let cap = spec.output_cap;
        std::thread::spawn(move || {
            let (mut kept, mut truncated, mut buf) = (Vec::new(), false, [0u8; 16384]);
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
            let _ = tx.send((idx, kept, truncated));
        });
    }
    drop(tx);

    let deadline = start + spec.timeout;
    let (mut timed_out, mut cancelled) = (false, false);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(_) => break None,
        }
        if cancel.is_cancelled() || Instant::now() >= deadline {
            cancelled = cancel.is_cancelled();
            timed_out = !cancelled;
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The group is gone, or the child exited; stragglers that escaped the group may
    // still hold the pipes, so do not wait on the readers for long.
    if status.is_some() {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    let mut out = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
        timed_out,
        cancelled,
        duration: start.elapsed(),
    };
    let reader_deadline = Instant::now() + Duration::from_millis(500);
    for _ in 0..2 {
        let left = reader_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, kept, t)) => {
                out.stdout = kept;
                out.truncated |= t;
            }
            Ok((_, kept, t)) => {
                out.stderr = kept;
                out.truncated |= t;
            }
            Err(_) => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn missing_binary_is_not_found() {
        let r = run(&Spec::new(argv(&["/nonexistent/tool"]), Duration::from_secs(1)), &Cancel::new());
        assert!(matches!(r, Err(ExecError::NotFound(_))));
    }

    #[test]
    fn hanging_child_and_grandchild_are_killed_at_deadline() {
        // sleep in the foreground plus a forked grandchild in the same group. The deadline
        // is long enough for the shell to start both on a loaded machine; what is checked
        // is the outcome (timed out, both killed), not the time it took.
        let pidfile = tempfile::NamedTempFile::new().unwrap();
        let script = format!("sleep 600 & echo $! > {}; exec sleep 600", pidfile.path().display());
        let spec = Spec::new(argv(&["sh", "-c", &script]), Duration::from_secs(5));
        let out = run(&spec, &Cancel::new()).unwrap();
        assert!(out.timed_out, "the step's status is a timeout");
        assert!(out.status.is_none(), "no exit status: the child was killed");
        let text = std::fs::read_to_string(pidfile.path()).unwrap();
        let grandchild: i32 =
            text.trim().parse().unwrap_or_else(|_| panic!("the shell never wrote the grandchild's pid: {text:?}"));
        let gone =
            || std::fs::read_to_string(format!("/proc/{grandchild}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(), "grandchild {grandchild} survived the deadline (waited 30 s for it to die)");
    }

    #[test]
    fn flood_is_capped_and_child_not_blocked() {
        let mut spec = Spec::new(argv(&["head", "-c", "5000000", "/dev/zero"]), Duration::from_secs(10));
        spec.output_cap = 1000;
        let out = run(&spec, &Cancel::new()).unwrap();
        assert!(out.success());
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.truncated);
    }
}
