//! Exit codes and the top-level error kinds `main` maps onto them.
//!
//! Callers branch on kinds (bad input vs. refused target vs. seal failure); the message of
//! each is one line that names the next step.

/// Documented process exit codes (README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Archive sealed and verified, every step ok (or skipped by design).
    Ok = 0,
    /// Archive sealed and verified, but some steps failed, timed out or were interrupted.
    Partial = 1,
    /// Bad input (VMID, flags, config, runbook): nothing was touched.
    BadInput = 2,
    /// The target was refused: not running, not proven to be the VM, on another node.
    Refused = 3,
    /// The archive could not be written, sealed or verified. No restart happens.
    SealFailed = 4,
    /// Sealed, but the requested restart failed or was refused.
    RestartFailed = 5,
    /// Another autopsy of the same VM holds its lock, or the cooldown is in force.
    Busy = 6,
    /// A bug or an environment failure the tool did not anticipate.
    Internal = 70,
}

/// Errors that end a run before (or instead of) an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error("{0}")]
    Seal(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::BadInput(_) => Exit::BadInput,
            Error::Target(t) => t.exit(),
            Error::Seal(_) => Exit::SealFailed,
            Error::Busy(_) => Exit::Busy,
            Error::Other(_) => Exit::Internal,
        }
    }
}
