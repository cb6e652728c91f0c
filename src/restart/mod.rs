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
pub mod config;
mod drive;
pub mod guards;
pub mod libvirt;
pub mod qm;
pub mod record;

pub use config::{MethodKind, Options, RestartConfig};
#[cfg(feature = "test-hooks")]
pub use drive::TEST_HOOK_ENV;
pub use drive::{predict, refuse, run};
pub use guards::{gate, ha_managed, ha_resources_path};
pub use record::{
    cooldown_active, cooldown_path, outcome_path, CommandEnd, CooldownState, RecordedAction, Recorder, RestartOutcome,
};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::config::Settings;
use crate::error::{Error, Exit};
use crate::target::{self, Layout, Target, VmId};

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

/// Everything [`run`] needs; owned so it can move to a blocking thread.
#[derive(Debug, Clone)]
pub struct RestartParams {
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

impl RestartParams {
    pub fn new(settings: &Settings, opts: Options, quiet: bool) -> Result<RestartParams, Error> {
        Ok(RestartParams {
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

/// The restart plan for `--dry-run`, appended to the capture plan.
pub fn plan(req: &RestartParams, vmid: VmId, old: Option<&Target>) -> String {
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

pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(if d.is_zero() { 0 } else { 1 }))).to_string()
}

#[cfg(test)]
mod tests;
