//! `wedge-autopsy diagnose VMID` and `diagnose --all`: verdicts for live VMs, no archive;
//! exit by verdict (the worst one's with `--all`).

use std::io::Write;

use serde_json::{json, Value};
use wedge_autopsy::archive::manifest::Trigger;
use wedge_autopsy::autopsy::{self, sweep, Request};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::config::Settings;
use wedge_autopsy::diagnose::Diagnosis;
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
    apply_knobs(&mut settings, window, min_idle)?;
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
        println!("{}", verdict_json(vmid, target.pid, &d));
    } else {
        print!("{}", render::diagnose_text(vmid, target.pid, &d));
    }
    Ok(Exit::Verdict(d.exit_code()))
}

/// `diagnose --all`: every running VM in one sweep; a line (or JSON object) per VM, in
/// VMID order. Exit: the worst verdict's code; a VM that could not be diagnosed (it
/// stopped meanwhile, or cannot be proven) counts above healthy and below every other
/// verdict, with its error's code.
pub fn run_all(
    parallel: usize,
    window: Option<String>,
    min_idle: Option<String>,
    json: bool,
    mut settings: Settings,
) -> Result<Exit, Error> {
    apply_knobs(&mut settings, window, min_idle)?;
    runbook::load("diagnose", &settings.runbook_dir)?;
    let vmids = sweep::running_vms(&settings.run_dir);
    if vmids.is_empty() {
        let _ = writeln!(
            std::io::stderr(),
            "wedge-autopsy: diagnose --all: no running VM on this node (no <VMID>.pid in {})",
            settings.run_dir.display()
        );
        return Ok(Exit::Ok);
    }
    let opts = sweep::Options {
        parallel,
        stuck: wedge_autopsy::stuck::process().clone(),
        trigger: Trigger::manual(Some("diagnose --all".into())),
        command_line: std::env::args().collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let rows = rt.block_on(async {
        let cancel = Cancel::new();
        autopsy::cancel_on_signals(&cancel)?;
        sweep::sweep(&vmids, &settings, &opts, &cancel).await
    })?;
    // (severity, exit): an error ranks between healthy (0) and the first real verdict.
    let mut worst: (u8, Exit) = (0, Exit::Verdict(0));
    let mut out = std::io::stdout().lock();
    for (vmid, row) in &rows {
        let (rank, exit) = match row {
            Ok(c) => {
                let line = if json {
                    let mut v = verdict_json(*vmid, c.pid, &c.diagnosis);
                    v["samples"] = json!(c.samples);
                    format!("{v}\n")
                } else {
                    render::sweep_line(*vmid, c.pid, &c.diagnosis)
                };
                let _ = out.write_all(line.as_bytes());
                let d = &c.diagnosis;
                (if d.severity() == 0 { 0 } else { d.severity() * 2 + 1 }, Exit::Verdict(d.exit_code()))
            }
            Err(e) => {
                let line = if json {
                    format!("{}\n", json!({"vmid": vmid, "error": e.to_string(), "exit": e.exit().code()}))
                } else {
                    format!("VM {vmid}: not diagnosed: {e}\n")
                };
                let _ = out.write_all(line.as_bytes());
                (1, e.exit())
            }
        };
        if rank > worst.0 {
            worst = (rank, exit);
        }
    }
    Ok(worst.1)
}

/// `--window` and `--min-idle` into the settings.
fn apply_knobs(settings: &mut Settings, window: Option<String>, min_idle: Option<String>) -> Result<(), Error> {
    if let Some(w) = window {
        settings.sample_interval = parse_duration(&w).map_err(|e| Error::BadInput(format!("--window: {e}")))?;
    }
    if let Some(m) = min_idle {
        settings.min_idle = parse_duration(&m).map_err(|e| Error::BadInput(format!("--min-idle: {e}")))?;
    }
    Ok(())
}

/// One VM's verdict as `diagnose --json` prints it.
fn verdict_json(vmid: VmId, pid: i32, d: &Diagnosis) -> Value {
    json!({"vmid": vmid, "pid": pid, "verdict": d.verdict, "strength": d.strength, "layer": d.layer, "restart": d.restart_advice(), "facts": d.facts, "disks": d.disks, "findings": d.findings})
}
