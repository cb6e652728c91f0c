//! A scripted QMP server for fault tests: binds a Unix socket (typically a lab VM's
//! `<vmid>.qmp`, with QEMU's own socket moved aside so the pid is still proven by the
//! pidfile) and misbehaves on cue. Every line it receives is logged with the time it
//! arrived, so a test can assert what the tool sent, and that it sent nothing after a
//! failure.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// What the fake does in answer to one request.
pub enum Act {
    /// Bytes written as they are (add `\r\n` yourself where a line should end).
    Raw(Vec<u8>),
    /// A normal reply to this request (plausible canned data for read-only queries).
    Reply,
    /// Stop reading and writing, keep the connection open until the client leaves.
    Hang,
    /// Close the connection.
    Close,
}

/// The answer to every request after the handshake: `(command, id) -> acts`.
pub type Responder = Box<dyn Fn(&str, &Value) -> Vec<Act> + Send + Sync>;

/// How the fake greets and answers.
pub struct Script {
    /// `false`: accept, then say nothing at all (socket held / QEMU frozen).
    pub greet: bool,
    /// `false`: greet, then never answer `qmp_capabilities`.
    pub answer_capabilities: bool,
    /// Answer to every request after the handshake: `(command, id) -> acts`.
    pub on: Responder,
}

impl Default for Script {
    fn default() -> Self {
        Script { greet: true, answer_capabilities: true, on: Box::new(|_, _| vec![Act::Reply]) }
    }
}

/// One line the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub line: String,
}

impl Received {
    pub fn command(&self) -> String {
        serde_json::from_str::<Value>(&self.line)
            .ok()
            .and_then(|v| v["execute"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("<not a command: {}>", self.line))
    }
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    connections: u32,
    /// When the fake stopped answering (Hang/Close/fault), for "nothing sent after".
    faulted_at: Option<Instant>,
}

pub struct FakeQmp {
    path: PathBuf,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
}

/// Canned `return` values good enough for the diagnosis to parse.
pub fn canned(command: &str) -> Value {
    match command {
        "query-status" => json!({"status": "running", "running": true, "singlestep": false}),
        "query-version" => json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}),
        "query-blockstats" => json!([{"device": "drive-scsi0", "qdev": "scsi0", "stats": {
            "rd_operations": 10, "wr_operations": 5, "flush_operations": 1, "rd_bytes": 40960, "wr_bytes": 20480,
            "wr_highest_offset": 4096, "idle_time_ns": 5_000_000_000u64, "failed_wr_operations": 0}}]),
        "qom-list" => json!([]),
        "query-block"
        | "query-named-block-nodes"
        | "query-cpus-fast"
        | "query-iothreads"
        | "query-block-jobs"
        | "query-jobs"
        | "query-chardev" => json!([]),
        _ => json!({}),
    }
}

pub fn reply_line(id: &Value, ret: Value) -> Vec<u8> {
    let mut v = serde_json::to_vec(&json!({"return": ret, "id": id})).unwrap();
    v.extend_from_slice(b"\r\n");
    v
}

impl FakeQmp {
    /// Binds `path` (removing whatever socket file is there) and serves connections
    /// one at a time on a background thread until dropped.
    pub fn start(path: &Path, script: Script) -> FakeQmp {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        listener.set_nonblocking(true).unwrap();
        let log: Arc<Mutex<Log>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(script);
        {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            log.lock().unwrap().connections += 1;
                            serve(s, &script, &log, &stop);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        FakeQmp { path: path.to_path_buf(), log, stop }
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().received.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.received().iter().map(Received::command).collect()
    }

    pub fn connections(&self) -> u32 {
        self.log.lock().unwrap().connections
    }

    /// Whether the scripted fault fired (the fake hung, closed or stopped answering).
    pub fn faulted(&self) -> bool {
        self.log.lock().unwrap().faulted_at.is_some()
    }

    /// Lines received after the fake started misbehaving (hang, close, garbage…).
    pub fn received_after_fault(&self) -> Vec<Received> {
        let log = self.log.lock().unwrap();
        match log.faulted_at {
            Some(t) => log.received.iter().filter(|r| r.at > t).cloned().collect(),
            None => Vec::new(),
        }
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(s: UnixStream, script: &Script, log: &Mutex<Log>, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let fault = || log.lock().unwrap().faulted_at.get_or_insert(Instant::now()).to_owned();
    if !script.greet {
        fault();
    } else if w.write_all(format!("{GREETING}\r\n").as_bytes()).is_err() {
        return;
    }
    let mut hung = !script.greet;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') => continue, // timed out mid-line; keep reading
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let got = std::mem::take(&mut line);
        log.lock().unwrap().received.push(Received { at: Instant::now(), line: got.trim_end().to_string() });
        if hung {
            continue;
        }
        let v: Value = serde_json::from_str(&got).unwrap_or(Value::Null);
        let cmd = v["execute"].as_str().unwrap_or("").to_string();
        let id = v.get("id").cloned().unwrap_or(Value::Null);
        if cmd == "qmp_capabilities" {
            if script.answer_capabilities {
                let _ = w.write_all(&reply_line(&id, json!({})));
            } else {
                fault();
                hung = true;
            }
            continue;
        }
        for act in (script.on)(&cmd, &id) {
            match act {
                Act::Reply => {
                    let _ = w.write_all(&reply_line(&id, canned(&cmd)));
                }
                Act::Raw(b) => {
                    if w.write_all(&b).is_err() {
                        fault();
                        return;
                    }
                }
                Act::Hang => {
                    fault();
                    hung = true;
                }
                Act::Close => {
                    fault();
                    let _ = w.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}
