//! The service's own log lines (job started, sealed, delivery failed…).
//!
//! In: a message that may carry text from outside (alert labels, API reasons, error
//! text). Out: exactly one line on stderr, whatever the message holds: control characters
//! are escaped (`\n`, `\u{1b}`…) so a newline in a label cannot forge a second line, and
//! under `--log-format json` the line is one JSON object like the tracing events.

use std::io::Write;

/// One line whatever `s` holds: see [`crate::render::summary::escape_control`].
pub fn escape(s: &str) -> String {
    crate::render::summary::escape_control(s)
}

/// Writes one service log line (`wedge-autopsy serve: <msg>` or a JSON object).
pub fn line(level: &str, msg: &str) {
    let text = if crate::logging::json_lines() {
        let v = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": level,
            "target": "wedge_autopsy::serve",
            "message": msg,
        });
        format!("{v}\n")
    } else {
        format!("wedge-autopsy serve: {}\n", escape(msg))
    };
    // One write: lines from several tasks never interleave.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `info`-level line; see [`line`].
macro_rules! info {
    ($($arg:tt)*) => { $crate::serve::log::line("INFO", &format!($($arg)*)) };
}
/// `warn`-level line; see [`line`].
macro_rules! warning {
    ($($arg:tt)*) => { $crate::serve::log::line("WARN", &format!($($arg)*)) };
}
pub(crate) use {info, warning as warn_line};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_line_stays_on_the_one_line() {
        let forged = "VM 102: INC\nwedge-autopsy serve: job 999 VM 102: sealed healthy\r\x1b[2K\u{2028}x\\n";
        let e = escape(forged);
        assert!(!e.contains('\n') && !e.contains('\r') && !e.contains('\x1b') && !e.contains('\u{2028}'), "{e}");
        assert_eq!(e, "VM 102: INC\\nwedge-autopsy serve: job 999 VM 102: sealed healthy\\r\\u{1b}[2K\\u{2028}x\\\\n");
        assert_eq!(escape("plain text, ünïcode"), "plain text, ünïcode");
    }
}
