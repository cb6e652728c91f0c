//! A read-only QMP client for capturing a wedged QEMU's state.
//!
//! - [`policy`] decides, before anything is written, whether a command is read-only.
//! - [`QmpClient::connect`] handles the one-client-at-a-time socket (retrying while
//!   another client such as pvestatd holds it) and tells "no greeting" (socket held or
//!   process frozen) apart from "greeting but `qmp_capabilities` unanswered" (main loop
//!   wedged).
//! - [`QmpClient::execute`] sends one `id`-tagged command at a time, keeps events,
//!   skips replies that are not ours, and after the first timeout sends nothing more.
//! - Every line sent and received is kept in a JSONL transcript for the archive.

mod client;
mod error;
pub(crate) mod line;
pub mod policy;
mod transcript;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use client::{ConnectFailure, QmpClient, Reply};
pub use error::QmpError;
pub use policy::Refusal;

/// Limits for one QMP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpConfig {
    /// Total time to get a greeting, across retries (default 10 s).
    pub connect_budget: Duration,
    /// Time to wait for the greeting on one connection attempt (default 1.5 s).
    pub greeting_timeout: Duration,
    /// Time to wait for the `qmp_capabilities` reply once greeted (default 3 s).
    pub capabilities_timeout: Duration,
    /// Longest line accepted from QEMU, in bytes (default 8 MiB).
    pub reply_cap: usize,
    /// Events kept; later ones are counted, not stored (default 1000).
    pub max_events: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        QmpConfig {
            connect_budget: Duration::from_secs(10),
            greeting_timeout: Duration::from_millis(1500),
            capabilities_timeout: Duration::from_secs(3),
            reply_cap: 8 * 1024 * 1024,
            max_events: 1000,
        }
    }
}

/// Renders a duration for messages: `10s`, `1.5s`, `0.25s`, `10.012s`.
pub(crate) fn secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

/// Makes untrusted text safe for a one-line message: control characters escaped,
/// at most `max` characters kept.
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod helper_tests {
    use super::*;

    #[test]
    fn secs_is_short() {
        assert_eq!(secs(Duration::from_secs(10)), "10s");
        assert_eq!(secs(Duration::from_millis(1500)), "1.5s");
        assert_eq!(secs(Duration::from_millis(250)), "0.25s");
        assert_eq!(secs(Duration::ZERO), "0s");
    }

    #[test]
    fn one_line_escapes_and_truncates() {
        assert_eq!(one_line("info block\nq", 80), "info block\\nq");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }
}
