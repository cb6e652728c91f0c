//! Logging setup: tracing events to stderr as text or JSON lines, or to the systemd
//! journal with structured fields, as [`crate::render::ui::choose`] decided.
//!
//! Under systemd the journal is the better sink: each step's `STEP`, `VMID`, `STATUS`
//! and `DURATION_MS` become journal fields (`journalctl -u wedge-autopsy STEP=seal`), with
//! priorities from the level; plain text through the stream would lose them. JSON lines
//! on stderr are for anything else that ingests logs (`--log-format json`).

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::render::live::SuspendingStderr;
use crate::render::ui::{choose, Env, LogFormat, LogSink, Ui};
use crate::render::STEP_TARGET;

fn level(n: u8) -> LevelFilter {
    match n {
        0 => LevelFilter::ERROR,
        1 => LevelFilter::WARN,
        2 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    }
}

static JSON_LINES: AtomicBool = AtomicBool::new(false);

/// Whether stderr carries JSON lines (`--log-format json`): code that writes its own
/// lines (the service's) must write JSON objects then too.
pub fn json_lines() -> bool {
    JSON_LINES.load(Ordering::Relaxed)
}

/// Chooses the output for `env` and the flags ([`crate::render::ui::choose`]) and installs
/// the global subscriber for it. Returns the plan in force: when the journal cannot be
/// reached, the plan for the same run without a journal (plain lines on stderr).
pub fn init(env: &Env, quiet: bool, verbose: u8, format: Option<LogFormat>) -> Ui {
    let ui = choose(env, quiet, verbose, format);
    let mut filter = Targets::new().with_default(level(ui.level));
    if !ui.step_events {
        filter = filter.with_target(STEP_TARGET, LevelFilter::OFF);
    }
    match ui.log {
        LogSink::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_field_prefix(None).with_syslog_identifier("wedge-autopsy".into());
                let _ = tracing_subscriber::registry().with(layer.with_filter(filter)).try_init();
                ui
            }
            Err(_) => init(&Env { journal: false, ..*env }, quiet, verbose, format),
        },
        LogSink::Json => {
            JSON_LINES.store(true, Ordering::Relaxed);
            let fmt = tracing_subscriber::fmt::layer().with_writer(|| SuspendingStderr).json().flatten_event(true);
            let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).try_init();
            ui
        }
        LogSink::Text { color } => {
            let fmt =
                tracing_subscriber::fmt::layer().with_writer(|| SuspendingStderr).with_target(false).with_ansi(color);
            let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).try_init();
            ui
        }
    }
}

use tracing_subscriber::Layer as _;
