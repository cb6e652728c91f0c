//! `wedge-autopsy audit`: every VM config on this node, risk stack and odd ones out.

use wedge_autopsy::config::Settings;
use wedge_autopsy::diagnose;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render;

pub fn run(json: bool, settings: &Settings) -> Result<Exit, Error> {
    let vms = diagnose::audit::audit_dir(&settings.pve_dir.join("qemu-server")).map_err(Error::BadInput)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(Exit::Ok);
    }
    print!("{}", render::audit_text(&vms));
    Ok(Exit::Ok)
}
