//! `wedge-autopsy serve`: the HTTP service, wired to the real restart.

use std::sync::Arc;

use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::serve;

pub fn run(listen: Option<String>, settings: Settings) -> Result<Exit, Error> {
    let restarter = Arc::new(serve::restart::Wired { settings: settings.clone() });
    serve::serve(listen, settings, restarter)
}
