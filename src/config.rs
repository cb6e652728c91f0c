//! Settings: built-in defaults, overridden by `/etc/wedge-autopsy/config.toml` (or
//! `--config`), overridden by flags. The file is strict: an unknown key is an error, so a
//! typo does not silently fall back to a default on the night it matters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;

pub const DEFAULT_CONFIG: &str = "/etc/wedge-autopsy/config.toml";
pub const DEFAULT_RUN_DIR: &str = "/var/run/qemu-server";
pub const DEFAULT_PVE_DIR: &str = "/etc/pve";
pub const DEFAULT_OUT: &str = "/var/lib/wedge-autopsy";

/// The config file, as written. Sections other subcommands own (`serve`, `restart`)
/// are kept as raw tables and validated by their owners.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub run_dir: Option<PathBuf>,
    pub pve_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub sample_interval: Option<String>,
    pub node: Option<String>,
    pub qm: Option<PathBuf>,
    pub runbook: Option<String>,
    pub runbook_dir: Option<PathBuf>,
    pub min_idle: Option<String>,
    pub serve: Option<toml::Table>,
    pub restart: Option<toml::Table>,
}

/// Flag values; `None` means "not given on the command line".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub pve_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub sample_interval: Option<String>,
    pub node: Option<String>,
}

/// Resolved settings every subcommand uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub run_dir: PathBuf,
    pub pve_dir: PathBuf,
    pub out: PathBuf,
    pub sample_interval: Duration,
    /// This node's name as Proxmox knows it (short hostname unless configured).
    pub node: String,
    pub qm: PathBuf,
    pub runbook: Option<String>,
    pub runbook_dir: PathBuf,
    /// Idle time beyond which frozen I/O counters alone mean a frozen block path.
    pub min_idle: Duration,
    /// The file the settings came from, if any.
    pub config_file: Option<PathBuf>,
    /// The raw `[restart]` table; validated by `restart::RestartConfig`.
    pub restart: Option<toml::Table>,
}

/// Parses `"2s"`, `"500ms"`, `"1m"`, `"0"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration {text:?} ({e}): write e.g. \"2s\", \"500ms\", \"0\""))
}

impl Settings {
    /// Loads the config file (the default path may be absent; an explicit `--config` must
    /// exist) and applies the flags on top.
    pub fn load(o: &Overrides) -> Result<Settings, Error> {
        let (file, config_file) = match &o.config {
            Some(p) => (read_file(p)?, Some(p.clone())),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                (read_file(Path::new(DEFAULT_CONFIG))?, Some(PathBuf::from(DEFAULT_CONFIG)))
            }
            None => (FileConfig::default(), None),
        };
        let interval_text = o.sample_interval.clone().or(file.sample_interval.clone()).unwrap_or_else(|| "2s".into());
        let sample_interval = parse_duration(&interval_text).map_err(|e| Error::BadInput(format!("sample_interval: {e}")))?;
        if sample_interval > Duration::from_secs(60) {
            return Err(Error::BadInput(format!(
                "sample_interval {interval_text} is too long: the VM is down while you wait; use at most 60s"
            )));
        }
        Ok(Settings {
            run_dir: o.run_dir.clone().or(file.run_dir).unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            pve_dir: o.pve_dir.clone().or(file.pve_dir).unwrap_or_else(|| DEFAULT_PVE_DIR.into()),
            out: o.out.clone().or(file.out).unwrap_or_else(|| DEFAULT_OUT.into()),
            sample_interval,
            node: o.node.clone().or(file.node).unwrap_or_else(local_node_name),
            qm: file.qm.unwrap_or_else(|| "qm".into()),
            runbook: file.runbook,
            runbook_dir: file.runbook_dir.unwrap_or_else(|| "/etc/wedge-autopsy/runbooks".into()),
            min_idle: match file.min_idle.as_deref() {
                Some(t) => parse_duration(t).map_err(|e| Error::BadInput(format!("min_idle: {e}")))?,
                None => Duration::from_secs(30),
            },
            config_file,
            restart: file.restart,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::BadInput(format!("cannot read config {}: {e}; fix the path given to --config", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        Error::BadInput(match line {
            Some(l) => format!("config {}:{l}: {msg}", path.display()),
            None => format!("config {}: {msg}", path.display()),
        })
    })
}

/// The short host name, which is what Proxmox uses as the node name.
pub fn local_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "run_dir = \"/file/run\"\nout = \"/file/out\"\nsample_interval = \"500ms\"\n").unwrap();
        let s = Settings::load(&Overrides {
            config: Some(cfg.clone()),
            out: Some("/flag/out".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.run_dir, PathBuf::from("/file/run"));
        assert_eq!(s.out, PathBuf::from("/flag/out"));
        assert_eq!(s.pve_dir, PathBuf::from(DEFAULT_PVE_DIR));
        assert_eq!(s.sample_interval, Duration::from_millis(500));
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "out = \"/x\"\nrundir = \"/typo\"\n").unwrap();
        let err = Settings::load(&Overrides { config: Some(cfg), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("rundir"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("two").is_err());
    }
}
