//! The unit of capture: a step writes files into a [`StepSink`] and ends as a [`StepRecord`].
//!
//! Partial failure is data. A collector that cannot read one thread's file records a
//! note and carries on; only a failure of the step's purpose becomes `Failed`.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Id of the record of the QMP connection (not a runbook step; the lane adds it).
pub const QMP_CONNECT_ID: &str = "qmp-connect";

/// How a step ended. Serialized lower-case into the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Ok,
    Failed,
    Timeout,
    Skipped,
    Interrupted,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Ok => "ok",
            StepStatus::Failed => "failed",
            StepStatus::Timeout => "timeout",
            StepStatus::Skipped => "skipped",
            StepStatus::Interrupted => "interrupted",
        }
    }

    /// Whether this status makes a run "partial" (exit code 1). Skipped is by design.
    pub fn is_problem(self) -> bool {
        matches!(self, StepStatus::Failed | StepStatus::Timeout | StepStatus::Interrupted)
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step's entry in `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: String,
    pub kind: String,
    pub status: StepStatus,
    pub start: DateTime<Utc>,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Non-fatal problems: an unreadable file, a thread that exited, a fallback taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub optional: bool,
    /// How QMP failed in this step, when it did: what the verdict branches on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_failure: Option<QmpFailure>,
}

/// A QMP failure as the verdict needs it (the text is in `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpFailure {
    /// Connected, but no greeting: another client holds the socket, or QEMU is frozen.
    NoGreeting,
    /// Greeted, `qmp_capabilities` unanswered: the main loop is not running.
    CapabilitiesUnanswered,
    /// An in-band command missed its deadline while the session was up.
    Timeout,
    /// The socket is missing, refused, or the transport failed.
    Unreachable,
    /// QEMU answered with an error (e.g. CommandNotFound).
    CommandError,
}

impl QmpFailure {
    /// From `QmpError::classify()`.
    pub fn from_class(class: &str) -> QmpFailure {
        match class {
            "no-greeting" => QmpFailure::NoGreeting,
            "capabilities-unanswered" => QmpFailure::CapabilitiesUnanswered,
            "timeout" => QmpFailure::Timeout,
            "command" | "refused" => QmpFailure::CommandError,
            _ => QmpFailure::Unreachable,
        }
    }
}

/// What a step returns when it did not simply succeed.
#[derive(Debug)]
pub enum StepOutcome {
    Ok,
    /// The step chose not to run (missing tool, not applicable); not a failure.
    Skipped(String),
    Failed(String),
    /// The collector hit its own deadline (it stopped and kept what it had).
    Timeout(String),
    /// The run was interrupted while the collector worked.
    Interrupted(String),
}

/// Where a step's output goes: a staging directory shared by the whole run.
///
/// A step gets its own sink; once the executor gives up on the step (timeout,
/// interrupt) the sink is closed and late writes from an abandoned thread are
/// dropped, so nothing half-written races the seal.
#[derive(Clone)]
pub struct StepSink {
    inner: Arc<Mutex<SinkState>>,
    root: PathBuf,
}

struct SinkState {
    open: bool,
    files: Vec<String>,
    notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("step output closed (the step was abandoned)")]
    Closed,
    #[error("invalid archive path {0:?}: must be relative, without '..'")]
    BadPath(String),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StepSink {
    pub fn new(root: &Path) -> Self {
        StepSink {
            inner: Arc::new(Mutex::new(SinkState { open: true, files: Vec::new(), notes: Vec::new() })),
            root: root.to_path_buf(),
        }
    }

    /// Writes `bytes` at archive path `rel` (e.g. `qmp/query-status.json`), mode 0600.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), SinkError> {
        let full = self.resolve(rel)?;
        let mut st = self.inner.lock().unwrap();
        if !st.open {
            return Err(SinkError::Closed);
        }
        write_private(&full, bytes).map_err(|source| SinkError::Io { path: rel.to_string(), source })?;
        if !st.files.iter().any(|f| f == rel) {
            st.files.push(rel.to_string());
        }
        Ok(())
    }

    /// Reserves archive path `rel` for a file another program writes (a core dump):
    /// creates its parent directory and returns the real path to hand to that program.
    pub fn reserve(&self, rel: &str) -> Result<PathBuf, SinkError> {
        use std::os::unix::fs::DirBuilderExt;
        let full = self.resolve(rel)?;
        let mut st = self.inner.lock().unwrap();
        if !st.open {
            return Err(SinkError::Closed);
        }
        if let Some(parent) = full.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| SinkError::Io { path: rel.to_string(), source })?;
        }
        if !st.files.iter().any(|f| f == rel) {
            st.files.push(rel.to_string());
        }
        Ok(full)
    }

    /// Records a non-fatal problem for the manifest.
    pub fn note(&self, msg: impl Into<String>) {
        let mut st = self.inner.lock().unwrap();
        if st.open {
            st.notes.push(msg.into());
        }
    }

    pub fn is_open(&self) -> bool {
        self.inner.lock().unwrap().open
    }

    /// Closes the sink and returns what it collected: (files, notes).
    pub fn close(&self) -> (Vec<String>, Vec<String>) {
        let mut st = self.inner.lock().unwrap();
        st.open = false;
        (std::mem::take(&mut st.files), std::mem::take(&mut st.notes))
    }

    fn resolve(&self, rel: &str) -> Result<PathBuf, SinkError> {
        let p = Path::new(rel);
        let ok = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(SinkError::BadPath(rel.to_string()));
        }
        Ok(self.root.join(p))
    }
}

/// Creates parent directories (0700) and writes the file with mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_rejects_escaping_paths_and_late_writes() {
        let dir = tempfile::tempdir().unwrap();
        let sink = StepSink::new(dir.path());
        assert!(matches!(sink.write("../x", b"a"), Err(SinkError::BadPath(_))));
        assert!(matches!(sink.write("/etc/x", b"a"), Err(SinkError::BadPath(_))));
        sink.write("proc/status", b"ok").unwrap();
        sink.note("thread 7 exited");
        let (files, notes) = sink.close();
        assert_eq!(files, vec!["proc/status".to_string()]);
        assert_eq!(notes, vec!["thread 7 exited".to_string()]);
        assert!(matches!(sink.write("proc/late", b"x"), Err(SinkError::Closed)));
        assert!(!dir.path().join("proc/late").exists());
    }
}
