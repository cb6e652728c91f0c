//! The command layer: one file per subcommand. Each turns parsed flags into the library's
//! plain option structs, calls the library, prints, and returns the exit code (or an
//! [`Error`](wedge_autopsy::error::Error) that knows its own). Clap lives here only.

pub mod audit;
pub mod autopsy;
pub mod cli;
pub mod diagnose;
pub mod generate;
pub mod inspect;
pub mod prune;
pub mod runbook;
pub mod serve;
pub mod signatures;
pub mod stacks;
