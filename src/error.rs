//! The top-level error a command ends with, and the exit code it maps to.
//!
//! Every module error converts into [`Error`] with `?`; its exit class is chosen once,
//! next to the module's type (`fn exit(&self) -> Exit`), so the README's exit-code
//! table holds by construction. The message of each is one line that names the next step.

pub use crate::exit::Exit;

use crate::archive::ArchiveError;
use crate::lock::LockError;
use crate::minicore::qemu_state::QemuStateError;
use crate::retention::{FloorError, PruneError};
use crate::runbook::RunbookErrors;
use crate::stacks::resymbolize::ResymbolizeError;
use crate::stacks::StackError;
use crate::target::TargetError;

/// Errors that end a run before (or instead of) an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{0}")]
    Seal(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Runbook(#[from] RunbookErrors),
    #[error(transparent)]
    Floor(#[from] FloorError),
    #[error(transparent)]
    Prune(#[from] PruneError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Resymbolize(#[from] ResymbolizeError),
    #[error(transparent)]
    QemuState(#[from] QemuStateError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    /// The exit code class; typed variants ask their own type.
    pub fn exit(&self) -> Exit {
        match self {
            Error::BadInput(_) => Exit::BadInput,
            Error::Target(e) => e.exit(),
            Error::Seal(_) => Exit::SealFailed,
            Error::Busy(_) => Exit::Busy,
            Error::Archive(e) => e.exit(),
            Error::Runbook(e) => e.exit(),
            Error::Floor(e) => e.exit(),
            Error::Prune(e) => e.exit(),
            Error::Lock(e) => e.exit(),
            Error::Stack(e) => e.exit(),
            Error::Resymbolize(e) => e.exit(),
            Error::QemuState(e) => e.exit(),
            Error::Other(_) => Exit::Internal,
        }
    }
}

impl From<std::io::Error> for Error {
    /// An I/O failure nobody anticipated (stdout, a runtime): internal.
    fn from(e: std::io::Error) -> Self {
        Error::Other(e.into())
    }
}

impl From<serde_json::Error> for Error {
    /// Serialising our own structs failed: internal.
    fn from(e: serde_json::Error) -> Self {
        Error::Other(e.into())
    }
}
