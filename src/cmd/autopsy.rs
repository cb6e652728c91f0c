//! `wedge-autopsy VMID…`: prove, capture, seal, optionally restart; one exit code for all.

use std::io::Write;

use wedge_autopsy::archive::{self, manifest::Trigger};
use wedge_autopsy::autopsy::{self, Progress, Request, Silent};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::lock::VmLock;
use wedge_autopsy::render::ui::{Display, Ui};
use wedge_autopsy::render::{self, StderrLines};
use wedge_autopsy::restart;
use wedge_autopsy::retention;
use wedge_autopsy::retention::Floor;
use wedge_autopsy::runbook::{self, Runbook};
use wedge_autopsy::target::{Target, VmId};
use wedge_autopsy::units::{human_bytes, parse_size};

use crate::cmd::cli::{AutopsyArgs, StacksArg};

pub fn run(args: &AutopsyArgs, settings: &Settings, ui: &Ui) -> Result<Exit, Error> {
    // Every VMID is checked before anything is touched.
    let mut vmids: Vec<VmId> = Vec::new();
    for v in &args.vmids {
        // `102 102` is one VM: a second capture would only find its own lock taken.
        let v: VmId = v.parse()?;
        if !vmids.contains(&v) {
            vmids.push(v);
        }
    }
    if vmids.is_empty() && !args.all_wedged {
        return Err(Error::BadInput("a VMID is required: wedge-autopsy <VMID>… or --all-wedged (see --help)".into()));
    }
    let rb_name = args.runbook.clone().or(settings.runbook.clone()).unwrap_or_else(|| runbook::DEFAULT.into());
    let runbook = runbook::load(&rb_name, &settings.runbook_dir)?;
    let floor = floor(args, settings, &runbook)?;
    // Validated before anything is touched: a bad [restart] table is bad input.
    let restart_req = match args.then_restart {
        true => Some(restart::RestartParams::new(settings, restart_options(args), args.quiet)?),
        false => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let cancel = Cancel::new();
    rt.block_on(async { autopsy::cancel_on_signals(&cancel) })?;
    // VMs named by the operator restart on their word; VMs found by --all-wedged only on proof.
    let named: Vec<VmId> = vmids.clone();
    if args.all_wedged {
        let found = rt.block_on(autopsy::sweep::wedged(settings, args.sweep_parallel as usize, &cancel))?;
        for (vmid, d) in found {
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
        return dry_run(args, &vmids, &req_for, restart_req.as_ref(), settings, &floor);
    }
    // Prove every target first: a refused VMID touches nothing, not even --out.
    let proven: Vec<(VmId, Result<Target, Error>)> =
        vmids.iter().map(|&v| (v, autopsy::prepare(&req_for(v), settings))).collect();
    if proven.iter().any(|(_, t)| t.is_ok()) {
        archive::prepare_out(&settings.out)?;
        retention::check_floor(&settings.out, &floor)?;
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

/// The free space this run needs before it starts: `--min-free`, else `[retention]
/// min_free` when the config sets it, else what the runbook may write.
fn floor(args: &AutopsyArgs, settings: &Settings, runbook: &Runbook) -> Result<Floor, Error> {
    let flag = match &args.min_free {
        Some(t) => Some(parse_size(t).map_err(|e| Error::BadInput(format!("--min-free: {e}")))?),
        None => None,
    };
    let config = settings.min_free_set.zip(settings.config_file.as_deref());
    Ok(Floor::choose(flag, config, (runbook.space_estimate(), &runbook.name)))
}

/// One VM in the `--dry-run` plan: the steps, and the first check the real run would fail.
#[derive(serde::Serialize)]
struct PlannedVm {
    vmid: VmId,
    pid: Option<i32>,
    proof: Option<wedge_autopsy::target::Proof>,
    runbook: String,
    deadline_s: u64,
    steps: Vec<autopsy::PlanStep>,
    archive: String,
    /// The restart plan, line by line, with `--then-restart`.
    restart: Option<Vec<String>>,
    /// The exit code the real run would end with for this VM (before any step's outcome).
    exit: u8,
    /// Why the real run would stop, if it would.
    error: Option<String>,
}

/// `--dry-run`: the real run's checks in its order, up to its first side effect
/// (VMID, proof and node, `--out`, free space, lock, restart HA and cooldown), the plan,
/// and the exit code the real run would have. Creates nothing, signals nothing.
fn dry_run(
    args: &AutopsyArgs,
    vmids: &[VmId],
    req_for: &dyn Fn(VmId) -> Request,
    restart_req: Option<&restart::RestartParams>,
    s: &Settings,
    floor: &Floor,
) -> Result<Exit, Error> {
    let mut vms = Vec::new();
    // Per VM: the first check that failed, as (the real run's exit, its message).
    let mut fails: Vec<Option<(Exit, String)>> = Vec::new();
    for &vmid in vmids {
        let req = req_for(vmid);
        let target = autopsy::prepare(&req, s);
        let t = target.as_ref().ok();
        vms.push(PlannedVm {
            vmid,
            pid: t.map(|t| t.pid),
            proof: t.map(|t| t.proof),
            runbook: format!("{} ({})", req.runbook.name, req.runbook.source),
            deadline_s: req.runbook.deadline.as_secs(),
            steps: autopsy::plan_steps(&req, s, t),
            archive: autopsy::archive_pattern(vmid, s),
            restart: restart_req.map(|r| restart::plan(r, vmid, t).lines().map(str::to_string).collect()),
            exit: 0,
            error: None,
        });
        fails.push(target.err().map(|e| (e.exit(), e.to_string())));
    }
    // As the real run: `--out` and the floor only once some VM is proven; they end the run.
    let mut free = None;
    let mut run_error: Option<Error> = None;
    if fails.iter().any(Option::is_none) {
        match out_usable(&s.out).map_err(Error::from).and_then(|()| Ok(retention::check_floor(&s.out, floor)?)) {
            Ok(f) => free = Some(f),
            Err(e) => run_error = Some(e),
        }
    }
    if run_error.is_none() {
        for (vm, fail) in vms.iter_mut().zip(fails.iter_mut()) {
            if fail.is_none() {
                *fail = VmLock::probe(&s.out, vm.vmid)
                    .err()
                    .map(|e| {
                        let e = Error::from(e);
                        (e.exit(), e.to_string())
                    })
                    .or_else(|| {
                        let r = restart_req?;
                        // A refused restart comes after a seal: 5, not 3; a cooldown is busy.
                        restart::predict(r, vm.vmid).err().map(|e| match e.exit() {
                            Exit::Busy => (Exit::Busy, e.to_string()),
                            _ => (Exit::RestartFailed, e.to_string()),
                        })
                    });
            }
            if let Some((exit, msg)) = fail {
                vm.exit = exit.code();
                vm.error = Some(msg.clone());
            }
        }
    }
    let exit = match &run_error {
        Some(e) => e.exit(),
        None => fails.iter().flatten().fold(Exit::Ok, |w, (e, _)| w.worse(*e)),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "dry_run": true,
            "exit": exit.code(),
            "error": run_error.as_ref().map(|e| e.to_string()),
            "out": s.out,
            "free": free,
            "min_free": floor,
            "vms": vms,
        });
        writeln!(out, "{json}")?;
    } else {
        for vm in &vms {
            write!(out, "runbook {}, deadline {}s, VM {}", vm.runbook, vm.deadline_s, vm.vmid)?;
            match vm.pid {
                Some(pid) => {
                    writeln!(out, ", pid {pid} (proven by {:?})", vm.proof.expect("a proven pid has a proof"))?
                }
                None => writeln!(out)?,
            }
            for st in &vm.steps {
                let opt = if st.optional { " opt" } else { "    " };
                writeln!(out, "  {:<24} {:>5}ms{opt}  {}", st.id, st.timeout_ms, st.what)?;
            }
            writeln!(out, "archive: {} (0600), then read back and hash-checked", vm.archive)?;
            for line in vm.restart.iter().flatten() {
                writeln!(out, "{line}")?;
            }
        }
        match free {
            Some(f) => writeln!(
                out,
                "free space: {} under {}, needs {} ({})",
                human_bytes(f),
                s.out.display(),
                human_bytes(floor.bytes),
                floor.from
            )?,
            None => writeln!(out, "free space: not checked (no VM proven)")?,
        }
        writeln!(out, "dry run: the real run would exit {}", exit.code())?;
    }
    drop(out);
    // The errors the real run would print, on stderr as it would.
    let several = vms.len() > 1;
    if let Some(e) = &run_error {
        let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {e}");
    }
    for vm in vms.iter().filter(|v| run_error.is_none() && v.error.is_some()) {
        let prefix = if several { format!("VM {}: ", vm.vmid) } else { String::new() };
        let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {prefix}{}", vm.error.as_deref().unwrap_or(""));
    }
    Ok(exit)
}

/// Whether [`archive::prepare_out`] would succeed, creating nothing: `out` is a writable
/// directory, or its nearest existing ancestor is one (where it would be created).
fn out_usable(out: &std::path::Path) -> Result<(), archive::ArchiveError> {
    use nix::unistd::{access, AccessFlags};
    let err = |source| archive::ArchiveError::OutDir { dir: out.display().to_string(), source };
    let mut p = out;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => return access(p, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| err(e.into())),
            Ok(_) => return Err(err(std::io::Error::from_raw_os_error(libc::ENOTDIR))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => return Err(err(e)),
            },
            Err(e) => return Err(err(e)),
        }
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
                let _ = writeln!(std::io::stdout(), "\n{}", o.summary_markdown());
            } else if let Some(s) = &o.report.sealed {
                // What a cron job keeps: the archive's path, one line.
                let _ = writeln!(std::io::stdout(), "{}", s.path.display());
            }
            if args.quiet {
                // The progress lines are off: failed steps are said here, one line each.
                for st in o.report.steps.iter().filter(|s| s.status.is_problem()) {
                    let opt = if st.optional { " (optional)" } else { "" };
                    let _ = writeln!(
                        std::io::stderr(),
                        "wedge-autopsy: VM {vmid}: step {}{opt} {}: {}",
                        st.id,
                        st.status,
                        st.error.as_deref().unwrap_or("no detail")
                    );
                }
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
