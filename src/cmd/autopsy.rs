//! `wedge-autopsy VMID…`: prove, capture, seal, optionally restart; one exit code for all.

use std::io::Write;

use wedge_autopsy::archive::{self, manifest::Trigger};
use wedge_autopsy::autopsy::{self, Progress, Request, Silent};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render::ui::{Display, Ui};
use wedge_autopsy::render::{self, StderrLines};
use wedge_autopsy::restart;
use wedge_autopsy::retention;
use wedge_autopsy::runbook::{self, Runbook};
use wedge_autopsy::target::{Target, VmId};
use wedge_autopsy::units::human_bytes;

use crate::cmd::cli::{AutopsyArgs, StacksArg};

pub fn run(args: &AutopsyArgs, settings: &Settings, ui: &Ui) -> Result<Exit, Error> {
    // Every VMID is checked before anything is touched.
    let mut vmids: Vec<VmId> = args.vmids.iter().map(|v| v.parse()).collect::<Result<_, _>>()?;
    if vmids.is_empty() && !args.all_wedged {
        return Err(Error::BadInput("a VMID is required: wedge-autopsy <VMID>… or --all-wedged (see --help)".into()));
    }
    let rb_name = args.runbook.clone().or(settings.runbook.clone()).unwrap_or_else(|| runbook::DEFAULT.into());
    let runbook = runbook::load(&rb_name, &settings.runbook_dir)?;
    // Validated before anything is touched: a bad [restart] table is bad input.
    let restart_req = match args.then_restart {
        true => Some(restart::Request::new(settings, restart_options(args), args.quiet)?),
        false => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let cancel = Cancel::new();
    rt.block_on(async { autopsy::cancel_on_signals(&cancel) })?;
    // VMs named by the operator restart on their word; VMs found by --all-wedged only on proof.
    let named: Vec<VmId> = vmids.clone();
    if args.all_wedged {
        for (vmid, d) in rt.block_on(autopsy::wedged_vms(settings, &cancel)) {
            if !vmids.contains(&vmid) {
                let _ = writeln!(
                    std::io::stderr(),
                    "wedge-autopsy: --all-wedged: VM {vmid} is {}{}",
                    d.verdict,
                    d.strength
                        .map(|s| format!(" ({})", serde_json::to_value(s).unwrap_or_default().as_str().unwrap_or("")))
                        .unwrap_or_default()
                );
                vmids.push(vmid);
            }
        }
        if vmids.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "wedge-autopsy: --all-wedged: no running VM on this node is wedged; nothing captured"
            );
            return Ok(Exit::Ok);
        }
    }
    let req_for = |vmid| request(args, &runbook, vmid, named.contains(&vmid));
    if args.dry_run {
        dry_run(&vmids, &req_for, restart_req.as_ref(), settings);
        return Ok(Exit::Ok);
    }
    // Prove every target first: a refused VMID touches nothing, not even --out.
    let proven: Vec<(VmId, Result<Target, Error>)> =
        vmids.iter().map(|&v| (v, autopsy::prepare(&req_for(v), settings))).collect();
    if proven.iter().any(|(_, t)| t.is_ok()) {
        archive::prepare_out(&settings.out)?;
        retention::check_floor(&settings.out, settings.retention.min_free)?;
    }
    let several = vmids.len() > 1;
    // A live step list for one VM on a terminal; plain prefixed lines for several.
    let display: Box<dyn Progress + Send> = match (ui.display, several) {
        (Display::None, _) => Box::new(Silent),
        (Display::Live { color }, false) => Box::new(render::live::LiveSteps::new(color, ui.verbose)),
        _ => Box::new(StderrLines::new()),
    };
    let lines = display.as_ref();
    let handle = rt.handle();
    let outcomes = autopsy::run_bounded(
        proven,
        args.parallel as usize,
        |(vmid, target): (VmId, Result<Target, Error>)| {
            let (req, restart_req) = (req_for(vmid), restart_req.clone());
            let prefixed = autopsy::Prefixed { prefix: vmid.to_string(), inner: lines };
            let shown: &dyn Progress = if several { &prefixed } else { lines };
            let traced = render::Traced { vmid: vmid.get() };
            let progress = render::Tee(shown, &traced);
            handle.block_on(autopsy::run_with_restart(&req, settings, target?, restart_req, &progress, &cancel))
        },
        || Err(anyhow::anyhow!("capture thread panicked").into()),
    );
    let mut worst = Exit::Ok;
    for (vmid, result) in vmids.iter().zip(&outcomes) {
        worst = worst.worse(report(args, settings, ui, several, *vmid, result));
    }
    Ok(worst)
}

/// The request for one VM; the same for every VM of the run but its id and whether the
/// operator named it (a restart on their word) or `--all-wedged` found it (only on proof).
fn request(args: &AutopsyArgs, runbook: &Runbook, vmid: VmId, named: bool) -> Request {
    let stacks = args.stacks.map(|s| match s {
        StacksArg::Native => vec!["native".to_string(), "gdb".to_string()],
        StacksArg::Gdb => vec!["gdb".to_string()],
        StacksArg::None => vec![],
    });
    Request {
        vmid,
        runbook: runbook.clone(),
        stacks,
        no_qmp: args.no_qmp,
        trigger: Trigger::manual(args.reason.clone()),
        command_line: std::env::args().collect(),
        restart_gate: if named {
            autopsy::RestartGate::Operator
        } else {
            autopsy::RestartGate::Automatic { allow_suspected: args.restart_suspected }
        },
    }
}

/// `--dry-run`: the plan for every VM and the free-space check; touches nothing.
fn dry_run(vmids: &[VmId], req_for: &dyn Fn(VmId) -> Request, restart_req: Option<&restart::Request>, s: &Settings) {
    for vmid in vmids {
        let req = req_for(*vmid);
        let target = autopsy::prepare(&req, s).ok();
        print!("{}", autopsy::plan(&req, s, target.as_ref()));
        if let Some(r) = restart_req {
            print!("{}", restart::plan(r, *vmid, target.as_ref()));
        }
    }
    match retention::check_floor(&s.out, s.retention.min_free) {
        Ok(free) => println!(
            "free space: {} under {} (min_free {})",
            human_bytes(free),
            s.out.display(),
            human_bytes(s.retention.min_free)
        ),
        Err(e) => println!("would refuse: {e}"),
    }
}

/// Prints one VM's result (summary or JSON on stdout, errors on stderr), applies
/// retention after a sealed run, and returns the VM's exit code.
fn report(
    args: &AutopsyArgs,
    settings: &Settings,
    ui: &Ui,
    several: bool,
    vmid: VmId,
    result: &Result<autopsy::Outcome, Error>,
) -> Exit {
    match result {
        Ok(o) => {
            // Retention after the restart, so pruning never delays one.
            if let Some(s) = &o.report.sealed {
                retention::after_run(&settings.out, &settings.retention, &s.path, ui.display != Display::None);
            }
            // Output ignores EPIPE: the archive is sealed whether or not anyone reads it.
            if args.json {
                let _ = writeln!(std::io::stdout(), "{}", o.json());
            } else if !args.quiet {
                let _ = writeln!(std::io::stdout(), "\n{}", wedge_autopsy::summary::markdown(&o.summary()));
            }
            for e in o.errors() {
                let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {e}");
            }
            o.exit()
        }
        Err(e) => {
            let prefix = if several { format!("VM {vmid}: ") } else { String::new() };
            let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {prefix}{e}");
            if args.json && several {
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    serde_json::json!({"vmid": vmid, "error": e.to_string(), "exit": e.exit().code()})
                );
            }
            e.exit()
        }
    }
}

fn restart_options(args: &AutopsyArgs) -> restart::Options {
    restart::Options {
        force: args.force,
        allow_ha: args.allow_ha,
        timeout: args.restart_timeout.clone(),
        qm: args.qm.clone(),
    }
}
