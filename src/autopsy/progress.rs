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

/// Wraps another progress so its step ids read `102/stacks`: several VMs captured in
/// one run stay tellable apart.
pub struct Prefixed<'a> {
    pub prefix: String,
    pub inner: &'a (dyn Progress + Send),
}

impl Progress for Prefixed<'_> {
    fn started(&self, id: &str) {
        self.inner.started(&format!("{}/{id}", self.prefix));
    }
    fn finished(&self, rec: &StepRecord) {
        let mut r = rec.clone();
        r.id = format!("{}/{}", self.prefix, rec.id);
        self.inner.finished(&r);
    }
    fn sealed(&self, sealed: Option<&Sealed>, error: Option<&str>, took: Duration) {
        self.inner.sealed(sealed, error, took);
    }
}
