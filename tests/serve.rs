//! `wedge-autopsy serve` as a real process on loopback, against real lab QEMUs: alerts
//! start autopsies, results reach a receiver the test runs, duplicates and bursts start
//! nothing new, refusals start nothing, and SIGTERM lets a running capture seal.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{tracer_pid, wait_until, Lab, LabOptions};
use serde_json::{json, Value};
use wedge_autopsy::archive::{self, ArchiveReader};

const TOKEN: &str = "t0ken-for-tests";

/// An assertion whose text is a row of the fault table's outcome column
/// (`scripts/fault-table` reads the `abuse_*` tests' claims, in order).
macro_rules! claim {
    ($what:literal, $ok:expr) => {
        assert!($ok, "fault-table claim failed: {}", $what)
    };
    ($what:literal, $ok:expr, $($fmt:tt)+) => {
        assert!($ok, "fault-table claim failed: {}: {}", $what, format!($($fmt)+))
    };
}
const JOB_TIMEOUT: Duration = Duration::from_secs(150);

// ---------------------------------------------------------------------------
// the server under test

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `wedge-autopsy serve` on a free loopback port with `config` (a full config
    /// file body; the lab's dirs are passed as flags) and waits until it listens.
    fn start(lab: &Lab, config: &str) -> Server {
        Server::start_with_env(lab, config, &[])
    }

    fn start_with_env(lab: &Lab, config: &str, env: &[(&str, &str)]) -> Server {
        Server::start_full(lab, config, env, &[], None)
    }

    /// With `args` before the subcommand's own (e.g. `--log-format json`) and, when
    /// given, RLIMIT_NOFILE set to `nofile` in the server.
    fn start_full(lab: &Lab, config: &str, env: &[(&str, &str)], args: &[&str], nofile: Option<u64>) -> Server {
        let cfg = lab.root().join("serve.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut all = args.to_vec();
        all.extend(["serve", "--listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap()]);
        let mut cmd = lab.tool_args(&all);
        cmd.env_remove("NOTIFY_SOCKET").envs(env.iter().copied());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start wedge-autopsy serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start listening; log:\n{}", log.lock().unwrap());
            }
        };
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
        http(&self.addr, method, path, headers, body)
    }

    fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        self.request(
            "POST",
            path,
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        self.request("GET", path, &[("Authorization", &auth)], b"")
    }

    fn metrics(&self) -> String {
        let (st, v) = self.request("GET", "/metrics", &[], b"");
        assert_eq!(st, 200);
        v.as_str().unwrap_or_default().to_string()
    }

    /// Polls the job until it leaves queued/running.
    fn wait_job(&self, id: u64) -> Value {
        let mut last = Value::Null;
        let done = wait_until(JOB_TIMEOUT, || {
            let (_, j) = self.get(&format!("/v1/autopsies/{id}"));
            last = j;
            matches!(last["state"].as_str(), Some("sealed" | "failed" | "cancelled")) && last["delivered"] == true
        });
        assert!(done, "job {id} did not finish: {last}\nlog:\n{}", self.log());
        last
    }

    /// Sends `sig` and waits (bounded) for the exit code.
    fn stop(&mut self, sig: libc::c_int, timeout: Duration) -> Option<i32> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body parsed as JSON when it is
/// JSON, else returned as a JSON string.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    // JSON unless the caller says otherwise: the service requires it on every POST.
    if method == "POST" && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413, 401) before reading the whole body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body = dechunk_if_needed(&text, body);
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn dechunk_if_needed(head: &str, body: &str) -> String {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------
// a ticket system stand-in: records every POST body

struct Receiver {
    url: String,
    rx: mpsc::Receiver<Value>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::failing_first(0)
    }

    /// Answers its first `fail` requests with 503 (a ticket system restarting), then 200;
    /// every body is passed on, the failed ones too.
    fn failing_first(fail: usize) -> Receiver {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/ticket", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let tx = tx.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                        let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                        let answer: &[u8] = if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail {
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                        };
                        if c.write_all(answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { url, rx }
    }

    fn next(&self, timeout: Duration) -> Option<Value> {
        self.rx.recv_timeout(timeout).ok()
    }
}

// ---------------------------------------------------------------------------
// helpers

fn alertmanager(vmid: &str, fingerprint: &str, status: &str) -> Value {
    json!({
        "version": "4",
        "status": status,
        "receiver": "wedge-autopsy",
        "groupKey": "{}:{alertname=\"VmDiskWritesFlat\"}",
        "truncatedAlerts": 0,
        "groupLabels": {"alertname": "VmDiskWritesFlat"},
        "commonLabels": {"alertname": "VmDiskWritesFlat", "vmid": vmid},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [{
            "status": status,
            "labels": {"alertname": "VmDiskWritesFlat", "vmid": vmid, "instance": "devvm", "severity": "page"},
            "annotations": {"summary": "disk writes flat at zero while the VM is up"},
            "startsAt": "2026-06-11T15:24:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=pve_disk_write_bytes",
            "fingerprint": fingerprint
        }]
    })
}

fn write_token(lab: &Lab) -> PathBuf {
    let p = lab.root().join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    chmod(&p, 0o600);
    p
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A counter's value in `/metrics` text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
}

fn archives(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".tar.zst")).collect())
        .unwrap_or_default()
}

fn proc_kib(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

// ---------------------------------------------------------------------------
// tests

#[test]
fn alert_starts_one_autopsy_and_its_result_reaches_the_ticket() {
    let lab = Lab::start(LabOptions::default());
    assert_eq!(lab.wedge()["wedged"], true);
    let receiver = Receiver::start();
    let token = write_token(&lab);
    let shared = lab.root().join("shared");
    let hook_out = lab.root().join("hook.env");
    let config = format!(
        "sample_interval = \"1s\"\nmin_idle = \"1s\"\nqm = {:?}\n\n[restart]\ntimeout = \"2s\"\nstop_deadline = \"6s\"\n\n[serve]\ntoken_file = {:?}\nnotify = [{:?}]\ncopy_to = {:?}\non_complete = [\"sh\", \"-c\", \"env > {}\"]\n\n[[serve.policy]]\nvmid = 102\naction = \"capture-then-restart\"\nrestart_on = [\"block-path-frozen\"]\n# the guest-less LSI wedge is only suspected: the restart path needs the opt-in\nrestart_suspected = true\n",
        common::qm_path().display().to_string(),
        token.display().to_string(),
        receiver.url,
        shared.display().to_string(),
        hook_out.display()
    );
    let pid_before = lab.pid();
    let root = lab.root().display().to_string();
    let server = Server::start_with_env(&lab, &config, &[("WEDGE_LAB_ROOT", &root), ("QM_TERM_GRACE", "1")]);
    let payload = alertmanager("102", "fp-102-wedge", "firing");

    // The same firing, five times (retries, an HA pair): one job, answered at once.
    let mut ids = Vec::new();
    let mut outcomes = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let (st, body) = server.post_json("/v1/alertmanager", &payload);
        slowest = slowest.max(t.elapsed());
        assert_eq!(st, 202, "{body}\n{}", server.log());
        ids.push(body["jobs"][0]["id"].as_u64().unwrap());
        outcomes.push(body["jobs"][0]["outcome"].as_str().unwrap().to_string());
    }
    eprintln!("slowest of 5 deliveries answered in {slowest:?}");
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(outcomes, ["started", "duplicate", "duplicate", "duplicate", "duplicate"]);
    // The alert resolves while the capture may still run: acknowledged, and it stops nothing.
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("102", "fp-102-wedge", "resolved"));
    assert_eq!((st, &body["resolved_ignored"]), (200, &json!(1)), "{body}");

    // The ticket gets the result.
    let doc = receiver.next(JOB_TIMEOUT).unwrap_or_else(|| panic!("no completion POST; log:\n{}", server.log()));
    assert_eq!(doc["job"], ids[0]);
    assert_eq!(doc["vmid"], 102);
    assert_eq!(doc["state"], "sealed", "{doc}");
    assert_eq!(doc["verdict"], "block-path-frozen", "{}", doc["facts"]);
    assert_eq!(doc["labels"]["instance"], "devvm");
    assert_eq!(doc["generator_url"], "http://prometheus.example:9090/graph?g0.expr=pve_disk_write_bytes");
    assert_eq!(doc["trigger"], "alert");
    let path = PathBuf::from(doc["archive"].as_str().unwrap());
    let verified = archive::verify(&path).expect("the archive verifies");
    assert_eq!(doc["sha256"], verified.sha256);
    assert_eq!(doc["size"], verified.size);
    let md = doc["summary_markdown"].as_str().unwrap();
    assert!(md.contains("block-path-frozen") && md.contains(&verified.sha256), "{md}");
    // The policy asks for a restart on this verdict: after the verified seal the wedged
    // QEMU (which ignores quit) is stopped for good and a new one proven and answering.
    assert_eq!(doc["restart"]["attempted"], true, "{}", doc["restart"]);
    assert_eq!(doc["restart"]["ok"], true, "{}", doc["restart"]);
    assert!(
        doc["restart"]["detail"].as_str().unwrap().contains(&format!("restarted: pid {pid_before} -> ")),
        "{}",
        doc["restart"]
    );
    assert!(md.contains("## Restart"), "{md}");
    assert!(wedge_autopsy::restart::outcome_path(&path).exists(), "restart.json beside the archive");
    let ar = ArchiveReader::open(&path).unwrap();
    assert_eq!(ar.manifest.trigger.kind, "alert");
    assert!(ar.manifest.trigger.reason.as_deref().unwrap_or("").contains("fp-102-wedge"));

    // The copy on shared storage and the hook carry the same facts.
    let copy = PathBuf::from(doc["copy"].as_str().expect("copy path in the document"));
    assert!(copy.starts_with(&shared));
    assert_eq!(archive::hash_file(&copy).unwrap().1, verified.sha256);
    assert!(archive::sidecar_path(&copy).exists());
    let job = server.wait_job(ids[0]);
    let env = std::fs::read_to_string(&hook_out).unwrap();
    assert!(env.contains(&format!("WEDGE_SHA256={}", verified.sha256)), "{env}");
    assert!(env.contains("WEDGE_VERDICT=block-path-frozen"));

    // One autopsy in all: one archive, one job that counted five deliveries.
    assert_eq!(archives(&lab.out_dir()).len(), 1);
    assert_eq!(job["deliveries"], 5);
    assert!(job["notified"].as_array().unwrap().iter().all(|d| d["ok"] == true), "{job}");
    let (_, list) = server.get("/v1/autopsies");
    assert_eq!(list["autopsies"].as_array().unwrap().len(), 1);
    let m = server.metrics();
    assert!(m.contains("wedge_autopsy_runs_total{result=\"sealed\"} 1"), "{m}");
    assert!(m.contains("wedge_autopsy_deliveries_total{outcome=\"duplicate\"} 4"), "{m}");
    assert!(m.contains("wedge_autopsy_restarts_total{outcome=\"ok\"} 1"), "{m}");
    assert!(receiver.next(Duration::from_millis(200)).is_none(), "exactly one completion POST");
    assert!(!common::pid_alive(pid_before), "the wedged QEMU is gone");
    assert!(lab.is_alive(), "a new QEMU runs");
    assert_ne!(lab.pid(), pid_before, "restarted as a new process");
    assert_eq!(tracer_pid(lab.pid()), 0);
}

#[test]
fn refusals_get_their_status_and_start_nothing() {
    let lab = Lab::start(LabOptions { vmid: 106, name: "ref".into(), ..LabOptions::default() });
    let before = lab.thread_states();
    // The cluster knows 120 (on another node) and 121 (here, but not running).
    let vmlist_path = lab.pve_dir().join(".vmlist");
    let mut vmlist: Value = serde_json::from_str(&std::fs::read_to_string(&vmlist_path).unwrap()).unwrap();
    let here = vmlist["ids"]["106"]["node"].clone();
    vmlist["ids"]["120"] = json!({"node": "pve-far", "type": "qemu", "version": 1});
    vmlist["ids"]["121"] = json!({"node": here, "type": "qemu", "version": 1});
    std::fs::write(&vmlist_path, vmlist.to_string()).unwrap();
    let token = write_token(&lab);
    let secret = lab.root().join("hmac");
    std::fs::write(&secret, "grafana-secret\n").unwrap();
    chmod(&secret, 0o600);
    let config = format!(
        "[serve]\ntoken_file = {:?}\nhmac_secret_file = {:?}\nmax_body = 4096\n",
        token.display().to_string(),
        secret.display().to_string()
    );
    let server = Server::start(&lab, &config);
    let good = alertmanager("106", "fp", "firing").to_string();
    let bearer = format!("Bearer {TOKEN}");
    let auth: &[(&str, &str)] = &[("Authorization", &bearer)];

    let (st, body) = server.request("POST", "/v1/alertmanager", &[], good.as_bytes());
    assert_eq!(st, 401, "no token: {body}");
    let (st, _) = server.request("POST", "/v1/alertmanager", &[("Authorization", "Bearer wrong")], good.as_bytes());
    assert_eq!(st, 401, "wrong token");
    let (st, body) = server.request("POST", "/v1/alertmanager", auth, b"{\"version\": \"4\", \"alerts\": [");
    assert_eq!(st, 400, "malformed: {body}");
    assert!(body["error"].as_str().unwrap().contains("malformed"));
    let (st, _) = server.request("POST", "/v1/grafana", auth, good.as_bytes());
    assert_eq!(st, 401, "grafana without its HMAC signature");
    // Grafana (version 1): a valid signature gets past auth to the mapping (121 is not
    // running, so 409); a body changed after signing, or the Alertmanager shape, does not.
    let mut grafana = alertmanager("121", "gfp", "firing");
    grafana["version"] = json!("1");
    grafana["orgId"] = json!(1);
    let gbody = grafana.to_string();
    let sig = wedge_autopsy::serve::auth::sign(b"grafana-secret", gbody.as_bytes());
    let signed: &[(&str, &str)] = &[("Authorization", &bearer), ("X-Grafana-Alerting-Signature", &sig)];
    let (st, body) = server.request("POST", "/v1/grafana", signed, gbody.as_bytes());
    assert_eq!(st, 409, "signed Grafana alert for a VM that is not running: {body}");
    let (st, _) = server.request("POST", "/v1/grafana", signed, gbody.replace("121", "106").as_bytes());
    assert_eq!(st, 401, "body changed after signing");
    let sig4 = wedge_autopsy::serve::auth::sign(b"grafana-secret", good.as_bytes());
    let (st, body) = server.request(
        "POST",
        "/v1/grafana",
        &[("Authorization", &bearer), ("X-Grafana-Alerting-Signature", &sig4)],
        good.as_bytes(),
    );
    assert_eq!(st, 400, "an Alertmanager payload on the Grafana endpoint: {body}");
    let big = alertmanager("106", &"x".repeat(10_000), "firing").to_string();
    let (st, _) = server.request("POST", "/v1/alertmanager", auth, big.as_bytes());
    assert_eq!(st, 413, "oversized");
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("107", "fp", "firing"));
    assert_eq!(st, 404, "unknown VM: {body}");
    assert!(body["error"].as_str().unwrap().contains("not in the cluster"), "{body}");
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("120", "fp", "firing"));
    assert_eq!(st, 421, "another node: {body}");
    assert_eq!(body["refused"][0]["node"], "pve-far");
    assert!(body["error"].as_str().unwrap().contains("pve-far"));
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("121", "fp", "firing"));
    assert_eq!(st, 409, "listed here but not running: {body}");
    let mut no_vmid = alertmanager("106", "fp", "firing");
    no_vmid["alerts"][0]["labels"].as_object_mut().unwrap().remove("vmid");
    let (st, body) = server.post_json("/v1/alertmanager", &no_vmid);
    assert_eq!(st, 422, "no VMID label: {body}");
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("106", "fp", "resolved"));
    assert_eq!(st, 200, "resolved alerts are acknowledged, not acted on: {body}");
    assert_eq!(body["resolved_ignored"], 1);
    let (st, _) = server.post_json("/v1/autopsy", &json!({"vmid": "106; reboot"}));
    assert_eq!(st, 400);
    let (st, _) = server.post_json("/v1/autopsy", &json!({"vmid": 106, "restrat": true}));
    assert_eq!(st, 400, "unknown API fields are refused");

    // Nothing started, nothing written, the VM untouched.
    let (_, list) = server.get("/v1/autopsies");
    assert_eq!(list["autopsies"], json!([]), "{list}");
    assert!(archives(&lab.out_dir()).is_empty());
    assert_eq!(lab.thread_states(), before);
    assert_eq!(tracer_pid(lab.pid()), 0);
    let (st, h) = server.request("GET", "/healthz", &[], b"");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));
    let m = server.metrics();
    assert!(m.contains("wedge_autopsy_deliveries_total{outcome=\"unauthorized\"} 4"), "{m}");
    assert!(m.contains("wedge_autopsy_runs_total{result=\"sealed\"} 0"), "{m}");
}

#[test]
fn sigterm_during_an_autopsy_lets_it_seal_then_exits() {
    let lab = Lab::start(LabOptions { vmid: 109, name: "term".into(), ..LabOptions::default() });
    let receiver = Receiver::start();
    let rb = lab.root().join("slow.toml");
    std::fs::write(
        &rb,
        "schema = 1\nname = \"slow\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"status\"\nkind = \"qmp\"\ncommand = \"query-status\"\n\n[[step]]\nid = \"nap\"\nkind = \"command\"\nargv = [\"sleep\", \"4.5\"]\ntimeout = \"60s\"\n\n[[step]]\nid = \"after\"\nkind = \"host\"\n",
    )
    .unwrap();
    let token = write_token(&lab);
    let config = format!(
        "[serve]\ntoken_file = {:?}\nnotify = [{:?}]\nrunbook = {:?}\nshutdown_grace = \"120s\"\n",
        token.display().to_string(),
        receiver.url,
        rb.display().to_string()
    );
    let mut server = Server::start(&lab, &config);
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 109, "reason": "INC-42"}));
    assert_eq!(st, 202, "{body}");
    assert!(wait_until(Duration::from_secs(60), || common::proc_cmdline_exists(&["sleep", "4.5"])), "{}", server.log());
    let code = server.stop(libc::SIGTERM, Duration::from_secs(90));
    assert_eq!(code, Some(0), "clean exit after the seal; log:\n{}", server.log());
    // Sealed with every step done: the capture was not cut short.
    let found = archives(&lab.out_dir());
    assert_eq!(found.len(), 1, "{found:?}");
    archive::verify(&found[0]).expect("verifies");
    let ar = ArchiveReader::open(&found[0]).unwrap();
    assert!(!ar.manifest.interrupted);
    let nap = ar.manifest.steps.iter().find(|s| s.id == "nap").unwrap();
    assert_eq!(nap.status.to_string(), "ok", "{nap:?}");
    assert_eq!(ar.manifest.trigger.kind, "api");
    assert_eq!(ar.manifest.trigger.reason.as_deref(), Some("INC-42"));
    let doc = receiver.next(Duration::from_secs(5)).expect("the result was delivered before exit");
    assert_eq!(doc["state"], "sealed");
    assert!(server.log().contains("stopping"), "{}", server.log());
    assert!(lab.is_alive());
}

#[test]
fn sigterm_past_the_grace_interrupts_the_capture_which_still_seals() {
    let lab = Lab::start(LabOptions { vmid: 112, name: "grace".into(), ..LabOptions::default() });
    let rb = lab.root().join("long.toml");
    std::fs::write(
        &rb,
        "schema = 1\nname = \"long\"\ndescription = \"d\"\n\n[[step]]\nid = \"proc\"\nkind = \"proc\"\n\n[[step]]\nid = \"nap\"\nkind = \"command\"\nargv = [\"sleep\", \"300.112\"]\ntimeout = \"400s\"\n",
    )
    .unwrap();
    let config = format!(
        "[serve]\nrunbook = {:?}\nshutdown_grace = \"1s\"\nallow_loopback_without_token = true\n",
        rb.display().to_string()
    );
    // Type=notify: systemd's socket stand-in receives READY=1, later STOPPING=1.
    let notify_path = lab.root().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut server = Server::start_with_env(&lab, &config, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let (st, body) = server.request("POST", "/v1/autopsy", &[], json!({"vmid": 112}).to_string().as_bytes());
    assert_eq!(st, 202, "loopback without a token, as the config allows: {body}");
    assert!(wait_until(Duration::from_secs(60), || common::proc_cmdline_exists(&["sleep", "300.112"])));
    assert_eq!(server.stop(libc::SIGTERM, Duration::from_secs(60)), Some(0), "{}", server.log());
    let n = notify.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let found = archives(&lab.out_dir());
    assert_eq!(found.len(), 1, "{}", server.log());
    let ar = ArchiveReader::open(&found[0]).unwrap();
    assert!(ar.manifest.interrupted, "cut at the grace");
    assert_eq!(ar.manifest.steps.iter().find(|s| s.id == "proc").unwrap().status.to_string(), "ok");
    assert!(!common::proc_cmdline_exists(&["sleep", "300.112"]), "the interrupted step's process was killed");
}

/// Fault: 1000 distinct firings for one VM from 8 senders at once; 152 of them carry a
/// 1 MB fingerprint and 40 labels of 4 KiB (the report: 150 such took RSS from 40 to
/// 534 MB, for good).
/// Outcome: every delivery answered 202; all joined the VM's one autopsy; VmRSS grows less than 48 MiB; VmHWM grows less than 48 MiB; at most max_firings_per_vm (256) firing keys remembered; the job record stays under 64 KiB; one archive; /healthz still answers.
#[test]
fn abuse_thousand_deliveries_with_huge_fields_keep_memory_flat() {
    let lab = Lab::start(LabOptions { vmid: 113, name: "burst".into(), ..LabOptions::default() });
    let token = write_token(&lab);
    let config = format!(
        "sample_interval = \"0\"\n\n[serve]\ntoken_file = {:?}\nmax_body = 2097152\n",
        token.display().to_string()
    );
    let server = Server::start(&lab, &config);
    // One real autopsy first, so the baseline includes a capture's own allocations.
    let (st, body) = server.post_json("/v1/alertmanager", &alertmanager("113", "first", "firing"));
    assert_eq!(st, 202, "{body}");
    let first = body["jobs"][0]["id"].as_u64().unwrap();
    let job = server.wait_job(first);
    assert_eq!(job["state"], "sealed", "{job}");
    let pid = server.pid();
    let (rss0, hwm0) = (proc_kib(pid, "VmRSS:"), proc_kib(pid, "VmHWM:"));

    // 1000 distinct firings for the VM, from 8 senders at once.
    let statuses: Arc<Mutex<BTreeMap<u16, usize>>> = Default::default();
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let outcomes: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (addr, statuses, slowest, outcomes) =
                (server.addr.clone(), statuses.clone(), slowest.clone(), outcomes.clone());
            std::thread::spawn(move || {
                let bearer = format!("Bearer {TOKEN}");
                for i in 0..125 {
                    let huge = i < 19;
                    let fp = if huge { format!("{}-{t}-{i}", "f".repeat(1_000_000)) } else { format!("burst-{t}-{i}") };
                    let mut p = alertmanager("113", &fp, "firing");
                    p["alerts"][0]["annotations"]["padding"] = json!("p".repeat(2000));
                    if huge {
                        for l in 0..40 {
                            p["alerts"][0]["labels"][format!("l{l}")] = json!("v".repeat(4096));
                        }
                    }
                    let start = Instant::now();
                    let (st, body) = http(
                        &addr,
                        "POST",
                        "/v1/alertmanager",
                        &[("Authorization", &bearer)],
                        p.to_string().as_bytes(),
                    );
                    let took = start.elapsed();
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                    *statuses.lock().unwrap().entry(st).or_default() += 1;
                    if let Some(o) = body["jobs"][0]["outcome"].as_str() {
                        *outcomes.lock().unwrap().entry(o.to_string()).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (rss1, hwm1) = (proc_kib(pid, "VmRSS:"), proc_kib(pid, "VmHWM:"));
    eprintln!(
        "burst: statuses {:?}, outcomes {:?}, slowest answer {:?}; VmRSS {rss0} -> {rss1} KiB, VmHWM {hwm0} -> {hwm1} KiB",
        statuses.lock().unwrap(),
        outcomes.lock().unwrap(),
        slowest.lock().unwrap()
    );
    let st = statuses.lock().unwrap().clone();
    claim!("every delivery answered 202", st == BTreeMap::from([(202, 1000)]), "{st:?}");
    let oc = outcomes.lock().unwrap().clone();
    claim!("all joined the VM's one autopsy", oc == BTreeMap::from([("joined".to_string(), 1000)]), "{oc:?}");
    // Keeping the 1 MB fingerprints (as before) grows RSS by ~150 MB; in-flight bodies
    // (8 senders × 1 MB, parsed) and allocator noise stay far below 48 MiB.
    claim!("VmRSS grows less than 48 MiB", rss1 < rss0 + 48 * 1024, "{rss0} -> {rss1} KiB");
    claim!("VmHWM grows less than 48 MiB", hwm1 < hwm0 + 48 * 1024, "{hwm0} -> {hwm1} KiB");
    let m = server.metrics();
    let keys = metric(&m, "wedge_autopsy_dedup_keys ");
    claim!("at most max_firings_per_vm (256) firing keys remembered", (1..=256).contains(&keys), "{keys}\n{m}");
    let (_, list) = server.get("/v1/autopsies");
    assert_eq!(list["autopsies"].as_array().unwrap().len(), 1, "still one autopsy");
    let kept = serde_json::to_string(&list).unwrap().len();
    claim!("the job record stays under 64 KiB", kept < 64 * 1024, "{kept} bytes");
    assert_eq!(list["autopsies"][0]["deliveries"], 1001);
    claim!("one archive", archives(&lab.out_dir()).len() == 1);
    let (st, _) = server.request("GET", "/healthz", &[], b"");
    claim!("/healthz still answers", st == 200, "{st}");
}

#[test]
fn watch_finds_a_frozen_vm_and_captures_it_without_an_alert() {
    let mut lab = Lab::start(LabOptions { vmid: 114, name: "watched".into(), ..LabOptions::default() });
    lab.add_vm(LabOptions { vmid: 115, name: "neighbour".into(), ..LabOptions::default() });
    assert_eq!(lab.vm(114).wedge()["wedged"], true);
    // The neighbour is really wedged too (writes queued in flight behind blkdebug), not
    // merely idle: an idle disk is no evidence of a frozen one.
    assert_eq!(lab.vm(115).wedge()["wedged"], true);
    let receiver = Receiver::start();
    let config = format!(
        "min_idle = \"1s\"\nsample_interval = \"1s\"\n\n[serve]\nnotify = [{:?}]\n\n[serve.watch]\ninterval = \"1s\"\nconsecutive = 2\nwindow = \"1s\"\n\n[[serve.policy]]\nvmid = 114\nwatch_autopsy = true\n",
        receiver.url
    );
    let server = Server::start(&lab, &config);
    // No alert is sent: the watch's own checks start the capture.
    let doc = receiver.next(JOB_TIMEOUT).unwrap_or_else(|| panic!("no watch-started autopsy; log:\n{}", server.log()));
    assert_eq!(doc["vmid"], 114);
    assert_eq!(doc["trigger"], "watch");
    assert_eq!(doc["verdict"], "block-path-frozen", "{}", doc["facts"]);
    assert!(doc["reason"].as_str().unwrap().contains("consecutive checks"), "{doc}");
    archive::verify(Path::new(doc["archive"].as_str().unwrap())).expect("verifies");
    let m = server.metrics();
    assert!(m.contains("wedge_autopsy_watch_verdict{vmid=\"114\",verdict=\"block-path-frozen\"} 1"), "{m}");
    assert!(m.contains("wedge_autopsy_watch_wedged{vmid=\"114\"} 1"), "{m}");
    // The neighbour is watched too: its wedge (requests in flight, none completing) is
    // exported, but its policy (the default) does not ask for watch autopsies, so it is
    // never captured.
    assert!(
        wait_until(Duration::from_secs(60), || server.metrics().contains("wedge_autopsy_watch_wedged{vmid=\"115\"} 1")),
        "{}\nlog:\n{}",
        server.metrics(),
        server.log()
    );
    let (_, list) = server.get("/v1/autopsies");
    let jobs = list["autopsies"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "one frozen episode, one autopsy, none for 115: {list}");
    assert_eq!(jobs[0]["vmid"], 114);
    assert!(!server.log().contains("VM 115: started"), "{}", server.log());
    assert_eq!(tracer_pid(lab.vm(115).pid()), 0);
}

// ---------------------------------------------------------------------------
// abuse: each test is a row of docs/faults.md (scripts/fault-table)

/// Reads from `s` until the server closes it (EOF or reset); `false` if it is still
/// open at `deadline`.
fn closed_by_server(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Fault: 300 connections held open from loopback (150 never send a byte, 150 stop in
/// the middle of their request head), against a server with 128 file descriptors,
/// `max_connections = 64` and `header_timeout = "2s"`.
/// Outcome: /healthz answers 200 while they are held; an authenticated API request gets its real answer; the systemd watchdog keeps getting WATCHDOG=1 (each after a real /healthz); idle connections are evicted to make room (connections_closed_total{reason="evicted"}); every held connection is closed by the server (evicted at once, the rest at the header timeout); /healthz answers afterwards.
#[test]
fn abuse_idle_and_slow_connections() {
    let lab = Lab::start(LabOptions { vmid: 116, name: "idle".into(), ..LabOptions::default() });
    let token = write_token(&lab);
    let config = format!(
        "[serve]\ntoken_file = {:?}\nmax_connections = 64\nheader_timeout = \"2s\"\n",
        token.display().to_string()
    );
    // systemd's watchdog stand-in: WATCHDOG_USEC=1.5 s, so a ping every 0.5 s.
    let notify_path = lab.root().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap()), ("WATCHDOG_USEC", "1500000")];
    let server = Server::start_full(&lab, &config, &env, &[], Some(128));
    let t0 = Instant::now();
    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&server.addr).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        if i % 2 == 1 {
            let _ = s.write_all(b"POST /v1/autopsy HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa");
        }
        held.push(s);
    }
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let (st, h) = server.request("GET", "/healthz", &[], b"");
        times.push(t.elapsed());
        claim!("/healthz answers 200 while they are held", st == 200, "{h}\n{}", server.log());
    }
    let t = Instant::now();
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 999}));
    let api = t.elapsed();
    claim!("an authenticated API request gets its real answer", matches!(st, 404 | 409), "{st} {body}");
    times.sort();
    eprintln!(
        "under 300 held connections: /healthz median {:?}, max {:?}; API answer {api:?}; all opened in {:?}",
        times[times.len() / 2],
        times[times.len() - 1],
        t0.elapsed()
    );
    // The watchdog keeps pinging under attack: each ping follows a real /healthz answer.
    let mut buf = [0u8; 256];
    let mut pings = 0;
    let end = Instant::now() + Duration::from_secs(30);
    while pings < 3 && Instant::now() < end {
        let n = notify.recv(&mut buf).expect("a notification within 30 s");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    claim!(
        "the systemd watchdog keeps getting WATCHDOG=1 (each after a real /healthz)",
        pings == 3,
        "{pings}\n{}",
        server.log()
    );
    let m = server.metrics();
    let evicted = metric(&m, "wedge_autopsy_connections_closed_total{reason=\"evicted\"}");
    claim!(
        "idle connections are evicted to make room (connections_closed_total{reason=\"evicted\"})",
        evicted >= 300 - 64,
        "{evicted}\n{m}"
    );
    // Every held connection is closed by the server: evicted ones at once, the rest when
    // their header timeout (2 s) runs out. Deadline generous for a loaded CI machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    let open: Vec<usize> =
        held.iter_mut().enumerate().filter_map(|(i, s)| (!closed_by_server(s, deadline)).then_some(i)).collect();
    claim!(
        "every held connection is closed by the server (evicted at once, the rest at the header timeout)",
        open.is_empty(),
        "left open: {open:?}"
    );
    let (st, _) = server.request("GET", "/healthz", &[], b"");
    claim!("/healthz answers afterwards", st == 200);
    assert!(metric(&server.metrics(), "wedge_autopsy_connections_open ") <= 2);
}

/// Fault: a request head of 32 KiB, a payload of 201 alerts, a POST as `text/plain`
/// (what a browser's form can send without a preflight), and POSTs to a service with no
/// `token_file` (the default setup); a token file readable by others; a world-writable config.
/// Outcome: the output directory is 0700 from the start; a 32 KiB head gets 431; without token_file a POST gets 401 naming token_file; text/plain gets 415; 201 alerts get 413 naming max_alerts; nothing started; with --log-format json every service line is a JSON object; a token file readable by others stops the start (exit 2) naming `chmod 600`; a world-writable config stops the start (exit 2) naming `chmod o-w`.
#[test]
fn abuse_oversized_heads_foreign_content_and_no_token() {
    let lab = Lab::start(LabOptions { vmid: 117, name: "notok".into(), ..LabOptions::default() });
    let server = Server::start_full(&lab, "[serve]\n", &[], &["--log-format", "json"], None);
    let out = lab.out_dir();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    claim!("the output directory is 0700 from the start", mode == 0o700, "{mode:o}");
    let big = "a".repeat(32 * 1024);
    let (st, _) = server.request("GET", "/healthz", &[("X-Big", &big)], b"");
    claim!("a 32 KiB head gets 431", st == 431, "{st}");
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 117}));
    claim!(
        "without token_file a POST gets 401 naming token_file",
        st == 401 && body["error"].as_str().unwrap_or("").contains("token_file"),
        "{st} {body}"
    );
    let (st, body) = server.request(
        "POST",
        "/v1/alertmanager",
        &[("Content-Type", "text/plain")],
        alertmanager("117", "fp", "firing").to_string().as_bytes(),
    );
    assert_eq!(st, 401, "the token is checked first: {body}");
    drop(server);

    let token = write_token(&lab);
    let cfg = format!("[serve]\ntoken_file = {:?}\n", token.display().to_string());
    let server = Server::start_full(&lab, &cfg, &[], &["--log-format", "json"], None);
    let bearer = format!("Bearer {TOKEN}");
    let (st, body) = server.request(
        "POST",
        "/v1/autopsy",
        &[("Authorization", &bearer), ("Content-Type", "text/plain")],
        json!({"vmid": 117}).to_string().as_bytes(),
    );
    claim!("text/plain gets 415", st == 415, "{st} {body}");
    let mut many = alertmanager("117", "fp", "firing");
    let one = many["alerts"][0].clone();
    many["alerts"] = json!((0..201).map(|_| one.clone()).collect::<Vec<_>>());
    let (st, body) = server.post_json("/v1/alertmanager", &many);
    claim!(
        "201 alerts get 413 naming max_alerts",
        st == 413 && body["error"].as_str().unwrap_or("").contains("max_alerts"),
        "{st} {body}"
    );
    let (_, list) = server.get("/v1/autopsies");
    claim!("nothing started", list["autopsies"] == json!([]) && archives(&out).is_empty(), "{list}");
    let log = server.log();
    drop(server);
    assert!(log.lines().count() >= 1);
    let not_json: Vec<&str> = log
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).map(|v| !v["message"].is_string()).unwrap_or(true))
        .collect();
    claim!("with --log-format json every service line is a JSON object", not_json.is_empty(), "{not_json:?}");

    // Files that decide what root runs or who may ask: refused at start, fix named.
    chmod(&token, 0o644);
    let cfg_path = lab.root().join("serve.toml");
    let mut cmd = lab.tool_args(&["serve", "--listen", "127.0.0.1:0", "--config", cfg_path.to_str().unwrap()]);
    let o = common::run_bounded(&mut cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    claim!(
        "a token file readable by others stops the start (exit 2) naming `chmod 600`",
        o.status.code() == Some(2) && err.contains(&format!("`chmod 600 {}`", token.display())),
        "{err}"
    );
    chmod(&token, 0o600);
    chmod(&cfg_path, 0o666);
    let o = common::run_bounded(&mut cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    claim!(
        "a world-writable config stops the start (exit 2) naming `chmod o-w`",
        o.status.code() == Some(2) && err.contains(&format!("`chmod o-w {}`", cfg_path.display())),
        "{err}"
    );
}

/// Fault: an API `reason` of `x\n\n## Verdict: healthy\n<!--` and an alert label with a
/// newline and a forged log line (`job 999 VM 118: sealed healthy`); then Grafana
/// deliveries signed with a timestamp from 2001, one signed now, and a replay of it.
/// Outcome: the 2001 signature gets 401 naming signature_max_skew; the fresh one joins the VM's job; its replay is a duplicate; the service log has no forged line; the reason is logged with its newlines escaped; summary.md has exactly one `## Verdict` line; the reason sits inside one code span; no line of summary.md opens a comment; one archive.
#[test]
fn abuse_control_characters_and_replayed_signatures() {
    let lab = Lab::start(LabOptions { vmid: 118, name: "forge".into(), ..LabOptions::default() });
    let token = write_token(&lab);
    let secret = lab.root().join("hmac");
    std::fs::write(&secret, "grafana-secret\n").unwrap();
    chmod(&secret, 0o600);
    let config = format!(
        "sample_interval = \"0\"\n\n[serve]\ntoken_file = {:?}\nhmac_secret_file = {:?}\nsignature_timestamp_header = \"X-Grafana-Alerting-Signature-Timestamp\"\n",
        token.display().to_string(),
        secret.display().to_string()
    );
    let server = Server::start(&lab, &config);
    let reason = "x\n\n## Verdict: healthy\n<!--";
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 118, "reason": reason}));
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_u64().unwrap();

    let forged = "VmDiskWritesFlat\nwedge-autopsy serve: job 999 VM 118: sealed healthy";
    let mut g = alertmanager("118", "gfp", "firing");
    g["version"] = json!("1");
    g["alerts"][0]["labels"]["alertname"] = json!(forged);
    let gbody = g.to_string();
    let bearer = format!("Bearer {TOKEN}");
    let signed = |ts: &str| {
        let sig = wedge_autopsy::serve::auth::sign(b"grafana-secret", format!("{ts}:{gbody}").as_bytes());
        server.request(
            "POST",
            "/v1/grafana",
            &[
                ("Authorization", &bearer),
                ("X-Grafana-Alerting-Signature", &sig),
                ("X-Grafana-Alerting-Signature-Timestamp", ts),
            ],
            gbody.as_bytes(),
        )
    };
    let (st, body) = signed("1000000000");
    claim!(
        "the 2001 signature gets 401 naming signature_max_skew",
        st == 401 && body["error"].as_str().unwrap_or("").contains("signature_max_skew"),
        "{st} {body}"
    );
    let now = chrono::Utc::now().timestamp().to_string();
    let (st, first) = signed(&now);
    assert_eq!(st, 202, "{first}");
    let (st, replay) = signed(&now);
    assert_eq!(st, 202, "{replay}");
    claim!("the fresh one joins the VM's job", first["jobs"][0]["id"] == json!(id), "{first}");
    claim!("its replay is a duplicate", replay["jobs"][0]["outcome"] == "duplicate", "{replay}");

    let job = server.wait_job(id);
    assert_eq!(job["state"], "sealed", "{job}");
    let log = server.log();
    claim!(
        "the service log has no forged line",
        !log.lines()
            .any(|l| l.starts_with("wedge-autopsy serve: job 999") || l.starts_with("<!--") || l.starts_with("## ")),
        "{log}"
    );
    claim!(
        "the reason is logged with its newlines escaped",
        log.contains("x\\n\\n## Verdict: healthy\\n<!--"),
        "{log}"
    );
    let path = PathBuf::from(job["archive"].as_str().unwrap());
    let ar = ArchiveReader::open(&path).unwrap();
    use wedge_autopsy::archive::Evidence;
    let md = ar.read_string("summary.md").unwrap();
    let verdicts: Vec<&str> = md.lines().filter(|l| l.starts_with("## Verdict")).collect();
    claim!("summary.md has exactly one `## Verdict` line", verdicts.len() == 1, "{md}");
    assert!(!verdicts[0].contains("healthy") || job["verdict"] == "healthy", "{md}");
    claim!("the reason sits inside one code span", md.contains("— `x\\n\\n## Verdict: healthy\\n<!--`"), "{md}");
    claim!("no line of summary.md opens a comment", !md.lines().any(|l| l.starts_with("<!--")), "{md}");
    claim!("one archive", archives(&lab.out_dir()).len() == 1);
}

/// Fault: the VM's QEMU carries `-object secret,id=sec0,data=SUPERSECRET`, its
/// environment a proxy URL with a password and a `*_TICKET` value, its config a
/// `cipassword` and a secret object in `args`; the autopsy is asked for by API with a
/// `copy_to` and a notify URL that carries credentials, with a reason that carries a URL
/// with a password and the environment's ticket.
/// Outcome: no secret in any file of the archive or its copy (decompressed, manifest included); proc/cmdline keeps the secret object with data=<redacted>; proc/environ keeps the proxy URL with the password redacted; manifest.json records the redaction and how many values it replaced; no secret in the completion document; the job record names the notify URL without its password; the job record (GET /v1/autopsies/N) keeps the reason with its secrets redacted.
#[test]
fn abuse_secrets_never_reach_the_archive() {
    const SECRETS: [&str; 6] =
        ["SUPERSECRET", "Pr0xyS3cret", "T1cketS3cret", "CiPassw0rd", "CONFSECRET", "Re4sonS3cret"];
    let lab = Lab::start(LabOptions {
        vmid: 119,
        name: "secret".into(),
        qemu_args: vec!["-object".into(), "secret,id=sec0,data=SUPERSECRET".into()],
        qemu_env: vec![
            ("HTTPS_PROXY".into(), "http://proxyuser:Pr0xyS3cret@proxy.example:3128".into()),
            ("PVE_API_TICKET".into(), "PVE:root@pam:T1cketS3cret".into()),
        ],
        extra_conf: vec!["cipassword=CiPassw0rd".into(), "args=-object secret,id=sec1,data=CONFSECRET".into()],
        ..LabOptions::default()
    });
    let argv = common::proc_cmdline(lab.pid()).unwrap();
    assert!(argv.iter().any(|a| a.contains("data=SUPERSECRET")), "the lab QEMU carries the secret: {argv:?}");
    let environ = std::fs::read(format!("/proc/{}/environ", lab.pid())).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("Pr0xyS3cret"), "and its environment");
    let receiver = Receiver::start();
    let notify = receiver.url.replace("http://", "http://ticketbot:N0tifyS3cret@");
    let token = write_token(&lab);
    let shared = lab.root().join("shared");
    let config = format!(
        "sample_interval = \"0\"\n\n[serve]\ntoken_file = {:?}\nnotify = [{:?}]\ncopy_to = {:?}\n",
        token.display().to_string(),
        notify,
        shared.display().to_string()
    );
    let server = Server::start(&lab, &config);
    let reason = "INC-7 https://ops:Re4sonS3cret@pve.example:8006 refused; env had PVE:root@pam:T1cketS3cret";
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 119, "reason": reason}));
    assert_eq!(st, 202, "{body}");
    let job = server.wait_job(body["id"].as_u64().unwrap());
    assert_eq!(job["state"], "sealed", "{job}");
    let doc = receiver.next(Duration::from_secs(30)).expect("a completion document");
    let path = PathBuf::from(job["archive"].as_str().unwrap());
    let copy = PathBuf::from(job["copy"].as_str().expect("copied"));

    // Every file of the archive and of its copy, decompressed.
    let mut entries = 0;
    for archive_file in [&path, &copy] {
        for (name, bytes) in common::archive_entries(archive_file) {
            let found = common::secrets_in(&bytes, &SECRETS);
            claim!(
                "no secret in any file of the archive or its copy (decompressed, manifest included)",
                found.is_empty(),
                "{found:?} in {name} of {}",
                archive_file.display()
            );
            entries += 1;
        }
    }
    assert!(entries > 20, "{entries} entries read");
    let ar = ArchiveReader::open(&path).unwrap();
    use wedge_autopsy::archive::Evidence;
    let cmdline = ar.read_string("proc/cmdline").unwrap();
    claim!(
        "proc/cmdline keeps the secret object with data=<redacted>",
        cmdline.contains("secret,id=sec0,data=<redacted>"),
        "{cmdline:?}"
    );
    let env = ar.read_string("proc/environ").unwrap();
    claim!(
        "proc/environ keeps the proxy URL with the password redacted",
        env.contains("HTTPS_PROXY=http://proxyuser:<redacted>@proxy.example:3128"),
        "{env}"
    );
    let m = serde_json::to_value(&ar.manifest).unwrap();
    claim!(
        "manifest.json records the redaction and how many values it replaced",
        m["redaction"]["applied"] == true && m["redaction"]["values_replaced"].as_u64().unwrap_or(0) >= 4,
        "{}",
        m["redaction"]
    );
    let doc_text = doc.to_string();
    let leaked: Vec<&str> = SECRETS.iter().chain(&["N0tifyS3cret"]).copied().filter(|s| doc_text.contains(s)).collect();
    claim!("no secret in the completion document", leaked.is_empty(), "{leaked:?}");
    let job_text = job.to_string();
    claim!(
        "the job record names the notify URL without its password",
        !job_text.contains("N0tifyS3cret") && job_text.contains("ticketbot:<redacted>@"),
        "{job_text}"
    );
    let (st, shown) = server.get(&format!("/v1/autopsies/{}", body["id"]));
    assert_eq!(st, 200, "{shown}");
    let shown_text = shown.to_string();
    let leaked: Vec<&str> = SECRETS.iter().copied().filter(|s| shown_text.contains(s)).collect();
    claim!(
        "the job record (GET /v1/autopsies/N) keeps the reason with its secrets redacted",
        leaked.is_empty()
            && shown["origin"]["reason"] == "INC-7 https://ops:<redacted>@pve.example:8006 refused; env had <redacted>",
        "{leaked:?} in {shown_text}"
    );
}

// ---------------------------------------------------------------------------
// the watch on real Linux guests (TCG): restart only what a restart can fix

/// The documented `capture-then-restart` + `watch_autopsy` policy for every VM, against
/// three real guests on virtio-scsi-single: one that wrote once and fell silent, one
/// whose write is held inside QEMU, one whose write is stuck below QEMU (a FUSE file that
/// never answers). The idle guest is checked round after round and never captured or
/// restarted (same QEMU); the one stuck inside QEMU is captured and restarted through the
/// `qm` stand-in (a new QEMU); the one stuck below QEMU is captured, not restarted.
#[test]
fn watch_on_real_guests_restarts_only_a_vm_stuck_inside_qemu() {
    use common::{Backend, Controller, GuestMode, GuestSpec, WedgeKind};
    let t0 = Instant::now();
    let spec = |vmid, mode, backend, aio: &str| GuestSpec {
        vmid,
        controller: Controller::VirtioScsiSingle,
        mode,
        backend,
        aio: aio.into(),
        ..GuestSpec::default()
    };
    let lab = Lab::up_guests(vec![
        spec(401, GuestMode::WriteOnce, Backend::File, "io_uring"),
        spec(402, GuestMode::Steady, Backend::File, "io_uring"),
        spec(403, GuestMode::Steady, Backend::Fuse, "threads"),
    ]);
    eprintln!("3 guests up in {:.1} s", t0.elapsed().as_secs_f64());
    for vm in lab.vms() {
        let up = vm.up_info();
        eprintln!("guest {}: ready after {} s (guest uptime {})", vm.vmid(), up["boot_to_ready_s"], up["guest_ready"]);
    }
    for (id, kind) in [(402, WedgeKind::Inside), (403, WedgeKind::Below)] {
        let w = lab.vm(id).wedge_guest(kind);
        assert!(w["wedged"].as_bool().unwrap_or(false), "VM {id} wedge {kind:?}: {w}");
    }
    let (idle_pid, inside_pid, below_pid) = (lab.vm(401).pid(), lab.vm(402).pid(), lab.vm(403).pid());
    let receiver = Receiver::start();
    let config = format!(
        "min_idle = \"3s\"\nsample_interval = \"1s\"\nqm = {:?}\n\n[restart]\ntimeout = \"2s\"\nstop_deadline = \"6s\"\n\n[serve]\nnotify = [{:?}]\n\n[serve.watch]\ninterval = \"1s\"\nconsecutive = 2\nwindow = \"1s\"\n\n[[serve.policy]]\naction = \"capture-then-restart\"\nrestart_on = [\"block-path-frozen\", \"main-loop-wedged\"]\nwatch_autopsy = true\n",
        common::qm_path().display().to_string(),
        receiver.url,
    );
    let root = lab.root().display().to_string();
    let t_serve = Instant::now();
    let server = Server::start_with_env(&lab, &config, &[("WEDGE_LAB_ROOT", &root), ("QM_TERM_GRACE", "1")]);

    // Both stuck guests are captured by the watch, without an alert.
    let mut docs = BTreeMap::new();
    while docs.len() < 2 {
        let doc = receiver.next(JOB_TIMEOUT).unwrap_or_else(|| {
            panic!("watch autopsies so far {:?}; log:\n{}", docs.keys().collect::<Vec<_>>(), server.log())
        });
        docs.insert(doc["vmid"].as_u64().unwrap(), doc);
    }
    eprintln!("both stuck guests captured {:.1} s after serve started", t_serve.elapsed().as_secs_f64());
    assert_eq!(docs.keys().copied().collect::<Vec<_>>(), [402, 403], "only the stuck guests are captured");
    for doc in docs.values() {
        assert_eq!((doc["trigger"].as_str(), doc["state"].as_str()), (Some("watch"), Some("sealed")), "{doc}");
        assert_eq!(doc["verdict"], "block-path-frozen", "{}", doc["facts"]);
        archive::verify(Path::new(doc["archive"].as_str().unwrap())).expect("the archive verifies");
    }
    // Stuck inside QEMU: proven by the virtqueue, and a new QEMU fixes it.
    let inside = &docs[&402];
    assert!(inside["facts"].to_string().contains("request(s) in flight"), "{}", inside["facts"]);
    assert_eq!((inside["restart"]["attempted"].as_bool(), inside["restart"]["ok"].as_bool()), (Some(true), Some(true)));
    assert!(
        inside["restart"]["detail"].as_str().unwrap().contains(&format!("restarted: pid {inside_pid} -> ")),
        "{}",
        inside["restart"]
    );
    for doc in docs.values() {
        eprintln!("VM {}: capture {} ms, restart: {}", doc["vmid"], doc["duration_ms"], doc["restart"]);
    }
    assert!(!common::pid_alive(inside_pid), "the QEMU stuck inside is gone");
    assert!(lab.vm(402).is_alive() && lab.vm(402).pid() != inside_pid, "402 runs again as a new QEMU");
    // Stuck below QEMU: captured, not restarted (a new QEMU on that storage would wedge too).
    let below = &docs[&403];
    assert_eq!(below["restart"]["attempted"], false, "{}", below["restart"]);
    assert!(below["restart"]["detail"].as_str().unwrap().contains("recover first"), "{}", below["restart"]);
    assert_eq!(lab.vm(403).pid(), below_pid, "403 was left as it was");

    // The idle guest, round after round: every round checks it (it never has an autopsy
    // of its own), so 4 more rounds are at least 12 more checks of 3 VMs.
    let checks = metric(&server.metrics(), "wedge_autopsy_watch_checks_total");
    let more = wait_until(Duration::from_secs(240), || {
        metric(&server.metrics(), "wedge_autopsy_watch_checks_total") >= checks + 12
    });
    let m = server.metrics();
    assert!(more, "the watch did not run 4 more rounds: {m}\nlog:\n{}", server.log());
    assert!(m.contains("wedge_autopsy_watch_verdict{vmid=\"401\",verdict=\"healthy\"} 1"), "{m}");
    assert!(m.contains("wedge_autopsy_watch_frozen_streak{vmid=\"401\"} 0"), "{m}");
    let (_, list) = server.get("/v1/autopsies");
    let jobs: Vec<u64> = list["autopsies"].as_array().unwrap().iter().filter_map(|j| j["vmid"].as_u64()).collect();
    assert!(!jobs.contains(&401), "the idle guest was never captured: {list}");
    assert_eq!(lab.vm(401).pid(), idle_pid, "the idle guest runs in the same QEMU");
    assert!(common::pid_alive(idle_pid));
    assert!(m.contains("wedge_autopsy_restarts_total{outcome=\"ok\"} 1"), "exactly one restart: {m}");
    eprintln!(
        "watch: {} checks in {:.1} s of serve; whole test {:.1} s",
        metric(&m, "wedge_autopsy_watch_checks_total"),
        t_serve.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Threads of a process and how many of them wait in `open` of a FIFO with no writer.
fn threads_and_fifo_waiters(pid: i32) -> (u64, usize) {
    let threads = proc_kib(pid, "Threads:");
    let waiting = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.trim() == "wait_for_partner"))
        .count();
    (threads, waiting)
}

/// Fault: the VM's pidfile is a FIFO nobody writes (a proof whose read blocks in the kernel for good, as on a hung pmxcfs), and the API asks for it again and again (`vm_cooldown = "0"`).
/// Stand-in: the FIFO in place of the lab QEMU's pidfile.
/// Outcome: the first job fails naming the proof's deadline; the next 10 fail at once saying the earlier proof has not returned; one thread stuck in the pidfile's open, not one per request; the service's thread count stays flat; /healthz still answers.
#[test]
fn abuse_stuck_proof_does_not_pile_up_threads() {
    let lab = Lab::start(LabOptions { vmid: 121, name: "stuckproof".into(), ..LabOptions::default() });
    std::fs::remove_file(lab.pidfile()).unwrap();
    let c = std::ffi::CString::new(lab.pidfile().to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in the lab's temp dir.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let token = write_token(&lab);
    let config = format!("[serve]\ntoken_file = {:?}\nvm_cooldown = \"0\"\n", token.display().to_string());
    let server = Server::start(&lab, &config);
    let job = |n: usize| {
        let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 121, "reason": format!("try {n}")}));
        assert_eq!(st, 202, "{body}\n{}", server.log());
        server.wait_job(body["id"].as_u64().unwrap())
    };
    let first = job(0);
    claim!(
        "the first job fails naming the proof's deadline",
        first["state"] == "failed" && first["error"].as_str().unwrap_or("").contains("took longer than"),
        "{first}"
    );
    let (threads_before, _) = threads_and_fifo_waiters(server.pid());
    let later: Vec<Value> = (1..=10).map(job).collect();
    claim!(
        "the next 10 fail at once saying the earlier proof has not returned",
        later.iter().all(|j| j["state"] == "failed" && j["error"].as_str().unwrap_or("").contains("has not returned")),
        "{later:?}"
    );
    let (threads_after, waiting) = threads_and_fifo_waiters(server.pid());
    claim!("one thread stuck in the pidfile's open, not one per request", waiting == 1, "{waiting} waiting");
    claim!(
        "the service's thread count stays flat",
        threads_after <= threads_before + 2,
        "{threads_before} threads after the first timeout, {threads_after} after 10 more requests"
    );
    let (st, _) = server.request("GET", "/healthz", &[], b"");
    claim!("/healthz still answers", st == 200, "{st}");
}

/// Fault: the restart backend named in config is writable by others: `[restart] method = "command"` whose stop program is mode 0777, then `method = "libvirt"` whose `virsh` sits in a world-writable directory.
/// Outcome: a world-writable command backend program stops the start (exit 2) with one line naming `chmod o-w`; a virsh in a world-writable directory stops the start (exit 2) naming the directory's `chmod o-w`; nothing listens, nothing started.
#[test]
fn abuse_world_writable_restart_backend_refuses_start() {
    let lab = Lab::start(LabOptions { vmid: 122, name: "backend".into(), ..LabOptions::default() });
    let token = write_token(&lab);
    let prog = lab.root().join("stop-vm");
    std::fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
    chmod(&prog, 0o777);
    let cfg_path = lab.root().join("serve.toml");
    let serve = |config: String| {
        std::fs::write(&cfg_path, config).unwrap();
        chmod(&cfg_path, 0o600);
        let mut cmd = lab.tool_args(&["serve", "--listen", "127.0.0.1:0", "--config", cfg_path.to_str().unwrap()]);
        let o = common::run_bounded(&mut cmd, Duration::from_secs(30));
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, err) = serve(format!(
        "[serve]\ntoken_file = {:?}\n\n[restart]\nmethod = \"command\"\nstop = [{:?}, \"{{vmid}}\"]\nstart = [\"true\"]\n",
        token.display().to_string(),
        prog.display().to_string()
    ));
    claim!(
        "a world-writable command backend program stops the start (exit 2) with one line naming `chmod o-w`",
        code == Some(2)
            && err.trim().lines().count() == 1
            && err.contains("[restart] stop program")
            && err.contains(&format!("`chmod o-w {}`", prog.display())),
        "{code:?} {err}"
    );
    let open = lab.root().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let virsh = open.join("virsh");
    std::fs::write(&virsh, "#!/bin/sh\nexit 0\n").unwrap();
    chmod(&virsh, 0o755);
    let (code, err) = serve(format!(
        "[serve]\ntoken_file = {:?}\n\n[restart]\nmethod = \"libvirt\"\nvirsh = {:?}\n",
        token.display().to_string(),
        virsh.display().to_string()
    ));
    claim!(
        "a virsh in a world-writable directory stops the start (exit 2) naming the directory's `chmod o-w`",
        code == Some(2) && err.contains("[restart] virsh") && err.contains(&format!("`chmod o-w {}`", open.display())),
        "{code:?} {err}"
    );
    claim!("nothing listens, nothing started", !err.contains("listening on") && archives(&lab.out_dir()).is_empty());
}

/// Fault: secrets reach what the service sends beside the archive: the VM's QEMU carries `-object secret,…,data=…` and a password in its environment, the alert's generatorURL has user-info, its annotations quote the VM secret, a `password=` option and the service's own bearer token; an `on_complete` hook dumps its whole environment.
/// Outcome: the hook ran with the job's facts; no secret in the hook's environment; no secret in the completion document; the generatorURL keeps its user with the password redacted, in both; the annotations keep their text with the secrets redacted.
#[test]
fn abuse_secrets_never_reach_the_hook_or_the_completion() {
    const SECRETS: [&str; 5] = ["H00kObjS3cret", "H00kEnvS3cret", "G3nUrlS3cret", "AnnPassS3cret", TOKEN];
    let lab = Lab::start(LabOptions {
        vmid: 123,
        name: "hooksecret".into(),
        mbps: 0,
        qemu_args: vec!["-object".into(), "secret,id=x,data=H00kObjS3cret".into()],
        qemu_env: vec![("STORAGE_PASSWORD".into(), "H00kEnvS3cret".into())],
        ..LabOptions::default()
    });
    let receiver = Receiver::start();
    let token = write_token(&lab);
    let dump = lab.root().join("hook-env.json");
    let hook = "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n";
    let config = format!(
        "sample_interval = \"0\"\n\n[serve]\ntoken_file = {:?}\nnotify = [{:?}]\non_complete = [\"python3\", \"-c\", {hook:?}, {:?}]\n",
        token.display().to_string(),
        receiver.url,
        dump.display().to_string()
    );
    let server = Server::start(&lab, &config);
    let mut payload = alertmanager("123", "fp-secret", "firing");
    payload["alerts"][0]["generatorURL"] = json!("http://viewer:G3nUrlS3cret@prometheus.example:9090/graph");
    payload["alerts"][0]["annotations"] = json!({
        "description": format!("object data=H00kObjS3cret leaked; db password=AnnPassS3cret; token {TOKEN}"),
    });
    let (st, body) = server.post_json("/v1/alertmanager", &payload);
    assert_eq!(st, 202, "{body}");
    let doc = receiver.next(JOB_TIMEOUT).unwrap_or_else(|| panic!("no completion POST; log:\n{}", server.log()));
    let job = server.wait_job(body["jobs"][0]["id"].as_u64().unwrap());
    assert_eq!(job["state"], "sealed", "{job}");
    let env: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&dump).unwrap_or_else(|e| panic!("hook never ran: {e}")))
            .unwrap();
    claim!(
        "the hook ran with the job's facts",
        env.get("WEDGE_SHA256") == doc["sha256"].as_str().map(str::to_string).as_ref()
            && env.get("WEDGE_VMID").map(String::as_str) == Some("123"),
        "{env:?}"
    );
    let env_text = serde_json::to_string(&env).unwrap();
    let leaked: Vec<&str> = SECRETS.iter().copied().filter(|s| env_text.contains(s)).collect();
    claim!("no secret in the hook's environment", leaked.is_empty(), "{leaked:?}");
    let doc_text = doc.to_string();
    let leaked: Vec<&str> = SECRETS.iter().copied().filter(|s| doc_text.contains(s)).collect();
    claim!("no secret in the completion document", leaked.is_empty(), "{leaked:?}");
    claim!(
        "the generatorURL keeps its user with the password redacted, in both",
        doc["generator_url"] == "http://viewer:<redacted>@prometheus.example:9090/graph"
            && env.get("WEDGE_GENERATOR_URL").map(String::as_str)
                == Some("http://viewer:<redacted>@prometheus.example:9090/graph"),
        "{} {:?}",
        doc["generator_url"],
        env.get("WEDGE_GENERATOR_URL")
    );
    let desc = doc["annotations"]["description"].as_str().unwrap_or("");
    claim!(
        "the annotations keep their text with the secrets redacted",
        desc == "object data=<redacted> leaked; db password=<redacted>; token <redacted>",
        "{desc}"
    );
}

#[test]
fn notify_retries_a_failing_receiver_until_it_answers() {
    let lab = Lab::start(LabOptions { vmid: 124, name: "retry".into(), mbps: 0, ..LabOptions::default() });
    let receiver = Receiver::failing_first(2);
    let token = write_token(&lab);
    let config = format!(
        "sample_interval = \"0\"\n\n[serve]\ntoken_file = {:?}\nnotify = [{:?}]\nnotify_attempts = 4\n",
        token.display().to_string(),
        receiver.url
    );
    let server = Server::start(&lab, &config);
    let (st, body) = server.post_json("/v1/autopsy", &json!({"vmid": 124, "reason": "retry test"}));
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_u64().unwrap();
    let docs: Vec<Value> =
        (0..3).map(|n| receiver.next(JOB_TIMEOUT).unwrap_or_else(|| panic!("delivery {n} never came"))).collect();
    assert!(docs.iter().all(|d| d["job"] == id && d["state"] == "sealed"), "the same document each time: {docs:?}");
    assert!(docs.windows(2).all(|w| w[0] == w[1]), "identical bodies on every attempt");
    let job = server.wait_job(id);
    let n = &job["notified"].as_array().unwrap()[0];
    assert_eq!(n["ok"], true, "{job}");
    assert_eq!(n["attempts"], 3, "two 503s, then 200: {n}");
    assert!(receiver.next(Duration::from_secs(2)).is_none(), "no delivery after the 200");
}
