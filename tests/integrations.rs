//! The shipped integration examples against the real tools from Debian's `prometheus`
//! and `prometheus-alertmanager` packages: `amtool check-config`, `promtool check
//! rules`, `promtool check metrics` on `serve`'s real `/metrics`, and a real
//! Alertmanager on loopback (configured from `examples/alertmanager.yml`) delivering a
//! firing alert posted with `amtool alert add` to `serve`, which captures a lab VM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{repo_root, run_bounded, wait_until, Lab, LabOptions};
use wedge_autopsy::archive::{self, ArchiveReader};

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "am-t0ken-for-tests";

fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn alertmanager_example_passes_amtool_check_config() {
    let out = run_bounded(Command::new("amtool").arg("check-config").arg(example("alertmanager.yml")), T);
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success() && all.contains("SUCCESS"), "amtool check-config failed:\n{all}");
    // What it found: the two per-node routes' receivers plus the default one.
    assert!(all.contains("3 receivers"), "{all}");
}

#[test]
fn prometheus_rules_example_passes_promtool_check_rules() {
    let out = run_bounded(Command::new("promtool").args(["check", "rules"]).arg(example("prometheus-rules.yml")), T);
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success() && all.contains("SUCCESS: 3 rules found"), "promtool check rules failed:\n{all}");
}

// ---------------------------------------------------------------------------
// processes under test

/// A child in its own process group, killed with the group and reaped on drop; its
/// stderr is collected.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(cmd: &mut Command, line_tx: Option<mpsc::Sender<String>>) -> Proc {
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(tx) = &line_tx {
                    let _ = tx.send(line.clone());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// `wedge-autopsy serve` on a free loopback port; returns it with its address.
fn start_serve(lab: &Lab, config: &str) -> (Proc, String) {
    let cfg = lab.root().join("serve.toml");
    std::fs::write(&cfg, config).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut cmd = lab.tool_args(&["serve", "--listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap()]);
    cmd.env_remove("NOTIFY_SOCKET");
    let p = Proc::spawn(&mut cmd, Some(tx));
    let end = Instant::now() + T;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                if let Some(rest) = l.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                    return (p, addr);
                }
            }
            Err(_) => break,
        }
    }
    panic!("serve did not say it listens within {T:?}; log:\n{}", p.log());
}

/// A port that was free a moment ago (Alertmanager takes an address, not a socket).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` → (status, body). HTTP/1.0, so the body is never chunked.
fn get(addr: &str, path: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = text(&raw);
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw.split_once("\r\n\r\n")?.1.to_string()))
}

/// The shipped example with its placeholders pointed at this test: the pve1 route's
/// webhook at `serve`, the token file at ours. Everything else (routes, matchers,
/// group_wait 0s, max_alerts, send_resolved, authorization) is the example as shipped.
fn alertmanager_config(serve_addr: &str, token_file: &Path) -> String {
    let shipped = std::fs::read_to_string(example("alertmanager.yml")).unwrap();
    assert!(
        shipped.contains("http://pve1.example.internal:9171")
            && shipped.contains("/etc/alertmanager/wedge-autopsy.token")
    );
    shipped
        .replace("http://pve1.example.internal:9171", &format!("http://{serve_addr}"))
        .replace("/etc/alertmanager/wedge-autopsy.token", token_file.to_str().unwrap())
}

fn archives(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".tar.zst")).collect())
        .unwrap_or_default()
}

#[test]
fn a_real_alertmanager_delivers_a_firing_alert_and_serve_captures_the_vm() {
    let lab = Lab::start(LabOptions { vmid: 143, name: "am-e2e".into(), ..LabOptions::default() });
    let token = lab.root().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    // serve refuses a token file others can read.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let serve_cfg = format!(
        "sample_interval = \"1s\"\nmin_idle = \"1s\"\n\n[serve]\ntoken_file = {:?}\n",
        token.display().to_string()
    );
    let (serve, serve_addr) = start_serve(&lab, &serve_cfg);

    // The real Alertmanager: own config and storage, no clustering, random free port.
    let am_dir = lab.root().join("alertmanager");
    std::fs::create_dir_all(am_dir.join("data")).unwrap();
    let am_cfg = am_dir.join("alertmanager.yml");
    std::fs::write(&am_cfg, alertmanager_config(&serve_addr, &token)).unwrap();
    let am_addr = format!("127.0.0.1:{}", free_port());
    let am = Proc::spawn(
        Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", am_cfg.display()))
            .arg(format!("--storage.path={}", am_dir.join("data").display()))
            .arg(format!("--web.listen-address={am_addr}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug"),
        None,
    );
    let ready = wait_until(T, || matches!(get(&am_addr, "/-/ready", None), Some((200, _))));
    assert!(ready, "Alertmanager at {am_addr} not ready within {T:?}; log:\n{}", am.log());

    // The sender: amtool posts a firing alert to Alertmanager's API, as Prometheus would.
    let posted = Instant::now();
    let out = run_bounded(
        Command::new("amtool")
            .arg(format!("--alertmanager.url=http://{am_addr}"))
            .args(["alert", "add", "alertname=PveVmDiskWritesFlat", "vmid=143", "node=pve1", "severity=page"])
            .arg("--annotation=summary=disk writes flat at zero while the VM is up"),
        T,
    );
    assert!(out.status.success(), "amtool alert add: {}{}", text(&out.stdout), text(&out.stderr));

    // Alertmanager routes it (group_wait 0s), delivers it with the bearer token, serve
    // captures VM 143 and seals.
    let deadline = Duration::from_secs(150);
    let sealed = wait_until(deadline, || {
        get(&serve_addr, "/v1/autopsies", Some(TOKEN))
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["autopsies"].as_array().is_some_and(|a| a.iter().any(|j| j["state"] == "sealed")))
    });
    let elapsed = posted.elapsed();
    assert!(
        sealed,
        "no sealed autopsy within {deadline:?} of the alert\nserve log:\n{}\nalertmanager log:\n{}",
        serve.log(),
        am.log()
    );
    eprintln!("alert posted to Alertmanager -> sealed archive: {:.2}s", elapsed.as_secs_f64());
    let (_, list) = get(&serve_addr, "/v1/autopsies", Some(TOKEN)).unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let jobs = list["autopsies"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "one alert, one autopsy: {list}");
    assert_eq!(jobs[0]["vmid"], 143, "{list}");
    let found = archives(&lab.out_dir());
    assert_eq!(found.len(), 1, "{found:?}");
    let verified = archive::verify(&found[0]).expect("the archive verifies");
    assert_eq!(jobs[0]["sha256"], verified.sha256, "{list}");
    let ar = ArchiveReader::open(&found[0]).unwrap();
    assert_eq!(ar.manifest.trigger.kind, "alert");
    // Alertmanager's own delivery reached serve: its log shows the notify succeeding.
    assert!(
        wait_until(Duration::from_secs(10), || am.log().contains("Notify success")),
        "alertmanager log:\n{}",
        am.log()
    );

    // serve's real /metrics, after a real capture, passes promtool's checks.
    let (st, metrics) = get(&serve_addr, "/metrics", None).unwrap();
    assert_eq!(st, 200);
    assert!(metrics.contains("wedge_autopsy_runs_total{result=\"sealed\"} 1"), "{metrics}");
    let mut check = Command::new("promtool");
    check.args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = check.spawn().expect("promtool");
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let end = Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "promtool check metrics did not finish within {T:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut msg = String::new();
    child.stdout.take().unwrap().read_to_string(&mut msg).ok();
    child.stderr.take().unwrap().read_to_string(&mut msg).ok();
    assert!(status.success(), "promtool check metrics on serve's /metrics:\n{msg}");
}
