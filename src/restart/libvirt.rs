//! libvirt backend: `virsh destroy <domain>` (an immediate hard stop; libvirt sends
//! SIGTERM, then SIGKILL) and `virsh start <domain>`. The domain is taken from the
//! proven QEMU's own command line: its `-uuid` (unambiguous) or else its `-name`
//! (`guest=<name>,…` as libvirt writes it, or a plain `<name>`).

use std::path::PathBuf;

use super::{CommandEnd, Recorder, RestartMethod, StopResult, VmRef};
use crate::target::Target;

pub struct Libvirt {
    pub virsh: PathBuf,
    pub domain: String,
}

impl Libvirt {
    /// Resolves the domain from `old`'s command line; `Err` when it names neither.
    pub fn for_target(virsh: PathBuf, old: &Target) -> Result<Libvirt, String> {
        let domain = domain_of(&old.cmdline).ok_or_else(|| {
            format!("pid {}'s command line has neither -uuid nor -name, so its libvirt domain is unknown; use method = \"command\"", old.pid)
        })?;
        Ok(Libvirt { virsh, domain })
    }

    fn argv(&self, verb: &str) -> Vec<String> {
        vec![self.virsh.display().to_string(), verb.into(), self.domain.clone()]
    }
}

/// The libvirt domain of a QEMU command line: `-uuid <uuid>`, else `-name`'s name.
pub fn domain_of(cmdline: &[String]) -> Option<String> {
    let value = |opt: &str| cmdline.windows(2).find(|w| w[0] == opt).map(|w| w[1].clone());
    if let Some(u) = value("-uuid").filter(|u| !u.is_empty()) {
        return Some(u);
    }
    crate::target::name_from_opts(&value("-name")?)
}

impl RestartMethod for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn plan(&self, vm: &VmRef) -> Vec<String> {
        vec![
            format!("stop      {} (deadline {}s)", self.argv("destroy").join(" "), vm.cfg.stop_deadline.as_secs()),
            format!("start     {} (deadline {}s)", self.argv("start").join(" "), vm.cfg.start_timeout.as_secs()),
        ]
    }

    fn stop(&self, vm: &VmRef, rec: &mut Recorder) -> StopResult {
        match rec.run("stop", self.argv("destroy"), vm.cfg.stop_deadline) {
            CommandEnd::Ok(_) => StopResult::Done,
            CommandEnd::TimedOut(m) => StopResult::TimedOut(m),
            CommandEnd::Failed(_, m) | CommandEnd::Error(m) => StopResult::Failed(m),
        }
    }

    fn start(&self, vm: &VmRef, rec: &mut Recorder) -> Result<(), String> {
        match rec.run("start", self.argv("start"), vm.cfg.start_timeout) {
            CommandEnd::Ok(_) => Ok(()),
            CommandEnd::Failed(_, m) | CommandEnd::TimedOut(m) | CommandEnd::Error(m) => Err(m),
        }
    }
}
