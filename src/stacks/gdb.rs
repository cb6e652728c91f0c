//! Stacks via an external `gdb -batch`. Kept as an option and as the fallback when the
//! native snapshot cannot run. gdb stops every thread for the whole run (~0.3 s) and,
//! if killed while attached, leaves them stopped; [`super::restore_stopped`] repairs that.

use std::time::Instant;

use super::{StackError, StackMethod, StackRequest};
use crate::exec::{self, ExecError, Spec};

/// `gdb -p PID -batch … -ex 'thread apply all bt'`, output to `stacks/gdb.txt`.
#[derive(Debug, Clone)]
pub struct Gdb {
    pub program: String,
    /// `bt` or `bt full` (the full runbook asks for locals too).
    pub backtrace: String,
}

impl Default for Gdb {
    fn default() -> Self {
        Gdb { program: "gdb".into(), backtrace: "bt".into() }
    }
}

impl Gdb {
    pub fn argv(&self, pid: i32) -> Vec<String> {
        [
            self.program.as_str(),
            "-p",
            &pid.to_string(),
            "-batch",
            "-nx",
            "-iex",
            "set debuginfod enabled off",
            "-ex",
            "set pagination off",
            "-ex",
            "set print thread-events off",
            "-ex",
            "info threads",
            "-ex",
            &format!("thread apply all {}", self.backtrace),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl StackMethod for Gdb {
    fn name(&self) -> &'static str {
        "gdb"
    }

    fn capture(&self, req: &StackRequest<'_>) -> Result<String, StackError> {
        let timeout = req.deadline.saturating_duration_since(Instant::now());
        let mut spec = Spec::new(self.argv(req.pid), timeout);
        spec.env_remove.push("DEBUGINFOD_URLS".into());
        let out = exec::run(&spec, req.cancel).map_err(|e| match e {
            ExecError::NotFound(p) => StackError::Unavailable(format!("{p} is not installed (apt install gdb)")),
            other => StackError::Failed(other.to_string()),
        })?;
        let mut text = out.stdout.clone();
        if !out.stderr.is_empty() {
            text.extend_from_slice(b"\n--- gdb stderr ---\n");
            text.extend_from_slice(&out.stderr);
        }
        let rel = if self.backtrace == "bt" {
            "stacks/gdb.txt".to_string()
        } else {
            format!("stacks/gdb-{}.txt", self.backtrace.replace(' ', "-"))
        };
        req.sink.write(&rel, &text).map_err(|e| StackError::Failed(e.to_string()))?;
        if out.cancelled {
            return Err(StackError::Interrupted);
        }
        if out.timed_out {
            return Err(StackError::Timeout(out.duration.as_millis() as u64));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let threads = stdout.lines().filter(|l| l.starts_with("Thread ")).count();
        if threads == 0 {
            if stderr.contains("ptrace: Operation not permitted") {
                return Err(StackError::Permission { pid: req.pid, detail: "gdb: ptrace not permitted".into() });
            }
            if stderr.contains("No such process") {
                return Err(StackError::NoProcess(req.pid));
            }
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
            return Err(StackError::Failed(format!("gdb printed no thread: {last}")));
        }
        Ok(format!("{threads} threads in {} ms", out.duration.as_millis()))
    }
}
