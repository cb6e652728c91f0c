//! The accept loop: HTTP/1.1 connections under a header-read deadline, an idle deadline
//! and a connection cap, so connections that never finish (or never start) a request
//! cannot keep `/healthz` and alert deliveries from being answered.
//!
//! In: a bound listener, the router, [`ConnLimits`]. Out: serves until `stop` fires, then
//! lets open requests finish (bounded by the caller) and closes the rest.
//!
//! Why a loop of our own and not `axum::serve`: axum 0.8's `serve` sets no header-read
//! timeout and no connection cap. Here hyper's `header_read_timeout` closes a connection
//! whose request head is not complete in time; hyper restarts that timer whenever it
//! waits for a new request head, so it is also the idle timeout of a keep-alive
//! connection. At the cap, the oldest connection without a request in flight is closed
//! to make room (a slow-header or idle connection is never "in flight"); only when every
//! connection is busy with a real request is the new one closed at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// Connection limits (from `[serve]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request head (or the next one on a kept-alive connection) must arrive within this.
    pub header_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Largest request head accepted (431 beyond): alert senders send a few hundred bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub open: AtomicUsize,
    /// Connections closed to make room at the cap (idle or slow ones).
    pub evicted: AtomicU64,
    /// New connections closed at once: the cap was reached with every connection busy.
    pub refused: AtomicU64,
}

struct Conn {
    /// Requests being answered on this connection.
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// By id, i.e. oldest first.
    conns: BTreeMap<u64, Conn>,
}

impl Table {
    /// Makes room for one more connection: `false` when every open one is busy.
    fn make_room(&mut self, max: usize, stats: &ConnStats) -> bool {
        if self.conns.len() < max {
            return true;
        }
        let idle = self.conns.iter().find(|(_, c)| c.busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id);
        match idle.and_then(|id| self.conns.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                stats.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `stop` changes; then open connections are asked
/// to finish their request and close. Returns when the loop has stopped accepting.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    mut stop: watch::Receiver<bool>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                // EMFILE and friends: back off briefly instead of spinning.
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = stop.changed() => break,
        };
        let (id, busy, close) = {
            let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
            if !t.make_room(limits.max_connections, &stats) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
            let id = t.next;
            t.next += 1;
            let c = Conn { busy: Arc::new(AtomicUsize::new(0)), close: Arc::new(Notify::new()) };
            let (busy, close) = (c.busy.clone(), c.close.clone());
            t.conns.insert(id, c);
            (id, busy, close)
        };
        let _ = stream.set_nodelay(true);
        stats.open.fetch_add(1, Ordering::SeqCst);
        let (router, table, stats, mut stop) = (router.clone(), table.clone(), stats.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let router = router.clone();
                let guard = Busy::new(busy.clone());
                async move {
                    let resp = tower_call(router, req).await;
                    drop(guard);
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(MAX_HEADER_BYTES)
                .max_headers(64);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.notified() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = close.notified() => {}
                    }
                }
            }
            table.lock().unwrap_or_else(|e| e.into_inner()).conns.remove(&id);
            stats.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Stopped accepting. Connections still open get the caller's grace; then they are
    // closed here so nothing outlives the service's stop.
    let table2 = table.clone();
    let close_all = move || {
        for c in table2.lock().unwrap_or_else(|e| e.into_inner()).conns.values() {
            c.close.notify_one();
        }
    };
    // The caller bounds how long it waits for us; closing is immediate on drop of the
    // runtime too, but say so explicitly for idle ones now.
    let idle: Vec<Arc<Notify>> = table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .conns
        .values()
        .filter(|c| c.busy.load(Ordering::SeqCst) == 0)
        .map(|c| c.close.clone())
        .collect();
    for n in idle {
        n.notify_one();
    }
    let wait_open = async {
        while stats.open.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(super::CONNECTIONS_GRACE, wait_open).await.is_err() {
        close_all();
    }
}

/// Counts a request in flight on its connection until dropped.
struct Busy(Arc<AtomicUsize>);
impl Busy {
    fn new(n: Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::SeqCst);
        Busy(n)
    }
}
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn tower_call(router: Router, req: hyper::Request<Incoming>) -> axum::response::Response {
    use tower_service::Service;
    let mut router = router;
    match router.call(req.map(axum::body::Body::new)).await {
        Ok(r) => r,
        Err(e) => match e {},
    }
}
