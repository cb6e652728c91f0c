//! What stderr shows and where logs go, decided once per run from the environment.
//!
//! [`choose`] is pure (facts in, plan out) so the rules are tested without a terminal:
//! a live step list only on a real terminal, plain timestamped lines otherwise (logs,
//! services), nothing with `--quiet`; colours only on a terminal and never with
//! `NO_COLOR`; under systemd (stderr is the journal) structured journal entries instead
//! of text, unless a `--log-format` was asked for.

/// `--log-format`: the sink asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Facts about the process's environment that decide the output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Env {
    /// stderr is a terminal.
    pub stderr_tty: bool,
    /// `TERM=dumb` (or unset): no cursor movement.
    pub term_dumb: bool,
    /// `NO_COLOR` is set and not empty (<https://no-color.org>).
    pub no_color: bool,
    /// stderr is connected to the systemd journal (`JOURNAL_STREAM` matches it).
    pub journal: bool,
}

impl Env {
    /// Reads the real environment.
    pub fn detect() -> Env {
        use std::io::IsTerminal;
        let stderr_tty = std::io::stderr().is_terminal();
        let term = std::env::var("TERM").unwrap_or_default();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let journal = nix::sys::stat::fstat(2)
            .map(|st| journal_matches(std::env::var("JOURNAL_STREAM").ok().as_deref(), st.st_dev, st.st_ino))
            .unwrap_or(false);
        Env { stderr_tty, term_dumb: term.is_empty() || term == "dumb", no_color, journal }
    }
}

/// Whether `JOURNAL_STREAM` (`"<dev>:<ino>"`, set by systemd) names the file that is our
/// stderr. Comparing device and inode, as systemd documents, keeps a child whose stderr
/// was redirected from logging to the journal by inheritance.
pub fn journal_matches(var: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.and_then(|v| v.split_once(':')) else { return false };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// How steps are shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Nothing (`--quiet`, or the logs are the progress: JSON, journal).
    None,
    /// One timestamped line per step ([`super::StderrLines`]).
    Lines,
    /// Spinners and elapsed times, redrawn in place ([`super::live::LiveSteps`]).
    Live { color: bool },
}

/// Where tracing events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Text { color: bool },
    Json,
    Journald,
}

/// The output plan of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ui {
    pub display: Display,
    pub log: LogSink,
    /// Most verbose level logged: 0 error, 1 warn, 2 info, 3 debug.
    pub level: u8,
    /// Whether per-step start/end events reach the log (they would repeat the display).
    pub step_events: bool,
    /// `-v`: the display also shows each step's notes.
    pub verbose: bool,
}

/// Decides the output from the environment and the flags.
pub fn choose(env: &Env, quiet: bool, verbose: u8, format: Option<LogFormat>) -> Ui {
    let color = env.stderr_tty && !env.no_color;
    let (display, log) = match format {
        Some(LogFormat::Json) => (Display::None, LogSink::Json),
        None if env.journal => (Display::None, LogSink::Journald),
        Some(LogFormat::Text) | None if env.stderr_tty && !env.term_dumb => {
            (Display::Live { color }, LogSink::Text { color })
        }
        Some(LogFormat::Text) | None => (Display::Lines, LogSink::Text { color }),
    };
    let display = if quiet { Display::None } else { display };
    // Structured sinks get every step event at info; text on stderr only adds to the
    // display what -v asks for.
    let structured = !matches!(log, LogSink::Text { .. });
    let level = if quiet && !structured {
        0
    } else if structured {
        2 + verbose.saturating_sub(1).min(1)
    } else {
        1 + verbose.min(2)
    };
    // On a live display -v shows notes in the list; step events would only repeat it.
    let live = matches!(display, Display::Live { .. });
    let step_events = structured || (verbose > 0 && !quiet && !live) || (display == Display::None && !quiet);
    Ui { display, log, level, step_events, verbose: verbose > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTY: Env = Env { stderr_tty: true, term_dumb: false, no_color: false, journal: false };
    const PIPE: Env = Env { stderr_tty: false, term_dumb: true, no_color: false, journal: false };

    #[test]
    fn live_only_on_a_terminal_with_colour_unless_no_color() {
        assert_eq!(choose(&TTY, false, 0, None).display, Display::Live { color: true });
        assert_eq!(choose(&Env { no_color: true, ..TTY }, false, 0, None).display, Display::Live { color: false });
        assert_eq!(choose(&Env { no_color: true, ..TTY }, false, 0, None).log, LogSink::Text { color: false });
        assert_eq!(choose(&Env { term_dumb: true, ..TTY }, false, 0, None).display, Display::Lines);
        assert_eq!(choose(&PIPE, false, 0, None).display, Display::Lines);
        // Never colour into a pipe, NO_COLOR or not.
        assert_eq!(choose(&PIPE, false, 0, None).log, LogSink::Text { color: false });
    }

    #[test]
    fn quiet_shows_nothing_and_logs_only_errors() {
        for env in [TTY, PIPE] {
            let ui = choose(&env, true, 0, None);
            assert_eq!(ui.display, Display::None);
            assert_eq!(ui.level, 0);
            assert!(!ui.step_events);
        }
    }

    #[test]
    fn text_logs_do_not_repeat_the_display_unless_asked() {
        let ui = choose(&PIPE, false, 0, None);
        assert_eq!((ui.level, ui.step_events), (1, false));
        let ui = choose(&PIPE, false, 1, None);
        assert_eq!((ui.level, ui.step_events, ui.verbose), (2, true, true));
        let ui = choose(&TTY, false, 2, None);
        assert_eq!((ui.level, ui.step_events, ui.verbose), (3, false, true));
    }

    #[test]
    fn journal_and_json_carry_the_step_events() {
        let journal = Env { journal: true, ..PIPE };
        let ui = choose(&journal, false, 0, None);
        assert_eq!((ui.display, ui.log, ui.level, ui.step_events), (Display::None, LogSink::Journald, 2, true));
        // An explicit format wins over the journal.
        assert_eq!(choose(&journal, false, 0, Some(LogFormat::Text)).display, Display::Lines);
        let ui = choose(&TTY, false, 0, Some(LogFormat::Json));
        assert_eq!((ui.display, ui.log, ui.step_events), (Display::None, LogSink::Json, true));
        // Quiet silences stderr, not the journal.
        assert!(choose(&journal, true, 0, None).step_events);
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(journal_matches(Some("8:1234"), 8, 1234));
        assert!(!journal_matches(Some("8:1234"), 8, 999));
        assert!(!journal_matches(Some("garbage"), 8, 1234));
        assert!(!journal_matches(None, 8, 1234));
    }
}
