//! `manifest.json`: what ran, how each step ended, and the hash of every file.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::step::StepRecord;

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub tool: Tool,
    pub host: String,
    pub node: String,
    pub vmid: Option<u32>,
    pub pid: Option<i32>,
    /// The tool's own invocation, as argv.
    pub command_line: Vec<String>,
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// The host's UTC offset at capture time, e.g. `+03:00`: host logs are local time.
    pub utc_offset: String,
    pub runbook: RunbookRef,
    #[serde(default)]
    pub target: Option<serde_json::Value>,
    pub interrupted: bool,
    /// The redaction pass over every file before sealing: that it ran and how many values
    /// it replaced, never what they were. Absent in archives from before the pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redaction: Option<Redaction>,
    pub steps: Vec<StepRecord>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Default for Tool {
    fn default() -> Self {
        Tool { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }
}

/// Who or what started the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trigger {
    /// `manual`, `alert`, `api`, `watch`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Trigger {
    /// A run started by hand: the invoking user (through sudo if so) and terminal.
    pub fn manual(reason: Option<String>) -> Trigger {
        let user = std::env::var("SUDO_USER")
            .ok()
            .or_else(|| std::env::var("LOGNAME").ok())
            .or_else(|| std::env::var("USER").ok())
            .or_else(|| Some(format!("uid {}", nix::unistd::getuid())));
        let tty = nix::unistd::ttyname(std::io::stdin()).ok().map(|p| p.display().to_string());
        Trigger { kind: "manual".into(), user, tty, reason }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunbookRef {
    pub name: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The local UTC offset as `+HH:MM`.
pub fn local_offset() -> String {
    chrono::Local::now().format("%:z").to_string()
}

/// What the pass did, for `manifest.json` (counts only, never values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Redaction {
    /// The pass ran over every file before sealing.
    pub applied: bool,
    /// Values replaced in the archive's files: `<redacted>` markers written at capture
    /// and by the pass, plus occurrences masked in binary files.
    pub values_replaced: u64,
}
