//! The redaction pass at seal time: the place where the target, `/proc` and the
//! manifest meet the redactor (so `redact` stays a leaf-level text module).

use std::path::Path;

use crate::archive::manifest::{Manifest, Redaction};
use crate::redact::{self, Redactor};
use crate::target::Target;

/// Reads one source (at most 1 MiB) on a thread of its own, at most [`LEARN_BUDGET`]:
/// `environ` takes the target's memory lock, which a wedged QEMU may hold, and the config
/// lives on pmxcfs, which can hang. `Ok(None)`: there is no such file (a libvirt VM has
/// no Proxmox config; a process that is gone has no environ, nor anything to leak).
/// `Err` says why it could not be read.
async fn read_bounded(key: String, path: std::path::PathBuf) -> Result<Option<Vec<u8>>, String> {
    match crate::stuck::bounded(crate::stuck::process(), &key, LEARN_BUDGET, move || {
        crate::procfs::read_capped(&path, 1 << 20)
    })
    .await
    {
        Ok(Ok(raw)) => Ok(Some(raw)),
        Ok(Err(e)) if matches!(e.kind(), std::io::ErrorKind::NotFound) || e.raw_os_error() == Some(3) => Ok(None),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The secret values of the VM, learned from the sources themselves: the target's command
/// line, its VM config and its `/proc/PID/environ`, each read under its own deadline so a
/// stuck one costs only itself. The second value names what could not be read.
pub(super) async fn learn_target_bounded(target: &Target) -> (Redactor, Option<String>) {
    let mut r = Redactor::default();
    r.learn_argv(&target.cmdline);
    let mut missed = Vec::new();
    let config = target.config_path.clone();
    match read_bounded(format!("config {}", config.display()), config).await {
        Ok(Some(raw)) => r.learn_file("vm.conf", &raw),
        Ok(None) => {}
        Err(e) => missed.push(format!("the VM config ({e})")),
    }
    let environ = Path::new(&format!("/proc/{}/environ", target.pid)).to_path_buf();
    match read_bounded(format!("pid {} environ", target.pid), environ).await {
        Ok(Some(raw)) => r.learn_file("environ", raw.split(|b| *b == 0).collect::<Vec<_>>().join(&b'\n').as_slice()),
        Ok(None) => {}
        Err(e) => missed.push(format!("the environment ({e})")),
    }
    let note = (!missed.is_empty()).then(|| format!("redaction could not learn from {}", missed.join(" or ")));
    (r, note)
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
    // Step errors and notes quote commands and files (a stderr line, a path).
    for step in manifest.steps.iter_mut() {
        let Ok(mut v) = serde_json::to_value(&*step) else { continue };
        if r.scrub_json(&mut v) > 0 {
            match serde_json::from_value(v) {
                Ok(clean) => *step = clean,
                // Same type both ways, so this cannot happen; never keep the unscrubbed text.
                Err(e) => {
                    step.error = Some(format!("step record could not be redacted: {e}"));
                    step.notes.clear();
                }
            }
        }
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
