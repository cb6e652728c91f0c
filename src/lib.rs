//! wedge-autopsy: autopsy before shooting.
//!
//! Given a VMID, prove which process is that VM's QEMU, capture its state read-only
//! (QMP, /proc, kernel and user stacks) into a sealed, hash-verified archive, and only
//! then, if asked, restart it. See README.md for the guarantees this crate keeps.

pub mod archive;
pub mod autopsy;
pub mod cancel;
pub mod config;
pub mod diagnose;
pub mod error;
pub mod exec;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod hostinfo;
pub mod inflight;
pub mod lock;
pub mod logging;
pub mod minicore;
pub mod procfs;
pub mod pve;
pub mod qga;
pub mod qmp;
pub mod redact;
pub mod render;
pub mod restart;
pub mod retention;
pub mod runbook;
pub mod serve;
pub mod signatures;
pub mod stacks;
pub mod step;
pub mod stuck;
pub mod summary;
pub mod target;
pub mod units;
