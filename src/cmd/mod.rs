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

/// `runbook check` and `signatures check`: each file read and given to `parse` (its text
/// and its name for error positions), which returns the detail of a good file or its
/// errors. "FILE: ok (detail)" per good file on stdout, every error on stderr; exit 2
/// when any file is bad, so a CI job can gate on it.
pub fn check_files<E: std::fmt::Display>(
    files: &[std::path::PathBuf],
    parse: impl Fn(&str, &str) -> Result<String, E>,
) -> wedge_autopsy::error::Exit {
    let mut bad = 0;
    for f in files {
        match std::fs::read_to_string(f) {
            Ok(text) => match parse(&text, &f.display().to_string()) {
                Ok(detail) => println!("{}: ok ({detail})", f.display()),
                Err(errs) => {
                    bad += 1;
                    eprintln!("{errs}");
                }
            },
            Err(e) => {
                bad += 1;
                eprintln!("{}: cannot read: {e}", f.display());
            }
        }
    }
    if bad == 0 {
        wedge_autopsy::error::Exit::Ok
    } else {
        wedge_autopsy::error::Exit::BadInput
    }
}
