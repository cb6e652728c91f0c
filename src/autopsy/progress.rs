//! Progress callbacks. The executor reports; the CLI decides how it looks.

use std::time::Duration;

use crate::archive::Sealed;
use crate::step::StepRecord;

pub trait Progress: Sync {
    fn started(&self, _id: &str) {}
    fn finished(&self, _rec: &StepRecord) {}
    fn sealed(&self, _sealed: Option<&Sealed>, _error: Option<&str>, _took: Duration) {}
}

/// Reports nothing (library callers, tests, `--quiet`).
pub struct Silent;
impl Progress for Silent {}
