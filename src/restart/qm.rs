//! Proxmox backends: `qm` (default) and `ha-manager` (HA-managed VMs, `--allow-ha`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{CommandEnd, Recorder, RestartMethod, StopResult, VmRef};

/// `qm stop <VMID> --timeout <T>` under the tool's deadline, then `qm start <VMID>`.
///
/// `qm stop` sends QMP `quit`, waits `T`, then SIGTERM, ~10 s later SIGKILL. A wedged
/// QEMU ignores `quit` and SIGTERM; when qm has not finished by `stop_deadline` its
/// process group is killed (releasing its config lock) and the caller SIGKILLs the
/// proven QEMU itself.
pub struct Qm {
    pub bin: PathBuf,
}

/// `qm stop --timeout` takes whole seconds.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Qm {
    fn stop_argv(&self, vm: &VmRef) -> Vec<String> {
        vec![
            self.bin.display().to_string(),
            "stop".into(),
            vm.vmid.to_string(),
            "--timeout".into(),
            whole_secs(vm.cfg.timeout).to_string(),
        ]
    }
    fn start_argv(&self, vm: &VmRef) -> Vec<String> {
        vec![self.bin.display().to_string(), "start".into(), vm.vmid.to_string()]
    }
}

impl RestartMethod for Qm {
    fn name(&self) -> &'static str {
        "qm"
    }

    fn plan(&self, vm: &VmRef) -> Vec<String> {
        vec![
            format!(
                "stop      {} (deadline {}s, then its process group is killed)",
                self.stop_argv(vm).join(" "),
                vm.cfg.stop_deadline.as_secs()
            ),
            format!("start     {} (deadline {}s)", self.start_argv(vm).join(" "), vm.cfg.start_timeout.as_secs()),
        ]
    }

    fn stop(&self, vm: &VmRef, rec: &mut Recorder) -> StopResult {
        match rec.run("stop", self.stop_argv(vm), vm.cfg.stop_deadline) {
            CommandEnd::Ok(_) => StopResult::Done,
            CommandEnd::TimedOut(m) => StopResult::TimedOut(m),
            CommandEnd::Failed(_, m) | CommandEnd::Error(m) => StopResult::Failed(m),
        }
    }

    fn start(&self, vm: &VmRef, rec: &mut Recorder) -> Result<(), String> {
        match rec.run("start", self.start_argv(vm), vm.cfg.start_timeout) {
            CommandEnd::Ok(_) => Ok(()),
            CommandEnd::Failed(_, m) | CommandEnd::TimedOut(m) | CommandEnd::Error(m) => Err(m),
        }
    }
}

/// For a VM listed in `ha/resources.cfg`: the HA manager owns its state, so the
/// request goes through it. `ha-manager set vm:<VMID> --state stopped`, then wait (up
/// to `stop_deadline`) for the proven QEMU to exit (the LRM runs the stop with its own
/// timeouts); then `ha-manager set vm:<VMID> --state started`, after which the caller's
/// verification waits for the new QEMU. With the requested state `stopped`, a
/// SIGKILL of a QEMU that outlived the deadline does not fight the HA manager.
pub struct HaManager {
    pub bin: PathBuf,
}

impl HaManager {
    fn set(&self, vm: &VmRef, state: &str) -> Vec<String> {
        vec![self.bin.display().to_string(), "set".into(), format!("vm:{}", vm.vmid), "--state".into(), state.into()]
    }
}

impl RestartMethod for HaManager {
    fn name(&self) -> &'static str {
        "ha-manager"
    }

    fn plan(&self, vm: &VmRef) -> Vec<String> {
        vec![
            format!(
                "stop      {}, then wait up to {}s for pid {} to exit",
                self.set(vm, "stopped").join(" "),
                vm.cfg.stop_deadline.as_secs(),
                vm.old.pid
            ),
            format!("start     {}", self.set(vm, "started").join(" ")),
        ]
    }

    fn stop(&self, vm: &VmRef, rec: &mut Recorder) -> StopResult {
        let t0 = Instant::now();
        match rec.run("stop", self.set(vm, "stopped"), vm.cfg.stop_deadline) {
            CommandEnd::Ok(_) => {}
            CommandEnd::TimedOut(m) => return StopResult::TimedOut(m),
            CommandEnd::Failed(_, m) | CommandEnd::Error(m) => return StopResult::Failed(m),
        }
        let (at, s) = (chrono::Utc::now(), Instant::now());
        let left = vm.cfg.stop_deadline.saturating_sub(t0.elapsed());
        match super::guards::wait_gone(vm.old, left) {
            None => {
                rec.push(at, s, "wait-ha-stop", true, format!("pid {} exited (HA state stopped)", vm.old.pid));
                StopResult::Done
            }
            Some((state, _)) => {
                let m = format!(
                    "pid {} still running (state {state}) {}s after the HA stop request",
                    vm.old.pid,
                    vm.cfg.stop_deadline.as_secs()
                );
                rec.push(at, s, "wait-ha-stop", false, m.clone());
                StopResult::TimedOut(m)
            }
        }
    }

    fn start(&self, vm: &VmRef, rec: &mut Recorder) -> Result<(), String> {
        match rec.run("start", self.set(vm, "started"), vm.cfg.start_timeout) {
            CommandEnd::Ok(_) => Ok(()),
            CommandEnd::Failed(_, m) | CommandEnd::TimedOut(m) | CommandEnd::Error(m) => Err(m),
        }
    }
}
