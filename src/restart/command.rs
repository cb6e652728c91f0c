//! `method = "command"`: site-specific stop and start programs, as argv lists in the
//! config (`stop = ["/usr/local/sbin/vmctl", "stop", "{vmid}"]`). Placeholders:
//! `{vmid}` and `{pid}` (the proven old QEMU's pid). No shell is involved.

use super::{CommandEnd, Recorder, RestartMethod, StopResult, VmRef};

pub struct CommandMethod {
    pub stop: Vec<String>,
    pub start: Vec<String>,
}

const PLACEHOLDERS: [&str; 2] = ["{vmid}", "{pid}"];

/// Checks one argv template from the config: present, non-empty program, and no
/// placeholder other than `{vmid}` and `{pid}`.
pub fn validate(key: &str, argv: Option<&[String]>) -> Result<(), String> {
    let argv = argv.ok_or_else(|| format!("method = \"command\" needs `{key} = [\"program\", \"arg\", …]`"))?;
    if argv.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(format!("{key}: the first element must be the program to run"));
    }
    for a in argv {
        let rest = PLACEHOLDERS.iter().fold(a.clone(), |s, p| s.replace(p, ""));
        if rest.contains('{') || rest.contains('}') {
            return Err(format!("{key}: {a:?} has a placeholder other than {{vmid}} and {{pid}}"));
        }
    }
    Ok(())
}

/// Fills `{vmid}` and `{pid}` into an argv template.
pub fn render(argv: &[String], vm: &VmRef) -> Vec<String> {
    argv.iter().map(|a| a.replace("{vmid}", &vm.vmid.to_string()).replace("{pid}", &vm.old.pid.to_string())).collect()
}

impl RestartMethod for CommandMethod {
    fn name(&self) -> &'static str {
        "command"
    }

    fn plan(&self, vm: &VmRef) -> Vec<String> {
        vec![
            format!("stop      {:?} (deadline {}s)", render(&self.stop, vm), vm.cfg.stop_deadline.as_secs()),
            format!("start     {:?} (deadline {}s)", render(&self.start, vm), vm.cfg.start_timeout.as_secs()),
        ]
    }

    fn stop(&self, vm: &VmRef, rec: &mut Recorder) -> StopResult {
        match rec.run("stop", render(&self.stop, vm), vm.cfg.stop_deadline) {
            CommandEnd::Ok(_) => StopResult::Done,
            CommandEnd::TimedOut(m) => StopResult::TimedOut(m),
            CommandEnd::Failed(_, m) | CommandEnd::Error(m) => StopResult::Failed(m),
        }
    }

    fn start(&self, vm: &VmRef, rec: &mut Recorder) -> Result<(), String> {
        match rec.run("start", render(&self.start, vm), vm.cfg.start_timeout) {
            CommandEnd::Ok(_) => Ok(()),
            CommandEnd::Failed(_, m) | CommandEnd::TimedOut(m) | CommandEnd::Error(m) => Err(m),
        }
    }
}
