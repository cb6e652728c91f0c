//! `[restart]`: the table as written, validated into [`RestartConfig`], with the
//! restart flags ([`Options`]) applied on top.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::error::Error;
use crate::units::parse_duration;

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
                super::command::validate("stop", raw.stop.as_deref()).map_err(bad)?;
                super::command::validate("start", raw.start.as_deref()).map_err(bad)?;
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

impl RestartConfig {
    pub(super) fn method_name(&self) -> &'static str {
        match self.method {
            MethodKind::Qm => "qm",
            MethodKind::Libvirt => "libvirt",
            MethodKind::Command => "command",
        }
    }
}
