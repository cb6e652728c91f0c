//! `--then-restart`: a full stop→start of the VM, only after its evidence is sealed.
//!
//! A guest reboot is no fix for a wedged QEMU (it reuses the wedged process), and the
//! 2026-06-11 recovery (`kill` + `qm start`) destroyed the evidence. So the restart here:
//!
//! 1. **Gate** ([`gate`]): runs only when the archive is sealed, and re-verifies it
//!    (read back, every hash checked) right before anything is stopped.
//! 2. **Refusals**: a VM listed in `<pve-dir>/ha/resources.cfg` is not stopped behind
//!    the HA manager's back (unless `--allow-ha`, which goes through `ha-manager`); a
//!    VM restarted less than `cooldown` ago is not restarted again (unless `--force`).
//! 3. **Stop** through one [`RestartMethod`] (`qm`, `ha-manager`, `libvirt`, `command`)
//!    under the tool's own deadline. If the proven old QEMU is still alive afterwards,
//!    it is SIGKILLed through a pidfd, after [`Target::still_same`] proved again that
//!    the pid is still that process. A process that does not exit (D state) is
//!    reported and no second QEMU is started on top of it.
//! 4. **Start** through the same method, then **verify**: a new process, proven by the
//!    same rule as the capture ([`target::resolve`]), whose QMP answers `query-status`.
//!
//! Every action is timed and recorded in a [`RestartOutcome`], written durably next to
//! the archive as `<archive>.restart.json`. Once the first stop command has been issued,
//! a Ctrl-C no longer aborts: stopping half-way would leave the VM down.

pub mod command;
pub mod libvirt;
pub mod qm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::{self, Sealed};
use crate::cancel::Cancel;
use crate::config::{parse_duration, Settings};
use crate::error::{Error, Exit};
use crate::exec;
use crate::qmp::{QmpClient, QmpConfig};
use crate::target::{self, Layout, Target, VmId};

/// Test-only hook (documented in tests/restart.rs): when set to a path `P`, the run
/// writes `P.ready` (the old pid) right before the kill decision and waits up to 120 s
/// for `P.go` to exist. Lets a test replace the process behind the old pid, to prove
/// that [`Target::still_same`] guards the kill. Recorded as an action when used.
pub const TEST_HOOK_ENV: &str = "WEDGE_AUTOPSY_TEST_HOOK_BEFORE_KILL";

/// Which backend stops and starts the VM (`[restart] method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodKind {
    Qm,
    Libvirt,
    Command,
}

/// The `[restart]` table as written. Strict: an unknown key is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    method: Option<MethodKind>,
    timeout: Option<String>,
    stop_deadline: Option<String>,
    kill_wait: Option<String>,
    start_timeout: Option<String>,
    verify_timeout: Option<String>,
    verify_qmp: Option<bool>,
    cooldown: Option<String>,
    ha_manager: Option<PathBuf>,
    virsh: Option<PathBuf>,
    stop: Option<Vec<String>>,
    start: Option<Vec<String>>,
}

/// The validated `[restart]` settings, with flags applied.
#[derive(Debug, Clone)]
pub struct RestartConfig {
    pub method: MethodKind,
    /// Graceful stop time given to the manager (`qm stop --timeout`), default 30 s.
    pub timeout: Duration,
    /// The tool's own deadline on the stop command; default `timeout` + 45 s (qm's lock
    /// wait, its SIGTERM grace and its SIGKILL wait). When it passes, the command's
    /// process group is killed and the tool SIGKILLs the proven QEMU itself.
    pub stop_deadline: Duration,
    /// How long a SIGKILLed QEMU gets to disappear before it is reported (default 10 s).
    pub kill_wait: Duration,
    /// Deadline of the start command (default 60 s).
    pub start_timeout: Duration,
    /// How long to wait for the new QEMU to be proven and answer QMP (default 60 s).
    pub verify_timeout: Duration,
    /// Whether the new QEMU must answer `query-status` (default true; libvirt holds
    /// its own monitor, so set false there).
    pub verify_qmp: bool,
    /// Minimum time between two restarts of one VM (default 30 min; `--force` overrides).
    pub cooldown: Duration,
    pub qm: PathBuf,
    pub ha_manager: PathBuf,
    pub virsh: PathBuf,
    /// `method = "command"`: argv templates with `{vmid}` and `{pid}`.
    pub stop: Vec<String>,
    pub start: Vec<String>,
}

/// Restart-related flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--force`: ignore the cooldown.
    pub force: bool,
    /// `--allow-ha`: an HA-managed VM is restarted through `ha-manager`.
    pub allow_ha: bool,
    /// `--restart-timeout`: overrides `restart.timeout`.
    pub timeout: Option<String>,
    /// `--qm`: overrides the top-level `qm` key.
    pub qm: Option<PathBuf>,
}

impl RestartConfig {
    /// Validates the `[restart]` table (`None` = all defaults) and applies the flags.
    /// Errors are one line naming the key; nothing has been touched when they occur.
    pub fn from_settings(settings: &Settings, opts: &Options) -> Result<RestartConfig, Error> {
        let bad = |m: String| Error::BadInput(format!("config [restart]: {m}"));
        let raw: RawConfig = match &settings.restart {
            None => RawConfig::default(),
            Some(t) => {
                toml::Value::Table(t.clone()).try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?
            }
        };
        let dur = |key: &str, v: Option<&String>, default: Duration| -> Result<Duration, Error> {
            match v {
                Some(t) => parse_duration(t).map_err(|e| bad(format!("{key}: {e}"))),
                None => Ok(default),
            }
        };
        let timeout = match &opts.timeout {
            Some(t) => parse_duration(t).map_err(|e| Error::BadInput(format!("--restart-timeout: {e}")))?,
            None => dur("timeout", raw.timeout.as_ref(), Duration::from_secs(30))?,
        };
        let method = raw.method.unwrap_or(MethodKind::Qm);
        let cfg = RestartConfig {
            method,
            timeout,
            stop_deadline: dur("stop_deadline", raw.stop_deadline.as_ref(), timeout + Duration::from_secs(45))?,
            kill_wait: dur("kill_wait", raw.kill_wait.as_ref(), Duration::from_secs(10))?,
            start_timeout: dur("start_timeout", raw.start_timeout.as_ref(), Duration::from_secs(60))?,
            verify_timeout: dur("verify_timeout", raw.verify_timeout.as_ref(), Duration::from_secs(60))?,
            verify_qmp: raw.verify_qmp.unwrap_or(true),
            cooldown: dur("cooldown", raw.cooldown.as_ref(), Duration::from_secs(30 * 60))?,
            qm: opts.qm.clone().unwrap_or_else(|| settings.qm.clone()),
            ha_manager: raw.ha_manager.unwrap_or_else(|| "ha-manager".into()),
            virsh: raw.virsh.clone().unwrap_or_else(|| "virsh".into()),
            stop: raw.stop.clone().unwrap_or_default(),
            start: raw.start.clone().unwrap_or_default(),
        };
        if cfg.stop_deadline.is_zero() || cfg.start_timeout.is_zero() || cfg.verify_timeout.is_zero() {
            return Err(bad("stop_deadline, start_timeout and verify_timeout must be longer than 0".into()));
        }
        match method {
            MethodKind::Command => {
                command::validate("stop", raw.stop.as_deref()).map_err(bad)?;
                command::validate("start", raw.start.as_deref()).map_err(bad)?;
            }
            _ if raw.stop.is_some() || raw.start.is_some() => {
                return Err(bad(
                    "stop/start argv lists are only used with method = \"command\"; remove them or set the method"
                        .into(),
                ))
            }
            _ => {}
        }
        if method != MethodKind::Libvirt && raw.virsh.is_some() {
            return Err(bad("virsh is only used with method = \"libvirt\"".into()));
        }
        Ok(cfg)
    }
}

/// One timed action of a restart, as recorded in `restart.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Action {
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
    pub actions: Vec<Action>,
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
    ) -> &mut Action {
        let a = Action {
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
            eprintln!(
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
    pub fn run(&mut self, action: &str, argv: Vec<String>, timeout: Duration) -> Ran {
        let at = Utc::now();
        let started = Instant::now();
        // A fresh Cancel: once stopping has begun, a signal must not abort half-way.
        let result = exec::run(&exec::Spec::new(argv.clone(), timeout), &Cancel::new());
        let ran = match result {
            Err(e) => Ran::Error(e.to_string()),
            Ok(out) if out.timed_out => Ran::TimedOut(format!(
                "`{}` did not finish within {}; its process group was killed",
                argv.join(" "),
                crate::qmp::secs(timeout)
            )),
            Ok(out) if out.success() => Ran::Ok(tail(&out.stdout)),
            Ok(out) => Ran::Failed(
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
            Ran::Ok(o) => {
                (true, if o.is_empty() { "exit 0".to_string() } else { format!("exit 0: {o}") }, Some(0), false)
            }
            Ran::Failed(c, m) => (false, m.clone(), Some(*c), false),
            Ran::TimedOut(m) => (false, m.clone(), None, true),
            Ran::Error(m) => (false, m.clone(), None, false),
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
pub enum Ran {
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
fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.char_indices().rev().nth(299).map(|(i, _)| i).unwrap_or(0);
    crate::qmp::one_line(&s[start..], 300)
}

/// What the stop step reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopResult {
    /// The manager says the VM is stopped.
    Done,
    /// The manager did not finish within the tool's deadline (its command was killed).
    TimedOut(String),
    /// The manager refused or failed (e.g. the VM is locked by a backup or migration).
    Failed(String),
}

/// What a backend is given about the VM.
pub struct VmRef<'a> {
    pub vmid: VmId,
    /// The proven old QEMU.
    pub old: &'a Target,
    pub cfg: &'a RestartConfig,
}

/// A way to stop and start a VM. Implementations only run the manager's commands
/// (argv only, under deadlines, recorded); the gate, the proven SIGKILL and the
/// verification are the caller's, the same for every backend.
pub trait RestartMethod: Send + Sync {
    /// `qm`, `ha-manager`, `libvirt`, `command`.
    fn name(&self) -> &'static str;
    /// One line per command, for `--dry-run`.
    fn plan(&self, vm: &VmRef) -> Vec<String>;
    /// Asks the manager to stop the VM for good (not a guest reboot).
    fn stop(&self, vm: &VmRef, rec: &mut Recorder) -> StopResult;
    /// Asks the manager to start the VM; `Err` is a one-line reason.
    fn start(&self, vm: &VmRef, rec: &mut Recorder) -> Result<(), String>;
}

/// Picks the backend: `ha-manager` for an HA-managed VM (only with `--allow-ha`; the
/// caller refuses otherwise), else `[restart] method`.
pub fn method_for(cfg: &RestartConfig, ha: bool, old: &Target) -> Result<Box<dyn RestartMethod>, RestartError> {
    if ha {
        return Ok(Box::new(qm::HaManager { bin: cfg.ha_manager.clone() }));
    }
    Ok(match cfg.method {
        MethodKind::Qm => Box::new(qm::Qm { bin: cfg.qm.clone() }),
        MethodKind::Libvirt => {
            Box::new(libvirt::Libvirt::for_target(cfg.virsh.clone(), old).map_err(RestartError::Setup)?)
        }
        MethodKind::Command => Box::new(command::CommandMethod { stop: cfg.stop.clone(), start: cfg.start.clone() }),
    })
}

/// Why a requested restart did not complete. One line each, naming the next step.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestartError {
    #[error(
        "not restarted: the archive was not sealed, so nothing was stopped; fix the seal error above and run again"
    )]
    NotSealed,
    #[error("not restarted: the sealed archive failed its re-verification ({0}); nothing was stopped; check the disk under --out")]
    Verify(String),
    #[error("not restarted: VM {vmid} is HA-managed ({path}); stopping it behind the HA manager's back would fight it. Re-run with --allow-ha to go through ha-manager, or use `ha-manager set vm:{vmid} --state stopped`")]
    HaManaged { vmid: VmId, path: String },
    #[error("not restarted: cannot tell whether VM {vmid} is HA-managed: {detail}; nothing was stopped")]
    HaUnknown { vmid: VmId, detail: String },
    #[error("not restarted: VM {vmid} was restarted by this tool {ago} ago (cooldown {cooldown}, state {path}); nothing was stopped. Pass --force to restart anyway")]
    Cooldown { vmid: VmId, ago: String, cooldown: String, path: String },
    #[error("not restarted: interrupted before anything was stopped")]
    Interrupted,
    #[error("not restarted: {0}")]
    Setup(String),
    #[error("stop failed and the old QEMU (pid {pid}) is still running; nothing was killed or started: {detail}. Check the VM's state with its manager (`qm status`, `virsh domstate`) and why it refused")]
    StopFailed { pid: i32, detail: String },
    #[error("the old QEMU (pid {pid}) did not exit within {secs}s after SIGKILL (state {state}, wchan {wchan}); no new QEMU was started on top of it. Inspect /proc/{pid}/stack; only a host reboot may free it")]
    Survived { pid: i32, secs: u64, state: char, wchan: String },
    #[error("the old QEMU (pid {pid}, state {state}) still runs after the stop but could not be proven again (same start time, command line unreadable or changed), so it was not killed and nothing was started; check `cat /proc/{pid}/cmdline` and kill it by hand")]
    NotProven { pid: i32, state: char },
    #[error("the old QEMU (pid {pid}) outlived the stop and could not be killed: {detail}; nothing was started. Kill it by hand after checking `cat /proc/{pid}/cmdline`")]
    KillFailed { pid: i32, detail: String },
    #[error(
        "the old QEMU is gone but the start failed: {0}; VM is DOWN: start it with `qm start` once the cause is fixed"
    )]
    StartFailed(String),
    #[error("the start command succeeded but the new QEMU could not be verified: {0}; check `qm status` and the VM's console")]
    VerifyNew(String),
    #[error("not restarted: {0}")]
    NotAdvised(String),
}

impl RestartError {
    /// A short machine-readable kind for `restart.json`.
    pub fn kind(&self) -> &'static str {
        match self {
            RestartError::NotSealed => "not-sealed",
            RestartError::Verify(_) => "archive-verify",
            RestartError::HaManaged { .. } => "ha-managed",
            RestartError::HaUnknown { .. } => "ha-unknown",
            RestartError::Cooldown { .. } => "cooldown",
            RestartError::Interrupted => "interrupted",
            RestartError::Setup(_) => "setup",
            RestartError::StopFailed { .. } => "stop-failed",
            RestartError::Survived { .. } => "survived-kill",
            RestartError::KillFailed { .. } => "kill-failed",
            RestartError::NotProven { .. } => "not-proven",
            RestartError::StartFailed(_) => "start-failed",
            RestartError::VerifyNew(_) => "verify-new",
            RestartError::NotAdvised(_) => "not-advised",
        }
    }

    /// Cooldown is "try later" ([`Exit::Busy`], as documented there); a seal failure
    /// keeps its own code; everything else is [`Exit::RestartFailed`].
    pub fn exit(&self) -> Exit {
        match self {
            RestartError::NotSealed | RestartError::Verify(_) => Exit::SealFailed,
            RestartError::Cooldown { .. } => Exit::Busy,
            _ => Exit::RestartFailed,
        }
    }
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
    pub actions: Vec<Action>,
}

impl RestartOutcome {
    /// The exit code a failed or refused restart overrides the run's with; `None` when
    /// it was performed.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }
}

/// Everything [`run`] needs; owned so it can move to a blocking thread.
#[derive(Debug, Clone)]
pub struct Request {
    pub cfg: RestartConfig,
    pub opts: Options,
    pub layout: Layout,
    /// Where the new QEMU is looked for and how it is proven: the runbook's `[target]`.
    pub spec: target::TargetSpec,
    pub out: PathBuf,
    pub quiet: bool,
    /// Time base of the progress lines on stderr.
    pub t0: Instant,
}

impl Request {
    pub fn new(settings: &Settings, opts: Options, quiet: bool) -> Result<Request, Error> {
        Ok(Request {
            cfg: RestartConfig::from_settings(settings, &opts)?,
            opts,
            layout: Layout {
                run_dir: settings.run_dir.clone(),
                pve_dir: settings.pve_dir.clone(),
                node: settings.node.clone(),
            },
            spec: target::TargetSpec::proxmox(),
            out: settings.out.clone(),
            quiet,
            t0: Instant::now(),
        })
    }
}

/// The gate: the archive exists, and reading it back still matches the manifest and
/// the hash reported at sealing time.
pub fn gate(sealed: Option<&Sealed>) -> Result<archive::VerifyReport, RestartError> {
    let sealed = sealed.ok_or(RestartError::NotSealed)?;
    let report = archive::verify(&sealed.path).map_err(|e| RestartError::Verify(e.to_string()))?;
    if report.sha256 != sealed.sha256 {
        return Err(RestartError::Verify(format!(
            "{} now hashes to {}, not {} as sealed",
            sealed.path.display(),
            report.sha256,
            sealed.sha256
        )));
    }
    Ok(report)
}

/// `<pve-dir>/ha/resources.cfg`.
pub fn ha_resources_path(pve_dir: &Path) -> PathBuf {
    pve_dir.join("ha").join("resources.cfg")
}

/// Whether `vm: <vmid>` is a section header in HA's `resources.cfg`. A missing file
/// means no HA; an unreadable one is an error (we cannot prove the VM is not managed).
pub fn ha_managed(pve_dir: &Path, vmid: VmId) -> Result<bool, String> {
    let path = ha_resources_path(pve_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(ha_lists(&text, vmid))
}

fn ha_lists(text: &str, vmid: VmId) -> bool {
    text.lines().any(|line| {
        // Section headers start at column 0; properties are indented.
        if line.starts_with(char::is_whitespace) {
            return false;
        }
        let Some((kind, id)) = line.split_once(':') else { return false };
        kind.trim() == "vm" && id.trim() == vmid.to_string()
    })
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

fn write_cooldown(out: &Path, vmid: VmId, st: &CooldownState) -> std::io::Result<()> {
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

/// The restart plan for `--dry-run`, appended to the capture plan.
pub fn plan(req: &Request, vmid: VmId, old: Option<&Target>) -> String {
    let mut o = String::from("restart (--then-restart), only after the archive above is sealed and verified again:\n");
    o.push_str(&format!(
        "  lock      {} held from the first capture to the end of the restart\n",
        crate::lock::lock_path(&req.out, vmid).display()
    ));
    let cd = match cooldown_active(&req.out, vmid, req.cfg.cooldown, Utc::now()) {
        Some((age, _)) if !req.opts.force => format!(
            "IN FORCE: last restart {} ago, within {}; it would be refused (--force overrides)",
            human(age),
            human(req.cfg.cooldown)
        ),
        Some((age, _)) => format!("last restart {} ago, overridden by --force", human(age)),
        None => format!("{} between restarts; none recorded within it", human(req.cfg.cooldown)),
    };
    o.push_str(&format!("  cooldown  {cd}\n"));
    let ha = ha_managed(&req.layout.pve_dir, vmid);
    let ha_line = match &ha {
        Ok(false) => "not HA-managed".to_string(),
        Ok(true) if req.opts.allow_ha => "HA-managed: through ha-manager (--allow-ha)".to_string(),
        Ok(true) => "HA-managed: REFUSED without --allow-ha".to_string(),
        Err(e) => format!("unknown ({e}): refused"),
    };
    o.push_str(&format!("  ha        {ha_line}\n"));
    let Some(old) = old else {
        o.push_str("  (no proven target: the restart plan needs the running QEMU)\n");
        return o;
    };
    let vm = VmRef { vmid, old, cfg: &req.cfg };
    match method_for(&req.cfg, matches!(ha, Ok(true)), old) {
        Ok(m) => {
            for line in m.plan(&vm) {
                o.push_str(&format!("  {line}\n"));
            }
        }
        Err(e) => o.push_str(&format!("  method    {e}\n")),
    }
    o.push_str(&format!(
        "  kill      if pid {} is still alive: prove it again (start time + cmdline), SIGKILL through a pidfd, wait {}; a process that does not exit is reported and nothing is started\n",
        old.pid,
        human(req.cfg.kill_wait)
    ));
    o.push_str(&format!(
        "  verify    a new process proven by pidfile/QMP socket, not pid {}{}, within {}\n",
        old.pid,
        if req.cfg.verify_qmp { ", answering query-status" } else { "" },
        human(req.cfg.verify_timeout)
    ));
    o
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(if d.is_zero() { 0 } else { 1 }))).to_string()
}

/// Performs the restart after an autopsy: gate, refusals, stop, proven kill, start,
/// verification, records. Blocking; call it from a plain thread or `spawn_blocking`
/// (the QMP check uses the current tokio runtime if there is one). Never panics on a
/// failure: every failure is `error` in the outcome.
/// The outcome of a restart refused before anything was done (the evidence does not
/// allow it): recorded like any other, with the VM untouched.
pub fn refuse(req: &Request, old: &Target, sealed: Option<&Sealed>, err: RestartError) -> RestartOutcome {
    let mut o = untouched(req, old, sealed, Utc::now());
    o.error = Some(err.to_string());
    o.error_kind = Some(err.kind().into());
    o.exit = Some(err.exit());
    o
}

/// The outcome before anything was done: the old QEMU still runs, nothing recorded yet.
fn untouched(req: &Request, old: &Target, sealed: Option<&Sealed>, started_at: DateTime<Utc>) -> RestartOutcome {
    RestartOutcome {
        requested: true,
        performed: false,
        method: req.cfg.method_name().into(),
        vmid: old.vmid,
        old_pid: old.pid,
        new_pid: None,
        escalated: false,
        old_stopped: false,
        vm_state: "running-old".into(),
        qmp_status: None,
        started_at,
        duration_ms: 0,
        error: None,
        error_kind: None,
        exit: None,
        archive: sealed.map(|s| s.path.display().to_string()),
        actions: Vec::new(),
    }
}

pub fn run(req: &Request, old: &Target, sealed: Option<&Sealed>, cancel: &Cancel) -> RestartOutcome {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let mut rec = Recorder::new(req.quiet, req.t0);
    let mut o = untouched(req, old, sealed, started_at);
    let result = drive(req, old, sealed, cancel, &mut rec, &mut o);
    if let Err(e) = &result {
        o.error = Some(e.to_string());
        o.error_kind = Some(e.kind().into());
        o.exit = Some(e.exit());
    }
    o.duration_ms = t0.elapsed().as_millis() as u64;
    if o.old_stopped {
        let st = CooldownState {
            last_attempt_at: started_at,
            old_pid: old.pid,
            new_pid: o.new_pid,
            performed: o.performed,
            archive: o.archive.clone(),
        };
        let at = Utc::now();
        let s = Instant::now();
        match write_cooldown(&req.out, old.vmid, &st) {
            Ok(()) => rec.push(
                at,
                s,
                "record",
                true,
                format!("cooldown state {}", cooldown_path(&req.out, old.vmid).display()),
            ),
            Err(e) => rec.push(
                at,
                s,
                "record",
                false,
                format!("cannot write {}: {e}", cooldown_path(&req.out, old.vmid).display()),
            ),
        };
    }
    o.actions = std::mem::take(&mut rec.actions);
    if let Some(s) = sealed {
        let p = outcome_path(&s.path);
        let bytes = serde_json::to_vec_pretty(&o).expect("outcome serializes");
        if let Err(e) = archive::write_durable(&p, &bytes) {
            if !req.quiet {
                eprintln!("wedge-autopsy: warning: cannot write {}: {e}", p.display());
            }
        }
    }
    o
}

impl RestartConfig {
    fn method_name(&self) -> &'static str {
        match self.method {
            MethodKind::Qm => "qm",
            MethodKind::Libvirt => "libvirt",
            MethodKind::Command => "command",
        }
    }
}

fn drive(
    req: &Request,
    old: &Target,
    sealed: Option<&Sealed>,
    cancel: &Cancel,
    rec: &mut Recorder,
    o: &mut RestartOutcome,
) -> Result<(), RestartError> {
    let vmid = old.vmid;
    // 1. The gate, right before anything is stopped.
    let (at, s) = (Utc::now(), Instant::now());
    match gate(sealed) {
        Ok(r) => rec.push(at, s, "verify-archive", true, format!("{} files, sha256 {}", r.files, r.sha256)),
        Err(e) => {
            rec.push(at, s, "verify-archive", false, e.to_string());
            return Err(e);
        }
    };
    // 2. HA.
    let (at, s) = (Utc::now(), Instant::now());
    let ha = match ha_managed(&req.layout.pve_dir, vmid) {
        Ok(h) => h,
        Err(detail) => {
            rec.push(at, s, "ha-check", false, detail.clone());
            return Err(RestartError::HaUnknown { vmid, detail });
        }
    };
    let ha_path = ha_resources_path(&req.layout.pve_dir).display().to_string();
    if ha && !req.opts.allow_ha {
        rec.push(at, s, "ha-check", false, format!("listed in {ha_path}; refused without --allow-ha"));
        return Err(RestartError::HaManaged { vmid, path: ha_path });
    }
    rec.push(
        at,
        s,
        "ha-check",
        true,
        if ha { format!("listed in {ha_path}; through ha-manager (--allow-ha)") } else { "not HA-managed".into() },
    );
    // 3. Cooldown.
    let (at, s) = (Utc::now(), Instant::now());
    match cooldown_active(&req.out, vmid, req.cfg.cooldown, at) {
        Some((age, _)) if !req.opts.force => {
            let e = RestartError::Cooldown {
                vmid,
                ago: human(age),
                cooldown: human(req.cfg.cooldown),
                path: cooldown_path(&req.out, vmid).display().to_string(),
            };
            rec.push(at, s, "cooldown", false, e.to_string());
            return Err(e);
        }
        Some((age, _)) => {
            rec.push(at, s, "cooldown", true, format!("last restart {} ago, overridden by --force", human(age)))
        }
        None => rec.push(at, s, "cooldown", true, format!("no restart within {}", human(req.cfg.cooldown))),
    };
    let method = method_for(&req.cfg, ha, old)?;
    o.method = method.name().into();
    if cancel.is_cancelled() {
        return Err(RestartError::Interrupted);
    }
    // From here on the VM goes down; the cooldown counts from this attempt.
    let vm = VmRef { vmid, old, cfg: &req.cfg };
    let stop = method.stop(&vm, rec);
    test_hook(old, rec);
    // 4. Is the old QEMU still there? Kill it only if it is proven to be the same process.
    let mut kill_error = None;
    if process_exists(old.pid) {
        let escalate = match &stop {
            StopResult::Done | StopResult::TimedOut(_) => true,
            StopResult::Failed(detail) => {
                // Proxmox refused (locked by backup/migration, …): do not go around it.
                if old.still_same() {
                    return Err(RestartError::StopFailed { pid: old.pid, detail: detail.clone() });
                }
                false
            }
        };
        if escalate {
            let (at, s) = (Utc::now(), Instant::now());
            match kill_proven(old) {
                Kill::Sent(how) => {
                    o.escalated = true;
                    rec.push(
                        at,
                        s,
                        "kill",
                        true,
                        format!("SIGKILL to pid {} ({how}) after proving it is still VM {vmid}'s QEMU", old.pid),
                    );
                }
                Kill::NotSame => {
                    rec.push(at, s, "kill", true, format!("pid {} is no longer VM {vmid}'s QEMU (start time or cmdline differ: exited, exiting or reused); not signalled", old.pid));
                }
                Kill::Gone => {
                    rec.push(at, s, "kill", true, format!("pid {} exited before the kill; nothing signalled", old.pid));
                }
                Kill::Error(e) => {
                    rec.push(at, s, "kill", false, format!("SIGKILL to pid {} failed: {e}", old.pid));
                    kill_error = Some(e);
                }
            }
        }
    }
    let (at, s) = (Utc::now(), Instant::now());
    match wait_gone(old, req.cfg.kill_wait) {
        None => {
            o.old_stopped = true;
            o.vm_state = "down".into();
            rec.push(at, s, "wait-exit", true, format!("old QEMU pid {} is gone", old.pid));
        }
        Some((state, wchan)) => {
            let secs = req.cfg.kill_wait.as_secs();
            rec.push(
                at,
                s,
                "wait-exit",
                false,
                format!("pid {} still present after {}s (state {state}, wchan {wchan})", old.pid, secs),
            );
            o.vm_state = "stuck".into();
            return Err(match (stop, kill_error) {
                (_, Some(detail)) => RestartError::KillFailed { pid: old.pid, detail },
                (StopResult::Failed(detail), None) if !o.escalated => RestartError::StopFailed { pid: old.pid, detail },
                _ if !o.escalated => RestartError::NotProven { pid: old.pid, state },
                _ => RestartError::Survived { pid: old.pid, secs, state, wchan },
            });
        }
    }
    // 5. Start and verify.
    if let Err(e) = method.start(&vm, rec) {
        return Err(RestartError::StartFailed(e));
    }
    o.vm_state = "unverified".into();
    let (at, s) = (Utc::now(), Instant::now());
    match verify_new(req, old) {
        Ok((new, status)) => {
            rec.push(
                at,
                s,
                "verify-new",
                true,
                format!(
                    "new pid {} proven by {:?}{}",
                    new.pid,
                    new.proof,
                    status.as_ref().map(|st| format!(", query-status: {st}")).unwrap_or_default()
                ),
            );
            o.new_pid = Some(new.pid);
            o.qmp_status = status;
            o.performed = true;
            o.vm_state = "restarted".into();
            Ok(())
        }
        Err((new_pid, e)) => {
            o.new_pid = new_pid;
            rec.push(at, s, "verify-new", false, e.clone());
            Err(RestartError::VerifyNew(e))
        }
    }
}

/// See [`TEST_HOOK_ENV`].
fn test_hook(old: &Target, rec: &mut Recorder) {
    let Some(p) = std::env::var_os(TEST_HOOK_ENV) else { return };
    let base = PathBuf::from(p);
    let with = |ext: &str| {
        let mut s = base.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (at, s) = (Utc::now(), Instant::now());
    let _ = std::fs::write(with(".ready"), format!("{}\n", old.pid));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !with(".go").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    rec.push(at, s, "test-hook", true, format!("paused before the kill decision ({TEST_HOOK_ENV}; tests only)"));
}

/// Whether any process (other than a zombie) has this pid.
fn process_exists(pid: i32) -> bool {
    matches!(crate::procfs::parse_stat_file(&format!("/proc/{pid}/stat")), Ok(s) if s.state != 'Z' && s.state != 'X')
}

/// Waits until the old process (pid + start time) is gone or a zombie. `None` when
/// gone; otherwise its state letter and wchan.
fn wait_gone(old: &Target, limit: Duration) -> Option<(char, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let st = crate::procfs::parse_stat_file(&format!("/proc/{}/stat", old.pid));
        match st {
            Ok(s) if s.starttime == old.starttime && s.state != 'Z' && s.state != 'X' => {
                if Instant::now() >= deadline {
                    let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", old.pid)).unwrap_or_default();
                    return Some((s.state, if wchan.is_empty() { "-".into() } else { wchan }));
                }
            }
            _ => return None,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

enum Kill {
    Sent(&'static str),
    NotSame,
    Gone,
    Error(String),
}

/// SIGKILL to the old QEMU, only if it is still proven to be it. The pidfd is opened
/// first, then the proof is repeated, then the signal goes through the pidfd: the
/// check and the kill refer to the same process even if the pid is reused meanwhile.
fn kill_proven(old: &Target) -> Kill {
    // SAFETY: plain syscalls with integer arguments; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, old.pid, 0) } as i32;
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Kill::Gone,
            Some(libc::ENOSYS) => {
                // Kernel < 5.3: prove, then kill(2) at once (a small reuse window remains).
                if !old.still_same() {
                    return Kill::NotSame;
                }
                // SAFETY: kill(2) on a pid proven an instant ago.
                if unsafe { libc::kill(old.pid, libc::SIGKILL) } == 0 {
                    Kill::Sent("kill(2); no pidfd on this kernel")
                } else {
                    Kill::Error(std::io::Error::last_os_error().to_string())
                }
            }
            _ => Kill::Error(format!("pidfd_open: {err}")),
        };
    }
    let result = if !old.still_same() {
        Kill::NotSame
    } else {
        // SAFETY: fd is a pidfd we own; no siginfo; flags 0.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if r == 0 {
            Kill::Sent("pidfd_send_signal")
        } else {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                Kill::Gone
            } else {
                Kill::Error(format!("pidfd_send_signal: {err}"))
            }
        }
    };
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
}

/// Waits for a new QEMU proven by the same rule as the capture, other than `old`, and
/// (if configured) for its `query-status`. `Err` carries a new pid if one was seen.
fn verify_new(req: &Request, old: &Target) -> Result<(Target, Option<String>), (Option<i32>, String)> {
    let deadline = Instant::now() + req.cfg.verify_timeout;
    let mut last_err;
    let new = loop {
        match target::resolve_with(old.vmid, &req.layout, &req.spec) {
            Ok(t) if t.pid == old.pid && t.starttime == old.starttime => {
                last_err = format!("the pidfile still names the old QEMU (pid {})", old.pid)
            }
            Ok(t) => break t,
            Err(e) => last_err = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err((None, format!("no new proven QEMU within {}: {last_err}", human(req.cfg.verify_timeout))));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Through virsh (libvirt) the socket is libvirtd's: the proof is the verification.
    if !req.cfg.verify_qmp || new.monitor != target::Monitor::Socket {
        return Ok((new, None));
    }
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
    let socket = new.qmp_socket.clone();
    let fut = async move {
        let cfg = QmpConfig { connect_budget: left, ..QmpConfig::default() };
        let mut c = QmpClient::connect(&socket, &cfg).await.map_err(|e| e.to_string())?;
        let r = c.execute("query-status", None, left.min(Duration::from_secs(10))).await.map_err(|e| e.to_string())?;
        Ok::<String, String>(r.value.get("status").and_then(|s| s.as_str()).unwrap_or("?").to_string())
    };
    let status = match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(fut),
        Err(_) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(fut),
            Err(e) => Err(e.to_string()),
        },
    };
    match status {
        Ok(st) => Ok((new, Some(st))),
        Err(e) => Err((
            Some(new.pid),
            format!("new pid {} does not answer query-status on {}: {e}", new.pid, new.qmp_socket.display()),
        )),
    }
}

#[cfg(test)]
mod tests;
