//! Results to the ticket: the completion document, POSTed to each `notify` URL with
//! bounded retries; the `on_complete` argv hook with the same facts in its environment;
//! and the optional copy of the archive and its sidecar to a shared directory, verified
//! by hash after the copy.
//!
//! Only `http://` targets are supported (no TLS stack is linked); put a local relay in
//! front of an https ticket system.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use super::jobs::Delivery;
use crate::archive;
use crate::cancel::Cancel;
use crate::exec;

/// What the ticket gets: one JSON document per finished job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub job: u64,
    pub vmid: u32,
    pub node: String,
    /// `sealed` or `failed`.
    pub state: String,
    pub verdict: Option<String>,
    pub facts: Vec<String>,
    /// The ticket-ready summary (the archive's summary.md plus the archive's own hash).
    pub summary_markdown: Option<String>,
    pub archive: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// Where the verified copy went (`copy_to`), if configured and it succeeded.
    pub copy: Option<String>,
    pub restart: Option<super::restart::RestartReport>,
    pub error: Option<String>,
    pub trigger: String,
    pub reason: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub generator_url: Option<String>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub duration_ms: u64,
}

impl Completion {
    /// The one redaction of what leaves the host outside the archive (the POSTed document
    /// and the hook's environment, which is built from it): every learned secret value
    /// replaced, and URL user-info or `password=`-style options in any text. Returns how
    /// many values were replaced.
    pub fn redact(&mut self, secrets: &mut crate::redact::Redactor) -> u64 {
        let Ok(mut v) = serde_json::to_value(&*self) else { return 0 };
        let n = secrets.scrub_json_text(&mut v);
        match serde_json::from_value(v) {
            Ok(doc) => *self = doc,
            // Cannot happen (same type both ways); never send the unredacted text.
            Err(e) => {
                *self = Completion { summary_markdown: None, facts: Vec::new(), ..self.clone() };
                self.error = Some(format!("completion could not be redacted: {e}"));
            }
        }
        n
    }
}

/// POSTs `doc` to every URL: each attempt bounded by `timeout`, up to `attempts`, with
/// backoff 1 s, 2 s, 4 s… (max 30 s). 2xx ends; 4xx other than 408/429 is final;
/// transport errors, 5xx, 408 and 429 are retried. `stop` ends the retries early
/// (service shutdown past its grace).
pub async fn post_all(
    urls: &[String],
    doc: &Completion,
    attempts: u32,
    timeout: Duration,
    stop: &Cancel,
) -> Vec<Delivery> {
    let body = Bytes::from(serde_json::to_vec(doc).unwrap_or_default());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut out = Vec::new();
    for url in urls {
        // The record (API, logs) names the target without its credentials.
        let mut d = Delivery { target: crate::redact::url(url), ok: false, attempts: 0, detail: String::new() };
        let mut backoff = Duration::from_secs(1);
        while d.attempts < attempts.max(1) {
            d.attempts += 1;
            let req = hyper::Request::post(url.as_str())
                .header("content-type", "application/json")
                .header("user-agent", concat!("wedge-autopsy/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(body.clone()));
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    d.detail = format!("bad URL: {e}");
                    break;
                }
            };
            let retry = match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(resp)) => {
                    let st = resp.status();
                    d.detail = format!("HTTP {}", st.as_u16());
                    if st.is_success() {
                        d.ok = true;
                        break;
                    }
                    st.is_server_error() || st.as_u16() == 408 || st.as_u16() == 429
                }
                Ok(Err(e)) => {
                    d.detail = format!("transport: {e}");
                    true
                }
                Err(_) => {
                    d.detail = format!("no answer within {} ms", timeout.as_millis());
                    true
                }
            };
            if !retry || d.attempts >= attempts || stop.is_cancelled() {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        out.push(d);
    }
    out
}

/// The environment of the `on_complete` hook: every fact as `WEDGE_*`.
pub fn hook_env(doc: &Completion) -> Vec<(String, String)> {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    let mut md = s(&doc.summary_markdown);
    if md.len() > 64 * 1024 {
        let mut cut = 64 * 1024;
        while !md.is_char_boundary(cut) {
            cut -= 1;
        }
        md.truncate(cut);
    }
    vec![
        ("WEDGE_JOB".into(), doc.job.to_string()),
        ("WEDGE_VMID".into(), doc.vmid.to_string()),
        ("WEDGE_NODE".into(), doc.node.clone()),
        ("WEDGE_STATE".into(), doc.state.clone()),
        ("WEDGE_VERDICT".into(), s(&doc.verdict)),
        ("WEDGE_ARCHIVE".into(), s(&doc.archive)),
        ("WEDGE_SIZE".into(), doc.size.map(|n| n.to_string()).unwrap_or_default()),
        ("WEDGE_SHA256".into(), s(&doc.sha256)),
        ("WEDGE_COPY".into(), s(&doc.copy)),
        ("WEDGE_RESTART".into(), doc.restart.as_ref().and_then(|r| serde_json::to_string(r).ok()).unwrap_or_default()),
        ("WEDGE_ERROR".into(), s(&doc.error)),
        ("WEDGE_TRIGGER".into(), doc.trigger.clone()),
        ("WEDGE_REASON".into(), s(&doc.reason)),
        ("WEDGE_LABELS".into(), serde_json::to_string(&doc.labels).unwrap_or_default()),
        ("WEDGE_GENERATOR_URL".into(), s(&doc.generator_url)),
        ("WEDGE_SUMMARY_MD".into(), md),
    ]
}

/// Runs the hook (argv, never a shell) with [`hook_env`]; blocking.
pub fn run_hook(argv: &[String], doc: &Completion, timeout: Duration) -> Delivery {
    let mut spec = exec::Spec::new(argv.to_vec(), timeout);
    spec.env = hook_env(doc);
    spec.output_cap = 64 * 1024;
    let target = argv.first().cloned().unwrap_or_default();
    match exec::run(&spec, &Cancel::new()) {
        Ok(out) if out.success() => Delivery { target, ok: true, attempts: 1, detail: "exit 0".into() },
        Ok(out) if out.timed_out => {
            Delivery { target, ok: false, attempts: 1, detail: format!("killed after {} ms", timeout.as_millis()) }
        }
        Ok(out) => Delivery {
            target,
            ok: false,
            attempts: 1,
            detail: format!(
                "{}: {}",
                out.status.map(|s| s.to_string()).unwrap_or_else(|| "killed".into()),
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").chars().take(200).collect::<String>()
            ),
        },
        Err(e) => Delivery { target, ok: false, attempts: 1, detail: e.to_string() },
    }
}

/// Copies `archive` and its `.sha256` sidecar into `dir`, then hashes the copy and
/// compares with `sha256`. A copy that does not verify is removed. Returns the copy's
/// path. Blocking.
///
/// `dir` may be shared storage others can write to, so nothing there is trusted: each
/// file is written to a fresh temp name created with `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted
/// file or symlink makes the create fail, and the next name is tried), fsynced, and
/// renamed over the final name (a rename replaces a planted symlink, never writes through
/// it); the copy is read back through `O_NOFOLLOW` for the hash.
pub fn copy_verified(archive_path: &Path, sha256: &str, dir: &Path) -> Result<PathBuf, String> {
    let name = archive_path.file_name().ok_or("archive path has no file name")?.to_string_lossy().into_owned();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create copy_to {}: {e}", dir.display()))?;
    let dest = dir.join(&name);
    let sidecar = archive::sidecar_path(archive_path);
    let copy = || -> std::io::Result<()> {
        let mut src = std::fs::File::open(archive_path)?;
        place(dir, &name, |f| std::io::copy(&mut src, f).map(|_| ()))?;
        if sidecar.exists() {
            let text = std::fs::read(&sidecar)?;
            place(dir, &format!("{name}.sha256"), |f| f.write_all(&text))?;
        }
        std::fs::File::open(dir)?.sync_all()
    };
    copy().map_err(|e| format!("copy to {} failed: {e}", dir.display()))?;
    let read_back = open_nofollow(&dest).and_then(archive::hash_reader_of);
    match read_back {
        Ok((_, h)) if h == sha256 => Ok(dest),
        Ok((_, h)) => {
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_file(archive::sidecar_path(&dest));
            Err(format!("copy in {} has sha256 {h}, not {sha256}: removed; check the shared storage", dir.display()))
        }
        Err(e) => Err(format!("cannot read back the copy {}: {e}", dest.display())),
    }
}

/// Writes `name` in `dir` through a temp file of our own (exclusive create, no symlink
/// followed), fsynced, then renamed into place.
fn place(dir: &Path, name: &str, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tries = 0;
    let (tmp, mut f) = loop {
        let nonce = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = dir.join(format!(".{name}.{}.{stamp:x}.{nonce}.part", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let result = fill(&mut f).and_then(|_| f.sync_all()).and_then(|_| std::fs::rename(&tmp, dir.join(name)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn open_nofollow(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_is_verified_and_sidecar_follows() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("autopsy-102.tar.zst");
        std::fs::write(&a, b"archive bytes").unwrap();
        let (_, h) = archive::hash_file(&a).unwrap();
        std::fs::write(archive::sidecar_path(&a), format!("{h}  autopsy-102.tar.zst\n")).unwrap();
        let shared = d.path().join("shared");
        let c = copy_verified(&a, &h, &shared).unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), b"archive bytes");
        assert!(archive::sidecar_path(&c).exists());
        let err = copy_verified(&a, "00", &d.path().join("s2")).unwrap_err();
        assert!(err.contains("removed"), "{err}");
        assert!(!d.path().join("s2/autopsy-102.tar.zst").exists());
    }

    /// The report: a predictable temp name and `fs::copy` let anyone who can write the
    /// shared directory plant a symlink and have root write through it. Now planted
    /// symlinks (at the final names and at the old temp name) are never followed.
    #[test]
    fn copy_never_writes_through_planted_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("autopsy-103.tar.zst");
        std::fs::write(&a, b"archive bytes").unwrap();
        let (_, h) = archive::hash_file(&a).unwrap();
        std::fs::write(archive::sidecar_path(&a), format!("{h}  autopsy-103.tar.zst\n")).unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        for planted in [
            "autopsy-103.tar.zst".to_string(),
            "autopsy-103.tar.zst.sha256".to_string(),
            format!(".autopsy-103.tar.zst.{}.part", std::process::id()),
        ] {
            std::os::unix::fs::symlink(&victim, shared.join(planted)).unwrap();
        }
        let c = copy_verified(&a, &h, &shared).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the symlink target is untouched");
        assert!(!std::fs::symlink_metadata(&c).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&c).unwrap(), b"archive bytes");
        let side = archive::sidecar_path(&c);
        assert!(!std::fs::symlink_metadata(&side).unwrap().file_type().is_symlink());
        assert!(std::fs::read_to_string(&side).unwrap().starts_with(&h));
        // The copy is private, and no temp file is left behind.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&c).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(&shared)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.ends_with(".part") && !n.starts_with(&format!(".autopsy-103.tar.zst.{}.part", std::process::id()))
            })
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn hook_gets_facts_in_env_not_through_a_shell() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("env");
        let doc = Completion {
            job: 7,
            vmid: 102,
            node: "pve1".into(),
            state: "sealed".into(),
            verdict: Some("block-path-frozen".into()),
            facts: vec![],
            summary_markdown: Some("# x; $(rm -rf /)".into()),
            archive: Some("/a.tar.zst".into()),
            size: Some(5),
            sha256: Some("ab".into()),
            copy: None,
            restart: None,
            error: None,
            trigger: "alert".into(),
            reason: None,
            labels: Default::default(),
            annotations: Default::default(),
            generator_url: Some("http://prom".into()),
            started_at: None,
            finished_at: chrono::Utc::now(),
            duration_ms: 1,
        };
        let argv = vec!["sh".into(), "-c".into(), format!("env > {}", out.display())];
        let r = run_hook(&argv, &doc, Duration::from_secs(10));
        assert!(r.ok, "{r:?}");
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(env.contains("WEDGE_VERDICT=block-path-frozen"));
        assert!(env.contains("WEDGE_SUMMARY_MD=# x; $(rm -rf /)"), "passed verbatim");
        assert!(env.contains("WEDGE_GENERATOR_URL=http://prom"));
    }
}
