//! A cancellation flag shared between the signal handler task and blocking collectors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set once, on SIGINT/SIGTERM/SIGHUP. Collectors poll it between operations; the
/// native stack snapshot detaches as soon as it sees it.
#[derive(Clone, Default, Debug)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
