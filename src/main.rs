//! `wedge-autopsy`: parse arguments, call the library, map the outcome to an exit code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use wedge_autopsy::archive::manifest::Trigger;
use wedge_autopsy::archive::{self, ArchiveReader, Evidence};
use wedge_autopsy::autopsy::{self, Request, Silent};
use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::cli::{AutopsyArgs, Cli, Command, RunbookAction, StacksArg};
use wedge_autopsy::config::{self, Settings};
use wedge_autopsy::diagnose;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render::ui::{self as ui, Display, Ui};
use wedge_autopsy::render::{self, StderrLines};
use wedge_autopsy::restart;
use wedge_autopsy::retention;
use wedge_autopsy::runbook;
use wedge_autopsy::target::{Target, VmId};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { Exit::BadInput.code() } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.command.is_some() {
        // Read-only subcommands end quietly when their reader goes away (`| head`). The
        // autopsy keeps Rust's default (SIGPIPE ignored): a closed pipe must not stop a seal.
        // SAFETY: called before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Some(Command::Generate { what }) = &cli.command {
        // Build-time assets: independent of any installed config.
        return finish(wedge_autopsy::gen::generate_cmd(what));
    }
    let ui =
        wedge_autopsy::logging::init(&ui::Env::detect(), cli.autopsy.quiet, cli.global.verbose, cli.global.log_format);
    let result = Settings::load(&cli.global.overrides()).and_then(|settings| match cli.command {
        None => autopsy_cmd(&cli.autopsy, &settings, &ui),
        Some(Command::Prune(args)) => retention::prune_cmd(&args, &settings),
        Some(Command::Generate { .. }) => unreachable!("handled above"),
        Some(Command::Runbook { action }) => runbook_cmd(action, &settings),
        Some(Command::Diagnose { vmid, window, min_idle, json }) => {
            diagnose_cmd(&vmid, window, min_idle, json, settings)
        }
        Some(Command::Audit { json }) => audit_cmd(json, &settings),
        Some(Command::Stacks { pid, json, lines, method }) => stacks_cmd(pid, json, lines, method),
        Some(Command::Inspect { archive, verify, json, cat, resymbolize, qemu_state, qemu_gdb_script }) => {
            let view = if resymbolize {
                InspectView::Resymbolize
            } else if qemu_state {
                InspectView::QemuState(qemu_gdb_script)
            } else {
                InspectView::Summary(cat)
            };
            inspect_cmd(&archive, verify, json, view, &settings)
        }
        Some(Command::Serve { listen }) => wedge_autopsy::serve::main(listen, settings),
    });
    finish(result)
}

fn finish(result: Result<Exit, Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.code()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {e}");
            ExitCode::from(e.exit().code())
        }
    }
}

fn autopsy_cmd(args: &AutopsyArgs, settings: &Settings, ui: &Ui) -> Result<Exit, Error> {
    // Every VMID is checked before anything is touched.
    let mut vmids: Vec<VmId> = args.vmids.iter().map(|v| v.parse().map_err(Error::Target)).collect::<Result<_, _>>()?;
    if vmids.is_empty() && !args.all_wedged {
        return Err(Error::BadInput("a VMID is required: wedge-autopsy <VMID>… or --all-wedged (see --help)".into()));
    }
    let rb_name = args.runbook.clone().or(settings.runbook.clone()).unwrap_or_else(|| runbook::DEFAULT.into());
    let runbook = runbook::load(&rb_name, &settings.runbook_dir).map_err(|e| Error::BadInput(e.to_string()))?;
    // Validated before anything is touched: a bad [restart] table is bad input.
    let restart_req = match args.then_restart {
        true => Some(restart::Request::new(settings, restart_options(args), args.quiet)?),
        false => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let cancel = Cancel::new();
    rt.block_on(async { autopsy::cancel_on_signals(&cancel) }).map_err(anyhow::Error::from)?;
    if args.all_wedged {
        for vmid in rt.block_on(autopsy::wedged_vms(settings, &cancel)) {
            if !vmids.contains(&vmid) {
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
    let stacks = args.stacks.map(|s| match s {
        StacksArg::Native => vec!["native".to_string(), "gdb".to_string()],
        StacksArg::Gdb => vec!["gdb".to_string()],
        StacksArg::None => vec![],
    });
    let req_for = |vmid| Request {
        vmid,
        runbook: runbook.clone(),
        stacks: stacks.clone(),
        no_qmp: args.no_qmp,
        trigger: Trigger::manual(args.reason.clone()),
        command_line: std::env::args().collect(),
    };
    if args.dry_run {
        for vmid in &vmids {
            let req = req_for(*vmid);
            let target = autopsy::prepare(&req, settings).ok();
            print!("{}", autopsy::plan(&req, settings, target.as_ref()));
            if let Some(r) = &restart_req {
                print!("{}", restart::plan(r, *vmid, target.as_ref()));
            }
        }
        match retention::check_floor(&settings.out, settings.retention.min_free) {
            Ok(free) => println!(
                "free space: {} under {} (min_free {})",
                retention::human_bytes(free),
                settings.out.display(),
                retention::human_bytes(settings.retention.min_free)
            ),
            Err(e) => println!("would refuse: {e}"),
        }
        return Ok(Exit::Ok);
    }
    // Prove every target first: a refused VMID touches nothing, not even --out.
    let proven: Vec<(VmId, Result<Target, Error>)> =
        vmids.iter().map(|&v| (v, autopsy::prepare(&req_for(v), settings))).collect();
    if proven.iter().any(|(_, t)| t.is_ok()) {
        archive::prepare_out(&settings.out).map_err(|e| Error::BadInput(e.to_string()))?;
        retention::check_floor(&settings.out, settings.retention.min_free).map_err(|e| Error::Seal(e.to_string()))?;
    }
    let several = vmids.len() > 1;
    // A live step list for one VM on a terminal; plain prefixed lines for several.
    let display: Box<dyn autopsy::Progress + Send> = match (ui.display, several) {
        (Display::None, _) => Box::new(Silent),
        (Display::Live { color }, false) => Box::new(render::live::LiveSteps::new(color, ui.verbose)),
        _ => Box::new(StderrLines::new()),
    };
    let lines = display.as_ref();
    let vmids_in_order: Vec<VmId> = proven.iter().map(|(v, _)| *v).collect();
    let handle = rt.handle();
    let outcomes = autopsy::run_bounded(
        proven,
        args.parallel as usize,
        |(vmid, target): (VmId, Result<Target, Error>)| {
            let (req, restart_req) = (req_for(vmid), restart_req.clone());
            let prefixed = autopsy::Prefixed { prefix: vmid.to_string(), inner: lines };
            let shown: &dyn autopsy::Progress = if several { &prefixed } else { lines };
            let traced = render::Traced { vmid: vmid.get() };
            let progress = render::Tee(shown, &traced);
            handle.block_on(autopsy::run_with_restart(&req, settings, target?, restart_req, &progress, &cancel))
        },
        || Err(anyhow::anyhow!("capture thread panicked").into()),
    );
    let results: Vec<(VmId, Result<autopsy::Outcome, Error>)> = vmids_in_order.into_iter().zip(outcomes).collect();
    let mut worst = Exit::Ok;
    for (vmid, result) in &results {
        let code = match result {
            Ok(o) => {
                // Retention after the restart, so pruning never delays one.
                if let Some(s) = &o.report.sealed {
                    retention::after_run(settings, &s.path, ui.display != Display::None);
                }
                // Output ignores EPIPE: the archive is sealed whether or not anyone reads it.
                if args.json {
                    let _ = writeln!(std::io::stdout(), "{}", o.json());
                } else if !args.quiet {
                    let _ = writeln!(std::io::stdout(), "\n{}", render::summary::markdown(&o.summary()));
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
        };
        worst = worst.worse(code);
    }
    Ok(worst)
}

fn restart_options(args: &AutopsyArgs) -> restart::Options {
    restart::Options {
        force: args.force,
        allow_ha: args.allow_ha,
        timeout: args.restart_timeout.clone(),
        qm: args.qm.clone(),
    }
}

fn diagnose_cmd(
    vmid: &str,
    window: Option<String>,
    min_idle: Option<String>,
    json: bool,
    mut settings: Settings,
) -> Result<Exit, Error> {
    let vmid: VmId = vmid.parse().map_err(Error::Target)?;
    if let Some(w) = window {
        settings.sample_interval = config::parse_duration(&w).map_err(|e| Error::BadInput(format!("--window: {e}")))?;
    }
    if let Some(m) = min_idle {
        settings.min_idle = config::parse_duration(&m).map_err(|e| Error::BadInput(format!("--min-idle: {e}")))?;
    }
    let runbook = runbook::load("diagnose", &settings.runbook_dir).map_err(|e| Error::BadInput(e.to_string()))?;
    let req = Request {
        vmid,
        runbook,
        stacks: None,
        no_qmp: false,
        trigger: Trigger::manual(None),
        command_line: std::env::args().collect(),
    };
    let target = autopsy::prepare(&req, &settings)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
    let (d, _) = rt.block_on(async {
        let cancel = Cancel::new();
        autopsy::cancel_on_signals(&cancel).map_err(anyhow::Error::from)?;
        autopsy::diagnose_live(&req, &settings, &target, &cancel).await
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({"vmid": vmid, "pid": target.pid, "verdict": d.verdict, "facts": d.facts, "findings": d.findings})
        );
    } else {
        print!("{}", render::diagnose_text(vmid, target.pid, &d));
    }
    Ok(Exit::Verdict(d.verdict.exit_code()))
}

fn stacks_cmd(pid: i32, json: bool, lines: bool, method: StacksArg) -> Result<Exit, Error> {
    use wedge_autopsy::stacks::{self, native, StackError, StackMethod};
    let cancel = Cancel::new();
    let map = |e: StackError| match e {
        StackError::NoProcess(_) => Error::BadInput(format!("{e}: check the pid with `ps -p {pid}`")),
        StackError::Permission { .. } => Error::Refused(e.to_string()),
        other => Error::Other(anyhow::anyhow!("{other}")),
    };
    match method {
        StacksArg::None => Err(Error::BadInput("--method none captures nothing: use native or gdb".into())),
        StacksArg::Native => {
            let opts = native::NativeOptions { lines, ..Default::default() };
            let report = native::snapshot_and_unwind(pid, &opts, &cancel).map_err(map)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?);
            } else {
                print!("{}", native::render_text(&report));
            }
            Ok(Exit::Ok)
        }
        StacksArg::Gdb => {
            let dir = std::env::temp_dir().join(format!("wedge-autopsy-stacks-{}", std::process::id()));
            let sink = wedge_autopsy::step::StepSink::new(&dir);
            if stacks::ThreadStates::read(pid).is_err() {
                return Err(Error::BadInput(format!("pid {pid} does not exist: check it with `ps -p {pid}`")));
            }
            let req = stacks::StackRequest {
                pid,
                sink: &sink,
                deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
                cancel: &cancel,
                labels: Default::default(),
                debug_dirs: Vec::new(),
            };
            let (result, restore) =
                stacks::leaving_as_found(pid, &|| true, || stacks::gdb::Gdb::default().capture(&req));
            for n in restore.notes("gdb") {
                eprintln!("wedge-autopsy: {n}");
            }
            let text = std::fs::read_to_string(dir.join("stacks/gdb.txt")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            result.map_err(map)?;
            print!("{text}");
            Ok(Exit::Ok)
        }
    }
}

fn audit_cmd(json: bool, settings: &Settings) -> Result<Exit, Error> {
    let vms = diagnose::audit::audit_dir(&settings.pve_dir.join("qemu-server")).map_err(Error::BadInput)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms).map_err(anyhow::Error::from)?);
        return Ok(Exit::Ok);
    }
    print!("{}", render::audit_text(&vms));
    Ok(Exit::Ok)
}

fn runbook_cmd(action: RunbookAction, settings: &Settings) -> Result<Exit, Error> {
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
            println!("{}", serde_json::to_string_pretty(&runbook::json_schema()).map_err(anyhow::Error::from)?);
            Ok(Exit::Ok)
        }
        RunbookAction::Check { files } => {
            let mut bad = 0;
            for f in &files {
                match std::fs::read_to_string(f) {
                    Ok(text) => match runbook::parse(&text, &f.display().to_string()) {
                        Ok(rb) => println!("{}: ok ({} steps)", f.display(), rb.steps.len()),
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
            Ok(if bad == 0 { Exit::Ok } else { Exit::BadInput })
        }
    }
}

/// What `inspect` shows.
enum InspectView {
    /// The summary, or one file (`--cat`).
    Summary(Option<String>),
    Resymbolize,
    /// `--qemu-state`, with the gdb script path if given.
    QemuState(Option<std::path::PathBuf>),
}

fn inspect_cmd(
    path: &std::path::Path,
    verify: bool,
    json: bool,
    view: InspectView,
    settings: &Settings,
) -> Result<Exit, Error> {
    if verify {
        let r = archive::verify(path).map_err(|e| Error::Seal(e.to_string()))?;
        if !json {
            println!("verified: {} files, sha256 {}", r.files, r.sha256);
        }
    }
    let reader = ArchiveReader::open(path).map_err(|e| Error::BadInput(e.to_string()))?;
    let cat = match view {
        InspectView::Summary(cat) => cat,
        InspectView::Resymbolize => {
            use wedge_autopsy::stacks::resymbolize;
            let opts = resymbolize::ResymbolizeOptions::from_env(settings.debug_dirs.clone());
            let r = resymbolize::resymbolize(&reader, &opts).map_err(|e| Error::BadInput(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(anyhow::Error::from)?);
            } else {
                print!("{}", resymbolize::render(&r));
            }
            return Ok(Exit::Ok);
        }
        InspectView::QemuState(script) => {
            use wedge_autopsy::minicore::qemu_state;
            let opts = qemu_state::Options::new(settings.debug_dirs.clone(), script);
            let r = qemu_state::run(path, &reader, &opts).map_err(|e| Error::BadInput(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(anyhow::Error::from)?);
            } else {
                print!("{}", qemu_state::render(&r));
            }
            return Ok(Exit::Ok);
        }
    };
    if let Some(p) = cat.as_deref() {
        let bytes = reader
            .read(p)
            .ok_or_else(|| Error::BadInput(format!("{p} is not in the archive; --json lists the files")))?;
        std::io::stdout().write_all(&bytes).map_err(anyhow::Error::from)?;
        return Ok(Exit::Ok);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reader.manifest).map_err(anyhow::Error::from)?);
        return Ok(Exit::Ok);
    }
    // Recomputed from the sealed evidence with the idle threshold the run used.
    let min_idle_secs = reader
        .read_json("summary.json")
        .and_then(|v| v["min_idle_secs"].as_f64())
        .unwrap_or(diagnose::DEFAULT_MIN_IDLE_SECS);
    let d = diagnose::diagnose(&reader, &reader.manifest.steps, &diagnose::Rules { min_idle_secs });
    print!("{}", render::inspect_text(&reader, &d));
    Ok(Exit::Ok)
}
