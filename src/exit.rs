//! The process exit codes the README documents. A leaf: every module error names its
//! class here (`fn exit(&self) -> Exit`) without depending on the top-level error.

/// Documented process exit codes (README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Archive sealed and verified, every step ok (or skipped by design).
    Ok,
    /// Archive sealed and verified, but some steps failed, timed out or were interrupted.
    Partial,
    /// Bad input (VMID, flags, config, runbook): nothing was touched.
    BadInput,
    /// The target was refused: not running, not proven to be the VM, on another node.
    Refused,
    /// The archive could not be written, sealed or verified. No restart happens.
    SealFailed,
    /// Sealed, but the requested restart failed or was refused.
    RestartFailed,
    /// Another autopsy of the same VM holds its lock, or the cooldown is in force.
    Busy,
    /// A bug or an environment failure the tool did not anticipate.
    Internal,
    /// `diagnose`: the verdict's own code (see `Verdict::exit_code`).
    Verdict(u8),
}

impl Exit {
    /// Of two outcomes (several VMs in one run), the one to report: a lost archive above
    /// a failed restart above a refusal above a partial capture.
    pub fn worse(self, other: Exit) -> Exit {
        let rank = |e: Exit| match e {
            Exit::Ok | Exit::Verdict(_) => 0,
            Exit::BadInput => 1,
            Exit::Partial => 2,
            Exit::Busy => 3,
            Exit::Refused => 4,
            Exit::Internal => 5,
            Exit::RestartFailed => 6,
            Exit::SealFailed => 7,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Partial => 1,
            Exit::BadInput => 2,
            Exit::Refused => 3,
            Exit::SealFailed => 4,
            Exit::RestartFailed => 5,
            Exit::Busy => 6,
            Exit::Internal => 70,
            Exit::Verdict(c) => c,
        }
    }
}
