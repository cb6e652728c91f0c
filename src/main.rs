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
use wedge_autopsy::retention;
use wedge_autopsy::runbook;
use wedge_autopsy::target::VmId;

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
    let ui = wedge_autopsy::logging::init(&ui::Env::detect(), cli.autopsy.quiet, cli.global.verbose, cli.global.log_format);
    let result = Settings::load(&cli.global.overrides()).and_then(|settings| match cli.command {
        None => autopsy_cmd(&cli.autopsy, &settings, &ui),
        Some(Command::Prune(args)) => retention::prune_cmd(&args, &settings),
        Some(Command::Generate { .. }) => unreachable!("handled above"),
        Some(Command::Runbook { action }) => runbook_cmd(action, &settings),
        Some(Command::Diagnose { vmid, window, min_idle, json }) => diagnose_cmd(&vmid, window, min_idle, json, settings),
        Some(Command::Audit { json }) => audit_cmd(json, &settings),
        Some(Command::Inspect { archive, verify, json, cat }) => inspect_cmd(&archive, verify, json, cat.as_deref()),
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
    let Some(vmid) = args.vmid.as_deref() else {
        return Err(Error::BadInput("a VMID is required: wedge-autopsy <VMID> (see --help)".into()));
    };
    let vmid: VmId = vmid.parse().map_err(Error::Target)?;
    let rb_name = args.runbook.clone().or(settings.runbook.clone()).unwrap_or_else(|| runbook::DEFAULT.into());
    let runbook = runbook::load(&rb_name, &settings.runbook_dir).map_err(|e| Error::BadInput(e.to_string()))?;
    let stacks = args.stacks.map(|s| match s {
        StacksArg::Native => vec!["native".to_string(), "gdb".to_string()],
        StacksArg::Gdb => vec!["gdb".to_string()],
        StacksArg::None => vec![],
    });
    let req = Request {
        vmid,
        runbook,
        stacks,
        no_qmp: args.no_qmp,
        trigger: Trigger::manual(args.reason.clone()),
        command_line: std::env::args().collect(),
    };
    if args.dry_run {
        let target = autopsy::prepare(&req, settings).ok();
        print!("{}", autopsy::plan(&req, settings, target.as_ref()));
        match retention::check_floor(&settings.out, settings.retention.min_free) {
            Ok(free) => println!("free space: {} under {} (min_free {})", retention::human_bytes(free), settings.out.display(), retention::human_bytes(settings.retention.min_free)),
            Err(e) => println!("would refuse: {e}"),
        }
        return Ok(Exit::Ok);
    }
    let target = autopsy::prepare(&req, settings)?;
    retention::check_floor(&settings.out, settings.retention.min_free).map_err(|e| Error::Seal(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
    let report = rt.block_on(async {
        let cancel = Cancel::new();
        autopsy::cancel_on_signals(&cancel).map_err(anyhow::Error::from)?;
        let display: Box<dyn autopsy::Progress> = match ui.display {
            Display::None => Box::new(Silent),
            Display::Lines => Box::new(StderrLines::new()),
            Display::Live { color } => Box::new(render::live::LiveSteps::new(color, ui.verbose)),
        };
        let traced = render::Traced { vmid: vmid.get() };
        let progress = render::Tee(display.as_ref(), &traced);
        autopsy::run(&req, settings, target, &progress, &cancel).await
    })?;
    if let Some(s) = &report.sealed {
        retention::after_run(settings, &s.path, ui.display != Display::None);
    }
    if !args.json && !args.quiet {
        let mut summary = report.summary.clone();
        summary.archive = report.sealed.as_ref().map(|s| render::summary::ArchiveFacts {
            name: s.path.display().to_string(),
            size: s.size,
            sha256: s.sha256.clone(),
        });
        let _ = writeln!(std::io::stdout(), "\n{}", render::summary::markdown(&summary));
    }
    if args.json {
        // Ignore EPIPE: the archive is sealed whether or not anyone reads this.
        let _ = writeln!(std::io::stdout(), "{}", render::autopsy_json(&report));
    }
    if let Some(e) = &report.seal_error {
        let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: the archive could not be sealed: {e}");
    }
    Ok(report.exit())
}

fn diagnose_cmd(vmid: &str, window: Option<String>, min_idle: Option<String>, json: bool, mut settings: Settings) -> Result<Exit, Error> {
    let vmid: VmId = vmid.parse().map_err(Error::Target)?;
    if let Some(w) = window {
        settings.sample_interval = config::parse_duration(&w).map_err(|e| Error::BadInput(format!("--window: {e}")))?;
    }
    if let Some(m) = min_idle {
        settings.min_idle = config::parse_duration(&m).map_err(|e| Error::BadInput(format!("--min-idle: {e}")))?;
    }
    let runbook = runbook::load("diagnose", &settings.runbook_dir).map_err(|e| Error::BadInput(e.to_string()))?;
    let req = Request { vmid, runbook, stacks: None, no_qmp: false, trigger: Trigger::manual(None), command_line: std::env::args().collect() };
    let target = autopsy::prepare(&req, &settings)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
    let (d, _) = rt.block_on(async {
        let cancel = Cancel::new();
        autopsy::cancel_on_signals(&cancel).map_err(anyhow::Error::from)?;
        autopsy::diagnose_live(&req, &settings, &target, &cancel).await
    })?;
    if json {
        println!("{}", serde_json::json!({"vmid": vmid, "pid": target.pid, "verdict": d.verdict, "facts": d.facts, "findings": d.findings}));
    } else {
        println!("VM {vmid} (pid {}): {}", target.pid, d.verdict);
        for f in &d.facts {
            println!("  - {f}");
        }
    }
    Ok(Exit::Verdict(d.verdict.exit_code()))
}

fn audit_cmd(json: bool, settings: &Settings) -> Result<Exit, Error> {
    let vms = diagnose::audit::audit_dir(&settings.pve_dir.join("qemu-server")).map_err(Error::BadInput)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms).map_err(anyhow::Error::from)?);
        return Ok(Exit::Ok);
    }
    for vm in &vms {
        let flags = vm.risks.len() + vm.unlike_neighbours.len() + vm.pending.len();
        println!("VM {}{}: {}", vm.vmid, vm.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(), if flags == 0 { "ok" } else { "flagged" });
        for r in &vm.risks {
            println!("  risk     {}", r.what);
        }
        for u in &vm.unlike_neighbours {
            println!("  unlike   {u}");
        }
        for p in &vm.pending {
            println!("  pending  {p} (applies only after a full stop→start)");
        }
    }
    Ok(Exit::Ok)
}

fn runbook_cmd(action: RunbookAction, settings: &Settings) -> Result<Exit, Error> {
    match action {
        RunbookAction::List => {
            for (name, source) in runbook::list(&settings.runbook_dir) {
                let desc = runbook::load(&name, &settings.runbook_dir).map(|r| r.description).unwrap_or_else(|e| format!("INVALID: {e}"));
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
                .ok_or_else(|| Error::BadInput(format!("no runbook named {name:?}; `wedge-autopsy runbook list` shows them")))?;
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

fn inspect_cmd(path: &std::path::Path, verify: bool, json: bool, cat: Option<&str>) -> Result<Exit, Error> {
    if verify {
        let r = archive::verify(path).map_err(|e| Error::Seal(e.to_string()))?;
        if !json {
            println!("verified: {} files, sha256 {}", r.files, r.sha256);
        }
    }
    let reader = ArchiveReader::open(path).map_err(|e| Error::BadInput(e.to_string()))?;
    if let Some(p) = cat {
        let bytes = reader.read(p).ok_or_else(|| Error::BadInput(format!("{p} is not in the archive; --json lists the files")))?;
        std::io::stdout().write_all(&bytes).map_err(anyhow::Error::from)?;
        return Ok(Exit::Ok);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reader.manifest).map_err(anyhow::Error::from)?);
        return Ok(Exit::Ok);
    }
    let m = &reader.manifest;
    match reader.read_string("summary.md") {
        Some(md) => print!("{md}"),
        None => println!("VM {} pid {} on {} (no summary.md in this archive)", m.vmid.unwrap_or(0), m.pid.unwrap_or(0), m.host),
    }
    // The verdict is recomputed from the sealed evidence, with this version's rules.
    let d = diagnose::diagnose(&reader, &m.steps, &diagnose::Rules::default());
    println!("\nRecomputed from the archive: {}", d.verdict);
    println!("\nFiles ({}):", m.files.len());
    for f in &m.files {
        println!("  {:>10}  {}  {}", f.size, &f.sha256[..12], f.path);
    }
    Ok(Exit::Ok)
}
