//! The session transcript: every line sent and received, every event and note, with
//! a UTC timestamp and milliseconds since the connection attempt began, as JSONL.

use std::borrow::Cow;
use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use serde::Serialize;

/// What a transcript entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// A line written to QEMU.
    Send,
    /// A line read from QEMU (greeting, reply, foreign reply, garbage).
    Recv,
    /// An asynchronous event read from QEMU.
    Event,
    /// Something the client decided or observed (retry, skip, refusal, timeout).
    Note,
}

#[derive(Serialize)]
struct Entry<'a> {
    t: String,
    ms: u64,
    kind: Kind,
    line: Cow<'a, str>,
    /// The line was not valid UTF-8; `line` is a lossy rendering.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lossy: bool,
    /// The line was longer than what is recorded; this is its length as read.
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated_from: Option<usize>,
}

/// An append-only JSONL buffer.
#[derive(Debug)]
pub(crate) struct Transcript {
    start: Instant,
    buf: Vec<u8>,
}

impl Transcript {
    pub(crate) fn new() -> Self {
        Transcript { start: Instant::now(), buf: Vec::new() }
    }

    /// When the connection attempt began; `ms` counts from here.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// Records a line (without its terminator).
    pub(crate) fn line(&mut self, kind: Kind, bytes: &[u8]) {
        self.push(kind, bytes, None);
    }

    /// Records the first part of a line that was `total` bytes long (or longer).
    pub(crate) fn truncated(&mut self, kind: Kind, head: &[u8], total: usize) {
        self.push(kind, head, Some(total));
    }

    pub(crate) fn note(&mut self, text: impl AsRef<str>) {
        self.push(Kind::Note, text.as_ref().as_bytes(), None);
    }

    /// The transcript so far, one JSON object per line.
    pub(crate) fn jsonl(&self) -> Vec<u8> {
        self.buf.clone()
    }

    /// The transcript so far plus a trailing note stamped now, without recording it.
    pub(crate) fn jsonl_with_note(&self, text: &str) -> Vec<u8> {
        let mut out = self.buf.clone();
        out.extend_from_slice(&self.render(Kind::Note, text.as_bytes(), None));
        out
    }

    fn push(&mut self, kind: Kind, bytes: &[u8], truncated_from: Option<usize>) {
        let entry = self.render(kind, bytes, truncated_from);
        self.buf.extend_from_slice(&entry);
    }

    /// One entry as a JSON line (with its `\n`).
    fn render(&self, kind: Kind, bytes: &[u8], truncated_from: Option<usize>) -> Vec<u8> {
        let line = String::from_utf8_lossy(bytes);
        let entry = Entry {
            t: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            kind,
            lossy: matches!(line, Cow::Owned(_)),
            line,
            truncated_from,
        };
        // Serializing a struct of strings and integers cannot fail.
        let mut out = serde_json::to_vec(&entry).unwrap_or_default();
        out.push(b'\n');
        out
    }
}
