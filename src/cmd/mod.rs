//! The command layer: one file per subcommand. Each turns parsed flags into the library's
//! plain option structs, calls the library, prints, and returns the exit code (or an
//! [`Error`](wedge_autopsy::error::Error) that knows its own). Clap lives here only.

pub mod audit;
pub mod autopsy;
pub mod cli;
pub mod diagnose;
pub mod generate;
pub mod inspect;
pub mod prune;
pub mod runbook;
pub mod serve;
pub mod signatures;
pub mod stacks;

use wedge_autopsy::config::{Overrides, Settings};
use wedge_autopsy::error::Error;

/// The settings every command runs with. The whole file is checked here, every section,
/// whichever command runs: a typo under `[restart]` or `[serve]` fails `wedge-autopsy 102
/// --dry-run` as it would fail the restart or the service, with one line naming the file.
pub fn load_settings(o: &Overrides) -> Result<Settings, Error> {
    let s = Settings::load(o)?;
    let file = s.config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    if s.restart.is_some() {
        wedge_autopsy::restart::RestartConfig::from_settings(&s, &Default::default()).map_err(|e| {
            let e = e.to_string();
            Error::BadInput(format!("config {file}: {}", e.strip_prefix("config ").unwrap_or(&e)))
        })?;
    }
    if let Some(t) = &s.serve {
        wedge_autopsy::serve::config::check(t).map_err(|e| Error::BadInput(format!("config {file}: {e}")))?;
    }
    Ok(s)
}
