//! Client tests against a scripted fake QMP server on a temporary Unix socket.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u7"}, "capabilities": ["oob"]}}"#;
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);
/// A bound whose breach means a hang, not a slow machine.
const HANG: Duration = Duration::from_secs(60);

fn fast_cfg() -> QmpConfig {
    QmpConfig {
        connect_budget: Duration::from_secs(2),
        greeting_timeout: SHORT,
        capabilities_timeout: Duration::from_millis(500),
        ..QmpConfig::default()
    }
}

fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("100.qmp");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// The server side of one connection.
struct Peer {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Peer {
    async fn accept(l: &UnixListener) -> Peer {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        Peer { r: BufReader::new(r), w }
    }

    async fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\r\n").await.unwrap();
    }

    /// The next request, or `None` at EOF.
    async fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).await.unwrap() == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).expect("client sent non-JSON"))
    }

    /// Greets, answers qmp_capabilities, and returns the capabilities request.
    async fn handshake(&mut self) -> Value {
        self.send(GREETING).await;
        let cap = self.recv().await.expect("capabilities request");
        assert_eq!(cap["execute"], "qmp_capabilities");
        self.send(&json!({"return": {}, "id": cap["id"]}).to_string()).await;
        cap
    }

    /// Every byte the client sends until it closes.
    async fn rest(mut self) -> Vec<u8> {
        let mut all = Vec::new();
        self.r.read_to_end(&mut all).await.unwrap();
        all
    }
}

fn transcript(c: &QmpClient) -> Vec<Value> {
    parse_jsonl(&c.transcript_jsonl())
}

fn parse_jsonl(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn kinds(t: &[Value], kind: &str) -> usize {
    t.iter().filter(|e| e["kind"] == kind).count()
}

#[tokio::test]
async fn handshake_and_command() {
    let (_d, path, l) = listen();
    let reply = r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": "wa-1"}"#;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let cap = p.handshake().await;
        let cmd = p.recv().await.unwrap();
        p.send(reply).await;
        (cap, cmd, p.rest().await)
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    assert_eq!(c.connect_attempts(), 1);
    assert_eq!(c.greeting().unwrap()["QMP"]["version"]["qemu"]["major"], 7);
    let r = c.execute("query-status", None, LONG).await.unwrap();
    assert_eq!(r.value["status"], "running");
    assert_eq!(r.raw, reply.as_bytes(), "raw is the line as sent, minus \\r\\n");
    assert!(r.elapsed <= LONG, "elapsed is measured within the command's deadline: {:?}", r.elapsed);

    let t = transcript(&c);
    drop(c);
    let (cap, cmd, rest) = server.await.unwrap();
    assert_eq!(cap["id"], "wa-0");
    assert_eq!(cmd, json!({"execute": "query-status", "id": "wa-1"}));
    assert!(rest.is_empty());

    assert_eq!(kinds(&t, "send"), 2);
    assert_eq!(kinds(&t, "recv"), 3, "greeting, capabilities reply, reply");
    let mut last_ms = 0;
    for e in &t {
        chrono::DateTime::parse_from_rfc3339(e["t"].as_str().unwrap()).unwrap();
        let ms = e["ms"].as_u64().unwrap();
        assert!(ms >= last_ms);
        last_ms = ms;
    }
    assert!(t.iter().any(|e| e["kind"] == "recv" && e["line"] == reply));
}

#[tokio::test]
async fn events_interleaved_are_kept_in_order() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.send(GREETING).await;
        let cap = p.recv().await.unwrap();
        p.send(r#"{"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {"seconds": 1, "microseconds": 0}}"#)
            .await;
        p.send(&json!({"return": {}, "id": cap["id"]}).to_string()).await;
        let cmd = p.recv().await.unwrap();
        p.send(r#"{"event": "BLOCK_IO_ERROR", "data": {"device": "drive-scsi0"}, "timestamp": {"seconds": 2, "microseconds": 0}}"#).await;
        p.send(r#"{"event": "STOP", "timestamp": {"seconds": 3, "microseconds": 0}}"#).await;
        p.send(&json!({"return": [{"device": "drive-scsi0"}], "id": cmd["id"]}).to_string()).await;
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let r = c.execute("query-blockstats", None, LONG).await.unwrap();
    assert_eq!(r.value[0]["device"], "drive-scsi0");
    let names: Vec<_> = c.events().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["RTC_CHANGE", "BLOCK_IO_ERROR", "STOP"]);
    assert_eq!(c.events_dropped(), 0);
    assert_eq!(kinds(&transcript(&c), "event"), 3);
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn replies_with_foreign_or_missing_id_are_skipped() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let cmd = p.recv().await.unwrap();
        p.send(r#"{"return": {"x": 1}, "id": "someone-else"}"#).await;
        p.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray input"}}"#).await;
        p.send(r#"{"surprise": true}"#).await;
        p.send(&json!({"return": {"x": 2}, "id": cmd["id"]}).to_string()).await;
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let r = c.execute("qom-list", Some(json!({"path": "/objects"})), LONG).await.unwrap();
    assert_eq!(r.value["x"], 2, "only the reply carrying our id is accepted");
    assert_eq!(c.skipped_replies(), 3);
    let t = transcript(&c);
    let notes: Vec<_> = t.iter().filter(|e| e["kind"] == "note").map(|e| e["line"].as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("\"someone-else\"") && n.contains("wa-1")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("id (none)")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("unrecognised")), "{notes:?}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn accepted_but_silent_socket_is_no_greeting_within_budget() {
    let (_d, path, l) = listen();
    // Accepts every connection and never writes, like a frozen QEMU.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_secs(3), l.accept()).await {
            held.push(s);
        }
        held.len()
    });

    let cfg = QmpConfig { connect_budget: Duration::from_secs(1), ..fast_cfg() };
    // A hang, not slowness, would breach this: the budget is 1 s.
    let f = tokio::time::timeout(HANG, QmpClient::connect_traced(&path, &cfg))
        .await
        .expect("connect gave up within its budget, not never")
        .unwrap_err();
    match &f.error {
        QmpError::NoGreeting { waited, attempts, .. } => {
            assert!(*waited >= Duration::from_secs(1), "the whole budget was used: {waited:?}");
            assert!(*attempts >= 3, "retried: {attempts}");
            assert_eq!(*attempts, f.attempts);
        }
        e => panic!("expected NoGreeting, got {e:?}"),
    }
    assert_eq!(f.error.classify(), "no-greeting");
    let msg = f.to_string();
    assert!(msg.contains("ss -xp") && !msg.contains('\n'), "{msg}");
    let t = parse_jsonl(&f.transcript_jsonl());
    assert!(t.iter().filter(|e| e["line"].as_str().unwrap().contains("no greeting within")).count() >= 3);
    assert!(
        !t.iter().any(|e| e["line"].as_str().unwrap().contains("waiting up to 0s")),
        "no attempt is started without time left"
    );
    assert!(server.await.unwrap() >= 3, "each attempt was a new connection");
}

#[tokio::test]
async fn never_accepted_socket_is_no_greeting() {
    // Bound and listening but never accepting: connect() succeeds via the backlog,
    // which is what a second client sees while the first holds QEMU's monitor.
    let (_d, path, _l) = listen();
    let cfg = QmpConfig { connect_budget: Duration::from_millis(700), ..fast_cfg() };
    let e = QmpClient::connect(&path, &cfg).await.unwrap_err();
    assert!(matches!(e, QmpError::NoGreeting { attempts, .. } if attempts >= 2), "{e:?}");
    assert!(e.is_unanswered());
}

#[tokio::test]
async fn greeting_then_silence_is_capabilities_unanswered_without_retry() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.send(GREETING).await;
        let cap = p.recv().await.unwrap();
        // A second connection would mean the client retried a wedged main loop.
        let again = tokio::time::timeout(Duration::from_millis(1500), l.accept()).await.is_ok();
        (cap, again, p.rest().await)
    });

    let f = tokio::time::timeout(HANG, QmpClient::connect_traced(&path, &fast_cfg()))
        .await
        .expect("connect gave up on the capabilities reply, not never")
        .unwrap_err();
    match f.error {
        QmpError::CapabilitiesUnanswered { waited } => {
            assert!(waited >= fast_cfg().capabilities_timeout, "waited its whole timeout: {waited:?}")
        }
        ref e => panic!("expected CapabilitiesUnanswered, got {e:?}"),
    }
    assert_eq!(f.error.classify(), "capabilities-unanswered");
    let t = parse_jsonl(&f.transcript_jsonl());
    assert!(t.iter().any(|e| e["kind"] == "recv" && e["line"] == GREETING), "greeting kept in the failure transcript");
    drop(f);
    let (cap, again, rest) = server.await.unwrap();
    assert_eq!(cap["execute"], "qmp_capabilities");
    assert!(!again, "must not reconnect after a greeting");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn timeout_disables_the_client_and_nothing_more_is_sent() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let cmd = p.recv().await.unwrap();
        // Never answer; report everything the client writes afterwards.
        (cmd, p.rest().await)
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let e = c.execute("query-block", None, Duration::from_millis(200)).await.unwrap_err();
    match &e {
        QmpError::Timeout { command, after } => {
            assert_eq!(command, "query-block");
            assert_eq!(*after, Duration::from_millis(200));
        }
        e => panic!("expected Timeout, got {e:?}"),
    }
    assert_eq!(e.classify(), "timeout");
    for _ in 0..3 {
        let e = c.execute("query-status", None, LONG).await.unwrap_err();
        assert!(matches!(&e, QmpError::Disabled { reason } if reason.contains("query-block")), "{e:?}");
        assert_eq!(e.classify(), "disabled");
    }
    assert!(c.disabled_reason().is_some());
    let t = transcript(&c);
    assert_eq!(kinds(&t, "send"), 2, "capabilities and query-block only");
    drop(c);
    let (cmd, rest) = server.await.unwrap();
    assert_eq!(cmd["execute"], "query-block");
    assert!(rest.is_empty(), "client wrote after the timeout: {:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn reply_cut_off_then_eof_is_closed() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        p.recv().await.unwrap();
        p.w.write_all(br#"{"return": {"status": "runn"#).await.unwrap();
        // Dropping both halves closes the connection mid-line.
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let e = c.execute("query-status", None, LONG).await.unwrap_err();
    assert!(matches!(e, QmpError::Closed), "{e:?}");
    let t = transcript(&c);
    assert!(t.iter().any(|e| e["kind"] == "recv" && e["line"] == r#"{"return": {"status": "runn"#));
    assert!(matches!(c.execute("query-status", None, LONG).await, Err(QmpError::Disabled { .. })));
    server.await.unwrap();
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        p.recv().await.unwrap();
        p.w.write_all(b"\x00\xffgarbage {\r\n").await.unwrap();
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let e = c.execute("query-status", None, LONG).await.unwrap_err();
    match &e {
        QmpError::Protocol(what) => assert!(what.contains("not JSON") && what.contains("garbage"), "{what}"),
        e => panic!("expected Protocol, got {e:?}"),
    }
    assert!(!e.to_string().contains('\n'));
    let t = transcript(&c);
    assert!(t.iter().any(|e| e["kind"] == "recv" && e["lossy"] == true), "non-UTF-8 line recorded lossily");
    assert!(matches!(c.execute("query-status", None, LONG).await, Err(QmpError::Disabled { .. })));
    drop(c);
    assert!(server.await.unwrap().is_empty(), "nothing sent after the protocol error");
}

#[tokio::test]
async fn reply_over_cap_is_refused_without_reading_it_all() {
    let (_d, path, l) = listen();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let cmd = p.recv().await.unwrap();
        let mut big = format!(r#"{{"id": "{}", "return": ""#, cmd["id"].as_str().unwrap()).into_bytes();
        big.resize(big.len() + 10 * 1024 * 1024, b'a');
        big.extend_from_slice(b"\"}\r\n");
        // Blocks once the socket buffer is full, unless the client reads it all.
        let wrote = p.w.write_all(&big).await.is_ok();
        done.store(true, Ordering::SeqCst);
        wrote
    });

    let cfg = QmpConfig { reply_cap: 64 * 1024, ..fast_cfg() };
    let mut c = QmpClient::connect(&path, &cfg).await.unwrap();
    let e = c.execute("query-named-block-nodes", None, LONG).await.unwrap_err();
    assert!(matches!(e, QmpError::ReplyTooLarge { limit: 65536 }), "{e:?}");
    assert!(!finished.load(Ordering::SeqCst), "the client must stop reading at the cap, not swallow 10 MiB");
    let t = c.transcript_jsonl();
    assert!(t.len() < 32 * 1024, "transcript keeps only the head: {} bytes", t.len());
    let t = parse_jsonl(&t);
    assert!(t.iter().any(|e| e["truncated_from"].as_u64().is_some_and(|n| n > 65536)));
    assert!(matches!(c.execute("query-status", None, LONG).await, Err(QmpError::Disabled { .. })));
    drop(c);
    assert!(!server.await.unwrap(), "server write fails once the client is gone");
}

#[tokio::test]
async fn event_flood_is_bounded_and_the_reply_still_found() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let cmd = p.recv().await.unwrap();
        let mut burst = Vec::new();
        for i in 0..10_000 {
            let ev =
                json!({"event": "RTC_CHANGE", "data": {"offset": i}, "timestamp": {"seconds": i, "microseconds": 0}});
            burst.extend_from_slice(ev.to_string().as_bytes());
            burst.extend_from_slice(b"\r\n");
        }
        p.w.write_all(&burst).await.unwrap();
        p.send(&json!({"return": {"status": "running"}, "id": cmd["id"]}).to_string()).await;
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let r = c.execute("query-status", None, LONG).await.unwrap();
    assert_eq!(r.value["status"], "running");
    assert_eq!(c.events().len(), 1000);
    assert_eq!(c.events_dropped(), 9000);
    assert_eq!(c.events()[0]["data"]["offset"], 0, "the earliest events are kept");
    let t = transcript(&c);
    assert_eq!(kinds(&t, "event"), 1000, "dropped events are not in the transcript either");
    assert!(t.len() < 1100);
    assert!(t.last().unwrap()["line"].as_str().unwrap().contains("9000 events dropped"));
    drop(c);
    server.await.unwrap();
}

/// Serves like QEMU: one client at a time, greeting on accept, `{"return": {}}` to
/// every command. Returns every command name it received.
async fn qemu_like(l: UnixListener, connections: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..connections {
        let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_secs(5), l.accept()).await else {
            break;
        };
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        if w.write_all(format!("{GREETING}\r\n").as_bytes()).await.is_err() {
            continue; // a client that already gave up
        }
        let mut line = String::new();
        while matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
            let Ok(req) = serde_json::from_str::<Value>(&line) else {
                break;
            };
            seen.push(req["execute"].as_str().unwrap_or_default().to_string());
            let reply = json!({"return": {}, "id": req["id"]}).to_string() + "\r\n";
            if w.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
            line.clear();
        }
    }
    seen
}

#[tokio::test]
async fn socket_held_by_another_client_then_released_connects_on_retry() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(qemu_like(l, 10));

    // The first client (think pvestatd) gets the greeting and holds the monitor.
    let mut holder = BufReader::new(UnixStream::connect(&path).await.unwrap());
    let mut greeting = String::new();
    holder.read_line(&mut greeting).await.unwrap();
    assert!(greeting.contains("\"QMP\""));
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        drop(holder);
    });

    // A generous budget: on a loaded machine the release may come late; only a hang fails.
    let cfg = QmpConfig { connect_budget: Duration::from_secs(30), ..fast_cfg() };
    let mut c = QmpClient::connect(&path, &cfg).await.unwrap();
    assert!(release.is_finished(), "greeted only after the holder let go");
    assert!(c.connect_attempts() >= 2, "attempts: {}", c.connect_attempts());
    c.execute("query-status", None, LONG).await.unwrap();
    let t = transcript(&c);
    assert!(t.iter().any(|e| e["line"].as_str().unwrap().contains("no greeting within")));
    drop(c);
    release.await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen, ["qmp_capabilities", "query-status"]);
}

#[tokio::test]
async fn refused_commands_never_reach_the_server() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(qemu_like(l, 1));

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let refused: [(&str, Option<Value>); 6] = [
        ("stop", None),
        ("quit", None),
        ("qom-set", Some(json!({"path": "/objects/throttle-drive-scsi0", "property": "limits", "value": {}}))),
        ("block_set_io_throttle", Some(json!({"id": "scsi0", "bps": 0}))),
        ("human-monitor-command", Some(json!({"command-line": "info block\nq"}))),
        ("qmp_capabilities", None),
    ];
    for (cmd, args) in refused {
        let e = c.execute(cmd, args, LONG).await.unwrap_err();
        assert!(matches!(&e, QmpError::Refused(r) if r.command == cmd), "{cmd}: {e:?}");
        assert_eq!(e.classify(), "refused");
    }
    c.execute("human-monitor-command", Some(json!({"command-line": "info status"})), LONG).await.unwrap();
    c.execute("query-status", None, LONG).await.unwrap();
    let notes = transcript(&c).iter().filter(|e| e["line"].as_str().unwrap().starts_with("not sent")).count();
    assert_eq!(notes, 6, "each refusal is noted in the transcript");
    drop(c);
    assert_eq!(server.await.unwrap(), ["qmp_capabilities", "human-monitor-command", "query-status"]);
}

#[tokio::test]
async fn qmp_error_reply_is_a_command_error_and_not_fatal() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let a = p.recv().await.unwrap();
        p.send(&json!({"error": {"class": "CommandNotFound", "desc": "The command x-query-virtio-queue-status has not been found"}, "id": a["id"]}).to_string()).await;
        let b = p.recv().await.unwrap();
        p.send(&json!({"return": {"status": "running"}, "id": b["id"]}).to_string()).await;
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let args = json!({"path": "/machine/peripheral/virtio0/virtio-backend", "queue": 0});
    let e = c.execute("x-query-virtio-queue-status", Some(args), LONG).await.unwrap_err();
    match &e {
        QmpError::Command { command, class, desc } => {
            assert_eq!(command, "x-query-virtio-queue-status");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("has not been found"));
        }
        e => panic!("expected Command, got {e:?}"),
    }
    let r = c.execute("query-status", None, LONG).await.unwrap();
    assert_eq!(r.value["status"], "running");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn missing_socket_and_stale_socket_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.qmp");
    let f = QmpClient::connect_traced(&missing, &fast_cfg()).await.unwrap_err();
    assert!(matches!(&f.error, QmpError::SocketMissing { path } if *path == missing), "{:?}", f.error);
    assert_eq!(f.attempts, 1);
    assert!(f.to_string().contains("is the VM running?"));

    // A socket file left behind by a dead listener.
    let stale = dir.path().join("stale.qmp");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let e = QmpClient::connect(&stale, &fast_cfg()).await.unwrap_err();
    assert!(matches!(e, QmpError::ConnectRefused { .. }), "{e:?}");
    assert_eq!(e.classify(), "connect-refused");
    let f = QmpClient::connect_traced(&stale, &fast_cfg()).await.unwrap_err();
    assert_eq!(f.attempts, 1, "no retries for a stale socket");
}

#[tokio::test]
async fn non_qmp_greeting_is_a_protocol_error() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.send("SSH-2.0-OpenSSH_9.2").await;
        p.rest().await
    });
    let e = QmpClient::connect(&path, &fast_cfg()).await.unwrap_err();
    assert!(matches!(&e, QmpError::Protocol(w) if w.contains("greeting")), "{e:?}");
    assert!(server.await.unwrap().is_empty(), "nothing sent to a non-QMP peer");
}

/// A real QEMU (the installed `qemu-system-x86_64`, TCG, no guest) with its QMP monitor
/// on `<dir>/real.qmp`; SIGKILLed and reaped on drop.
struct RealQemu {
    child: std::process::Child,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
}

impl RealQemu {
    fn start() -> RealQemu {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("real.qmp");
        let child = std::process::Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64", "-S", "-chardev"])
            .arg(format!("socket,id=qmp,path={},server=on,wait=off", qmp.display()))
            .args(["-mon", "chardev=qmp,mode=control"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64 ({e}): this test needs QEMU installed"));
        let mut q = RealQemu { child, qmp, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !q.qmp.exists() {
            if let Ok(Some(st)) = q.child.try_wait() {
                panic!("qemu-system-x86_64 exited ({st}) before creating its QMP socket");
            }
            assert!(Instant::now() < deadline, "QEMU did not create {} within 60 s", q.qmp.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for RealQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client against a real QEMU: handshake, read-only queries, a second client kept
/// out while the monitor is held, a QMP error reply, a refused command never sent.
#[tokio::test]
async fn real_qemu() {
    let q = RealQemu::start();
    let cfg = QmpConfig { connect_budget: Duration::from_secs(30), ..QmpConfig::default() };
    let mut c = QmpClient::connect(&q.qmp, &cfg).await.unwrap();
    assert!(c.greeting().unwrap()["QMP"]["version"]["qemu"]["major"].as_u64().is_some(), "{:?}", c.greeting());

    // While we hold the monitor, a second client connects but is not greeted.
    let second = QmpClient::connect(
        &q.qmp,
        &QmpConfig {
            connect_budget: Duration::from_secs(2),
            greeting_timeout: Duration::from_millis(500),
            ..cfg.clone()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(second, QmpError::NoGreeting { .. }), "{second:?}");

    let st = c.execute("query-status", None, LONG).await.unwrap();
    assert_eq!(st.value["status"], "prelaunch", "started with -S: {}", String::from_utf8_lossy(&st.raw));
    assert!(c.execute("query-blockstats", None, LONG).await.unwrap().value.is_array());
    assert!(c.execute("qom-list", Some(json!({"path": "/objects"})), LONG).await.unwrap().value.is_array());
    let hmp = c.execute("human-monitor-command", Some(json!({"command-line": "info status"})), LONG).await.unwrap();
    assert!(hmp.value.as_str().unwrap_or("").contains("prelaunch"), "{:?}", hmp.value);
    let e = c.execute("query-no-such-thing", None, LONG).await.unwrap_err();
    assert!(matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"), "{e:?}");
    assert!(matches!(c.execute("stop", None, LONG).await, Err(QmpError::Refused(_))));
    // Still usable after an error reply and a refusal; nothing of `stop` was sent.
    assert_eq!(c.execute("query-status", None, LONG).await.unwrap().value["status"], "prelaunch");
    let sent: Vec<Value> = transcript(&c).into_iter().filter(|e| e["kind"] == "send").collect();
    assert!(sent.iter().all(|e| !e["line"].as_str().unwrap().contains("\"stop\"")), "{sent:?}");
}

#[tokio::test]
async fn late_reply_is_recorded_without_sending() {
    let (_d, path, l) = listen();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        p.handshake().await;
        let cmd = p.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        p.send(r#"{"event": "BLOCK_JOB_READY", "timestamp": {"seconds": 1, "microseconds": 0}}"#).await;
        p.send(&json!({"return": [], "id": cmd["id"]}).to_string()).await;
        p.rest().await
    });

    let mut c = QmpClient::connect(&path, &fast_cfg()).await.unwrap();
    let e = c.execute("query-block", None, Duration::from_millis(150)).await.unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    // The window is generous (the late reply comes 400 ms after the request); what is
    // checked is what it collected, not how long it took.
    assert_eq!(c.collect_late(Duration::from_secs(5)).await, 2);
    assert_eq!(c.events().len(), 1);
    let t = transcript(&c);
    assert!(t.iter().any(|e| e["kind"] == "recv"
        && serde_json::from_str::<Value>(e["line"].as_str().unwrap()).ok()
            == Some(json!({"return": [], "id": "wa-1"}))));
    assert!(t.iter().any(|e| e["line"].as_str().unwrap().contains("\"wa-1\" arrived after its deadline")));
    // Still disabled: a late answer does not make the monitor trustworthy again.
    assert!(matches!(c.execute("query-status", None, LONG).await, Err(QmpError::Disabled { .. })));
    drop(c);
    assert!(server.await.unwrap().is_empty(), "nothing sent after the timeout");
}
