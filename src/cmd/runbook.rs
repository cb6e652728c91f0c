//! `wedge-autopsy runbook list|show|check|schema`.

use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::runbook;

use crate::cmd::cli::RunbookAction;

pub fn run(action: RunbookAction, settings: &Settings) -> Result<Exit, Error> {
    match action {
        RunbookAction::List => {
            for (name, source) in runbook::list(&settings.runbook_dir) {
                let desc = runbook::load(&name, &settings.runbook_dir)
                    .map(|r| r.description)
                    .unwrap_or_else(|e| format!("INVALID: {e}"));
                println!("{name:<20} {source:<40} {desc}");
            }
            Ok(Exit::Ok)
        }
        RunbookAction::Show { name } => {
            let path = settings.runbook_dir.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&name)
                .or_else(|_| std::fs::read_to_string(&path))
                .ok()
                .or_else(|| runbook::BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, t)| t.to_string()))
                .ok_or_else(|| {
                    Error::BadInput(format!("no runbook named {name:?}; `wedge-autopsy runbook list` shows them"))
                })?;
            print!("{text}");
            Ok(Exit::Ok)
        }
        RunbookAction::Schema => {
            println!("{}", serde_json::to_string_pretty(&runbook::json_schema())?);
            Ok(Exit::Ok)
        }
        RunbookAction::Check { files } => Ok(crate::cmd::check_files(&files, |text, name| {
            runbook::parse(text, name).map(|rb| format!("{} steps", rb.steps.len()))
        })),
    }
}
