//! Several autopsies at once (host-wide incidents): each on its own OS thread, at most
//! `limit` running, results in input order. The captures block (ptrace, /proc, external
//! programs), so plain threads and a counting semaphore fit better than async tasks.

use std::sync::{Condvar, Mutex};

/// Runs `f` on every item, at most `limit` at a time; returns the results in input
/// order. A panicking item yields `on_panic`'s value instead of tearing the batch down.
pub fn run_bounded<T: Send, R: Send>(
    items: Vec<T>,
    limit: usize,
    f: impl Fn(T) -> R + Sync,
    on_panic: impl Fn() -> R + Sync,
) -> Vec<R> {
    let slots = Semaphore::new(limit.max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let (slots, f) = (&slots, &f);
                scope.spawn(move || {
                    let _slot = slots.acquire();
                    f(item)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| on_panic())).collect()
    })
}

struct Semaphore {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Semaphore {
    fn new(n: usize) -> Self {
        Semaphore { free: Mutex::new(n), cv: Condvar::new() }
    }

    fn acquire(&self) -> SemaphoreGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        SemaphoreGuard(self)
    }
}

struct SemaphoreGuard<'a>(&'a Semaphore);

impl Drop for SemaphoreGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn never_more_than_the_limit_and_order_kept() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = run_bounded(
            (0..12).collect(),
            3,
            |i: usize| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
                running.fetch_sub(1, Ordering::SeqCst);
                if i == 5 {
                    panic!("one capture thread dies");
                }
                i * 2
            },
            || usize::MAX,
        );
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(out[4], 8);
        assert_eq!(out[5], usize::MAX, "a panic is a result, not the end of the batch");
        assert_eq!(out.len(), 12);
    }
}
