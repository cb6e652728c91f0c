//! What the watch knows about each VM, shared by the watch (writes), the runner (an
//! autopsy waits while its VM is being checked) and `/metrics` (reads). Its own module
//! so the runner and the watch need not import each other.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::diagnose::Verdict;
use crate::target::VmId;

/// The last check of one VM.
#[derive(Debug, Clone)]
pub struct VmWatch {
    /// `None`: the check itself failed (see `error`).
    pub verdict: Option<Verdict>,
    /// Consecutive `block-path-frozen` checks.
    pub frozen_streak: u32,
    /// When the current streak began (identifies one frozen episode).
    pub streak_since: Option<DateTime<Utc>>,
    pub checked_at: DateTime<Utc>,
    pub error: Option<String>,
}

/// Every watched VM, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct WatchState {
    pub vms: BTreeMap<VmId, VmWatch>,
    pub checks: u64,
    /// How many consecutive frozen checks count as wedged.
    pub consecutive: u32,
    /// The VM being checked right now: its QMP socket is in use, so an autopsy of it
    /// waits (see `runner`), and the watch never starts a check on a VM with an active
    /// job. Both sides decide under this state's lock.
    pub checking: Option<VmId>,
}
