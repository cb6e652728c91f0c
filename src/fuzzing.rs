//! Entry points for fuzzing every parser fed from outside the tool (cargo-fuzz targets
//! under `fuzz/`, and the stable, seeded smoke loop in `tests/fuzz_smoke.rs`).
//!
//! Each takes arbitrary bytes and must return without panicking, looping forever or
//! growing memory without bound. Not part of the tool's API.
#![doc(hidden)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::archive::Evidence;
use crate::qmp::{QmpClient, QmpConfig};
use crate::stacks::native::modules::{Bytes, Elf, Module, Modules};
use crate::stacks::native::unwind::{stack_reader, Regs, Unwinder, NREGS};

/// Splits `data` at `\0\0` into at most `n` parts (missing parts empty).
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(2).position(|w| w == b"\0\0") {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// QMP: `data` is everything the "QEMU" side sends (greeting, replies, events,
/// garbage), with a small reply cap and event cap so limits are hit. The client
/// negotiates, runs three read-only commands and collects late lines.
pub fn qmp_session(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let Ok((ours, theirs)) = tokio::net::UnixStream::pair() else { return };
        let data = data.to_vec();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut r, mut w) = theirs.into_split();
            // Drain what the client sends so it never blocks on a full socket.
            let drain = tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
            drop(w);
            let _ = drain.await;
        });
        let cfg = QmpConfig {
            connect_budget: Duration::from_millis(50),
            greeting_timeout: Duration::from_millis(50),
            capabilities_timeout: Duration::from_millis(50),
            reply_cap: 4096,
            max_events: 8,
        };
        if let Ok(mut c) = QmpClient::over_stream(ours, &cfg).await {
            for cmd in ["query-status", "query-blockstats", "query-block"] {
                let _ = c.execute(cmd, None, Duration::from_millis(20)).await;
            }
            let _ = c.collect_late(Duration::from_millis(5)).await;
            let _ = c.transcript_jsonl();
        }
        server.abort();
    });
}

/// The line reader and the policy on their own: cheap, for many executions.
pub fn qmp_lines(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut r = crate::qmp::line::LineReader::new(data, 64);
        for _ in 0..data.len() + 1 {
            match r.next_line().await {
                Ok(crate::qmp::line::Line::Complete(l)) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&l) {
                        let cmd = v["execute"].as_str().unwrap_or("");
                        let _ = crate::qmp::policy::check(cmd, v.get("arguments"));
                    }
                }
                _ => return,
            }
        }
        panic!("line reader did not reach the end of {} bytes", data.len());
    });
}

pub fn runbook(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(rb) = crate::runbook::parse(&text, "fuzz.toml") {
        let vars = crate::runbook::Vars::default();
        for s in &rb.steps {
            if let crate::runbook::StepKind::Command { argv, output, .. } = &s.kind {
                for a in argv {
                    let _ = a.render(&vars);
                }
                let _ = output.render(&vars);
            }
        }
    }
}

/// /proc files and the VM config: stat, syscall, config.
pub fn proc_files(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::procfs::parse_stat(&text);
    let _ = crate::procfs::parse_syscall(&text);
    let _ = crate::procfs::split_nul(data);
    let cfg = crate::pve::vmconfig::PveConfig::parse(&text);
    let _ = crate::diagnose::config::risks(&cfg);
    let _ = crate::stacks::native::modules::parse_maps(&text);
}

struct Files(BTreeMap<String, Vec<u8>>);

impl Evidence for Files {
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.0.get(path).cloned()
    }
    fn list(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// The whole diagnosis (findings, fdinfo, threads, verdict) on hostile evidence.
pub fn diagnosis(data: &[u8]) {
    const PATHS: [&str; 13] = [
        "qmp/query-status.json",
        "qmp/query-blockstats.1.json",
        "qmp/query-blockstats.2.json",
        "qmp/query-block.json",
        "qmp/throttle-groups.json",
        "config/102.conf",
        "proc/status",
        "proc/fdinfo.txt",
        "proc/task/100/stat",
        "proc/task/100/wchan",
        "proc/task/100/syscall",
        "stacks/threads.json",
        "stacks/gdb.txt",
    ];
    let p = parts(data, PATHS.len());
    let files = Files(PATHS.iter().zip(p).map(|(k, v)| (k.to_string(), v.to_vec())).collect());
    let d = crate::diagnose::diagnose(&files, &[], &crate::diagnose::Rules::default());
    let _ = serde_json::to_string(&d);
}

/// Archive verification and reading on corrupt input.
pub fn archive(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("wa-fuzz-archive-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("a.tar.zst");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = crate::archive::verify(&path);
    if let Ok(r) = crate::archive::ArchiveReader::open(&path) {
        for f in r.list().into_iter().take(64) {
            let _ = r.read(&f);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The unwinder: `data` = ELF length (u32 LE) ‖ stack length (u16 LE) ‖ ELF bytes ‖
/// stack bytes ‖ registers (8 bytes each; lengths clamped to what is there). The ELF
/// (if it parses) is mapped as a module at 0x400000; the stack at 0x7000_0000.
pub fn unwind(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let elf_len = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 6);
    let rest = &data[6..];
    let (elf_bytes, rest) = rest.split_at(elf_len);
    let stack_len = (u16::from_le_bytes([data[4], data[5]]) as usize).min(rest.len());
    let (stack, reg_bytes) = rest.split_at(stack_len);
    let mut modules = Modules::default();
    if let Ok(elf) = Elf::parse(PathBuf::from("fuzz.elf"), Bytes::Owned(elf_bytes.to_vec())) {
        modules.list.push(Module {
            name: "fuzz.elf".into(),
            start: 0x40_0000,
            end: 0x40_0000 + (elf_bytes.len() as u64).max(0x1000),
            bias: 0x40_0000,
            elf,
            debug: None,
        });
    }
    let base = 0x7000_0000u64;
    let mut regs = Regs([None; NREGS]);
    for (i, c) in reg_bytes.chunks(8).take(NREGS).enumerate() {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        let mut v = u64::from_le_bytes(b);
        // Keep pc and sp mostly inside the module and the stack so CFI runs.
        if i == crate::stacks::native::unwind::RIP && v >> 63 == 0 {
            v = 0x40_0000 + v % 0x1_0000;
        }
        if i == crate::stacks::native::unwind::RSP && v >> 63 == 0 {
            v = base + v % (stack.len() as u64 + 1);
        }
        regs.set(i, Some(v));
    }
    let mem = stack_reader(base, stack);
    let mut u = Unwinder::new(&modules);
    let (frames, _end) = u.unwind(regs, &mem);
    assert!(frames.len() <= 4096, "unbounded unwind: {} frames", frames.len());
}

/// Webhook payloads and what the service derives from them: `data` = payload ‖ `\0\0` ‖
/// signature header ‖ `\0\0` ‖ timestamp header ‖ `\0\0` ‖ free text. The payload goes to
/// both parsers (Alertmanager v4, Grafana v1), every alert through the firing key, the
/// bounds, the VMID mapping and the describe text; the headers through the token and
/// HMAC checks; the text through the log escape, the summary literal and redaction.
/// Asserts the bounds the service documents.
pub fn webhook(data: &[u8]) {
    use crate::serve::alert::{self, Source};
    use crate::serve::auth::Auth;
    let p = parts(data, 4);
    let cfg = crate::serve::config::parse(None, None).expect("defaults parse");
    for source in [Source::Alertmanager, Source::Grafana] {
        if let Ok(payload) = alert::parse(p[0], source) {
            for a in payload.alerts.iter().take(64) {
                let key = a.firing_key();
                assert!(key.len() <= alert::MAX_KEY.max(7 + 64), "firing key of {} bytes", key.len());
                let b = alert::bounded(&a.labels);
                assert!(b.len() <= alert::MAX_LABELS);
                assert!(b.iter().all(|(k, v)| k.len() <= alert::MAX_LABEL_NAME && v.len() <= alert::MAX_TEXT));
                let _ = alert::vmid_of(a, &cfg);
                assert!(a.describe().len() <= alert::MAX_LABEL_NAME + 64 + 8);
                let _ = a.is_firing();
            }
        }
    }
    let mut headers = axum::http::HeaderMap::new();
    if let Ok(v) = axum::http::HeaderValue::from_bytes(p[1]) {
        headers.insert("x-grafana-alerting-signature", v.clone());
        headers.insert(axum::http::header::AUTHORIZATION, v);
    }
    if let Ok(v) = axum::http::HeaderValue::from_bytes(p[2]) {
        headers.insert("x-grafana-alerting-signature-timestamp", v);
    }
    let auth = Auth {
        token: Some(b"token".to_vec()),
        hmac_secret: Some(b"secret".to_vec()),
        signature_header: "X-Grafana-Alerting-Signature".into(),
        timestamp_header: Some("X-Grafana-Alerting-Signature-Timestamp".into()),
        max_skew: Duration::from_secs(300),
    };
    let _ = auth.check_token(&headers);
    let _ = auth.check_signature_at(&headers, p[0], 1_700_000_000);
    let text = String::from_utf8_lossy(p[3]);
    let line = crate::render::summary::escape_control(&text);
    assert!(!line.contains('\n') && !line.contains('\r'));
    let lit = crate::render::summary::literal(&text);
    assert!(!lit.contains('\n'));
    let args: Vec<String> = text.split('\0').map(str::to_string).collect();
    let _ = crate::redact::argv(&args);
    let _ = crate::redact::environ(&args);
    let _ = crate::redact::pve_config(&text);
    let _ = crate::redact::url(&text);
}
