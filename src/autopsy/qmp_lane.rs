//! The run's one QMP session, shared by every QMP step and the background samplers.
//!
//! Connected lazily at the first QMP step and recorded as step `qmp-connect`, so the
//! manifest tells "no greeting" (socket held or QEMU frozen) from "greeting but
//! `qmp_capabilities` unanswered" (main loop wedged). Once QMP failed or timed out, later
//! QMP steps are skipped without sending anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::archive::Staging;
use crate::cancel::Cancel;
use crate::exec::{self, ExecError, Spec};
use crate::qmp::{policy, QmpClient, QmpConfig, QmpError, Reply};
use crate::step::{StepRecord, StepStatus};
use crate::target::{Monitor, Target};

/// How long to listen for a reply that missed its deadline, before closing.
const LATE_REPLY_WAIT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Lane {
    socket: PathBuf,
    /// `Some((program, domain))`: QMP through `virsh qemu-monitor-command`.
    virsh: Option<(String, String)>,
    no_qmp: bool,
    attempted: bool,
    /// Why QMP is not usable; set by a failed connect or the first timeout.
    unavailable: Arc<std::sync::Mutex<Option<String>>>,
    client: Arc<Mutex<Option<QmpClient>>>,
    connect_notes: Arc<std::sync::Mutex<Vec<u8>>>,
}

/// Why a QMP step produced no reply.
pub enum LaneError {
    /// Nothing was sent: QMP was never usable or was given up on earlier.
    NotSent(String),
    Qmp(QmpError),
}

impl Lane {
    pub fn new(target: &Target, no_qmp: bool) -> Lane {
        let virsh = match (&target.monitor, &target.domain) {
            (Monitor::Virsh { program }, Some(domain)) => Some((program.clone(), domain.clone())),
            _ => None,
        };
        Lane {
            socket: target.qmp_socket.clone(),
            virsh,
            no_qmp,
            attempted: false,
            unavailable: Default::default(),
            client: Default::default(),
            connect_notes: Default::default(),
        }
    }

    pub fn attempted(&self) -> bool {
        self.attempted
    }

    /// Connects (retrying within the budget while another client holds the socket).
    pub async fn connect(&mut self, deadline: Instant, cancel: &Cancel) -> StepRecord {
        self.attempted = true;
        let start = Utc::now();
        let t0 = Instant::now();
        let mut rec = StepRecord {
            id: crate::step::QMP_CONNECT_ID.into(),
            kind: "qmp".into(),
            status: StepStatus::Ok,
            start,
            duration_ms: 0,
            error: None,
            notes: vec![],
            files: vec![],
            optional: false,
            qmp_failure: None,
        };
        if self.no_qmp {
            rec.status = StepStatus::Skipped;
            rec.error = Some("--no-qmp: QMP not used".into());
            *self.unavailable.lock().unwrap() = Some("--no-qmp".into());
            return rec;
        }
        if let Some((program, domain)) = &self.virsh {
            rec.notes.push(format!(
                "through `{program} qemu-monitor-command {domain}`: libvirtd holds the monitor socket, so no session of our own"
            ));
            rec.duration_ms = t0.elapsed().as_millis() as u64;
            return rec;
        }
        let mut cfg = QmpConfig::default();
        cfg.connect_budget = cfg.connect_budget.min(deadline.saturating_duration_since(Instant::now()));
        let budget = cfg.connect_budget + cfg.capabilities_timeout + Duration::from_secs(1);
        let outcome = tokio::select! {
            r = tokio::time::timeout(budget, QmpClient::connect_traced(&self.socket, &cfg)) => r,
            _ = super::cancelled(cancel) => {
                rec.status = StepStatus::Interrupted;
                rec.error = Some("interrupted while connecting".into());
                *self.unavailable.lock().unwrap() = Some("interrupted".into());
                rec.duration_ms = t0.elapsed().as_millis() as u64;
                return rec;
            }
        };
        match outcome {
            Ok(Ok(client)) => {
                if let Some(g) = client.greeting() {
                    rec.notes.push(format!("greeting: {}", compact(g, 200)));
                }
                *self.client.lock().await = Some(client);
            }
            Ok(Err(failure)) => {
                let e = &failure.error;
                rec.status = StepStatus::Failed;
                rec.error = Some(format!("{} ({})", e, e.classify()));
                rec.qmp_failure = Some(crate::step::QmpFailure::from_class(e.classify()));
                rec.notes.push(format!("{} connect attempts", failure.attempts));
                self.connect_notes.lock().unwrap().extend_from_slice(&failure.transcript_jsonl());
                *self.unavailable.lock().unwrap() = Some(format!("QMP connect failed: {}", e.classify()));
            }
            Err(_) => {
                rec.status = StepStatus::Timeout;
                rec.error = Some(format!("connect did not finish within {} ms", budget.as_millis()));
                rec.qmp_failure = Some(crate::step::QmpFailure::NoGreeting);
                *self.unavailable.lock().unwrap() = Some("QMP connect timed out".into());
            }
        }
        rec.duration_ms = t0.elapsed().as_millis() as u64;
        rec
    }

    /// Runs one read-only command; `NotSent` if QMP is (or became) unusable.
    pub async fn execute(&self, command: &str, args: Option<Value>, timeout: Duration) -> Result<Reply, LaneError> {
        if let Some(why) = self.unavailable.lock().unwrap().clone() {
            return Err(LaneError::NotSent(why));
        }
        if let Some((program, domain)) = self.virsh.clone() {
            return self.execute_virsh(program, domain, command, args, timeout).await;
        }
        let mut guard = self.client.lock().await;
        let Some(client) = guard.as_mut() else {
            return Err(LaneError::NotSent("no QMP session".into()));
        };
        match client.execute(command, args, timeout).await {
            Ok(r) => Ok(r),
            Err(e) => {
                if matches!(
                    e,
                    QmpError::Timeout { .. }
                        | QmpError::Closed
                        | QmpError::ReplyTooLarge { .. }
                        | QmpError::Protocol(_)
                ) {
                    *self.unavailable.lock().unwrap() = Some(format!("QMP gave up after {command}: {}", e.classify()));
                }
                Err(LaneError::Qmp(e))
            }
        }
    }

    /// One command through `virsh qemu-monitor-command`, under the same allowlist and
    /// deadline as a direct session; the exchange goes into the transcript.
    async fn execute_virsh(
        &self,
        program: String,
        domain: String,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Reply, LaneError> {
        policy::check(command, args.as_ref()).map_err(|r| LaneError::Qmp(QmpError::Refused(r)))?;
        let mut msg = serde_json::json!({"execute": command});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let line = msg.to_string();
        self.note("send", &line);
        let spec = Spec::new(vec![program, "qemu-monitor-command".into(), domain, line], timeout);
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || exec::run(&spec, &Cancel::new()))
            .await
            .map_err(|e| LaneError::Qmp(QmpError::Protocol(format!("virsh task failed: {e}"))))?;
        let out = match out {
            Ok(o) => o,
            Err(ExecError::NotFound(p)) => {
                *self.unavailable.lock().unwrap() = Some(format!("{p} is not installed"));
                return Err(LaneError::NotSent(format!("{p} is not installed")));
            }
            Err(e) => return Err(LaneError::Qmp(QmpError::Protocol(e.to_string()))),
        };
        if out.timed_out {
            *self.unavailable.lock().unwrap() = Some(format!("QMP gave up after {command}: timeout (virsh)"));
            self.note("note", &format!("virsh killed after {} ms", timeout.as_millis()));
            return Err(LaneError::Qmp(QmpError::Timeout { command: command.into(), after: timeout }));
        }
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.note("recv", &stdout);
        if !out.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let desc = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("failed").to_string();
            return Err(LaneError::Qmp(QmpError::Command { command: command.into(), class: "virsh".into(), desc }));
        }
        let value: Value = serde_json::from_str(&stdout)
            .map_err(|e| LaneError::Qmp(QmpError::Protocol(format!("virsh printed no JSON reply ({e})"))))?;
        Ok(Reply { raw: stdout.into_bytes(), value: value["return"].clone(), elapsed: t0.elapsed() })
    }

    fn note(&self, dir: &str, line: &str) {
        let entry = serde_json::json!({"t": Utc::now().to_rfc3339(), "kind": dir, "via": "virsh", "line": line});
        let mut t = self.connect_notes.lock().unwrap();
        t.extend_from_slice(entry.to_string().as_bytes());
        t.push(b'\n');
    }

    /// Saves the transcript and events, then closes the session (pvestatd wants the socket).
    /// After a timeout it listens briefly (sending nothing) so a late answer is on record.
    pub async fn finish(&self, staging: &Staging) {
        let sink = staging.sink();
        let mut client = self.client.lock().await.take();
        if let Some(c) = client.as_mut().filter(|c| c.disabled_reason().is_some()) {
            let late = c.collect_late(LATE_REPLY_WAIT).await;
            if late > 0 {
                let _ = sink.write(
                    "qmp/late-replies.txt",
                    format!("{late} replies arrived after their deadline; see transcript.jsonl\n").as_bytes(),
                );
            }
        }
        let mut transcript = self.connect_notes.lock().unwrap().clone();
        if let Some(c) = &client {
            transcript.extend_from_slice(&c.transcript_jsonl());
            let events = serde_json::to_vec_pretty(c.events()).unwrap_or_default();
            let _ = sink.write("qmp/events.json", &events);
        }
        if !transcript.is_empty() {
            let _ = sink.write("qmp/transcript.jsonl", &transcript);
        }
        sink.close();
    }
}

fn compact(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}
