//! `wedge-autopsy diagnose VMID`: the verdict for a live VM, no archive; exit by verdict.

use wedge_autopsy::archive::manifest::Trigger;
use wedge_autopsy::autopsy::{self, Request};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render;
use wedge_autopsy::runbook;
use wedge_autopsy::target::VmId;
use wedge_autopsy::units::parse_duration;

pub fn run(
    vmid: &str,
    window: Option<String>,
    min_idle: Option<String>,
    json: bool,
    mut settings: Settings,
) -> Result<Exit, Error> {
    let vmid: VmId = vmid.parse()?;
    if let Some(w) = window {
        settings.sample_interval = parse_duration(&w).map_err(|e| Error::BadInput(format!("--window: {e}")))?;
    }
    if let Some(m) = min_idle {
        settings.min_idle = parse_duration(&m).map_err(|e| Error::BadInput(format!("--min-idle: {e}")))?;
    }
    let runbook = runbook::load("diagnose", &settings.runbook_dir)?;
    let req = Request {
        vmid,
        runbook,
        stacks: None,
        no_qmp: false,
        trigger: Trigger::manual(None),
        command_line: std::env::args().collect(),
        restart_gate: Default::default(),
    };
    let target = autopsy::prepare(&req, &settings)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (d, _) = rt.block_on(async {
        let cancel = Cancel::new();
        autopsy::cancel_on_signals(&cancel)?;
        autopsy::diagnose_live(&req, &settings, &target, &cancel).await
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({"vmid": vmid, "pid": target.pid, "verdict": d.verdict, "strength": d.strength, "layer": d.layer, "restart": d.restart_advice(), "facts": d.facts, "disks": d.disks, "findings": d.findings})
        );
    } else {
        print!("{}", render::diagnose_text(vmid, target.pid, &d));
    }
    Ok(Exit::Verdict(d.exit_code()))
}
