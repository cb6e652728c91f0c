//! Calls that can block in the kernel past their deadline (a read of a hung pmxcfs file,
//! of `/proc/PID/cmdline` while that process's memory lock is held, of a FIFO) run on a
//! thread of their own, and such a thread cannot be cancelled. This registry keeps at most
//! one stuck thread per key: while an earlier call for a key has not returned, a new call
//! is refused at once instead of starting another thread; and at most `max` keys can be
//! stuck at once.
//!
//! In: a key and, after the deadline, word that the call timed out. Out: a [`Running`] to
//! move into the thread and a [`Waiting`] for the caller, or [`Refused`]. Why: a service
//! that retries a stuck proof every few seconds would otherwise gain a thread each time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Keys whose call outlived its deadline and has not returned yet.
#[derive(Debug)]
pub struct Stuck {
    keys: Mutex<BTreeMap<String, Instant>>,
    max: usize,
}

/// Why a call was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("an earlier read of {key} has not returned for {secs} s (stuck in the kernel); not starting another")]
    StillStuck { key: String, secs: u64 },
    #[error("{count} reads are stuck in the kernel already; not starting another")]
    TooMany { count: usize },
}

#[derive(Debug, Default)]
struct State {
    done: bool,
    stuck: bool,
}

/// Moved into the thread that makes the call: marks it returned when dropped.
#[derive(Debug)]
pub struct Running {
    reg: Arc<Stuck>,
    key: String,
    state: Arc<Mutex<State>>,
}

/// Kept by the caller: [`Waiting::timed_out`] once the deadline passed.
#[derive(Debug)]
pub struct Waiting {
    reg: Arc<Stuck>,
    key: String,
    state: Arc<Mutex<State>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stuck {
    pub fn new(max: usize) -> Arc<Stuck> {
        Arc::new(Stuck { keys: Mutex::new(BTreeMap::new()), max })
    }

    /// A call for `key` may start, unless an earlier one is still stuck or `max` are.
    pub fn admit(self: &Arc<Self>, key: &str) -> Result<(Running, Waiting), Refused> {
        let keys = lock(&self.keys);
        if let Some(since) = keys.get(key) {
            return Err(Refused::StillStuck { key: key.to_string(), secs: since.elapsed().as_secs() });
        }
        if keys.len() >= self.max {
            return Err(Refused::TooMany { count: keys.len() });
        }
        let state = Arc::new(Mutex::new(State::default()));
        let r = Running { reg: self.clone(), key: key.to_string(), state: state.clone() };
        Ok((r, Waiting { reg: self.clone(), key: key.to_string(), state }))
    }

    /// Keys stuck now.
    pub fn count(&self) -> usize {
        lock(&self.keys).len()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        st.done = true;
        if st.stuck {
            lock(&self.reg.keys).remove(&self.key);
        }
    }
}

impl Waiting {
    /// The deadline passed: unless the call returned meanwhile, its key is stuck until it does.
    pub fn timed_out(self) {
        let mut st = lock(&self.state);
        if !st.done {
            st.stuck = true;
            lock(&self.reg.keys).insert(self.key.clone(), Instant::now());
        }
    }
}

/// Keys that may be stuck at once in a long-running process (each holds one thread).
pub const MAX_STUCK: usize = 32;

/// The registry for reads made on behalf of one run (the CLI's or one of `serve`'s):
/// shared by every run of the process, so a VM whose reads hang gains at most one thread.
pub fn process() -> &'static Arc<Stuck> {
    static REG: std::sync::OnceLock<Arc<Stuck>> = std::sync::OnceLock::new();
    REG.get_or_init(|| Stuck::new(MAX_STUCK))
}

/// Why [`bounded`] returned no value.
#[derive(Debug, thiserror::Error)]
pub enum Bounded {
    #[error("took longer than {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("{0}")]
    Refused(#[from] Refused),
    #[error("the task failed: {0}")]
    Failed(String),
}

/// [`bounded`] for synchronous callers: `f` on a thread of its own, waited for at most
/// `limit`; past it the thread is abandoned and `key` counts as stuck until it returns.
pub fn bounded_blocking<T: Send + 'static>(
    stuck: &Arc<Stuck>,
    key: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Bounded> {
    let (running, waiting) = stuck.admit(key)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _running = running;
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).map_err(|_| {
        waiting.timed_out();
        Bounded::Timeout(limit)
    })
}

/// Runs `f` on a blocking thread, at most `limit`, unless `key` is still stuck: a read that
/// outlives `limit` keeps its thread (it cannot be cancelled), but no second thread is
/// started for `key` while it is stuck.
pub async fn bounded<T: Send + 'static>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_stuck_call_per_key_until_it_returns() {
        let reg = Stuck::new(2);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (running, waiting) = reg.admit("a").unwrap();
        let t = std::thread::spawn(move || {
            let _r = running;
            // Blocks until released, like a read stuck in the kernel.
            go_rx.recv_timeout(Duration::from_secs(60)).expect("released by the test");
        });
        waiting.timed_out();
        assert!(matches!(reg.admit("a"), Err(Refused::StillStuck { .. })));
        // Another key is fine; a third stuck key is over the cap.
        let (r_b, w_b) = reg.admit("b").unwrap();
        w_b.timed_out();
        assert_eq!(reg.count(), 2);
        assert!(matches!(reg.admit("c"), Err(Refused::TooMany { count: 2 })));
        drop(r_b);
        go_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(reg.count(), 0, "both returned");
        // A call that returned before its caller gave up is never marked stuck.
        let (r, w) = reg.admit("a").unwrap();
        drop(r);
        w.timed_out();
        assert_eq!(reg.count(), 0);
    }

    #[test]
    fn bounded_blocking_abandons_a_stuck_call_and_refuses_its_key_until_it_returns() {
        let reg = Stuck::new(4);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let r = bounded_blocking(&reg, "k", Duration::from_millis(50), move || {
            go_rx.recv_timeout(Duration::from_secs(60)).expect("released by the test");
            let _ = done_tx.send(());
        });
        assert!(matches!(r, Err(Bounded::Timeout(_))), "{r:?}");
        assert!(matches!(bounded_blocking(&reg, "k", Duration::from_secs(1), || 1), Err(Bounded::Refused(_))));
        assert_eq!(bounded_blocking(&reg, "other", Duration::from_secs(5), || 7).unwrap(), 7);
        go_tx.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The registry forgets the key once the abandoned call has returned.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while reg.count() > 0 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(bounded_blocking(&reg, "k", Duration::from_secs(5), || 2).unwrap(), 2);
    }
}
