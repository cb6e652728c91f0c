//! `wedge-autopsy`: parse arguments, dispatch to the subcommand in [`cmd`], map the outcome
//! to an exit code. Every exit code comes from [`Exit`] or from the error's own type.

mod cmd;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use cmd::cli::{Cli, Command};
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render::ui;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { Exit::BadInput.code() } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let read_only = match &cli.command {
        None => cli.autopsy.dry_run,
        // The service writes to sockets and hooks whose readers may go away mid-answer.
        Some(Command::Serve { .. }) => false,
        Some(_) => true,
    };
    if read_only {
        // Read-only commands end quietly when their reader goes away (`| head`), as
        // coreutils do. The autopsy keeps Rust's default (SIGPIPE ignored, EPIPE ignored
        // by every write): a closed pipe must not stop a seal.
        // SAFETY: called before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Some(Command::Generate { what }) = &cli.command {
        // Build-time assets: independent of any installed config.
        return finish(cmd::generate::run(what));
    }
    let ui =
        wedge_autopsy::logging::init(&ui::Env::detect(), cli.autopsy.quiet, cli.global.verbose, cli.global.log_format);
    let result = cmd::load_settings(&cli.global.overrides()).and_then(|settings| {
        // Broken operator signatures are reported, never a reason to skip a capture.
        for e in wedge_autopsy::signatures::configure(&settings.signature_dir) {
            tracing::warn!("signature not loaded: {e}");
        }
        match cli.command {
            None => cmd::autopsy::run(&cli.autopsy, &settings, &ui),
            Some(Command::Prune(args)) => cmd::prune::run(&args, &settings),
            Some(Command::Generate { .. }) => unreachable!("handled above"),
            Some(Command::Runbook { action }) => cmd::runbook::run(action, &settings),
            Some(Command::Signatures { action }) => cmd::signatures::run(action, &settings),
            Some(Command::Diagnose { vmid, all, parallel, window, min_idle, json }) => match vmid {
                Some(vmid) if !all => cmd::diagnose::run(&vmid, window, min_idle, json, settings),
                _ => cmd::diagnose::run_all(parallel as usize, window, min_idle, json, settings),
            },
            Some(Command::Audit { json }) => cmd::audit::run(json, &settings),
            Some(Command::Stacks { pid, json, lines, method }) => cmd::stacks::run(pid, json, lines, method, &settings),
            Some(Command::Inspect { archive, verify, json, cat, resymbolize, qemu_state, qemu_gdb_script }) => {
                let view = cmd::inspect::View::from_flags(cat, resymbolize, qemu_state, qemu_gdb_script);
                cmd::inspect::run(&archive, verify, json, view, &settings)
            }
            Some(Command::Serve { listen }) => cmd::serve::run(listen, settings),
        }
    });
    finish(result)
}

/// The exit code of a finished command; an error is printed on one line first.
fn finish(result: Result<Exit, Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.code()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "wedge-autopsy: error: {e}");
            ExitCode::from(e.exit().code())
        }
    }
}
