//! QMP client (the full client lands from the `qmp` branch).
pub mod policy;
