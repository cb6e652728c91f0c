//! `wedge-autopsy signatures list|show|check`: the known-bug signatures in use.

use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::signatures;

use crate::cmd::cli::SignaturesAction;

pub fn run(action: SignaturesAction, settings: &Settings) -> Result<Exit, Error> {
    match action {
        SignaturesAction::List => print!("{}", signatures::list_text(&signatures::load(&settings.signature_dir))),
        SignaturesAction::Show { id } => print!(
            "{}",
            signatures::show_text(&id, &settings.signature_dir).ok_or_else(|| Error::BadInput(format!(
                "no signature with id {id:?}; `wedge-autopsy signatures list` shows them"
            )))?
        ),
        SignaturesAction::Check { files } => {
            return Ok(crate::cmd::check_files(&files, |text, name| {
                signatures::parse(text, name).map(|s| format!("{} {}, fixed in: {}", s.kind, s.id, s.fixed_in()))
            }))
        }
    }
    Ok(Exit::Ok)
}
