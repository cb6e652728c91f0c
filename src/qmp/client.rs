//! The QMP session: connect with retries, handshake, one command at a time.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::line::{Line, LineReader};
use super::transcript::{Kind, Transcript};
use super::{one_line, policy, secs, QmpConfig, QmpError};

/// A successful reply to [`QmpClient::execute`].
#[derive(Debug, Clone)]
pub struct Reply {
    /// The reply line exactly as received, without its `\r\n` terminator.
    pub raw: Vec<u8>,
    /// The reply's `"return"` value.
    pub value: Value,
    /// From just before the request was written to the reply being read.
    pub elapsed: Duration,
}

/// A failed [`QmpClient::connect_traced`]: the error plus what happened on the way.
#[derive(Debug)]
pub struct ConnectFailure {
    pub error: QmpError,
    /// Connection attempts made (each a connect plus a wait for the greeting).
    pub attempts: u32,
    transcript: Transcript,
}

impl ConnectFailure {
    /// The attempt notes and any lines exchanged, as JSONL (same format as
    /// [`QmpClient::transcript_jsonl`]).
    pub fn transcript_jsonl(&self) -> Vec<u8> {
        self.transcript.jsonl()
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ConnectFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<ConnectFailure> for QmpError {
    fn from(f: ConnectFailure) -> Self {
        f.error
    }
}

/// A connected, negotiated QMP session. Dropping it closes the socket, which frees
/// it for the next client (QEMU serves one at a time).
#[derive(Debug)]
pub struct QmpClient {
    reader: LineReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    max_events: usize,
    greeting: Option<Value>,
    events: Vec<Value>,
    events_dropped: u64,
    skipped: u64,
    transcript: Transcript,
    next_id: u64,
    /// Set once the client must not write again (timeout, broken stream).
    disabled: Option<String>,
    /// The read side is closed or mid-line; nothing more can be read either.
    stream_broken: bool,
    attempts: u32,
}

/// Why one connection attempt ended without a greeting.
enum AttemptError {
    /// Worth another attempt within the budget (held socket, full backlog).
    Retry(String),
    /// Retrying cannot help (missing socket, no listener, not QMP).
    Fatal(QmpError),
}

type Greeted = (LineReader<OwnedReadHalf>, OwnedWriteHalf, Value);

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(400);
/// Shortest greeting window worth a new attempt.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates
    /// capabilities. See [`QmpClient::connect_traced`] for the transcript of a failure.
    pub async fn connect(path: &Path, cfg: &QmpConfig) -> Result<QmpClient, QmpError> {
        Self::connect_traced(path, cfg).await.map_err(QmpError::from)
    }

    /// Like [`QmpClient::connect`], but a failure keeps the attempt count and transcript.
    ///
    /// QEMU serves one client at a time: a second client's `connect()` succeeds but
    /// the greeting only comes once the first client leaves. So each attempt waits up
    /// to `greeting_timeout`, and attempts repeat with a short backoff until
    /// `connect_budget` is spent. A missing socket or a refused connection ends at once.
    /// Once greeted, `qmp_capabilities` gets `capabilities_timeout` and no retry: if it
    /// is unanswered the main loop is wedged and reconnecting cannot help.
    pub async fn connect_traced(path: &Path, cfg: &QmpConfig) -> Result<QmpClient, ConnectFailure> {
        let mut transcript = Transcript::new();
        let start = transcript.start();
        let deadline = start + cfg.connect_budget;
        let mut attempts = 0u32;
        let mut backoff = BACKOFF_START;

        let greeted = loop {
            attempts += 1;
            let window = cfg.greeting_timeout.min(deadline.saturating_duration_since(Instant::now()));
            transcript.note(format!(
                "attempt {attempts}: connecting to {}, waiting up to {} for the greeting",
                path.display(),
                secs(window)
            ));
            match attempt(path, window, cfg.reply_cap, &mut transcript).await {
                Ok(g) => break g,
                Err(AttemptError::Fatal(error)) => {
                    transcript.note(format!("giving up: {error}"));
                    return Err(ConnectFailure { error, attempts, transcript });
                }
                Err(AttemptError::Retry(why)) => transcript.note(format!("attempt {attempts}: {why}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // Never start an attempt too short to be greeted in.
            if deadline.saturating_duration_since(Instant::now()) >= MIN_ATTEMPT {
                continue;
            }
            let error = QmpError::NoGreeting { path: path.to_path_buf(), waited: start.elapsed(), attempts };
            transcript.note(format!("giving up: {error}"));
            return Err(ConnectFailure { error, attempts, transcript });
        };

        Self::negotiate(greeted, transcript, attempts, cfg).await
    }

    /// The handshake over a stream that is already connected (a socketpair in tests and
    /// fuzzing): the greeting within `greeting_timeout`, then `qmp_capabilities`.
    #[doc(hidden)]
    pub async fn over_stream(stream: UnixStream, cfg: &QmpConfig) -> Result<QmpClient, ConnectFailure> {
        let mut transcript = Transcript::new();
        transcript.start();
        let until = tokio::time::Instant::now() + cfg.greeting_timeout;
        match greet(stream, until, cfg.greeting_timeout, cfg.reply_cap, &mut transcript).await {
            Ok(g) => Self::negotiate(g, transcript, 1, cfg).await,
            Err(AttemptError::Fatal(error)) => Err(ConnectFailure { error, attempts: 1, transcript }),
            Err(AttemptError::Retry(why)) => {
                transcript.note(why);
                let error = QmpError::NoGreeting { path: PathBuf::new(), waited: cfg.greeting_timeout, attempts: 1 };
                Err(ConnectFailure { error, attempts: 1, transcript })
            }
        }
    }

    async fn negotiate(
        greeted: Greeted,
        transcript: Transcript,
        attempts: u32,
        cfg: &QmpConfig,
    ) -> Result<QmpClient, ConnectFailure> {
        let (reader, writer, greeting) = greeted;
        let mut client = QmpClient {
            reader,
            writer,
            max_events: cfg.max_events,
            greeting: Some(greeting),
            events: Vec::new(),
            events_dropped: 0,
            skipped: 0,
            transcript,
            next_id: 0,
            disabled: None,
            stream_broken: false,
            attempts,
        };

        let cap_start = Instant::now();
        let request = b"{\"execute\":\"qmp_capabilities\",\"id\":\"wa-0\"}\n";
        let negotiated = tokio::time::timeout(cfg.capabilities_timeout, client.send_and_wait(request, "wa-0")).await;
        let error = match negotiated {
            Ok(Ok((_, msg))) => match msg.get("error") {
                None => return Ok(client),
                Some(err) => client.command_error("qmp_capabilities", err),
            },
            Ok(Err(e)) => e,
            Err(_) => {
                let waited = cap_start.elapsed();
                client.disable(format!("qmp_capabilities unanswered after {}", secs(waited)));
                QmpError::CapabilitiesUnanswered { waited }
            }
        };
        client.transcript.note(format!("giving up: {error}"));
        Err(ConnectFailure { error, attempts, transcript: client.transcript })
    }

    /// Sends one command and waits up to `timeout` for its reply.
    ///
    /// The command is checked against [`policy`] first; a refusal returns
    /// [`QmpError::Refused`] and nothing is written. Events read while waiting are
    /// kept; replies carrying another (or no) `id` are noted and skipped. A QMP error
    /// reply is [`QmpError::Command`] and leaves the session usable. A timeout, an
    /// over-long line, a closed or garbled stream end the session: every later call
    /// returns [`QmpError::Disabled`] without writing anything.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Reply, QmpError> {
        if let Err(refusal) = policy::check(command, arguments.as_ref()) {
            self.transcript.note(format!("not sent: {refusal}"));
            return Err(QmpError::Refused(refusal));
        }
        if let Some(reason) = &self.disabled {
            let reason = reason.clone();
            self.transcript.note(format!("not sent: `{command}`: {reason}"));
            return Err(QmpError::Disabled { reason });
        }

        self.next_id += 1;
        let id = format!("wa-{}", self.next_id);
        let mut req = Map::new();
        req.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            req.insert("arguments".into(), args);
        }
        req.insert("id".into(), Value::String(id.clone()));
        // serde_json escapes control characters, so the request is a single line.
        let mut line = serde_json::to_vec(&Value::Object(req)).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');

        let started = Instant::now();
        match tokio::time::timeout(timeout, self.send_and_wait(&line, &id)).await {
            Err(_) => {
                self.disable(format!(
                    "an earlier command (`{command}`) timed out after {}; nothing more is sent to a wedged monitor",
                    secs(timeout)
                ));
                Err(QmpError::Timeout { command: command.to_string(), after: timeout })
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok((raw, mut msg))) => {
                if let Some(err) = msg.get("error") {
                    return Err(self.command_error(command, err));
                }
                let value = msg.remove("return").unwrap_or(Value::Null);
                Ok(Reply { raw, value, elapsed: started.elapsed() })
            }
        }
    }

    /// Waits up to `wait` for whatever QEMU still sends (typically the reply to a
    /// command that timed out, or events) and records it in the transcript, without
    /// writing anything. Returns how many lines arrived. Does nothing once the stream
    /// is closed or broken. Useful to learn whether a slow command answered late.
    pub async fn collect_late(&mut self, wait: Duration) -> usize {
        if self.stream_broken {
            return 0;
        }
        let until = tokio::time::Instant::now() + wait;
        let mut lines = 0;
        loop {
            let bytes = match tokio::time::timeout_at(until, self.reader.next_line()).await {
                Err(_) => {
                    // A reply cut off mid-line is evidence too: keep what arrived.
                    let pending = self.reader.pending();
                    if !pending.is_empty() {
                        let n = pending.len();
                        let head = pending[..n.min(super::line::HEAD_KEEP)].to_vec();
                        if n > head.len() {
                            self.transcript.truncated(Kind::Recv, &head, n);
                        } else {
                            self.transcript.line(Kind::Recv, &head);
                        }
                        self.transcript.note(format!("late: {n} bytes of an unterminated line, nothing more arrived"));
                    }
                    return lines;
                }
                Ok(Ok(Line::Complete(bytes))) => bytes,
                Ok(Ok(Line::Eof { partial })) => {
                    if !partial.is_empty() {
                        self.transcript.line(Kind::Recv, &partial);
                    }
                    self.transcript.note("late: EOF");
                    self.stream_broken = true;
                    return lines;
                }
                Ok(Ok(Line::TooLong { head, seen })) => {
                    self.transcript.truncated(Kind::Recv, &head, seen);
                    self.transcript.note("late: line over the reply cap; stopped reading");
                    self.stream_broken = true;
                    return lines;
                }
                Ok(Err(e)) => {
                    self.transcript.note(format!("late: read failed: {e}"));
                    self.stream_broken = true;
                    return lines;
                }
            };
            lines += 1;
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v.get("event").is_some() => self.keep_event(&bytes, v),
                Ok(v) => {
                    self.transcript.line(Kind::Recv, &bytes);
                    let id = v.as_object().map_or_else(|| "(not an object)".into(), id_text);
                    self.transcript.note(format!("late: message with id {id} arrived after its deadline"));
                }
                Err(_) => {
                    self.transcript.line(Kind::Recv, &bytes);
                    self.transcript.note("late: not JSON; stopped reading");
                    self.stream_broken = true;
                    return lines;
                }
            }
        }
    }

    /// The greeting `{"QMP": {...}}` as received.
    pub fn greeting(&self) -> Option<&Value> {
        self.greeting.as_ref()
    }

    /// Events received so far, oldest first, at most `max_events`.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Events received after `max_events` was reached, counted but not kept.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// Replies skipped because their `id` was not the one awaited.
    pub fn skipped_replies(&self) -> u64 {
        self.skipped
    }

    /// How many connection attempts it took to get the greeting.
    pub fn connect_attempts(&self) -> u32 {
        self.attempts
    }

    /// Why the client no longer sends, if it doesn't.
    pub fn disabled_reason(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    /// Everything sent, received and decided, one JSON object per line:
    /// `{"t": RFC 3339 UTC, "ms": since connect began, "kind": "send"|"recv"|"event"|"note", "line": …}`.
    /// If events were dropped or replies skipped, a final note gives the counts.
    pub fn transcript_jsonl(&self) -> Vec<u8> {
        if self.events_dropped == 0 && self.skipped == 0 {
            return self.transcript.jsonl();
        }
        self.transcript.jsonl_with_note(&format!(
            "summary: {} events kept, {} events dropped over the cap, {} foreign replies skipped",
            self.events.len(),
            self.events_dropped,
            self.skipped
        ))
    }

    fn disable(&mut self, reason: String) {
        self.transcript.note(format!("disabled: {reason}"));
        if self.disabled.is_none() {
            self.disabled = Some(reason);
        }
    }

    /// Marks the session unusable because of `e` and returns it.
    fn broken(&mut self, e: QmpError) -> QmpError {
        self.stream_broken = true;
        self.disable(format!("the connection is unusable after an earlier error: {e}"));
        e
    }

    fn command_error(&mut self, command: &str, err: &Value) -> QmpError {
        let field = |k: &str| one_line(err.get(k).and_then(Value::as_str).unwrap_or("?"), 300);
        QmpError::Command { command: command.to_string(), class: field("class"), desc: field("desc") }
    }

    /// Writes `line` and reads until the reply tagged `id` arrives. Returns the raw
    /// reply line and its parsed object. Not bounded in time: callers wrap it.
    async fn send_and_wait(&mut self, line: &[u8], id: &str) -> Result<(Vec<u8>, Map<String, Value>), QmpError> {
        self.transcript.line(Kind::Send, line.strip_suffix(b"\n").unwrap_or(line));
        if let Err(e) = self.writer.write_all(line).await {
            return Err(self.broken(io_error(e)));
        }
        loop {
            let bytes = match self.reader.next_line().await {
                Ok(Line::Complete(bytes)) => bytes,
                Ok(Line::Eof { partial }) => {
                    if partial.is_empty() {
                        self.transcript.note("EOF while waiting for a reply");
                    } else {
                        self.transcript.line(Kind::Recv, &partial);
                        self.transcript.note(format!("EOF after {} bytes of an unterminated line", partial.len()));
                    }
                    return Err(self.broken(QmpError::Closed));
                }
                Ok(Line::TooLong { head, seen }) => {
                    self.transcript.truncated(Kind::Recv, &head, seen);
                    let limit = self.reader_cap();
                    return Err(self.broken(QmpError::ReplyTooLarge { limit }));
                }
                Err(e) => return Err(self.broken(io_error(e))),
            };
            let mut msg = match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    self.transcript.line(Kind::Recv, &bytes);
                    let what = format!("expected a JSON object, got {}", preview(&bytes));
                    return Err(self.broken(QmpError::Protocol(what)));
                }
                Err(e) => {
                    self.transcript.line(Kind::Recv, &bytes);
                    let what = format!("not JSON ({e}): {}", preview(&bytes));
                    return Err(self.broken(QmpError::Protocol(what)));
                }
            };
            if msg.contains_key("event") {
                self.keep_event(&bytes, Value::Object(msg));
                continue;
            }
            if msg.contains_key("return") || msg.contains_key("error") {
                if msg.get("id").and_then(Value::as_str) == Some(id) {
                    self.transcript.line(Kind::Recv, &bytes);
                    msg.remove("id");
                    return Ok((bytes, msg));
                }
                self.skip(&bytes, format!("skipped a reply with id {} while waiting for {id}", id_text(&msg)));
                continue;
            }
            let what =
                if msg.contains_key("QMP") { "an unexpected second greeting" } else { "an unrecognised message" };
            self.skip(&bytes, format!("skipped {what}"));
        }
    }

    fn keep_event(&mut self, bytes: &[u8], event: Value) {
        if self.events.len() < self.max_events {
            self.transcript.line(Kind::Event, bytes);
            self.events.push(event);
        } else {
            if self.events_dropped == 0 {
                self.transcript
                    .note(format!("event cap of {} reached: later events are counted, not kept", self.max_events));
            }
            self.events_dropped += 1;
        }
    }

    /// Records a skipped line, up to `max_events` of them, so a misbehaving peer
    /// cannot grow the transcript without bound.
    fn skip(&mut self, bytes: &[u8], note: String) {
        self.skipped += 1;
        if self.skipped <= self.max_events as u64 {
            self.transcript.line(Kind::Recv, bytes);
            self.transcript.note(note);
        }
    }

    fn reader_cap(&self) -> usize {
        self.reader.cap()
    }
}

/// One connect plus greeting, all within `window`.
async fn attempt(
    path: &Path,
    window: Duration,
    reply_cap: usize,
    transcript: &mut Transcript,
) -> Result<Greeted, AttemptError> {
    let until = tokio::time::Instant::now() + window;
    let stream = match tokio::time::timeout_at(until, UnixStream::connect(path)).await {
        Err(_) => return Err(AttemptError::Retry(format!("connect did not complete within {}", secs(window)))),
        Ok(Err(e)) => return Err(connect_error(path, e)),
        Ok(Ok(s)) => s,
    };
    greet(stream, until, window, reply_cap, transcript).await
}

/// Reads and checks the greeting on a connected stream, by `until`.
async fn greet(
    stream: UnixStream,
    until: tokio::time::Instant,
    window: Duration,
    reply_cap: usize,
    transcript: &mut Transcript,
) -> Result<Greeted, AttemptError> {
    let (read, write) = stream.into_split();
    let mut reader = LineReader::new(read, reply_cap);
    let line = match tokio::time::timeout_at(until, reader.next_line()).await {
        Err(_) => {
            return Err(AttemptError::Retry(format!(
                "connected, but no greeting within {} (socket held by another client, or QEMU frozen)",
                secs(window)
            )))
        }
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {
            return Err(AttemptError::Retry("connection reset before the greeting".into()))
        }
        Ok(Err(e)) => return Err(AttemptError::Fatal(QmpError::Io(e))),
        Ok(Ok(l)) => l,
    };
    match line {
        Line::Complete(bytes) => {
            transcript.line(Kind::Recv, &bytes);
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v.get("QMP").is_some_and(Value::is_object) => Ok((reader, write, v)),
                _ => Err(AttemptError::Fatal(QmpError::Protocol(format!(
                    "expected the QMP greeting, got {}",
                    preview(&bytes)
                )))),
            }
        }
        Line::Eof { partial } => {
            if !partial.is_empty() {
                transcript.line(Kind::Recv, &partial);
            }
            Err(AttemptError::Fatal(QmpError::Closed))
        }
        Line::TooLong { head, seen } => {
            transcript.truncated(Kind::Recv, &head, seen);
            Err(AttemptError::Fatal(QmpError::ReplyTooLarge { limit: reply_cap }))
        }
    }
}

fn connect_error(path: &Path, e: std::io::Error) -> AttemptError {
    let path: PathBuf = path.to_path_buf();
    match e.kind() {
        ErrorKind::NotFound => AttemptError::Fatal(QmpError::SocketMissing { path }),
        ErrorKind::ConnectionRefused => AttemptError::Fatal(QmpError::ConnectRefused { path }),
        // EAGAIN: the listener's backlog is full (several clients queued). Try again.
        ErrorKind::WouldBlock => AttemptError::Retry("connect: listen backlog full (EAGAIN)".into()),
        _ => AttemptError::Fatal(QmpError::Connect { path, source: e }),
    }
}

fn io_error(e: std::io::Error) -> QmpError {
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

/// The first bytes of an untrusted line, escaped, for an error message.
fn preview(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(80)];
    let mut s = one_line(&String::from_utf8_lossy(head), 80);
    if bytes.len() > head.len() {
        s.push('…');
    }
    format!("\"{s}\" ({} bytes)", bytes.len())
}

fn id_text(msg: &Map<String, Value>) -> String {
    match msg.get("id") {
        None => "(none)".into(),
        Some(v) => one_line(&v.to_string(), 60),
    }
}
