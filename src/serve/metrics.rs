//! `/metrics`: Prometheus text exposition (format 0.0.4), rendered from snapshots of the
//! job store and the watch state. Collecting is the store's job; this only formats.

use std::fmt::Write;

use super::jobs::{Counters, DURATION_BUCKETS};
use super::watch_state::WatchState;
use crate::diagnose::Verdict;

/// Point-in-time numbers to render.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub counters: Counters,
    pub queued: usize,
    pub running: usize,
    pub jobs_kept: usize,
    pub dedup_keys: usize,
    pub watch: Option<WatchState>,
    pub connections: Connections,
}

/// The accept loop's numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Connections {
    pub open: u64,
    pub evicted: u64,
    pub refused: u64,
}

const VERDICTS: [Verdict; 8] = [
    Verdict::BlockPathFrozen,
    Verdict::MainLoopWedged,
    Verdict::QmpUnreachable,
    Verdict::Paused,
    Verdict::IoError,
    Verdict::ProcessStopped,
    Verdict::Healthy,
    Verdict::Inconclusive,
];

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(s: &MetricsSnapshot) -> String {
    let mut o = String::new();
    let c = &s.counters;
    head(&mut o, "wedge_autopsy_runs_total", "counter", "Finished autopsy jobs by result (sealed, failed, cancelled).");
    for r in ["sealed", "failed", "cancelled"] {
        let _ = writeln!(o, "wedge_autopsy_runs_total{{result=\"{r}\"}} {}", c.runs.get(r).copied().unwrap_or(0));
    }
    head(
        &mut o,
        "wedge_autopsy_run_duration_seconds",
        "histogram",
        "Wall time of finished autopsies, from start to seal.",
    );
    for (i, b) in DURATION_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            o,
            "wedge_autopsy_run_duration_seconds_bucket{{le=\"{b}\"}} {}",
            c.duration_buckets.get(i).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(o, "wedge_autopsy_run_duration_seconds_bucket{{le=\"+Inf\"}} {}", c.duration_count);
    let _ = writeln!(o, "wedge_autopsy_run_duration_seconds_sum {}", c.duration_sum);
    let _ = writeln!(o, "wedge_autopsy_run_duration_seconds_count {}", c.duration_count);
    head(
        &mut o,
        "wedge_autopsy_restarts_total",
        "counter",
        "Restarts after a capture, by outcome (ok, failed, not-attempted).",
    );
    for r in ["ok", "failed", "not-attempted"] {
        let _ =
            writeln!(o, "wedge_autopsy_restarts_total{{outcome=\"{r}\"}} {}", c.restarts.get(r).copied().unwrap_or(0));
    }
    head(&mut o, "wedge_autopsy_deliveries_total", "counter", "Webhook and API deliveries by outcome.");
    for (k, v) in &c.deliveries {
        let _ = writeln!(o, "wedge_autopsy_deliveries_total{{outcome=\"{k}\"}} {v}");
    }
    head(&mut o, "wedge_autopsy_queue_depth", "gauge", "Autopsies waiting for a concurrency slot.");
    let _ = writeln!(o, "wedge_autopsy_queue_depth {}", s.queued);
    head(&mut o, "wedge_autopsy_running", "gauge", "Autopsies capturing now.");
    let _ = writeln!(o, "wedge_autopsy_running {}", s.running);
    head(&mut o, "wedge_autopsy_jobs_kept", "gauge", "Job records kept for GET /v1/autopsies.");
    let _ = writeln!(o, "wedge_autopsy_jobs_kept {}", s.jobs_kept);
    head(&mut o, "wedge_autopsy_dedup_keys", "gauge", "Alert firings remembered for duplicate detection.");
    let _ = writeln!(o, "wedge_autopsy_dedup_keys {}", s.dedup_keys);
    head(&mut o, "wedge_autopsy_connections_open", "gauge", "HTTP connections open now.");
    let _ = writeln!(o, "wedge_autopsy_connections_open {}", s.connections.open);
    head(
        &mut o,
        "wedge_autopsy_connections_closed_total",
        "counter",
        "Connections closed by the connection cap: evicted (idle or slow, to make room) or refused (all busy).",
    );
    let _ = writeln!(o, "wedge_autopsy_connections_closed_total{{reason=\"evicted\"}} {}", s.connections.evicted);
    let _ = writeln!(o, "wedge_autopsy_connections_closed_total{{reason=\"refused\"}} {}", s.connections.refused);
    if let Some(w) = &s.watch {
        head(&mut o, "wedge_autopsy_watch_checks_total", "counter", "Watch diagnoses run.");
        let _ = writeln!(o, "wedge_autopsy_watch_checks_total {}", w.checks);
        head(
            &mut o,
            "wedge_autopsy_watch_verdict",
            "gauge",
            "1 for the verdict of each watched VM's last check, 0 for the others.",
        );
        for (vmid, v) in &w.vms {
            for verdict in VERDICTS {
                let on = u8::from(v.verdict == Some(verdict));
                let _ = writeln!(o, "wedge_autopsy_watch_verdict{{vmid=\"{vmid}\",verdict=\"{verdict}\"}} {on}");
            }
        }
        head(&mut o, "wedge_autopsy_watch_frozen_streak", "gauge", "Consecutive block-path-frozen checks per VM.");
        for (vmid, v) in &w.vms {
            let _ = writeln!(o, "wedge_autopsy_watch_frozen_streak{{vmid=\"{vmid}\"}} {}", v.frozen_streak);
        }
        head(
            &mut o,
            "wedge_autopsy_watch_wedged",
            "gauge",
            "1 when a VM stayed block-path-frozen for the configured consecutive checks.",
        );
        for (vmid, v) in &w.vms {
            let _ = writeln!(
                o,
                "wedge_autopsy_watch_wedged{{vmid=\"{vmid}\"}} {}",
                u8::from(w.consecutive > 0 && v.frozen_streak >= w.consecutive)
            );
        }
        head(
            &mut o,
            "wedge_autopsy_watch_check_errors",
            "gauge",
            "1 when a VM's last check could not run (proof or QMP failed).",
        );
        for (vmid, v) in &w.vms {
            let _ = writeln!(o, "wedge_autopsy_watch_check_errors{{vmid=\"{vmid}\"}} {}", u8::from(v.error.is_some()));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::watch_state::VmWatch;

    #[test]
    fn renders_runs_queue_and_watch_verdicts() {
        let mut s = MetricsSnapshot { queued: 2, ..Default::default() };
        s.counters.runs.insert("sealed", 3);
        s.counters.duration_buckets = vec![0; DURATION_BUCKETS.len()];
        let mut w = WatchState { consecutive: 2, ..Default::default() };
        w.vms.insert(
            "102".parse().unwrap(),
            VmWatch {
                verdict: Some(Verdict::BlockPathFrozen),
                frozen_streak: 2,
                streak_since: None,
                checked_at: chrono::Utc::now(),
                error: None,
            },
        );
        s.watch = Some(w);
        let t = render(&s);
        assert!(t.contains("wedge_autopsy_runs_total{result=\"sealed\"} 3"));
        assert!(t.contains("wedge_autopsy_queue_depth 2"));
        assert!(t.contains("wedge_autopsy_watch_verdict{vmid=\"102\",verdict=\"block-path-frozen\"} 1"));
        assert!(t.contains("wedge_autopsy_watch_verdict{vmid=\"102\",verdict=\"healthy\"} 0"));
        assert!(t.contains("wedge_autopsy_watch_wedged{vmid=\"102\"} 1"));
    }
}
