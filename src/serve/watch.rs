//! The watch: every `interval`, `diagnose` each VM running on this node (a pidfile in
//! run_dir, proven by `autopsy::prepare`), one VM at a time. A VM whose verdict stays
//! `block-path-frozen` for `consecutive` checks is exported in `/metrics` as wedged and,
//! if its policy has `watch_autopsy = true`, gets an autopsy without waiting for an alert.
//!
//! A VM with a queued or running autopsy is skipped: QMP serves one client at a time, and
//! the capture must not lose its session to a check.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::config::Watch;
use super::jobs::{Origin, Submit};
use super::runner::Ctx;
use super::watch_state::VmWatch;
use crate::archive::manifest::Trigger;
use crate::autopsy::{self, Request};
use crate::diagnose::Verdict;
use crate::runbook;
use crate::target::VmId;

/// VMIDs with a `<VMID>.pid` file in `run_dir`.
pub fn running_vms(run_dir: &std::path::Path) -> Vec<VmId> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".pid").and_then(|s| s.parse::<VmId>().ok()) {
                out.insert(id);
            }
        }
    }
    out.into_iter().collect()
}

/// Runs until the store shuts down.
pub async fn run(ctx: Arc<Ctx>, w: Watch) {
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
        for vmid in vms {
            if ctx.store.is_shutting_down() {
                return;
            }
            {
                let mut g = ctx.watch.lock().unwrap_or_else(|e| e.into_inner());
                if ctx.store.vm_active(vmid) {
                    continue;
                }
                g.checking = Some(vmid);
            }
            let result = check(&settings, &ctx.stuck, vmid).await;
            ctx.watch.lock().unwrap_or_else(|e| e.into_inner()).checking = None;
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
                    if let Ok((id, super::jobs::Outcome::Started)) = ctx.store.submit(Submit { vmid, origin, policy }) {
                        ctx.spawn(id);
                    }
                }
            }
        }
    }
}

/// One `diagnose` of `vmid`: proof, the diagnose runbook, the verdict. Nothing kept.
async fn check(
    settings: &crate::config::Settings,
    stuck: &std::sync::Arc<crate::stuck::Stuck>,
    vmid: VmId,
) -> Result<Verdict, String> {
    let rb = runbook::load("diagnose", &settings.runbook_dir).map_err(|e| e.to_string())?;
    let req = Request {
        vmid,
        runbook: rb,
        stacks: None,
        no_qmp: false,
        trigger: Trigger { kind: "watch".into(), ..Default::default() },
        command_line: vec!["wedge-autopsy".into(), "serve".into(), "watch".into()],
        restart_gate: Default::default(),
    };
    let (r, s) = (req.clone(), settings.clone());
    let key = format!("vm {vmid}");
    let target = super::proof::run(stuck, &key, Duration::from_secs(15), move || autopsy::prepare(&r, &s))
        .await
        .map_err(|e| format!("proving the process: {e}"))?
        .map_err(|e| e.to_string())?;
    let cancel = crate::cancel::Cancel::new();
    let (d, _) = autopsy::diagnose_live(&req, settings, &target, &cancel).await.map_err(|e| e.to_string())?;
    Ok(d.verdict)
}
