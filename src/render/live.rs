//! The live step list for a terminal: one spinner per running step with its elapsed
//! time, replaced by its status and duration when it ends. Only chosen when stderr is a
//! terminal ([`super::ui::choose`]); logs printed meanwhile go above the list
//! ([`SuspendingStderr`]) instead of tearing it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use console::Style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::archive::Sealed;
use crate::autopsy::Progress;
use crate::step::{StepRecord, StepStatus};

/// The live display currently drawing, if any (for [`SuspendingStderr`]).
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// [`Progress`] as a live step list on stderr.
pub struct LiveSteps {
    mp: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Finished bars, kept alive: indicatif forgets a dropped bar's line on the next
    /// redraw, and the finished list is what the user reads afterwards.
    done: Mutex<Vec<ProgressBar>>,
    color: bool,
    verbose: bool,
}

impl LiveSteps {
    /// Starts drawing on stderr. `color` styles the spinner and statuses; `verbose`
    /// prints each step's notes under it.
    pub fn new(color: bool, verbose: bool) -> Self {
        console::set_colors_enabled_stderr(color);
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(mp.clone());
        LiveSteps { mp, bars: Mutex::new(HashMap::new()), done: Mutex::new(Vec::new()), color, verbose }
    }

    fn style(&self, s: Style) -> Style {
        if self.color {
            s.force_styling(true)
        } else {
            Style::new().force_styling(false)
        }
    }

    fn spinner_style(&self) -> ProgressStyle {
        let t = if self.color {
            "  {spinner:.cyan} {prefix:<24} {elapsed:>4}  {msg}"
        } else {
            "  {spinner} {prefix:<24} {elapsed:>4}  {msg}"
        };
        ProgressStyle::with_template(t).expect("valid template").tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓")
    }

    fn done_style() -> ProgressStyle {
        ProgressStyle::with_template("  {msg}").expect("valid template")
    }

    fn bar(&self, id: &str) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.entry(id.to_string())
            .or_insert_with(|| {
                let pb = self.mp.add(ProgressBar::new_spinner());
                pb.set_style(self.spinner_style());
                pb.set_prefix(id.to_string());
                pb.enable_steady_tick(Duration::from_millis(100));
                pb
            })
            .clone()
    }

    fn finish(&self, id: &str, status: &str, ok: Option<bool>, took: Duration, detail: &str, notes: &[String]) {
        let pb = self.bar(id);
        self.bars.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        let (mark, st) = match ok {
            Some(true) => ("✓", self.style(Style::new().green())),
            Some(false) => ("✗", self.style(Style::new().red().bold())),
            None => ("-", self.style(Style::new().yellow())),
        };
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!("  {}", self.style(Style::new().dim()).apply_to(detail))
        };
        let mut msg = format!(
            "{} {id:<24} {:>6}  {:<11}{detail}",
            st.apply_to(mark),
            format!("{:.1}s", took.as_secs_f64()),
            st.apply_to(status)
        );
        for n in notes {
            msg.push_str(&format!("\n      {}", self.style(Style::new().dim()).apply_to(format!("note: {n}"))));
        }
        pb.set_style(Self::done_style());
        pb.finish_with_message(msg);
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push(pb);
    }

    /// A finished line of its own under the list.
    fn line(&self, text: String) {
        let pb = self.mp.add(ProgressBar::new_spinner());
        pb.set_style(Self::done_style());
        pb.finish_with_message(text);
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push(pb);
    }
}

impl Progress for LiveSteps {
    fn started(&self, id: &str) {
        self.bar(id);
    }

    fn finished(&self, r: &StepRecord) {
        let ok = match r.status {
            StepStatus::Ok => Some(true),
            StepStatus::Skipped => None,
            _ if r.optional => None,
            _ => Some(false),
        };
        let notes: &[String] = if self.verbose { &r.notes } else { &[] };
        self.finish(
            &r.id,
            r.status.as_str(),
            ok,
            Duration::from_millis(r.duration_ms),
            r.error.as_deref().unwrap_or(""),
            notes,
        );
    }

    fn sealed(&self, sealed: Option<&Sealed>, error: Option<&str>, took: Duration) {
        match sealed {
            Some(s) => {
                self.finish(
                    "seal",
                    "ok",
                    Some(true),
                    took,
                    &format!("{} files, {}, verified", s.files, crate::units::human_bytes(s.size)),
                    &[],
                );
                self.line(format!("\nsha256  {}\narchive {}", s.sha256, s.path.display()));
            }
            None => self.finish("seal", "failed", Some(false), took, error.unwrap_or("unknown error"), &[]),
        }
    }
}

impl Drop for LiveSteps {
    fn drop(&mut self) {
        for (_, pb) in self.bars.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            pb.abandon();
        }
        *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A stderr writer for logs that hides the live display while it writes, so a log line
/// lands above the step list instead of inside it. Without a live display it is stderr.
pub struct SuspendingStderr;

impl Write for SuspendingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match active {
            Some(mp) => mp.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
