//! Logging setup: tracing events to stderr as text or JSON lines, or to the systemd
//! journal with structured fields, as [`crate::render::ui::choose`] decided.
//!
//! Under systemd the journal is the better sink: each step's `STEP`, `VMID`, `STATUS`
//! and `DURATION_MS` become journal fields (`journalctl -u wedge-autopsy STEP=seal`), with
//! priorities from the level; plain text through the stream would lose them. JSON lines
//! on stderr are for anything else that ingests logs (`--log-format json`).

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::render::live::SuspendingStderr;
use crate::render::ui::{Display, LogSink, Ui};
use crate::render::STEP_TARGET;

fn level(n: u8) -> LevelFilter {
    match n {
        0 => LevelFilter::ERROR,
        1 => LevelFilter::WARN,
        2 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    }
}

/// Installs the global subscriber for `ui`. Returns the plan actually in force: when the
/// journal cannot be reached, text lines on stderr (and the plain step display) instead.
pub fn init(mut ui: Ui) -> Ui {
    let mut filter = Targets::new().with_default(level(ui.level));
    if !ui.step_events {
        filter = filter.with_target(STEP_TARGET, LevelFilter::OFF);
    }
    if ui.log == LogSink::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_field_prefix(None).with_syslog_identifier("wedge-autopsy".into());
                let _ = tracing_subscriber::registry().with(layer.with_filter(filter)).try_init();
                return ui;
            }
            Err(_) => {
                ui.log = LogSink::Text { color: false };
                if ui.display == Display::None && ui.level > 0 {
                    ui.display = Display::Lines;
                }
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(|| SuspendingStderr).with_target(false);
    let _ = match ui.log {
        LogSink::Json => tracing_subscriber::registry().with(fmt.json().flatten_event(true).with_filter(filter)).try_init(),
        LogSink::Text { color } => tracing_subscriber::registry().with(fmt.with_ansi(color).with_filter(filter)).try_init(),
        LogSink::Journald => unreachable!("handled above"),
    };
    ui
}

use tracing_subscriber::Layer as _;
