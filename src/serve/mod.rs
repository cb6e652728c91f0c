//! `wedge-autopsy serve`: alerts trigger the autopsy, results reach the ticket, and an
//! optional watch finds wedges before a human notices.
//!
//! In: `[serve]` from the shared config file, the CLI's settings, and a [`Restarter`].
//! Out: an HTTP service (see [`http`]) until SIGTERM/SIGINT; then it stops accepting,
//! cancels queued jobs, lets running autopsies seal (bounded by `shutdown_grace`, after
//! which they are interrupted and seal what they have), delivers their results, and exits.
//!
//! Modules: [`config`] (`[serve]`), [`auth`] (token, HMAC), [`alert`] (payloads, alert →
//! VM), [`jobs`] (dedup, per-VM and global limits, records), [`runner`] (one job end to
//! end), [`restart`] (the seam to the restart), [`notify`] (POST, hook, copy), [`watch`]
//! (periodic diagnose), [`metrics`] (Prometheus text), [`http`] (routes).

pub mod alert;
pub mod auth;
pub mod config;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod restart;
pub mod runner;
pub mod watch;
pub mod watch_state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::IntoFuture;

use tokio::sync::Semaphore;

pub use restart::{RestartOutcome, RestartRequest, Restarter};

use crate::cancel::Cancel;
use crate::config::{FileConfig, Settings};
use crate::error::{Error, Exit};

/// How long open HTTP connections get to finish after a stop signal.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(5);

/// How long interrupted captures get to seal and deliver after the grace is over.
const AFTER_GRACE: Duration = Duration::from_secs(30);

/// Reads `[serve]` from the file the settings came from (already validated as a whole by
/// `Settings::load`; `[serve]` itself is validated here).
pub fn load_config(settings: &Settings, listen: Option<&str>) -> Result<config::ServeConfig, Error> {
    let table = match &settings.config_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::BadInput(format!("cannot read config {}: {e}", p.display())))?;
            let fc: FileConfig = toml::from_str(&text)
                .map_err(|e| Error::BadInput(format!("config {}: {}", p.display(), e.message())))?;
            fc.serve
        }
        None => None,
    };
    config::parse(table.as_ref(), listen).map_err(|e| {
        let file = settings.config_file.as_ref().map(|p| format!("config {}: ", p.display())).unwrap_or_default();
        Error::BadInput(format!("{file}{e}"))
    })
}

/// Runs the service until a stop signal. The restart is injected so the restart module
/// (or a test double) can be wired without this module knowing it.
pub fn serve(listen: Option<String>, settings: Settings, restarter: Arc<dyn Restarter>) -> Result<Exit, Error> {
    let cfg = load_config(&settings, listen.as_deref())?;
    // main() restores SIGPIPE's default for subcommands; a service must not die when a
    // client or the log reader goes away mid-write.
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    std::fs::create_dir_all(&settings.out).map_err(|e| {
        Error::BadInput(format!("cannot create output directory {}: {e}; fix --out or `out`", settings.out.display()))
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    rt.block_on(run(cfg, settings, restarter))
}

async fn run(cfg: config::ServeConfig, settings: Settings, restarter: Arc<dyn Restarter>) -> Result<Exit, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::BadInput(format!("cannot listen on {}: {e}; choose another --listen", cfg.listen)))?;
    let local = listener.local_addr().map_err(anyhow::Error::from)?;
    let limits = jobs::Limits {
        repeat_window: cfg.repeat_window,
        vm_cooldown: cfg.vm_cooldown,
        max_queue: cfg.max_queue,
        keep_jobs: cfg.keep_jobs,
    };
    let grace = cfg.shutdown_grace;
    let watch_cfg = cfg.watch.clone();
    let ctx = Arc::new(runner::Ctx {
        slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
        store: jobs::Store::new(limits),
        cfg,
        settings,
        restarter,
        hard_stop: Cancel::new(),
        in_flight: AtomicUsize::new(0),
        watch: Mutex::new(watch_state::WatchState::default()),
    });
    if let Some(w) = watch_cfg {
        tokio::spawn(watch::run(ctx.clone(), w));
    }
    let mut term = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let mut int = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    eprintln!(
        "wedge-autopsy serve: listening on http://{local} (node {}, out {}, auth {})",
        ctx.settings.node,
        ctx.settings.out.display(),
        if ctx.cfg.token.is_some() { "bearer token" } else { "none, loopback only" }
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, http::router(ctx.clone()))
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .into_future(),
    );
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ctx.store.shut_down();
    eprintln!("wedge-autopsy serve: stopping: no new autopsies; letting running ones seal");
    let _ = stop_tx.send(());
    // Open connections get a moment to finish their request; a client that holds one
    // open must not hold up the seal.
    match tokio::time::timeout(CONNECTIONS_GRACE, server).await {
        Ok(Ok(Err(e))) => eprintln!("wedge-autopsy serve: server error while stopping: {e}"),
        Err(_) => eprintln!(
            "wedge-autopsy serve: connections still open after {} s; closing them",
            CONNECTIONS_GRACE.as_secs()
        ),
        _ => {}
    }
    drain(&ctx, grace).await;
    Ok(Exit::Ok)
}

/// Waits for job tasks: up to `grace` undisturbed, then interrupts captures (they seal
/// what they have) and waits up to [`AFTER_GRACE`] more.
async fn drain(ctx: &runner::Ctx, grace: Duration) {
    let wait = |limit: Duration| async move {
        let end = Instant::now() + limit;
        while ctx.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ctx.in_flight.load(Ordering::SeqCst) == 0
    };
    if wait(grace).await {
        return;
    }
    eprintln!(
        "wedge-autopsy serve: shutdown grace ({} s) is over: interrupting running captures so they seal now",
        grace.as_secs()
    );
    ctx.hard_stop.cancel();
    if !wait(AFTER_GRACE).await {
        eprintln!(
            "wedge-autopsy serve: {} job(s) still running after the grace; exiting anyway",
            ctx.in_flight.load(Ordering::SeqCst)
        );
    }
}
