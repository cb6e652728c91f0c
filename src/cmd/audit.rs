//! `wedge-autopsy audit`: every VM config on this node, risk stack and odd ones out, and
//! for each running QEMU whether a wedge could be pinned to a line.

use wedge_autopsy::config::Settings;
use wedge_autopsy::diagnose;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render;

pub fn run(json: bool, settings: &Settings) -> Result<Exit, Error> {
    let mut vms = diagnose::audit::audit_dir(&settings.pve_dir.join("qemu-server")).map_err(Error::BadInput)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let search = wedge_autopsy::stacks::native::DebugSearch { dirs: settings.debug_dirs.clone() };
    let layout = wedge_autopsy::target::Layout {
        run_dir: settings.run_dir.clone(),
        pve_dir: settings.pve_dir.clone(),
        node: settings.node.clone(),
    };
    let running = rt.block_on(diagnose::pinnable::running(&layout, &search, Default::default()));
    diagnose::audit::attach_running(&mut vms, running);
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(Exit::Ok);
    }
    print!("{}", render::audit_text(&vms));
    Ok(Exit::Ok)
}
