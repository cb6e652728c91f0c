//! QMP client (in progress on a branch).
