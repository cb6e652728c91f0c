//! The redaction pass at seal time: the place where the target, `/proc` and the
//! manifest meet the redactor (so `redact` stays a leaf-level text module).

use std::path::Path;

use crate::archive::manifest::{Manifest, Redaction};
use crate::redact::{self, Redactor};
use crate::target::Target;

/// The secret values of the VM, learned from the sources themselves: the target's command
/// line, its `/proc/PID/environ` and its VM config.
fn learn_target(target: &Target) -> Redactor {
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

/// [`learn_target`] on a thread of its own, at most 5 s: reading `environ` takes the
/// target's memory lock, which a wedged QEMU may hold. Past the deadline (or while an
/// earlier read of this VM is still stuck) only the command line is learned, and the
/// second value says why.
pub(super) async fn learn_target_bounded(target: &Target) -> (Redactor, Option<String>) {
    let t = target.clone();
    let key = format!("pid {} environ", target.pid);
    match crate::stuck::bounded(crate::stuck::process(), &key, LEARN_BUDGET, move || learn_target(&t)).await {
        Ok(r) => (r, None),
        Err(e) => {
            let mut r = Redactor::default();
            r.learn_argv(&target.cmdline);
            (r, Some(format!("redaction learned from the command line only: reading the environment {e}")))
        }
    }
}

const LEARN_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// The one pass before sealing: starts from what `learned` holds (the sources themselves,
/// see [`learn_target_bounded`]: the staged copies are already redacted) and learns from
/// the staged files; replaces what it learned in every staged file and in the manifest
/// (whose target command line is also redacted structurally). An I/O error leaves
/// `applied: false`, which the manifest shows. Returns the result and the redactor with
/// everything it learned, for what the run shows outside the archive (the printed
/// summary, `--json`).
pub(super) fn seal_pass(dir: &Path, mut learned: Redactor, manifest: &mut Manifest) -> (Redaction, Redactor) {
    let r = &mut learned;
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
    (result, learned)
}

/// A reason someone typed or an alert carried, structurally redacted where it enters a
/// run (`password=…`, URL user-info): the manifest, the summary and every copy of them
/// then hold only the redacted text.
pub(super) fn trigger(t: &crate::archive::manifest::Trigger) -> crate::archive::manifest::Trigger {
    let mut t = t.clone();
    t.reason = t.reason.map(|r| redact::text(&r).0);
    t
}
