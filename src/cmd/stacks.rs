//! `wedge-autopsy stacks PID`: thread stacks of any process, native snapshot or gdb.

use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::stacks::{self, native, StackError, StackMethod};

use crate::cmd::cli::StacksArg;

pub fn run(pid: i32, json: bool, lines: bool, method: StacksArg, settings: &Settings) -> Result<Exit, Error> {
    let cancel = Cancel::new();
    // A missing process is the pid the operator typed: say how to check it.
    let hint = |e: StackError| match e {
        StackError::NoProcess(_) => Error::BadInput(format!("{e}: check the pid with `ps -p {pid}`")),
        other => other.into(),
    };
    match method {
        StacksArg::None => Err(Error::BadInput("--method none captures nothing: use native or gdb".into())),
        StacksArg::Native => {
            let debug = native::DebugSearch { dirs: settings.debug_dirs.clone() };
            let opts = native::NativeOptions { lines, debug, ..Default::default() };
            let report = native::snapshot_and_unwind(pid, &opts, &cancel).map_err(hint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
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
                debug_dirs: settings.debug_dirs.clone(),
            };
            let (result, restore) =
                stacks::leaving_as_found(pid, &|| true, || stacks::gdb::Gdb::default().capture(&req));
            for n in restore.notes("gdb") {
                eprintln!("wedge-autopsy: {n}");
            }
            let text = std::fs::read_to_string(dir.join("stacks/gdb.txt")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            result.map_err(hint)?;
            print!("{text}");
            Ok(Exit::Ok)
        }
    }
}
