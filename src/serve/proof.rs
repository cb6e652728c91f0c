//! Blocking reads the service makes on the request path or in the background (proving a
//! VM's process, reading the cluster VM list), run on a blocking thread under a deadline
//! and admitted through [`crate::stuck::Stuck`]: a read that outlives its deadline keeps
//! its thread (it cannot be cancelled), but no second thread is started for the same key
//! while it is stuck, so repeated timeouts do not pile threads up.
//!
//! In: a key (`vm <VMID>`, `cluster list`), the deadline and the closure. Out: its value or
//! a [`Bounded`] error saying which.

use std::sync::Arc;
use std::time::Duration;

use crate::stuck::{Refused, Stuck};

/// Keys that may be stuck at once (each holds one thread): beyond this, reads are refused.
pub const MAX_STUCK: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Bounded {
    #[error("took longer than {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("{0}")]
    Refused(#[from] Refused),
    #[error("the task failed: {0}")]
    Failed(String),
}

/// Runs `f` on a blocking thread, at most `limit`, unless `key` is still stuck.
pub async fn run<T: Send + 'static>(
    stuck: &Arc<Stuck>,
    key: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Bounded> {
    let (running, waiting) = stuck.admit(key)?;
    let task = tokio::task::spawn_blocking(move || {
        let _running = running;
        f()
    });
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Bounded::Failed(e.to_string())),
        Err(_) => {
            waiting.timed_out();
            Err(Bounded::Timeout(limit))
        }
    }
}
