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
pub mod listen;
pub(crate) mod log;
pub mod metrics;
pub mod notify;
pub mod perms;
pub mod restart;
pub mod runner;
pub mod watch;
pub mod watch_state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

pub use restart::{RestartReport, RestartRequest, Restarter};

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
    let cfg = config::parse(table.as_ref(), listen).map_err(|e| {
        let file = settings.config_file.as_ref().map(|p| format!("config {}: ", p.display())).unwrap_or_default();
        Error::BadInput(format!("{file}{e}"))
    })?;
    check_trust(&cfg, settings).map_err(Error::BadInput)?;
    Ok(cfg)
}

/// Refuses to serve when a file that decides what root runs could be changed by
/// others: the config, the runbook directory and the runbook in use, the hook, and the
/// `qm` backend (VM config, stop/start).
fn check_trust(cfg: &config::ServeConfig, settings: &Settings) -> Result<(), String> {
    if let Some(p) = &settings.config_file {
        perms::check_trusted("config", p)?;
    }
    if settings.runbook_dir.is_dir() {
        perms::check_trusted("runbook directory", &settings.runbook_dir)?;
    }
    let name = cfg.runbook.as_ref().or(settings.runbook.as_ref());
    if let Some(n) = name.filter(|n| n.contains('/')) {
        perms::check_trusted("runbook", std::path::Path::new(n))?;
    } else if let Some(n) = name {
        let p = settings.runbook_dir.join(format!("{n}.toml"));
        if p.is_file() {
            perms::check_trusted("runbook", &p)?;
        }
    }
    if let Some(argv0) = cfg.on_complete.as_ref().and_then(|a| a.first()) {
        let p = perms::resolve_program(argv0)
            .ok_or_else(|| format!("[serve] on_complete program {argv0:?} is not found on PATH: give its full path"))?;
        perms::check_trusted("[serve] on_complete program", &p)?;
    }
    if let Some(qm) = perms::resolve_program(&settings.qm.to_string_lossy()) {
        perms::check_trusted("qm backend", &qm)?;
    }
    check_restart_backend(settings)
}

/// The `[restart]` backend's programs: the `stop`/`start` argv programs of
/// `method = "command"` (which must be found), `virsh` for libvirt, `qm` and
/// `ha-manager` (checked where they are installed).
fn check_restart_backend(settings: &Settings) -> Result<(), String> {
    use crate::restart::{MethodKind, Options, RestartConfig};
    let rc = RestartConfig::from_settings(settings, &Options::default()).map_err(|e| e.to_string())?;
    let mut optional = vec![("[restart] ha_manager", rc.ha_manager.clone())];
    match rc.method {
        MethodKind::Qm => optional.push(("[restart] qm backend", rc.qm.clone())),
        MethodKind::Libvirt => optional.push(("[restart] virsh", rc.virsh.clone())),
        MethodKind::Command => {
            for (what, argv) in [("[restart] stop program", &rc.stop), ("[restart] start program", &rc.start)] {
                let Some(argv0) = argv.first() else { continue };
                let p = perms::resolve_program(argv0)
                    .ok_or_else(|| format!("{what} {argv0:?} is not found on PATH: give its full path"))?;
                perms::check_trusted(what, &p)?;
            }
        }
    }
    for (what, prog) in optional {
        if let Some(p) = perms::resolve_program(&prog.to_string_lossy()) {
            perms::check_trusted(what, &p)?;
        }
    }
    Ok(())
}

/// Runs the service until a stop signal. The restart is injected so the restart module
/// (or a test double) can be wired without this module knowing it.
pub fn serve(listen: Option<String>, settings: Settings, restarter: Arc<dyn Restarter>) -> Result<Exit, Error> {
    let cfg = load_config(&settings, listen.as_deref())?;
    // main() restores SIGPIPE's default for subcommands; a service must not die when a
    // client or the log reader goes away mid-write.
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // 0700 from the start, not only after the first capture: archives hold environment
    // and memory maps.
    crate::archive::prepare_out(&settings.out)?;
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
    let limits = jobs::QueueLimits {
        repeat_window: cfg.repeat_window,
        vm_cooldown: cfg.vm_cooldown,
        max_queue: cfg.max_queue,
        keep_jobs: cfg.keep_jobs,
        max_firings_per_vm: cfg.max_firings_per_vm,
    };
    let grace = cfg.shutdown_grace;
    let watch_cfg = cfg.watch.clone();
    let ctx = Arc::new(runner::Service {
        slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
        store: jobs::Store::new(limits),
        cfg,
        settings,
        restarter,
        hard_stop: Cancel::new(),
        in_flight: AtomicUsize::new(0),
        watch: Mutex::new(watch_state::WatchState::default()),
        conns: Arc::new(listen::ConnStats::default()),
        stuck: crate::stuck::Stuck::new(crate::stuck::MAX_STUCK),
    });
    if let Some(w) = watch_cfg {
        tokio::spawn(watch::run(ctx.clone(), w));
    }
    let mut term = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let mut int = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    log::info!(
        "listening on http://{local} (node {}, out {}, auth {})",
        ctx.settings.node,
        ctx.settings.out.display(),
        match (&ctx.cfg.token, ctx.cfg.allow_loopback_without_token) {
            (Some(_), _) => "bearer token",
            (None, true) => "none: loopback without token allowed by config",
            (None, false) => "none: state-changing requests refused until token_file is set",
        }
    );
    let conn_limits =
        listen::ConnLimits { header_timeout: ctx.cfg.header_timeout, max_connections: ctx.cfg.max_connections };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(listen::serve(
        listener,
        http::router(ctx.clone()),
        conn_limits,
        ctx.conns.clone(),
        stop_rx.clone(),
    ));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tokio::spawn(watchdog(local, stop_rx));
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ctx.store.shut_down();
    log::info!("stopping: no new autopsies; letting running ones seal");
    let _ = stop_tx.send(true);
    // Open connections get a moment to finish their request (the listener closes them
    // after CONNECTIONS_GRACE); a client that holds one open must not hold up the seal.
    if tokio::time::timeout(CONNECTIONS_GRACE + Duration::from_secs(1), server).await.is_err() {
        log::warn_line!("connections still open after {} s; closing them", CONNECTIONS_GRACE.as_secs());
    }
    drain(&ctx, grace).await;
    Ok(Exit::Ok)
}

/// Waits for job tasks: up to `grace` undisturbed, then interrupts captures (they seal
/// what they have) and waits up to [`AFTER_GRACE`] more.
async fn drain(ctx: &runner::Service, grace: Duration) {
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
    log::warn_line!("shutdown grace ({} s) is over: interrupting running captures so they seal now", grace.as_secs());
    ctx.hard_stop.cancel();
    if !wait(AFTER_GRACE).await {
        log::warn_line!(
            "{} job(s) still running after the grace; exiting anyway",
            ctx.in_flight.load(Ordering::SeqCst)
        );
    }
}

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` only after a real request to our own
/// `/healthz` over loopback was answered, so a wedged accept loop or runtime gets the
/// service restarted. Does nothing when the unit sets no watchdog.
async fn watchdog(local: std::net::SocketAddr, mut stop: tokio::sync::watch::Receiver<bool>) {
    // As sd_watchdog_enabled(3): WATCHDOG_USEC set, and WATCHDOG_PID (if set) is ours.
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let pid_ok = std::env::var("WATCHDOG_PID").map(|p| p == std::process::id().to_string()).unwrap_or(true);
    if usec == 0 || !pid_ok {
        return;
    }
    let period = Duration::from_micros(usec) / 3;
    let ip = if local.ip().is_unspecified() {
        match local {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        local.ip()
    };
    let url = format!("http://{}/healthz", std::net::SocketAddr::new(ip, local.port()));
    loop {
        if healthz_answers(&url, period).await {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            log::warn_line!("watchdog: {url} did not answer within {} ms; not pinging systemd", period.as_millis());
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One GET of `url` with `Connection: close`, answered 200 (or 503 while stopping) in time.
pub async fn healthz_answers(url: &str, timeout: Duration) -> bool {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    let client: Client<_, Empty<axum::body::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
    let Ok(req) = hyper::Request::get(url).header("connection", "close").body(Empty::new()) else { return false };
    matches!(
        tokio::time::timeout(timeout, client.request(req)).await,
        Ok(Ok(r)) if r.status().as_u16() == 200 || r.status().as_u16() == 503
    )
}
