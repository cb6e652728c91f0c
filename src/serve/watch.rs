//! The watch: every `interval`, one sweep (`autopsy::sweep`) over the VMs running on
//! this node (a pidfile in run_dir, each proven by `autopsy::prepare`): every VM's first
//! sample, one window, every VM's second sample, so a round costs about one window
//! however many VMs run. A VM whose verdict stays `block-path-frozen` for `consecutive`
//! checks is exported in `/metrics` as wedged and, if its policy has
//! `watch_autopsy = true`, gets an autopsy without waiting for an alert.
//!
//! A VM with a queued or running autopsy is left out of the round: QMP serves one client
//! at a time, and the capture must not lose its session to a check. The sweep itself
//! holds a VM's socket for one short command at a time (pvestatd polls it every 10 s).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;

use super::config::Watch;
use super::jobs::{Origin, Submit};
use super::runner::Service;
use super::watch_state::VmWatch;
use crate::archive::manifest::Trigger;
use crate::autopsy::sweep;
use crate::diagnose::Verdict;
use crate::target::VmId;

pub use crate::autopsy::sweep::running_vms;

/// Runs until the store shuts down.
pub async fn run(ctx: Arc<Service>, w: Watch) {
    ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).consecutive = w.consecutive;
    let mut settings = ctx.settings.clone();
    if let Some(win) = w.window {
        settings.sample_interval = win;
    }
    let mut tick = tokio::time::interval(w.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.store.is_shutting_down() {
            return;
        }
        let vms = running_vms(&settings.run_dir);
        ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).vms.retain(|id, _| vms.contains(id));
        // The round's VMs: those without an active job, claimed under the lock.
        let round: Vec<VmId> = {
            let mut g = ctx.watch.lock().unwrap_or_else(|e| e.into_inner());
            let round: Vec<VmId> = vms.iter().copied().filter(|&v| !ctx.store.vm_active(v)).collect();
            g.checking = round.iter().copied().collect();
            round
        };
        let results = check(&settings, &ctx.stuck, &round, w.parallel).await;
        ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).checking.clear();
        for (vmid, result) in results {
            if ctx.store.is_shutting_down() {
                return;
            }
            let (verdict, error) = match result {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            };
            let now = Utc::now();
            let (streak, since) = {
                let mut g = ctx.watch.lock().unwrap_or_else(|e| e.into_inner());
                g.checks += 1;
                let prev = g.vms.get(&vmid).cloned();
                let (streak, since) = match (verdict, prev) {
                    (Some(Verdict::BlockPathFrozen), Some(p)) if p.frozen_streak > 0 => {
                        (p.frozen_streak + 1, p.streak_since)
                    }
                    (Some(Verdict::BlockPathFrozen), _) => (1, Some(now)),
                    _ => (0, None),
                };
                g.vms.insert(
                    vmid,
                    VmWatch { verdict, frozen_streak: streak, streak_since: since, checked_at: now, error },
                );
                (streak, since)
            };
            if streak >= w.consecutive {
                let policy = ctx.cfg.policy_for(vmid, &BTreeMap::new());
                if policy.watch_autopsy {
                    let since = since.unwrap_or(now);
                    let origin = Origin {
                        kind: "watch".into(),
                        reason: Some(format!(
                            "block-path-frozen for {streak} consecutive checks since {}",
                            since.format("%Y-%m-%dT%H:%M:%SZ")
                        )),
                        labels: BTreeMap::new(),
                        annotations: BTreeMap::new(),
                        generator_url: None,
                        firing: Some(format!("watch:{vmid}@{}", since.to_rfc3339())),
                        restart_requested: false,
                    };
                    if let Ok((id, super::jobs::Admission::Started)) = ctx.store.submit(Submit { vmid, origin, policy })
                    {
                        ctx.spawn(id);
                    }
                }
            }
        }
    }
}

/// One sweep over `vmids`: proof, the diagnose runbook, the verdicts. Nothing kept.
async fn check(
    settings: &crate::config::Settings,
    stuck: &Arc<crate::stuck::Stuck>,
    vmids: &[VmId],
    parallel: usize,
) -> Vec<(VmId, Result<Verdict, String>)> {
    let opts = sweep::Options {
        parallel,
        stuck: stuck.clone(),
        trigger: Trigger { kind: "watch".into(), ..Default::default() },
        command_line: vec!["wedge-autopsy".into(), "serve".into(), "watch".into()],
    };
    let cancel = crate::cancel::Cancel::new();
    match sweep::sweep(vmids, settings, &opts, &cancel).await {
        Ok(rows) => rows
            .into_iter()
            .map(|(vmid, r)| (vmid, r.map(|c| c.diagnosis.verdict).map_err(|e| e.to_string())))
            .collect(),
        Err(e) => vmids.iter().map(|&v| (v, Err(e.to_string()))).collect(),
    }
}
