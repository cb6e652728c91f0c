//! The redaction pass at seal time: the place where the target, `/proc` and the
//! manifest meet the redactor (so `redact` stays a leaf-level text module).

use std::path::Path;

use crate::archive::manifest::{Manifest, Redaction};
use crate::redact::{self, Redactor};
use crate::target::Target;

/// The secret values of the VM, learned from the sources themselves: the target's command
/// line, its `/proc/PID/environ` and its VM config. Also used by `serve` for what leaves
/// the host outside the archive (the completion document, the hook's environment).
pub fn learn_target(target: &Target) -> Redactor {
    let mut r = Redactor::default();
    r.learn_argv(&target.cmdline);
    // Best effort: a process that is gone has no environ to learn from (nor to leak).
    if let Ok(raw) = crate::procfs::read_capped(Path::new(&format!("/proc/{}/environ", target.pid)), 1 << 20) {
        r.learn_file("environ", raw.split(|b| *b == 0).collect::<Vec<_>>().join(&b'\n').as_slice());
    }
    if let Ok(raw) = crate::procfs::read_capped(&target.config_path, 1 << 20) {
        r.learn_file("vm.conf", &raw);
    }
    r
}

/// The one pass before sealing: learns from the sources themselves (the target's command
/// line, its `/proc/PID/environ` and its VM config, read again because the staged copies
/// are already redacted) and from the staged files; replaces what it learned in every
/// staged file and in the manifest (whose target command line is also redacted
/// structurally). An I/O error leaves `applied: false`, which the manifest shows.
pub(super) fn seal_pass(dir: &Path, target: &Target, manifest: &mut Manifest) -> Redaction {
    let r = &mut learn_target(target);
    let mut result = r.scrub_dir(dir).unwrap_or_default();
    if let Some(serde_json::Value::Object(t)) = manifest.target.as_mut() {
        if let Some(serde_json::Value::Array(a)) = t.get_mut("cmdline") {
            let args: Vec<String> = a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect();
            *a = redact::argv(&args).0.into_iter().map(serde_json::Value::String).collect();
        }
    }
    for v in [manifest.target.as_mut()].into_iter().flatten() {
        result.values_replaced += r.scrub_json(v);
    }
    let mut other = serde_json::json!([manifest.command_line, manifest.trigger.reason]);
    if r.scrub_json(&mut other) > 0 {
        manifest.command_line = serde_json::from_value(other[0].take()).unwrap_or_default();
        manifest.trigger.reason = serde_json::from_value(other[1].take()).unwrap_or_default();
    }
    result
}
