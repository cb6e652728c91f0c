//! What a restart leaves behind: each timed [`RecordedAction`] (printed as it happens), the
//! [`RestartOutcome`] (`<archive>.restart.json`, the `restart` object of `--json`), and
//! the per-VM cooldown state that carries across runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive;
use crate::cancel::Cancel;
use crate::exec;
use crate::exit::Exit;
use crate::target::VmId;

/// One timed action of a restart, as recorded in `restart.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedAction {
    pub at: DateTime<Utc>,
    /// `verify-archive`, `ha-check`, `cooldown`, `stop`, `kill`, `wait-exit`, `start`,
    /// `verify-new`, `record`, `test-hook`.
    pub action: String,
    pub ok: bool,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    pub detail: String,
}

/// Collects actions, and prints each as one line on stderr unless quiet.
pub struct Recorder {
    pub actions: Vec<RecordedAction>,
    quiet: bool,
    t0: Instant,
}

impl Recorder {
    /// `t0`: the time base of the progress lines (the run's start, so the restart's
    /// lines continue the capture's).
    pub fn new(quiet: bool, t0: Instant) -> Self {
        Recorder { actions: Vec::new(), quiet, t0 }
    }

    /// Records an action that started at `started` (wall clock `at`).
    pub fn push(
        &mut self,
        at: DateTime<Utc>,
        started: Instant,
        action: &str,
        ok: bool,
        detail: impl Into<String>,
    ) -> &mut RecordedAction {
        let a = RecordedAction {
            at,
            action: action.into(),
            ok,
            duration_ms: started.elapsed().as_millis() as u64,
            argv: None,
            exit_code: None,
            timed_out: false,
            detail: detail.into(),
        };
        if !self.quiet {
            let _ = writeln!(
                std::io::stderr(),
                "[{:>6.2}s] restart {:<14} {:<6} {:>6} ms  {}",
                self.t0.elapsed().as_secs_f64(),
                a.action,
                if a.ok { "ok" } else { "FAILED" },
                a.duration_ms,
                a.detail
            );
        }
        self.actions.push(a);
        self.actions.last_mut().expect("just pushed")
    }

    /// Runs `argv` (argv only, own process group, killed at `timeout`) and records it.
    pub fn run(&mut self, action: &str, argv: Vec<String>, timeout: Duration) -> CommandEnd {
        let at = Utc::now();
        let started = Instant::now();
        // A fresh Cancel: once stopping has begun, a signal must not abort half-way.
        let result = exec::run(&exec::Spec::new(argv.clone(), timeout), &Cancel::new());
        let ran = match result {
            Err(e) => CommandEnd::Error(e.to_string()),
            Ok(out) if out.timed_out => CommandEnd::TimedOut(format!(
                "`{}` did not finish within {}; its process group was killed",
                argv.join(" "),
                crate::qmp::secs(timeout)
            )),
            Ok(out) if out.success() => CommandEnd::Ok(tail(&out.stdout)),
            Ok(out) => CommandEnd::Failed(
                out.status.and_then(|s| s.code()).unwrap_or(-1),
                format!(
                    "`{}` failed ({}): {}",
                    argv.join(" "),
                    out.status.map(|s| s.to_string()).unwrap_or_default(),
                    tail(&out.stderr)
                ),
            ),
        };
        let (ok, detail, code, timed_out) = match &ran {
            CommandEnd::Ok(o) => {
                (true, if o.is_empty() { "exit 0".to_string() } else { format!("exit 0: {o}") }, Some(0), false)
            }
            CommandEnd::Failed(c, m) => (false, m.clone(), Some(*c), false),
            CommandEnd::TimedOut(m) => (false, m.clone(), None, true),
            CommandEnd::Error(m) => (false, m.clone(), None, false),
        };
        let a = self.push(at, started, action, ok, detail);
        a.argv = Some(argv);
        a.exit_code = code;
        a.timed_out = timed_out;
        ran
    }
}

/// How a recorded command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEnd {
    /// Exit 0, with the tail of stdout.
    Ok(String),
    /// Non-zero exit: code and a one-line message with stderr's tail.
    Failed(i32, String),
    /// Killed at the deadline.
    TimedOut(String),
    /// Not started (not installed, permission).
    Error(String),
}

/// The last 300 characters of a program's output, on one line.
pub(super) fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.char_indices().rev().nth(299).map(|(i, _)| i).unwrap_or(0);
    crate::qmp::one_line(&s[start..], 300)
}

/// The outcome of a requested restart: the `restart` object of `--json`, the summary
/// and `<archive>.restart.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RestartOutcome {
    pub requested: bool,
    /// The old QEMU is gone and a new, verified one runs.
    pub performed: bool,
    /// `qm`, `ha-manager`, `libvirt`, `command` (or the configured one when refused).
    pub method: String,
    pub vmid: VmId,
    pub old_pid: i32,
    pub new_pid: Option<i32>,
    /// The tool SIGKILLed the old QEMU itself (the manager's stop did not end it).
    pub escalated: bool,
    /// Whether the old QEMU ended (false: it still runs, or its state is unknown).
    pub old_stopped: bool,
    /// `restarted`, `running-old` (nothing changed), `down` (stopped, not started),
    /// `unverified` (started, not proven), `stuck` (old QEMU did not die).
    pub vm_state: String,
    /// `query-status` of the new QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp_status: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// [`RestartError::kind`].
    pub error_kind: Option<String>,
    #[serde(skip)]
    pub exit: Option<Exit>,
    pub archive: Option<String>,
    pub actions: Vec<RecordedAction>,
}

impl RestartOutcome {
    /// The exit code a failed or refused restart overrides the run's with; `None` when
    /// it was performed.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }
}

/// The small per-VM state file that carries the cooldown across runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CooldownState {
    /// When this tool last began to stop the VM.
    pub last_attempt_at: DateTime<Utc>,
    pub old_pid: i32,
    pub new_pid: Option<i32>,
    pub performed: bool,
    pub archive: Option<String>,
}

/// `<out>/restart-state/<VMID>.json`.
pub fn cooldown_path(out: &Path, vmid: VmId) -> PathBuf {
    out.join("restart-state").join(format!("{vmid}.json"))
}

/// `Some(age)` of the last attempt when it lies within `cooldown`.
pub fn cooldown_active(
    out: &Path,
    vmid: VmId,
    cooldown: Duration,
    now: DateTime<Utc>,
) -> Option<(Duration, CooldownState)> {
    let text = std::fs::read_to_string(cooldown_path(out, vmid)).ok()?;
    let st: CooldownState = serde_json::from_str(&text).ok()?;
    let age = (now - st.last_attempt_at).to_std().unwrap_or(Duration::ZERO);
    (age < cooldown).then_some((age, st))
}

pub(super) fn write_cooldown(out: &Path, vmid: VmId, st: &CooldownState) -> std::io::Result<()> {
    let p = cooldown_path(out, vmid);
    std::fs::create_dir_all(p.parent().expect("has parent"))?;
    archive::write_durable(&p, &serde_json::to_vec_pretty(st).expect("state serializes"))
}

/// `<archive>.restart.json`.
pub fn outcome_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".restart.json");
    PathBuf::from(s)
}
