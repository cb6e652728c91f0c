//! Findings: the facts around the verdict, gathered from the evidence files.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::config::{self, PveConfig, Risk};
use super::ret;
use crate::archive::Evidence;
use crate::step::{StepRecord, StepStatus};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    /// `State:` of `/proc/PID/status`, e.g. `S (sleeping)`.
    pub process_state: Option<String>,
    pub threads: Vec<ThreadFinding>,
    pub main_thread: Option<ThreadFinding>,
    /// Threads in D state, with their kernel stacks.
    pub blocked: Vec<ThreadFinding>,
    pub devices: Vec<DeviceDelta>,
    pub sample_window_ms: u64,
    pub qmp_replies: usize,
    pub io_status_errors: Vec<String>,
    /// Live throttle limits per device or group, in QMP units.
    pub throttle: BTreeMap<String, BTreeMap<String, u64>>,
    /// Limits in the config that differ from what QEMU enforces.
    pub throttle_drift: Vec<String>,
    pub io_uring: Vec<String>,
    pub risks: Vec<Risk>,
    /// Top frames per group of identical stacks, when stacks were captured.
    pub stacks: Vec<String>,
    /// Proxmox VE context: versions, backup, tasks, HA, pending changes, imminent stops.
    pub pve: crate::pve::PveFindings,
    /// Modules with frames the stacks could not name (`qemu-system-x86_64+0x837c39`):
    /// their build-id and what would name them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unnamed: Vec<UnnamedFrames>,
    /// Known bugs and risk stacks (`signatures/*.toml`) the evidence matches.
    pub signatures: Vec<crate::signatures::SignatureMatch>,
}

/// One module whose frames have no name in the captured stacks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnnamedFrames {
    /// The module's file name (`qemu-system-x86_64`) and path as mapped.
    pub module: String,
    pub path: String,
    pub build_id: Option<String>,
    /// Unnamed frames of this module over all threads, and one as printed.
    pub frames: usize,
    pub example: String,
    /// The debug file that was used, when one was found (then only static functions
    /// it lacks stay unnamed).
    pub debug_file: Option<String>,
    /// What would name them: an installable package, or why there is none.
    pub hint: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ThreadFinding {
    pub tid: i32,
    pub name: String,
    pub state: char,
    pub wchan: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel_stack: Vec<String>,
}

/// One device's counters in sample 1 and sample 2.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceDelta {
    pub device: String,
    pub rd_ops: (u64, u64),
    pub wr_ops: (u64, u64),
    pub flush_ops: (u64, u64),
    pub unmap_ops: (u64, u64),
    pub wr_bytes: (u64, u64),
    pub rd_bytes: (u64, u64),
    pub wr_highest: (u64, u64),
    pub idle_ns: (Option<u64>, Option<u64>),
    pub failed: (u64, u64),
}

impl DeviceDelta {
    pub fn ops_delta(&self) -> u64 {
        [self.rd_ops, self.wr_ops, self.flush_ops, self.unmap_ops].iter().map(|(a, b)| b.saturating_sub(*a)).sum()
    }
    /// Whether any I/O ever completed (QEMU omits `idle_time_ns` until one does).
    pub fn ever_completed(&self) -> bool {
        self.idle_ns.1.is_some()
    }
    pub fn idle_secs(&self) -> Option<f64> {
        self.idle_ns.1.map(|n| n as f64 / 1e9)
    }
}

pub fn collect(ev: &dyn Evidence, steps: &[StepRecord]) -> Findings {
    let mut f = Findings {
        process_state: ev
            .read_string("proc/status")
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("State:")).map(|v| v.trim().to_string())),
        ..Default::default()
    };
    let pid: Option<i32> = ev
        .read_string("proc/status")
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|v| v.trim().parse().ok()));
    threads(ev, pid, &mut f);
    devices(ev, steps, &mut f);
    f.qmp_replies =
        steps.iter().filter(|s| s.kind == "qmp" && s.status == StepStatus::Ok).map(|s| s.files.len().max(1)).sum();
    if let Some(blocks) = ret(ev, "qmp/query-block.json") {
        for b in blocks.as_array().into_iter().flatten() {
            let dev = b["device"].as_str().filter(|d| !d.is_empty()).or(b["qdev"].as_str()).unwrap_or("?").to_string();
            if let Some(st) = b["io-status"].as_str() {
                if st != "ok" {
                    f.io_status_errors.push(format!("{dev} io-status {st}"));
                }
            }
            let ins = &b["inserted"];
            let mut lim = BTreeMap::new();
            for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
                if let Some(v) = ins[k].as_u64().filter(|v| *v > 0) {
                    lim.insert(k.to_string(), v);
                }
            }
            if !lim.is_empty() {
                f.throttle.insert(dev, lim);
            }
        }
    }
    if let Some(groups) = ev.read_json("qmp/throttle-groups.json").and_then(|v| v["groups"].as_object().cloned()) {
        for (name, limits) in groups {
            let mut lim = BTreeMap::new();
            for (k, v) in limits.as_object().into_iter().flatten() {
                if let Some(n) = v.as_u64().filter(|n| *n > 0) {
                    lim.insert(k.replace('-', "_"), n);
                }
            }
            f.throttle.insert(format!("group {name}"), lim);
        }
    }
    if let Some((_, text)) = ev
        .list()
        .iter()
        .find(|p| p.starts_with("config/") && p.ends_with(".conf"))
        .and_then(|p| Some((p.clone(), ev.read_string(p)?)))
    {
        let cfg = PveConfig::parse(&text);
        f.risks = config::risks(&cfg);
        drift(&cfg, &mut f);
    }
    io_uring(ev, &mut f);
    stacks(ev, &mut f);
    f.pve = crate::pve::findings(ev);
    f
}

fn threads(ev: &dyn Evidence, pid: Option<i32>, f: &mut Findings) {
    let mut tids: Vec<i32> =
        ev.list().iter().filter_map(|p| p.strip_prefix("proc/task/")?.strip_suffix("/stat")?.parse().ok()).collect();
    tids.sort_unstable();
    for tid in tids {
        let read = |name: &str| ev.read_string(&format!("proc/task/{tid}/{name}")).unwrap_or_default();
        let stat = crate::procfs::parse_stat(&read("stat"));
        let t = ThreadFinding {
            tid,
            name: read("comm").trim().to_string(),
            state: stat.as_ref().map(|s| s.state).unwrap_or('?'),
            // A bare "0" means the thread is running, not sleeping anywhere.
            wchan: Some(read("wchan").trim().to_string()).filter(|w| w != "0").unwrap_or_default(),
            kernel_stack: read("stack")
                .lines()
                .map(|l| l.split_once("] ").map(|(_, r)| r).unwrap_or(l).to_string())
                .collect(),
        };
        if Some(tid) == pid {
            f.main_thread = Some(t.clone());
        }
        if t.state == 'D' {
            f.blocked.push(t.clone());
        }
        f.threads.push(t);
    }
}

fn stats(v: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for d in v.as_array().into_iter().flatten() {
        let name = d["device"].as_str().filter(|s| !s.is_empty()).or(d["qdev"].as_str()).or(d["node-name"].as_str());
        if let Some(n) = name {
            out.insert(n.to_string(), d["stats"].clone());
        }
    }
    out
}

fn devices(ev: &dyn Evidence, steps: &[StepRecord], f: &mut Findings) {
    let (Some(a), Some(b)) = (ret(ev, "qmp/query-blockstats.1.json"), ret(ev, "qmp/query-blockstats.2.json")) else {
        return;
    };
    if let Some(s) = steps.iter().find(|s| s.files.iter().any(|p| p.ends_with("query-blockstats.2.json"))) {
        f.sample_window_ms = s.duration_ms;
    }
    let (a, b) = (stats(&a), stats(&b));
    for (dev, s2) in &b {
        let Some(s1) = a.get(dev) else { continue };
        let n = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
        let pair = |k: &str| (n(s1, k), n(s2, k));
        f.devices.push(DeviceDelta {
            device: dev.clone(),
            rd_ops: pair("rd_operations"),
            wr_ops: pair("wr_operations"),
            flush_ops: pair("flush_operations"),
            unmap_ops: pair("unmap_operations"),
            wr_bytes: pair("wr_bytes"),
            rd_bytes: pair("rd_bytes"),
            wr_highest: pair("wr_highest_offset"),
            idle_ns: (s1["idle_time_ns"].as_u64(), s2["idle_time_ns"].as_u64()),
            failed: (
                n(s1, "failed_wr_operations") + n(s1, "failed_rd_operations"),
                n(s2, "failed_wr_operations") + n(s2, "failed_rd_operations"),
            ),
        });
    }
}

/// Config limits vs. live ones, compared as numbers (never strings).
fn drift(cfg: &PveConfig, f: &mut Findings) {
    for (disk, want) in config::configured_limits(cfg) {
        let live = f
            .throttle
            .iter()
            .find(|(dev, _)| dev.ends_with(&disk) || dev.ends_with(&format!("-{disk}")))
            .map(|(_, l)| l.clone());
        let Some(live) = live else {
            if !want.is_empty() && !f.throttle.is_empty() {
                f.throttle_drift.push(format!("{disk}: config limits {want:?} but QEMU reports none for this disk"));
            }
            continue;
        };
        if live != want {
            f.throttle_drift.push(format!("{disk}: config {want:?} but QEMU enforces {live:?}"));
        }
    }
}

/// io_uring rings from `proc/fdinfo.txt`: submissions the kernel has not consumed and
/// completions QEMU has not reaped.
fn io_uring(ev: &dyn Evidence, f: &mut Findings) {
    let Some(text) = ev.read_string("proc/fdinfo.txt") else { return };
    for block in text.split("== fd ").skip(1) {
        let fd = block.lines().next().unwrap_or("").trim().to_string();
        let field = |name: &str| {
            block.lines().find_map(|l| l.trim().strip_prefix(name)?.trim_start_matches(':').trim().parse::<u64>().ok())
        };
        let (Some(sqh), Some(sqt), Some(cqh), Some(cqt)) =
            (field("SqHead"), field("SqTail"), field("CqHead"), field("CqTail"))
        else {
            continue;
        };
        f.io_uring.push(format!(
            "fd {fd}: {} submissions not consumed by the kernel, {} completions not reaped (SqHead {sqh} SqTail {sqt} CqHead {cqh} CqTail {cqt})",
            sqt.wrapping_sub(sqh),
            cqt.wrapping_sub(cqh)
        ));
    }
}

/// Modules with unnamed frames in `stacks/threads.json`, each once, with its build-id
/// and the package that would name its frames (the audit's rule, [`super::pinnable`]).
fn unnamed(ev: &dyn Evidence, v: &Value) -> Vec<UnnamedFrames> {
    let mut by_module: BTreeMap<String, UnnamedFrames> = BTreeMap::new();
    for fr in v["threads"].as_array().into_iter().flatten().flat_map(|t| t["frames"].as_array().into_iter().flatten()) {
        let (None, Some(path), Some(_)) = (fr["symbol"].as_str(), fr["module"].as_str(), fr["module_offset"].as_u64())
        else {
            continue;
        };
        let e = by_module.entry(path.to_string()).or_insert_with(|| UnnamedFrames {
            module: path.rsplit('/').next().unwrap_or(path).to_string(),
            path: path.to_string(),
            example: frame_name(fr),
            ..Default::default()
        });
        e.frames += 1;
    }
    let version = ev.read_json("qmp/query-version.json").map(|v| v["return"].clone());
    for (path, u) in by_module.iter_mut() {
        let m = v["modules"].as_array().into_iter().flatten().find(|m| m["name"].as_str() == Some(path.as_str()));
        u.build_id = m.and_then(|m| m["build_id"].as_str()).map(str::to_string);
        u.debug_file = m.and_then(|m| m["debug_file"].as_str()).map(str::to_string);
        u.hint = unnamed_hint(&u.module, version.as_ref());
    }
    by_module.into_values().collect()
}

/// Which package would name a module's frames.
fn unnamed_hint(module: &str, version: Option<&Value>) -> String {
    if crate::stacks::dbgsym::is_qemu_image(module) {
        let Some(v) = version else {
            return "the QEMU build is unknown (no query-version reply): see `wedge-autopsy audit`".into();
        };
        let p = crate::stacks::dbgsym::from_qmp(v["package"].as_str().unwrap_or(""), None);
        return match p.dbgsym {
            Some(d) => format!("`apt install {d}` (matches this build-id): {}", p.note),
            None => p.note,
        };
    }
    if module.starts_with("libc.so") || module.starts_with("ld-linux") || module.starts_with("libpthread") {
        return "`apt install libc6-dbg` (Debian main: glibc's detached debug info under /usr/lib/debug/.build-id)"
            .into();
    }
    format!("the -dbgsym package of the package that owns it (`dpkg -S {module}`), for this build-id")
}

/// A frame as people read it: its symbol, else `module+0xoffset`, else its address.
fn frame_name(fr: &Value) -> String {
    if let Some(sym) = fr["symbol"].as_str() {
        return sym.to_string();
    }
    match (fr["module"].as_str(), fr["module_offset"].as_u64()) {
        (Some(m), Some(off)) => format!("{}+{off:#x}", m.rsplit('/').next().unwrap_or(m)),
        _ => fr["pc"].as_u64().map(|pc| format!("{pc:#x}")).unwrap_or_else(|| "?".into()),
    }
}

fn stacks(ev: &dyn Evidence, f: &mut Findings) {
    if let Some(v) = ev.read_json("stacks/threads.json") {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in v["threads"].as_array().into_iter().flatten() {
            let frames: Vec<String> = t["frames"].as_array().into_iter().flatten().take(6).map(frame_name).collect();
            let name = t["name"].as_str().unwrap_or("?").to_string();
            let stack = if frames.is_empty() {
                "(no user-space frames: a kernel-side thread)".to_string()
            } else {
                frames.join(" < ")
            };
            groups.entry(stack).or_default().push(name);
        }
        for (stack, names) in groups {
            f.stacks.push(format!("{} thread(s) [{}]: {stack}", names.len(), names.join(", ")));
        }
        f.unnamed = unnamed(ev, &v);
    } else if let Some(text) = ev.read_string("stacks/gdb.txt") {
        // gdb: the first frame line after each "Thread N (…)" header.
        let mut lines = text.lines().peekable();
        while let Some(l) = lines.next() {
            if l.starts_with("Thread ") && l.contains("(LWP") {
                if let Some(frame) = lines.next() {
                    let name = l.split('"').nth(1).unwrap_or("?");
                    f.stacks.push(format!("{name}: {}", frame.trim()));
                }
            }
        }
    }
}
