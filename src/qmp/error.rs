//! What can go wrong talking to QMP, as an enum callers branch on.
//!
//! Every message is one line and, where there is one, names the next step.

use std::path::PathBuf;
use std::time::Duration;

use super::policy::Refusal;
use super::secs;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket path does not exist (ENOENT).
    #[error("QMP socket {} missing: is the VM running? (check `qm status <vmid>`)", .path.display())]
    SocketMissing { path: PathBuf },

    /// The socket file exists but nothing listens on it (ECONNREFUSED).
    #[error(
        "QMP socket {} refused the connection: stale socket with no listener; the QEMU process has probably exited (check its pid file)",
        .path.display()
    )]
    ConnectRefused { path: PathBuf },

    /// Any other failure to connect (permissions, path too long, …).
    #[error("connecting to QMP socket {}: {source}; check the path and that the tool runs as root on the VM's host", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Connected (or queued) but no greeting arrived within the connect budget.
    #[error(
        "no QMP greeting from {} within {} ({attempts} attempts): the socket is held by another client or QEMU is frozen; check `ss -xp | grep {}`",
        .path.display(), secs(*.waited), .path.display()
    )]
    NoGreeting { path: PathBuf, waited: Duration, attempts: u32 },

    /// The greeting came but `qmp_capabilities` got no answer: the main loop is wedged.
    #[error(
        "QMP greeting received but qmp_capabilities unanswered after {}: QEMU's main loop is wedged; capture /proc and stacks instead",
        secs(*.waited)
    )]
    CapabilitiesUnanswered { waited: Duration },

    /// An in-band command got no reply in time. The client sends nothing more afterwards.
    #[error(
        "QMP `{command}` unanswered after {}: QEMU's main loop is likely wedged; no further QMP commands are sent on this connection",
        secs(*.after)
    )]
    Timeout { command: String, after: Duration },

    /// The policy refused the command; nothing was sent.
    #[error(transparent)]
    Refused(Refusal),

    /// The connection is no longer used (after a timeout or a broken stream); nothing was sent.
    #[error("QMP command not sent: {reason}")]
    Disabled { reason: String },

    /// A line from QEMU exceeded the reply cap; the connection is abandoned.
    #[error(
        "QMP reply line exceeds {limit} bytes: connection abandoned; raise reply_cap if a reply this large is expected"
    )]
    ReplyTooLarge { limit: usize },

    /// QEMU closed the connection (possibly mid-reply).
    #[error(
        "QEMU closed the QMP connection: the process may have exited or been killed; check whether it is still running"
    )]
    Closed,

    /// Reading or writing the established connection failed.
    #[error("QMP socket I/O failed: {0}; the connection is abandoned")]
    Io(#[source] std::io::Error),

    /// QEMU sent something that is not QMP (not JSON, not an object, no greeting).
    #[error("QMP protocol error: {0}; the connection is abandoned")]
    Protocol(String),

    /// QEMU answered with `{"error": {"class", "desc"}}`. The session stays usable.
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

impl QmpError {
    /// A stable short kind for the manifest (`no-greeting`, `timeout`, …).
    pub fn classify(&self) -> &'static str {
        match self {
            QmpError::SocketMissing { .. } => "socket-missing",
            QmpError::ConnectRefused { .. } => "connect-refused",
            QmpError::Connect { .. } => "connect",
            QmpError::NoGreeting { .. } => "no-greeting",
            QmpError::CapabilitiesUnanswered { .. } => "capabilities-unanswered",
            QmpError::Timeout { .. } => "timeout",
            QmpError::Refused(_) => "refused",
            QmpError::Disabled { .. } => "disabled",
            QmpError::ReplyTooLarge { .. } => "reply-too-large",
            QmpError::Closed => "closed",
            QmpError::Io(_) => "io",
            QmpError::Protocol(_) => "protocol",
            QmpError::Command { .. } => "command",
        }
    }

    /// Whether the error means QEMU did not answer in time (a wedge signal), as
    /// opposed to a usage or transport problem.
    pub fn is_unanswered(&self) -> bool {
        matches!(self, QmpError::NoGreeting { .. } | QmpError::CapabilitiesUnanswered { .. } | QmpError::Timeout { .. })
    }
}
