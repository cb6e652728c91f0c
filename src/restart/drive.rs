//! The restart itself, step by step as the module docs number them: gate, HA,
//! cooldown, stop, proven kill, wait for exit, start, verify; then the records.

use std::io::Write;
use std::time::Instant;

use chrono::Utc;

use super::guards::{gate, ha_managed, ha_resources_path, kill_proven, process_exists, verify_new, wait_gone, Kill};
use super::record::{
    cooldown_active, cooldown_path, outcome_path, write_cooldown, CooldownState, Recorder, RestartOutcome,
};
use super::{human, method_for, RestartError, RestartParams, StopResult, VmRef};
use crate::archive::{self, Sealed};
use crate::cancel::Cancel;
use crate::target::{Target, VmId};

/// Test-only hook (documented in tests/restart.rs), compiled only with the `test-hooks`
/// feature, which release builds and the package never enable: when set to a path `P`,
/// the run writes `P.ready` (the old pid) right before the kill decision and waits up to
/// 120 s for `P.go` to exist. Lets a test replace the process behind the old pid, to
/// prove that [`Target::still_same`] guards the kill. Recorded as an action when used.
#[cfg(feature = "test-hooks")]
pub const TEST_HOOK_ENV: &str = "WEDGE_AUTOPSY_TEST_HOOK_BEFORE_KILL";

/// A restart requested and not (yet) done: the VM untouched, the old QEMU running.
fn untouched(req: &RestartParams, old: &Target, sealed: Option<&Sealed>) -> RestartOutcome {
    RestartOutcome {
        requested: true,
        performed: false,
        method: req.cfg.method_name().into(),
        vmid: old.vmid,
        old_pid: old.pid,
        new_pid: None,
        escalated: false,
        old_stopped: false,
        vm_state: "running-old".into(),
        qmp_status: None,
        started_at: Utc::now(),
        duration_ms: 0,
        error: None,
        error_kind: None,
        exit: None,
        archive: sealed.map(|s| s.path.display().to_string()),
        actions: Vec::new(),
    }
}

/// The outcome of a restart refused before anything was done (the evidence does not
/// allow it): recorded like any other, with the VM untouched.
pub fn refuse(req: &RestartParams, old: &Target, sealed: Option<&Sealed>, err: RestartError) -> RestartOutcome {
    RestartOutcome {
        error: Some(err.to_string()),
        error_kind: Some(err.kind().into()),
        exit: Some(err.exit()),
        ..untouched(req, old, sealed)
    }
}

/// Performs the restart after an autopsy: gate, refusals, stop, proven kill, start,
/// verification, records. Blocking; call it from a plain thread or `spawn_blocking`
/// (the QMP check uses the current tokio runtime if there is one). Never panics on a
/// failure: every failure is `error` in the outcome.
pub fn run(req: &RestartParams, old: &Target, sealed: Option<&Sealed>, cancel: &Cancel) -> RestartOutcome {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let mut rec = Recorder::new(req.quiet, req.t0);
    let mut o = RestartOutcome { started_at, ..untouched(req, old, sealed) };
    let result = drive(req, old, sealed, cancel, &mut rec, &mut o);
    if let Err(e) = &result {
        o.error = Some(e.to_string());
        o.error_kind = Some(e.kind().into());
        o.exit = Some(e.exit());
    }
    o.duration_ms = t0.elapsed().as_millis() as u64;
    if o.old_stopped {
        let st = CooldownState {
            last_attempt_at: started_at,
            old_pid: old.pid,
            new_pid: o.new_pid,
            performed: o.performed,
            archive: o.archive.clone(),
        };
        let at = Utc::now();
        let s = Instant::now();
        match write_cooldown(&req.out, old.vmid, &st) {
            Ok(()) => rec.push(
                at,
                s,
                "record",
                true,
                format!("cooldown state {}", cooldown_path(&req.out, old.vmid).display()),
            ),
            Err(e) => rec.push(
                at,
                s,
                "record",
                false,
                format!("cannot write {}: {e}", cooldown_path(&req.out, old.vmid).display()),
            ),
        };
    }
    o.actions = std::mem::take(&mut rec.actions);
    if let Some(s) = sealed {
        let p = outcome_path(&s.path);
        let bytes = serde_json::to_vec_pretty(&o).expect("outcome serializes");
        if let Err(e) = archive::write_durable_new(&p, &bytes) {
            if !req.quiet {
                let _ = writeln!(std::io::stderr(), "wedge-autopsy: warning: cannot write {}: {e}", p.display());
            }
        }
    }
    o
}

/// The numbered steps in order; the first failure ends the restart (the caller records it).
fn drive(
    req: &RestartParams,
    old: &Target,
    sealed: Option<&Sealed>,
    cancel: &Cancel,
    rec: &mut Recorder,
    o: &mut RestartOutcome,
) -> Result<(), RestartError> {
    check_gate(sealed, rec)?;
    let ha = check_ha(req, old.vmid, rec)?;
    check_cooldown(req, old.vmid, rec)?;
    let method = method_for(&req.cfg, ha, old)?;
    o.method = method.name().into();
    if cancel.is_cancelled() {
        return Err(RestartError::Interrupted);
    }
    // From here on the VM goes down; the cooldown counts from this attempt.
    let vm = VmRef { vmid: old.vmid, old, cfg: &req.cfg };
    let stop = method.stop(&vm, rec);
    #[cfg(feature = "test-hooks")]
    test_hook(old, rec);
    let kill_error = kill_if_still_there(old, &stop, rec, o)?;
    wait_exit(req, old, stop, kill_error, rec, o)?;
    // 5. Start and verify.
    if let Err(e) = method.start(&vm, rec) {
        return Err(RestartError::StartFailed(e));
    }
    o.vm_state = "unverified".into();
    verify_started(req, old, rec, o)
}

/// Step 1, the gate: right before anything is stopped.
fn check_gate(sealed: Option<&Sealed>, rec: &mut Recorder) -> Result<(), RestartError> {
    let (at, s) = (Utc::now(), Instant::now());
    match gate(sealed) {
        Ok(r) => {
            rec.push(at, s, "verify-archive", true, format!("{} files, sha256 {}", r.files, r.sha256));
            Ok(())
        }
        Err(e) => {
            rec.push(at, s, "verify-archive", false, e.to_string());
            Err(e)
        }
    }
}

/// Step 2, HA: an HA-managed VM only with `--allow-ha` (then through ha-manager). Returns
/// whether it is HA-managed.
fn check_ha(req: &RestartParams, vmid: VmId, rec: &mut Recorder) -> Result<bool, RestartError> {
    let (at, s) = (Utc::now(), Instant::now());
    let ha = match ha_managed(&req.layout.pve_dir, vmid) {
        Ok(h) => h,
        Err(detail) => {
            rec.push(at, s, "ha-check", false, detail.clone());
            return Err(RestartError::HaUnknown { vmid, detail });
        }
    };
    let ha_path = ha_resources_path(&req.layout.pve_dir).display().to_string();
    if ha && !req.opts.allow_ha {
        rec.push(at, s, "ha-check", false, format!("listed in {ha_path}; refused without --allow-ha"));
        return Err(RestartError::HaManaged { vmid, path: ha_path });
    }
    rec.push(
        at,
        s,
        "ha-check",
        true,
        if ha { format!("listed in {ha_path}; through ha-manager (--allow-ha)") } else { "not HA-managed".into() },
    );
    Ok(ha)
}

/// For `--dry-run`: the refusal the restart of `vmid` would meet before stopping anything
/// (HA without `--allow-ha`, the cooldown), from the same checks [`run`] makes. Reads only.
pub fn predict(req: &RestartParams, vmid: VmId) -> Result<(), RestartError> {
    let mut rec = Recorder::new(true, Instant::now());
    check_ha(req, vmid, &mut rec)?;
    check_cooldown(req, vmid, &mut rec)
}

/// Step 3, cooldown: no second restart of one VM within `cooldown`, unless `--force`.
fn check_cooldown(req: &RestartParams, vmid: VmId, rec: &mut Recorder) -> Result<(), RestartError> {
    let (at, s) = (Utc::now(), Instant::now());
    match cooldown_active(&req.out, vmid, req.cfg.cooldown, at) {
        Some((age, _)) if !req.opts.force => {
            let e = RestartError::Cooldown {
                vmid,
                ago: human(age),
                cooldown: human(req.cfg.cooldown),
                path: cooldown_path(&req.out, vmid).display().to_string(),
            };
            rec.push(at, s, "cooldown", false, e.to_string());
            return Err(e);
        }
        Some((age, _)) => {
            rec.push(at, s, "cooldown", true, format!("last restart {} ago, overridden by --force", human(age)))
        }
        None => rec.push(at, s, "cooldown", true, format!("no restart within {}", human(req.cfg.cooldown))),
    };
    Ok(())
}

/// Step 4: is the old QEMU still there after the stop? Kill it only if it is proven to be the
/// same process. Returns the kill's error, if the signal could not be sent.
fn kill_if_still_there(
    old: &Target,
    stop: &StopResult,
    rec: &mut Recorder,
    o: &mut RestartOutcome,
) -> Result<Option<String>, RestartError> {
    let vmid = old.vmid;
    if !process_exists(old.pid) {
        return Ok(None);
    }
    match stop {
        StopResult::Done | StopResult::TimedOut(_) => {}
        StopResult::Failed(detail) => {
            // Proxmox refused (locked by backup/migration, …): do not go around it.
            if old.still_same() {
                return Err(RestartError::StopFailed { pid: old.pid, detail: detail.clone() });
            }
            return Ok(None);
        }
    }
    let (at, s) = (Utc::now(), Instant::now());
    match kill_proven(old) {
        Kill::Sent(how) => {
            o.escalated = true;
            rec.push(
                at,
                s,
                "kill",
                true,
                format!("SIGKILL to pid {} ({how}) after proving it is still VM {vmid}'s QEMU", old.pid),
            );
        }
        Kill::NotSame => {
            rec.push(at, s, "kill", true, format!("pid {} is no longer VM {vmid}'s QEMU (start time or cmdline differ: exited, exiting or reused); not signalled", old.pid));
        }
        Kill::Gone => {
            rec.push(at, s, "kill", true, format!("pid {} exited before the kill; nothing signalled", old.pid));
        }
        Kill::Error(e) => {
            rec.push(at, s, "kill", false, format!("SIGKILL to pid {} failed: {e}", old.pid));
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// Step 4b: the old QEMU must be gone before a new one starts; if it is not, say why.
fn wait_exit(
    req: &RestartParams,
    old: &Target,
    stop: StopResult,
    kill_error: Option<String>,
    rec: &mut Recorder,
    o: &mut RestartOutcome,
) -> Result<(), RestartError> {
    let (at, s) = (Utc::now(), Instant::now());
    match wait_gone(old, req.cfg.kill_wait) {
        None => {
            o.old_stopped = true;
            o.vm_state = "down".into();
            rec.push(at, s, "wait-exit", true, format!("old QEMU pid {} is gone", old.pid));
            Ok(())
        }
        Some((state, wchan)) => {
            let secs = req.cfg.kill_wait.as_secs();
            rec.push(
                at,
                s,
                "wait-exit",
                false,
                format!("pid {} still present after {}s (state {state}, wchan {wchan})", old.pid, secs),
            );
            o.vm_state = "stuck".into();
            Err(match (stop, kill_error) {
                (_, Some(detail)) => RestartError::KillFailed { pid: old.pid, detail },
                (StopResult::Failed(detail), None) if !o.escalated => RestartError::StopFailed { pid: old.pid, detail },
                _ if !o.escalated => RestartError::NotProven { pid: old.pid, state },
                _ => RestartError::Survived { pid: old.pid, secs, state, wchan },
            })
        }
    }
}

/// Step 5b: a new QEMU, proven by the capture's rule, answering QMP if configured.
fn verify_started(
    req: &RestartParams,
    old: &Target,
    rec: &mut Recorder,
    o: &mut RestartOutcome,
) -> Result<(), RestartError> {
    let (at, s) = (Utc::now(), Instant::now());
    match verify_new(req, old) {
        Ok((new, status)) => {
            rec.push(
                at,
                s,
                "verify-new",
                true,
                format!(
                    "new pid {} proven by {:?}{}",
                    new.pid,
                    new.proof,
                    status.as_ref().map(|st| format!(", query-status: {st}")).unwrap_or_default()
                ),
            );
            o.new_pid = Some(new.pid);
            o.qmp_status = status;
            o.performed = true;
            o.vm_state = "restarted".into();
            Ok(())
        }
        Err((new_pid, e)) => {
            o.new_pid = new_pid;
            rec.push(at, s, "verify-new", false, e.clone());
            Err(RestartError::VerifyNew(e))
        }
    }
}

/// See [`TEST_HOOK_ENV`].
#[cfg(feature = "test-hooks")]
fn test_hook(old: &Target, rec: &mut Recorder) {
    use std::path::PathBuf;
    use std::time::Duration;
    let Some(p) = std::env::var_os(TEST_HOOK_ENV) else { return };
    let base = PathBuf::from(p);
    let with = |ext: &str| {
        let mut s = base.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (at, s) = (Utc::now(), Instant::now());
    let _ = std::fs::write(with(".ready"), format!("{}\n", old.pid));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !with(".go").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    rec.push(at, s, "test-hook", true, format!("paused before the kill decision ({TEST_HOOK_ENV}; tests only)"));
}
