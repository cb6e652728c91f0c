//! The HTTP surface. Handlers check auth, read the body under a size cap, map alerts to
//! VMs, and hand jobs to the runner; they never wait for a capture, so every answer is
//! quick: `202` with the job id.
//!
//! Status codes: 401 auth, 415 not `application/json`, 400 malformed body, 413
//! oversized (bytes or alerts), 404/409/421/422 an alert
//! that maps to no local running VM (final for Alertmanager), 503 only when a retry
//! later would help (queue full, stopping).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use super::alert::{self, AlertRefusal, Source};
use super::auth::Auth;
use super::jobs::{Admission, Origin, Submit, SubmitError};
use super::metrics;
use super::runner::Service;
use crate::target::VmId;

/// A body that trickles in slower than this is refused (408), so a slow sender cannot
/// hold a connection and a worker.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// `.vmlist` lives on pmxcfs, which can hang when the cluster filesystem does; mapping
/// runs on a blocking thread under this bound and a hang is answered 503 (retry helps).
const LOCATE_TIMEOUT: Duration = Duration::from_secs(3);

pub fn router(ctx: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/alertmanager", post(alertmanager))
        .route("/v1/grafana", post(grafana))
        .route("/v1/autopsy", post(autopsy))
        .route("/v1/autopsies", get(list))
        .route("/v1/autopsies/{id}", get(one))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(ctx)
}

fn auth(ctx: &Service) -> Auth {
    Auth {
        token: ctx.cfg.token.clone(),
        hmac_secret: ctx.cfg.hmac_secret.clone(),
        signature_header: ctx.cfg.signature_header.clone(),
        timestamp_header: ctx.cfg.signature_timestamp_header.clone(),
        max_skew: ctx.cfg.signature_max_skew,
    }
}

fn error(status: u16, msg: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({"error": msg.into()}))).into_response()
}

/// The gate of every state-changing request: a token (required unless the operator
/// allowed loopback without one), `Content-Type: application/json` (a browser's form
/// post cannot send it without a preflight), then the body under `max_body`. `Err` is
/// the response to send.
async fn authed_body(ctx: &Service, headers: &HeaderMap, body: Body, signed: bool) -> Result<Vec<u8>, Response> {
    let a = auth(ctx);
    if a.token.is_none() && !ctx.cfg.allow_loopback_without_token {
        ctx.store.count_refused("unauthorized");
        return Err(error(
            401,
            "no [serve] token_file is configured, so requests that start autopsies are refused: set token_file (mode 0600), or allow_loopback_without_token = true to accept any local user",
        ));
    }
    if let Err(e) = a.check_token(headers) {
        ctx.store.count_refused("unauthorized");
        return Err(error(401, e.to_string()));
    }
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        ctx.store.count_refused("malformed");
        return Err(error(415, "send the body as JSON with `Content-Type: application/json`"));
    }
    let max = ctx.cfg.max_body;
    let too_big = || {
        error(
            413,
            format!("body larger than {max} bytes ([serve] max_body): send fewer alerts per notification (max_alerts)"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        ctx.store.count_refused("too-large");
        return Err(too_big());
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect()).await;
    let Ok(read) = read else {
        ctx.store.count_refused("malformed");
        return Err(error(408, format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs())));
    };
    let bytes = match read {
        Ok(c) => c.to_bytes().to_vec(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            ctx.store.count_refused("too-large");
            return Err(too_big());
        }
        Err(e) => {
            ctx.store.count_refused("malformed");
            return Err(error(400, format!("could not read the body: {e}")));
        }
    };
    if signed {
        if let Err(e) = a.check_signature(headers, &bytes) {
            ctx.store.count_refused("unauthorized");
            return Err(error(401, e.to_string()));
        }
    }
    Ok(bytes)
}

async fn alertmanager(State(ctx): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    alerts(ctx, headers, body, Source::Alertmanager).await
}

async fn grafana(State(ctx): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    alerts(ctx, headers, body, Source::Grafana).await
}

async fn alerts(ctx: Arc<Service>, headers: HeaderMap, body: Body, source: Source) -> Response {
    let bytes = match authed_body(&ctx, &headers, body, source == Source::Grafana).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let payload = match alert::parse(&bytes, source) {
        Ok(p) => p,
        Err(e) => {
            ctx.store.count_refused("malformed");
            return error(400, e);
        }
    };
    // A cap on alerts per payload: one huge payload cannot flush the memory of firings
    // (Alertmanager's `max_alerts` and Grafana's grouping keep real ones far below).
    if payload.alerts.len() > ctx.cfg.max_alerts {
        ctx.store.count_refused("too-large");
        return error(
            413,
            format!(
                "payload carries {} alerts, more than [serve] max_alerts ({}): set max_alerts on the sender's webhook",
                payload.alerts.len(),
                ctx.cfg.max_alerts
            ),
        );
    }
    let firing: Vec<alert::Alert> = payload.alerts.iter().filter(|a| a.is_firing()).cloned().collect();
    let resolved = payload.alerts.len() - firing.len();
    // Resolved alerts never stop a capture: they are acknowledged and ignored.
    let located = {
        let ctx2 = ctx.clone();
        let firing = firing.clone();
        blocking_locate(&ctx, move || {
            firing
                .iter()
                .map(|a| {
                    alert::vmid_of(a, &ctx2.cfg).and_then(|vmid| {
                        alert::locate(vmid, &ctx2.settings.pve_dir, &ctx2.settings.run_dir, &ctx2.settings.node)
                            .map(|_| vmid)
                    })
                })
                .collect::<Vec<_>>()
        })
        .await
    };
    let located = match located {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut jobs = Vec::new();
    let mut refused: Vec<(AlertRefusal, String)> = Vec::new();
    let mut busy: Option<SubmitError> = None;
    for (a, located) in firing.iter().zip(located) {
        let vmid = match located {
            Ok(v) => v,
            Err(r) => {
                ctx.store.count_refused("refused");
                refused.push((r, a.describe()));
                continue;
            }
        };
        let origin = Origin {
            kind: "alert".into(),
            reason: Some(format!(
                "{} alert {}",
                if source == Source::Alertmanager { "Alertmanager" } else { "Grafana" },
                a.describe()
            )),
            labels: alert::bounded(&a.labels),
            annotations: alert::bounded(&a.annotations),
            generator_url: (!a.generator_url.is_empty()).then(|| alert::cut(&a.generator_url, alert::MAX_TEXT)),
            firing: Some(a.firing_key()),
            restart_requested: false,
        };
        let policy = ctx.cfg.policy_for(vmid, &a.labels);
        match ctx.store.submit(Submit { vmid, origin, policy }) {
            Ok((id, outcome)) => {
                if outcome == Admission::Started {
                    ctx.spawn(id);
                }
                jobs.push(json!({"id": id, "vmid": vmid, "alert": a.describe(), "outcome": outcome}));
            }
            Err(e) => busy = Some(e),
        }
    }
    let refused_json: Vec<Value> = refused
        .iter()
        .map(|(r, a)| json!({"alert": a, "status": r.status(), "reason": r.to_string(), "node": r.node()}))
        .collect();
    let body = json!({"jobs": jobs, "refused": refused_json, "resolved_ignored": resolved});
    // A full queue or a stopping service: 503 even if other alerts of this payload were
    // taken, because the redelivery of those is recognised as a duplicate.
    if let Some(e) = busy {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string(), "jobs": body["jobs"], "refused": body["refused"]})),
        )
            .into_response();
        r.headers_mut().insert("retry-after", HeaderValue::from_static("30"));
        return r;
    }
    if !jobs.is_empty() {
        return (StatusCode::ACCEPTED, Json(body)).into_response();
    }
    if let Some((first, _)) = refused.first() {
        let status = if refused.iter().all(|(r, _)| r.status() == first.status()) { first.status() } else { 422 };
        let mut b = body;
        b["error"] = json!(first.to_string());
        return (StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY), Json(b)).into_response();
    }
    // Only resolved alerts (or none): nothing to do, and nothing to retry.
    (StatusCode::OK, Json(body)).into_response()
}

/// `POST /v1/autopsy` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiRequest {
    vmid: Value,
    #[serde(default)]
    restart: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn autopsy(State(ctx): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match authed_body(&ctx, &headers, body, false).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: ApiRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            ctx.store.count_refused("malformed");
            return error(
                400,
                format!("malformed request: {e}; send {{\"vmid\": 102, \"restart\": false, \"reason\": \"…\"}}"),
            );
        }
    };
    let text = match &req.vmid {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let vmid: VmId = match text.parse() {
        Ok(v) => v,
        Err(e) => {
            ctx.store.count_refused("malformed");
            return error(400, format!("{e}"));
        }
    };
    let ctx2 = ctx.clone();
    let located = match blocking_locate(&ctx, move || {
        alert::locate(vmid, &ctx2.settings.pve_dir, &ctx2.settings.run_dir, &ctx2.settings.node)
    })
    .await
    {
        Ok(l) => l,
        Err(r) => return r,
    };
    if let Err(r) = located {
        ctx.store.count_refused("refused");
        return (
            StatusCode::from_u16(r.status()).unwrap_or(StatusCode::NOT_FOUND),
            Json(json!({"error": r.to_string(), "node": r.node()})),
        )
            .into_response();
    }
    let origin = Origin {
        kind: "api".into(),
        reason: req.reason.map(|r| alert::cut(&r, alert::MAX_TEXT)),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        generator_url: None,
        firing: None,
        restart_requested: req.restart,
    };
    let policy = ctx.cfg.policy_for(vmid, &BTreeMap::new());
    match ctx.store.submit(Submit { vmid, origin, policy }) {
        Ok((id, outcome)) => {
            if outcome == Admission::Started {
                ctx.spawn(id);
            }
            (StatusCode::ACCEPTED, Json(json!({"id": id, "vmid": vmid, "outcome": outcome}))).into_response()
        }
        Err(e) => {
            let mut r = error(503, e.to_string());
            r.headers_mut().insert("retry-after", HeaderValue::from_static("30"));
            r
        }
    }
}

/// Runs a mapping closure (file reads, possibly on pmxcfs) on a blocking thread, bounded
/// by [`LOCATE_TIMEOUT`].
async fn blocking_locate<T: Send + 'static>(
    ctx: &Service,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    match crate::stuck::bounded(&ctx.stuck, "cluster list", LOCATE_TIMEOUT, f).await {
        Ok(v) => Ok(v),
        Err(crate::stuck::Bounded::Failed(e)) => Err(error(500, format!("mapping task failed: {e}"))),
        Err(e) => {
            let mut r = error(503, format!("reading the cluster VM list: {e} (is pmxcfs hanging?): retry later"));
            r.headers_mut().insert("retry-after", HeaderValue::from_static("30"));
            Err(r)
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(State(ctx): State<Arc<Service>>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Err(e) = auth(&ctx).check_token(&headers) {
        return error(401, e.to_string());
    }
    let jobs = ctx.store.recent(q.limit.unwrap_or(50).min(ctx.cfg.keep_jobs));
    Json(json!({"autopsies": jobs})).into_response()
}

async fn one(State(ctx): State<Arc<Service>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = auth(&ctx).check_token(&headers) {
        return error(401, e.to_string());
    }
    match id.parse::<u64>().ok().and_then(|id| ctx.store.get(id)) {
        Some(j) => Json(j).into_response(),
        None => error(
            404,
            format!("no autopsy {id:?} (only the last {} are kept): GET /v1/autopsies lists them", ctx.cfg.keep_jobs),
        ),
    }
}

async fn healthz(State(ctx): State<Arc<Service>>) -> Response {
    let (queued, running) = ctx.store.active();
    if ctx.store.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping", "queued": queued, "running": running})),
        )
            .into_response();
    }
    Json(json!({"status": "ok", "queued": queued, "running": running})).into_response()
}

async fn metrics_text(State(ctx): State<Arc<Service>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let (queued, running) = ctx.store.active();
    let (jobs_kept, dedup_keys) = ctx.store.sizes();
    let watch = ctx.cfg.watch.as_ref().map(|_| ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).clone());
    let connections = metrics::Connections {
        open: ctx.conns.open.load(Relaxed) as u64,
        evicted: ctx.conns.evicted.load(Relaxed),
        refused: ctx.conns.refused.load(Relaxed),
    };
    let snap = metrics::MetricsSnapshot {
        counters: ctx.store.counters(),
        queued,
        running,
        jobs_kept,
        dedup_keys,
        watch,
        connections,
    };
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&snap)).into_response()
}
