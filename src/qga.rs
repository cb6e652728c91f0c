//! A minimal QEMU guest-agent client: one read-only command per connection, under a
//! deadline, over `<run_dir>/<VMID>.qga`.
//!
//! In: the socket path, a command from [`ALLOWED`] and a deadline. Out: the reply's
//! `return` value, or a typed [`QgaError`]. Only commands that read are on the allowlist,
//! enforced here before anything is written: the agent can also write files, run
//! programs, freeze filesystems and shut the guest down, and none of that may ever be
//! sent by this tool. Like QMP, the agent serves one client at a time, so a busy socket
//! looks exactly like a silent agent: both end at the deadline.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The only guest-agent commands this tool sends: all of them read.
pub const ALLOWED: &[&str] = &["guest-ping", "guest-info", "guest-get-diskstats", "guest-get-osinfo", "guest-get-time"];

/// Longest reply line read, in bytes.
const REPLY_CAP: usize = 1 << 20;

/// Why a guest-agent command got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("`{0}` is not a read-only guest-agent command; only {list} are sent", list = ALLOWED.join(", "))]
    NotAllowed(String),
    #[error("no guest-agent socket at {0} (the VM has no `agent: 1`, or it is not running)")]
    NoSocket(String),
    #[error("cannot connect to {path}: {detail}")]
    Connect { path: String, detail: String },
    #[error("no answer within {}ms (no agent running in the guest, or another client holds the socket)", .0.as_millis())]
    Timeout(Duration),
    #[error("the agent answered with an error: {0}")]
    Agent(String),
    #[error("unreadable answer: {0}")]
    Protocol(String),
}

/// Sends `command` (no arguments) and waits until `deadline` for its reply.
pub fn execute(socket: &Path, command: &str, deadline: Duration) -> Result<Value, QgaError> {
    if !ALLOWED.contains(&command) {
        return Err(QgaError::NotAllowed(command.chars().take(60).collect()));
    }
    let shown = socket.display().to_string();
    if !socket.exists() {
        return Err(QgaError::NoSocket(shown));
    }
    let end = Instant::now() + deadline;
    let mut s = UnixStream::connect(socket).map_err(|e| QgaError::Connect { path: shown, detail: e.to_string() })?;
    let left = |end: Instant| end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_write_timeout(Some(left(end))).ok();
    let line = format!("{}\n", serde_json::json!({ "execute": command }));
    s.write_all(line.as_bytes()).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => QgaError::Timeout(deadline),
        _ => QgaError::Protocol(format!("write: {e}")),
    })?;
    // Replies are one JSON object per line. Lines left over from an earlier client (or
    // garbage) are skipped; the first object with `return` or `error` is the answer.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if Instant::now() >= end {
            return Err(QgaError::Timeout(deadline));
        }
        s.set_read_timeout(Some(left(end))).ok();
        let n = match s.read(&mut chunk) {
            Ok(0) => return Err(QgaError::Protocol("the agent closed the connection".into())),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue
            }
            Err(e) => return Err(QgaError::Protocol(format!("read: {e}"))),
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if let Some(answer) = answer(&line) {
                return answer;
            }
        }
        if buf.len() > REPLY_CAP {
            return Err(QgaError::Protocol(format!("a reply line longer than {REPLY_CAP} bytes")));
        }
    }
}

/// `guest-ping`: `Ok(round trip)` when the agent answers in time.
pub fn ping(socket: &Path, deadline: Duration) -> Result<Duration, QgaError> {
    let t = Instant::now();
    execute(socket, "guest-ping", deadline).map(|_| t.elapsed())
}

/// One reply line → the answer, or `None` for a line that is not one.
fn answer(line: &[u8]) -> Option<Result<Value, QgaError>> {
    let v: Value = serde_json::from_slice(line).ok()?;
    if let Some(r) = v.get("return") {
        return Some(Ok(r.clone()));
    }
    let e = v.get("error")?;
    let desc = e.get("desc").and_then(Value::as_str).unwrap_or("(no description)");
    Some(Err(QgaError::Agent(crate::qmp::one_line(desc, 200))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_commands_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        for cmd in ["guest-shutdown", "guest-exec", "guest-fsfreeze-freeze", "guest-file-open", "guest-set-time"] {
            // Refused before the socket is even looked at.
            let e = execute(&dir.path().join("none.qga"), cmd, Duration::from_millis(10)).unwrap_err();
            assert!(matches!(e, QgaError::NotAllowed(_)), "{cmd}: {e}");
        }
        let e = execute(&dir.path().join("none.qga"), "guest-ping", Duration::from_millis(10)).unwrap_err();
        assert!(matches!(e, QgaError::NoSocket(_)), "{e}");
    }

    #[test]
    fn replies_and_errors_and_noise() {
        assert!(answer(b"garbage\n").is_none());
        assert!(answer(b"{\"event\":\"x\"}\n").is_none());
        assert_eq!(answer(b"{\"return\": {}}\n").unwrap().unwrap(), serde_json::json!({}));
        let e = answer(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\\nway\"}}\n").unwrap().unwrap_err();
        assert!(matches!(e, QgaError::Agent(ref d) if !d.contains('\n')), "{e}");
    }
}
