//! One function per step kind: run it under its deadline and turn the outcome into a
//! [`StepRecord`]. Collectors that block (/proc reads, ptrace, external programs) run on
//! their own OS thread; when the deadline passes the thread is abandoned and its sink
//! closed, so a read stuck behind a D-state thread cannot hold up the rest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use super::qmp_lane::{Lane, LaneError};
use super::sampling::{finish_record, later_samples, record, Ctx, Ended, Ran, Sampled};
use crate::archive::{Evidence, Staging};
use crate::cancel::Cancel;
use crate::exec::{self, ExecError, Spec};
use crate::minicore;
use crate::runbook::{Step, StepKind, Template, Vars};
use crate::stacks::{self, StackError, StackRequest};
use crate::step::{StepOutcome, StepRecord, StepSink, StepStatus};
use crate::target::Target;

/// After a cancel, how long a blocking step gets to clean up (detach, kill its child).
const CLEANUP_GRACE: Duration = Duration::from_secs(3);

/// The deadline a collector enforces on itself: a little before the executor gives up
/// on it, so a killed command or gdb still gets its partial output written.
fn inner_deadline(timeout: Duration) -> Duration {
    timeout.saturating_sub((timeout / 5).min(Duration::from_millis(500)))
}

/// A record for a step that never started.
pub fn not_run(step: &Step, status: StepStatus, why: &str) -> StepRecord {
    let mut r = record(step, status, Utc::now(), Duration::ZERO);
    r.error = Some(why.into());
    r
}

pub async fn run(ctx: &mut Ctx<'_>, step: &Step, timeout: Duration) -> Ran {
    let start = Utc::now();
    let t0 = Instant::now();
    let sink = ctx.staging.sink();
    let outcome = match &step.kind {
        StepKind::Qmp { command, arguments, samples, interval, output } => {
            return qmp_step(ctx, step, command, arguments.clone(), *samples, *interval, output, timeout, sink).await;
        }
        StepKind::Inflight { samples, interval } => {
            return super::inflight_step::run(ctx, step, *samples, *interval, timeout, sink).await;
        }
        StepKind::QomThrottle { output } => {
            Ended::Done(throttle(&ctx.qmp, &output.render(ctx.vars), timeout, &sink).await)
        }
        _ => {
            let job = blocking_job(ctx, step, timeout, sink.clone());
            run_blocking(job, timeout, ctx.cancel).await
        }
    };
    Ran::Done(finish_record(step, start, t0.elapsed(), outcome, &sink, timeout))
}

type Job = Box<dyn FnOnce() -> StepOutcome + Send + 'static>;

/// Runs `job` on its own thread; gives up at `timeout` or on cancel (after a grace
/// period in which the job can detach or kill what it started).
async fn run_blocking(job: Job, timeout: Duration, cancel: &Cancel) -> Ended {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(job());
    });
    tokio::select! {
        r = &mut rx => r.map(Ended::Done).unwrap_or(Ended::Done(StepOutcome::Failed("collector thread panicked".into()))),
        _ = tokio::time::sleep(timeout) => Ended::Timeout,
        _ = super::cancelled(cancel) => {
            let _ = tokio::time::timeout(CLEANUP_GRACE, rx).await;
            Ended::Interrupted
        }
    }
}

fn blocking_job(ctx: &Ctx<'_>, step: &Step, timeout: Duration, sink: StepSink) -> Job {
    let pid = ctx.target.pid;
    let cancel = ctx.cancel.clone();
    let vars = ctx.vars.clone();
    match step.kind.clone() {
        StepKind::Proc => {
            let target = ctx.target.clone();
            Box::new(move || {
                // The pid may have been reused since it was proven: never file a
                // stranger's /proc (environ included) as the VM's.
                if !target.still_same() {
                    return StepOutcome::Failed(format!(
                        "pid {pid} is no longer VM {}'s QEMU; /proc not read",
                        target.vmid
                    ));
                }
                match crate::procfs::capture_process(pid, &sink, &cancel) {
                    Ok(_) => StepOutcome::Ok,
                    Err(e) => StepOutcome::Failed(e),
                }
            })
        }
        StepKind::Host => Box::new(move || match crate::procfs::capture_host(&sink) {
            Ok(_) => StepOutcome::Ok,
            Err(e) => StepOutcome::Failed(e),
        }),
        StepKind::HostInfo => {
            let target = ctx.target.clone();
            let staging = ctx.staging.clone();
            let input = crate::hostinfo::Input {
                pid,
                vmid: vars.vmid.clone(),
                pve_dir: ctx.settings.pve_dir.clone(),
                debug_dirs: ctx.settings.debug_dirs.clone(),
                stat_budget: (timeout / 4).min(Duration::from_secs(2)),
            };
            Box::new(move || host_info_step(&input, &staging, &target, &sink))
        }
        StepKind::File { path, output, redact, tail, if_exists } => {
            Box::new(move || file_step(&path, &output, &redact, tail, if_exists, &vars, &sink))
        }
        StepKind::PveTasks { output, log_cap } => Box::new(move || {
            crate::pve::capture_tasks(
                std::path::Path::new(&vars.log_dir),
                &vars.vmid,
                &output.render(&vars),
                log_cap,
                &sink,
            )
        }),
        StepKind::Command { only_ha, .. } if only_ha && !ha_managed(&vars) => {
            Box::new(|| StepOutcome::Skipped("not HA-managed (no `vm:` entry in ha/resources.cfg)".into()))
        }
        StepKind::Command { argv, output, output_cap, .. } => {
            let timeout = inner_deadline(timeout);
            if argv.iter().any(|a| a.uses("pid")) {
                // A command addressed to {pid} (eu-stack -p, gdb -p, cat /proc/{pid}/…) must
                // not reach an unrelated process that took over the pid.
                let target = ctx.target.clone();
                return Box::new(move || {
                    if !target.still_same() {
                        return StepOutcome::Failed(format!(
                            "pid {pid} is no longer VM {}'s QEMU; not run",
                            target.vmid
                        ));
                    }
                    command_step(&argv, &output, output_cap, timeout, &vars, &sink, &cancel)
                });
            }
            Box::new(move || command_step(&argv, &output, output_cap, timeout, &vars, &sink, &cancel))
        }
        StepKind::Stacks { methods, backtrace } => {
            let methods = ctx.stacks_override.clone().unwrap_or(methods);
            let target = ctx.target.clone();
            let labels = thread_labels(ctx.staging);
            let deadline = Instant::now() + inner_deadline(timeout);
            let debug_dirs = ctx.settings.debug_dirs.clone();
            Box::new(move || {
                let want = StacksWant { methods: &methods, backtrace: &backtrace, labels, debug_dirs };
                stacks_step(&target, want, deadline, &sink, &cancel)
            })
        }
        StepKind::Core { output, min_free } => {
            let out_dir = ctx.staging.dir.clone();
            let target = ctx.target.clone();
            let deadline = Instant::now() + inner_deadline(timeout);
            Box::new(move || core_step(&target, &output.render(&vars), min_free, &out_dir, deadline, &sink, &cancel))
        }
        StepKind::Minicore { output, min_free } => {
            let target = ctx.target.clone();
            let mut opts = minicore::MinicoreOptions {
                ram_sizes: minicore::plan::ram_sizes(
                    ctx.staging.read_json("qmp/x-query-ramblock.json").as_ref(),
                    ctx.staging.read_json("qmp/query-memdev.json").as_ref(),
                ),
                min_free,
                debug_dirs: ctx.settings.debug_dirs.clone(),
                labels: thread_labels(ctx.staging),
                ..Default::default()
            };
            opts.stop_timeout = opts.stop_timeout.min(inner_deadline(timeout) / 4);
            let rel = output.render(&vars);
            Box::new(move || minicore_step(&target, &rel, &opts, &sink, &cancel))
        }
        StepKind::Qmp { .. } | StepKind::QomThrottle { .. } | StepKind::Inflight { .. } => {
            unreachable!("QMP steps run on the lane")
        }
    }
}

/// Writes [`crate::hostinfo::HostInfo`]; what could not be read is listed in it and
/// noted, so the step fails only when the record cannot be written.
fn host_info_step(input: &crate::hostinfo::Input, ev: &Staging, target: &Target, sink: &StepSink) -> StepOutcome {
    let info = crate::hostinfo::collect(input, ev, &|| target.still_same());
    for u in &info.unavailable {
        sink.note(format!("unavailable: {u}"));
    }
    match sink.write(crate::hostinfo::PATH, &serde_json::to_vec_pretty(&info).unwrap_or_default()) {
        Ok(()) => StepOutcome::Ok,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

/// Whether the VM of this run is HA-managed; an unreadable resources.cfg counts as yes
/// (asking ha-manager costs nothing, missing the answer does).
fn ha_managed(vars: &Vars) -> bool {
    match vars.vmid.parse() {
        Ok(vmid) => crate::restart::ha_managed(std::path::Path::new(&vars.pve_dir), vmid).unwrap_or(true),
        Err(_) => false,
    }
}

/// Copies a file (a config, redacted as one) or the tail of a log (redacted as text).
fn file_step(
    path: &Template,
    output: &Template,
    redact: &[String],
    tail: Option<u64>,
    if_exists: bool,
    vars: &Vars,
    sink: &StepSink,
) -> StepOutcome {
    let src = path.render(vars);
    let read = match tail {
        Some(n) => crate::pve::tail(std::path::Path::new(&src), n).map(|(bytes, cut)| {
            if cut {
                sink.note(format!("{src}: last {n} bytes kept"));
            }
            bytes
        }),
        None => crate::procfs::read_capped(std::path::Path::new(&src), 16 << 20),
    };
    let text = match read {
        Ok(t) => t,
        Err(e) if if_exists && e.kind() == std::io::ErrorKind::NotFound => {
            return StepOutcome::Skipped(format!("unavailable: no {src}"))
        }
        Err(e) => return StepOutcome::Failed(format!("cannot read {src}: {e}")),
    };
    let text = String::from_utf8_lossy(&text);
    let redacted =
        if tail.is_some() { crate::pve::redact_log(&text) } else { crate::redact::key_values(&text, redact) };
    match sink.write(&output.render(vars), redacted.as_bytes()) {
        Ok(()) => StepOutcome::Ok,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

fn command_step(
    argv: &[Template],
    output: &Template,
    cap: usize,
    timeout: Duration,
    vars: &Vars,
    sink: &StepSink,
    cancel: &Cancel,
) -> StepOutcome {
    let argv: Vec<String> = argv.iter().map(|a| a.render(vars)).collect();
    let mut spec = Spec::new(argv.clone(), timeout);
    spec.output_cap = cap;
    let out = match exec::run(&spec, cancel) {
        Ok(o) => o,
        Err(ExecError::NotFound(p)) => return StepOutcome::Skipped(format!("{p} is not installed")),
        Err(e) => return StepOutcome::Failed(e.to_string()),
    };
    let rel = output.render(vars);
    if let Err(e) = sink.write(&rel, &out.stdout) {
        return StepOutcome::Failed(e.to_string());
    }
    if !out.stderr.is_empty() {
        let _ = sink.write(&format!("{rel}.stderr"), &out.stderr);
    }
    if out.truncated {
        sink.note(format!("output capped at {cap} bytes"));
    }
    if out.timed_out {
        return StepOutcome::Timeout(format!(
            "killed (with its process group) at the {} ms deadline; output so far kept",
            timeout.as_millis()
        ));
    }
    if out.cancelled {
        return StepOutcome::Interrupted("killed (with its process group): run interrupted; output so far kept".into());
    }
    match out.status {
        Some(s) if s.success() => StepOutcome::Ok,
        Some(s) => {
            let tail = String::from_utf8_lossy(&out.stderr);
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            StepOutcome::Failed(format!("{} exited with {s}: {last}", argv[0]))
        }
        None => StepOutcome::Failed("terminated".into()),
    }
}

/// Thread labels from QMP replies already captured: `CPU n` and iothread ids.
fn thread_labels(ev: &dyn Evidence) -> BTreeMap<i32, String> {
    let mut labels = BTreeMap::new();
    if let Some(v) = ev.read_json("qmp/query-cpus-fast.json") {
        for cpu in v["return"].as_array().into_iter().flatten() {
            if let (Some(tid), Some(idx)) = (cpu["thread-id"].as_i64(), cpu["cpu-index"].as_i64()) {
                labels.insert(tid as i32, format!("CPU {idx}"));
            }
        }
    }
    if let Some(v) = ev.read_json("qmp/query-iothreads.json") {
        for it in v["return"].as_array().into_iter().flatten() {
            if let (Some(tid), Some(id)) = (it["thread-id"].as_i64(), it["id"].as_str()) {
                labels.insert(tid as i32, format!("iothread {id}"));
            }
        }
    }
    labels
}

/// What a stacks step asks for.
struct StacksWant<'a> {
    methods: &'a [String],
    backtrace: &'a str,
    labels: BTreeMap<i32, String>,
    debug_dirs: Vec<std::path::PathBuf>,
}

fn stacks_step(
    target: &Target,
    want: StacksWant<'_>,
    deadline: Instant,
    sink: &StepSink,
    cancel: &Cancel,
) -> StepOutcome {
    let StacksWant { methods, backtrace, labels, debug_dirs } = want;
    if methods.is_empty() {
        return StepOutcome::Skipped("--stacks none".into());
    }
    if !target.still_same() {
        return StepOutcome::Failed(format!("pid {} is no longer VM {}'s QEMU; not traced", target.pid, target.vmid));
    }
    let req = StackRequest { pid: target.pid, sink, deadline, cancel, labels, debug_dirs };
    let (outcome, restore) = stacks::leaving_as_found(target.pid, &|| target.still_same(), || {
        run_methods(methods, backtrace, &req, deadline, sink, cancel)
    });
    for n in restore.notes("the stack method") {
        sink.note(n);
    }
    outcome
}

/// The stack methods in order until one works.
fn run_methods(
    methods: &[String],
    backtrace: &str,
    req: &StackRequest<'_>,
    deadline: Instant,
    sink: &StepSink,
    cancel: &Cancel,
) -> StepOutcome {
    let mut outcome = StepOutcome::Failed("no stack method ran".into());
    for name in methods {
        let method: Option<Box<dyn stacks::StackMethod>> = if name == "gdb" {
            Some(Box::new(stacks::gdb::Gdb { backtrace: backtrace.into(), ..Default::default() }))
        } else {
            stacks::method(name)
        };
        let Some(method) = method else {
            sink.note(format!("stack method {name} is not available in this build"));
            continue;
        };
        match method.capture(req) {
            Ok(summary) => {
                sink.note(format!("{name}: {summary}"));
                outcome = StepOutcome::Ok;
                break;
            }
            Err(StackError::Interrupted) => {
                outcome = StepOutcome::Interrupted("interrupted; the target was detached first".into());
                break;
            }
            Err(e @ StackError::NoProcess(_)) => {
                outcome = StepOutcome::Failed(e.to_string());
                break;
            }
            Err(e) => {
                sink.note(format!("{name} failed: {e}"));
                outcome = StepOutcome::Failed(format!("{name}: {e}"));
                if Instant::now() >= deadline || cancel.is_cancelled() {
                    break;
                }
            }
        }
    }
    outcome
}

fn core_step(
    target: &Target,
    rel: &str,
    min_free: u64,
    staging_dir: &std::path::Path,
    deadline: Instant,
    sink: &StepSink,
    cancel: &Cancel,
) -> StepOutcome {
    let free = match nix::sys::statvfs::statvfs(staging_dir) {
        Ok(s) => s.blocks_available() * s.fragment_size(),
        Err(e) => return StepOutcome::Failed(format!("cannot check free space: {e}")),
    };
    let rss = std::fs::read_to_string(format!("/proc/{}/status", target.pid))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    if free < min_free + rss {
        return StepOutcome::Skipped(format!(
            "refused: {} MiB free, a core needs about {} MiB plus the {} MiB floor; free space or lower min_free",
            free >> 20,
            rss >> 20,
            min_free >> 20
        ));
    }
    if !target.still_same() {
        return StepOutcome::Failed(format!("pid {} is no longer VM {}'s QEMU; not dumped", target.pid, target.vmid));
    }
    let path = match sink.reserve(rel) {
        Ok(p) => p,
        Err(e) => return StepOutcome::Failed(e.to_string()),
    };
    let argv = vec![
        "gdb".to_string(),
        "-p".into(),
        target.pid.to_string(),
        "-batch".into(),
        "-nx".into(),
        "-iex".into(),
        "set debuginfod enabled off".into(),
        "-ex".into(),
        format!("gcore {}", path.display()),
    ];
    let spec = Spec::new(argv, deadline.saturating_duration_since(Instant::now()));
    let (out, restore) = stacks::leaving_as_found(target.pid, &|| target.still_same(), || exec::run(&spec, cancel));
    for n in restore.notes("gdb") {
        sink.note(n);
    }
    match out {
        Err(ExecError::NotFound(_)) => StepOutcome::Skipped("gdb is not installed (apt install gdb)".into()),
        Err(e) => StepOutcome::Failed(e.to_string()),
        Ok(o) if o.success() && path.exists() => StepOutcome::Ok,
        Ok(o) => StepOutcome::Failed(format!(
            "gcore failed: {}",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )),
    }
}

/// A minicore of the target (see [`crate::minicore`]): the core, its report
/// (`<dir>/minicore.json`) and the stacks of the same freeze (`<dir>/stacks.json`).
fn minicore_step(
    target: &Target,
    rel: &str,
    opts: &minicore::MinicoreOptions,
    sink: &StepSink,
    cancel: &Cancel,
) -> StepOutcome {
    if !target.still_same() {
        return StepOutcome::Failed(format!("pid {} is no longer VM {}'s QEMU; not dumped", target.pid, target.vmid));
    }
    let path = match sink.reserve(rel) {
        Ok(p) => p,
        Err(e) => return StepOutcome::Failed(e.to_string()),
    };
    let (result, restore) = stacks::leaving_as_found(target.pid, &|| target.still_same(), || {
        minicore::dump(target.pid, &path, opts, cancel)
    });
    for n in restore.notes("minicore") {
        sink.note(n);
    }
    let dir = rel.rsplit_once('/').map_or(String::new(), |(d, _)| format!("{d}/"));
    match result {
        Ok((mut report, stacks)) => {
            report.archive_path = rel.to_string();
            sink.note(format!(
                "froze {} threads for {} µs; memory copied {} ({} ms); core {} MiB, guest RAM left out {} MiB",
                report.threads_stopped,
                report.freeze_us,
                report.memory_copy,
                report.copy_ms,
                report.core_bytes >> 20,
                report.guest_ram_bytes >> 20
            ));
            sink.note(
                "the core holds QEMU's memory (keys, passwords, guest data in flight): treat the archive as secret",
            );
            for n in &report.notes {
                sink.note(format!("minicore: {n}"));
            }
            let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
            let stacks_json = serde_json::to_vec_pretty(&stacks).unwrap_or_default();
            if let Err(e) = sink.write(&format!("{dir}minicore.json"), &json) {
                return StepOutcome::Failed(e.to_string());
            }
            if let Err(e) = sink.write(&format!("{dir}stacks.json"), &stacks_json) {
                return StepOutcome::Failed(e.to_string());
            }
            StepOutcome::Ok
        }
        Err(e) => {
            // Nothing half-written is sealed as a core.
            let _ = std::fs::remove_file(&path);
            let _ = sink.write(&format!("{rel}.missing"), e.to_string().as_bytes());
            match e {
                minicore::MinicoreError::Refused(why) => StepOutcome::Skipped(format!("refused: {why}")),
                minicore::MinicoreError::Stack(StackError::Interrupted) => {
                    StepOutcome::Interrupted("interrupted; the target was detached first".into())
                }
                other => StepOutcome::Failed(other.to_string()),
            }
        }
    }
}

/// Output path of sample `n` of `samples`: `qmp/x.json` → `qmp/x.2.json`.
fn sample_path(rel: &str, n: u32, samples: u32) -> String {
    if samples == 1 {
        return rel.to_string();
    }
    match rel.rsplit_once('.') {
        Some((stem, ext)) if !ext.contains('/') => format!("{stem}.{n}.{ext}"),
        _ => format!("{rel}.{n}"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn qmp_step(
    ctx: &mut Ctx<'_>,
    step: &Step,
    command: &str,
    args: Option<Value>,
    samples: u32,
    interval: Option<std::time::Duration>,
    output: &Template,
    timeout: Duration,
    sink: StepSink,
) -> Ran {
    let start = Utc::now();
    let t0 = Instant::now();
    let rel = output.render(ctx.vars);
    let first = one_sample(&ctx.qmp, command, args.clone(), timeout, &sample_path(&rel, 1, samples), &sink).await;
    let (lane, command) = (ctx.qmp.clone(), command.to_string());
    let interval = interval.unwrap_or(ctx.settings.sample_interval);
    let s = Sampled { step, start, t0, first: t0, samples, interval, timeout, sink: sink.clone() };
    later_samples(ctx, s, first, move |n| {
        let (lane, command, args, sink) = (lane.clone(), command.clone(), args.clone(), sink.clone());
        let rel = sample_path(&rel, n, samples);
        async move { one_sample(&lane, &command, args, timeout, &rel, &sink).await }
    })
}

async fn one_sample(
    lane: &Lane,
    command: &str,
    args: Option<Value>,
    timeout: Duration,
    rel: &str,
    sink: &StepSink,
) -> Ended {
    match lane.execute(command, args, timeout).await {
        Ok(reply) => match sink.write(rel, &reply.raw) {
            Ok(()) => Ended::Done(StepOutcome::Ok),
            Err(e) => Ended::Done(StepOutcome::Failed(e.to_string())),
        },
        Err(LaneError::NotSent(why)) => Ended::Done(StepOutcome::Skipped(format!("not sent: {why}"))),
        Err(LaneError::Qmp(crate::qmp::QmpError::Command { class, desc, .. })) if class == "CommandNotFound" => {
            // Proxmox-only commands on another QEMU: the answer itself is the evidence.
            let reply = json!({"error": {"class": class, "desc": desc}});
            let _ = sink.write(rel, &serde_json::to_vec(&reply).unwrap_or_default());
            Ended::Done(StepOutcome::Skipped(format!("unavailable: this QEMU has no {command} (CommandNotFound)")))
        }
        Err(LaneError::Qmp(e)) => {
            if matches!(e, crate::qmp::QmpError::Timeout { .. }) {
                Ended::Timeout
            } else {
                Ended::Done(StepOutcome::Failed(format!("{e} ({})", e.classify())))
            }
        }
    }
}

/// Throttle groups: `qom-list /objects`, then `qom-get <group> limits` for each
/// `throttle-group` child. `-drive` throttling has no group object; it shows in query-block.
async fn throttle(lane: &Lane, rel: &str, timeout: Duration, sink: &StepSink) -> StepOutcome {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let list = match lane.execute("qom-list", Some(json!({"path": "/objects"})), left()).await {
        Ok(r) => r,
        Err(LaneError::NotSent(why)) => return StepOutcome::Skipped(format!("not sent: {why}")),
        Err(LaneError::Qmp(e)) => return StepOutcome::Failed(format!("qom-list /objects: {e}")),
    };
    let mut groups = serde_json::Map::new();
    for obj in list.value.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (obj["name"].as_str(), obj["type"].as_str()) else { continue };
        if !ty.contains("throttle-group") {
            continue;
        }
        let path = format!("/objects/{name}");
        match lane.execute("qom-get", Some(json!({"path": path, "property": "limits"})), left()).await {
            Ok(r) => {
                groups.insert(name.to_string(), r.value);
            }
            Err(LaneError::NotSent(why)) => {
                sink.note(format!("{path}: not sent: {why}"));
                break;
            }
            Err(LaneError::Qmp(e)) => sink.note(format!("{path} limits: {e}")),
        }
    }
    if groups.is_empty() {
        sink.note("no throttle-group objects (with -drive throttling the limits are in query-block)");
    }
    let doc = json!({"objects": list.value, "groups": groups});
    match sink.write(rel, &serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
        Ok(()) => StepOutcome::Ok,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::sample_path;

    #[test]
    fn sample_paths() {
        assert_eq!(sample_path("qmp/query-blockstats.json", 1, 1), "qmp/query-blockstats.json");
        assert_eq!(sample_path("qmp/query-blockstats.json", 2, 2), "qmp/query-blockstats.2.json");
        assert_eq!(sample_path("qmp/raw", 1, 2), "qmp/raw.1");
    }
}
