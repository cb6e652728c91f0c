//! Text rendering of a [`StacksReport`]: threads with identical stacks are grouped
//! ("12 threads: …"), largest group first. Pure functions of the report.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Frame, StacksReport, SyscallInfo, ThreadReport};

/// `#3  0x00007f2a1b2c3d4e in qemu_poll_ns+0x5e (/usr/bin/qemu-system-x86_64) at util/qemu-timer.c:339`
pub fn render_frame(i: usize, f: &Frame) -> String {
    let mut s = format!("#{i:<2} {:#018x}", f.pc);
    match (&f.symbol, f.offset) {
        (Some(sym), Some(off)) => write!(s, " in {sym}+{off:#x}").unwrap(),
        (Some(sym), None) => write!(s, " in {sym}").unwrap(),
        (None, _) => s.push_str(" in ??"),
    }
    match (&f.module, f.module_offset) {
        (Some(m), Some(o)) if f.symbol.is_none() => write!(s, " ({m}+{o:#x})").unwrap(),
        (Some(m), _) => write!(s, " ({})", short_module(m)).unwrap(),
        (None, _) => {}
    }
    if let Some(file) = &f.file {
        write!(s, " at {file}").unwrap();
        if let Some(l) = f.line {
            write!(s, ":{l}").unwrap();
        }
    }
    if f.signal_frame {
        s.push_str("  <signal handler called>");
    }
    for inl in &f.inlined {
        write!(s, "\n      inlined {}", inl.function.as_deref().unwrap_or("??")).unwrap();
        if let Some(file) = &inl.file {
            write!(s, " at {file}:{}", inl.line.unwrap_or(0)).unwrap();
        }
    }
    s
}

fn short_module(m: &str) -> &str {
    m.rsplit('/').next().unwrap_or(m)
}

/// One line per thread for a group header: `1234 "CPU 0/TCG" [CPU 0] S`.
fn thread_line(t: &ThreadReport) -> String {
    let mut s = format!("{} \"{}\"", t.tid, t.comm);
    if let Some(l) = &t.label {
        write!(s, " [{l}]").unwrap();
    }
    write!(s, " {}", t.state).unwrap();
    if let Some(w) = &t.wchan {
        write!(s, " wchan={w}").unwrap();
    }
    if let Some(SyscallInfo::In { nr, .. }) = &t.syscall {
        write!(s, " syscall={nr}").unwrap();
    }
    if let Some(us) = t.freeze_us {
        write!(s, " stopped={us}µs").unwrap();
    }
    if t.capture != "stopped" {
        write!(s, " ({})", t.capture).unwrap();
    }
    s
}

/// The part of a thread that decides grouping: its frames as rendered, and its errors.
fn group_key(t: &ThreadReport) -> String {
    let mut k = String::new();
    for (i, f) in t.frames.iter().enumerate() {
        k.push_str(&render_frame(i, f));
        k.push('\n');
    }
    if let Some(e) = &t.end {
        if e != "outermost frame" {
            writeln!(k, "   (unwinding stopped: {e})").unwrap();
        }
    }
    k
}

/// The readable form of the report (`stacks/threads.txt`).
pub fn render_text(r: &StacksReport) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "pid {}: {} threads, {} frames, frozen {} µs (method {}, {})",
        r.pid,
        r.threads.len(),
        r.frame_count(),
        r.freeze_us,
        r.method,
        r.arch
    )
    .unwrap();
    for n in &r.notes {
        writeln!(out, "note: {n}").unwrap();
    }
    let mut groups: BTreeMap<String, Vec<&ThreadReport>> = BTreeMap::new();
    for t in &r.threads {
        groups.entry(group_key(t)).or_default().push(t);
    }
    let mut groups: Vec<(String, Vec<&ThreadReport>)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.1[0].tid.cmp(&b.1[0].tid)));
    for (key, ts) in groups {
        out.push('\n');
        if ts.len() == 1 {
            writeln!(out, "1 thread: {}", thread_line(ts[0])).unwrap();
        } else {
            writeln!(out, "{} threads:", ts.len()).unwrap();
            for t in &ts {
                writeln!(out, "  {}", thread_line(t)).unwrap();
            }
        }
        if key.is_empty() {
            out.push_str("  (no user frames)\n");
        }
        for line in key.lines() {
            writeln!(out, "  {line}").unwrap();
        }
        for t in &ts {
            for e in &t.errors {
                writeln!(out, "  ! {}: {e}", t.tid).unwrap();
            }
            if t.capture != "stopped" {
                if let Some(k) = &t.kernel_stack {
                    writeln!(out, "  kernel stack of {}:", t.tid).unwrap();
                    for l in k {
                        writeln!(out, "    {l}").unwrap();
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::unwind::Via;
    use super::*;

    fn frame(pc: u64, sym: Option<&str>) -> Frame {
        Frame {
            pc,
            module: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
            module_offset: Some(pc - 0x7f00_0000_0000),
            symbol: sym.map(String::from),
            offset: sym.map(|_| 0x10),
            file: None,
            line: None,
            inlined: vec![],
            via: Via::Cfi,
            signal_frame: false,
        }
    }

    fn thread(tid: i32, frames: Vec<Frame>) -> ThreadReport {
        ThreadReport {
            tid,
            name: "worker".into(),
            comm: "worker".into(),
            label: None,
            state: 'S',
            capture: "stopped".into(),
            wchan: Some("do_sys_poll".into()),
            syscall: None,
            kernel_stack: None,
            frames,
            end: Some("outermost frame".into()),
            freeze_us: Some(12),
            errors: vec![],
        }
    }

    #[test]
    fn frame_lines() {
        assert_eq!(
            render_frame(0, &frame(0x7f00_0000_1234, Some("poll"))),
            "#0  0x00007f0000001234 in poll+0x10 (libc.so.6)"
        );
        assert_eq!(
            render_frame(12, &frame(0x7f00_0000_1234, None)),
            "#12 0x00007f0000001234 in ?? (/usr/lib/x86_64-linux-gnu/libc.so.6+0x1234)"
        );
    }

    #[test]
    fn identical_stacks_are_grouped() {
        let same = || vec![frame(0x7f00_0000_1000, Some("poll")), frame(0x7f00_0000_2000, Some("start_thread"))];
        let mut r = StacksReport {
            method: "native".into(),
            pid: 7,
            arch: "x86_64".into(),
            freeze_us: 300,
            stopping_us: 200,
            total_us: 5000,
            threads: vec![
                thread(8, same()),
                thread(9, vec![frame(0x7f00_0000_3000, Some("main"))]),
                thread(10, same()),
            ],
            modules: vec![],
            notes: vec![],
        };
        r.threads[2].label = Some("CPU 1".into());
        let text = render_text(&r);
        assert!(text.starts_with("pid 7: 3 threads, 5 frames, frozen 300 µs"), "{text}");
        let two = text.find("2 threads:").expect(&text);
        let one = text.find("1 thread: 9").expect(&text);
        assert!(two < one, "largest group first:\n{text}");
        assert!(text.contains("  10 \"worker\" [CPU 1] S wchan=do_sys_poll stopped=12µs"), "{text}");
        assert_eq!(text.matches("in poll+0x10").count(), 1, "a group prints its stack once:\n{text}");
    }

    #[test]
    fn report_json_round_trips() {
        let r = StacksReport {
            method: "native".into(),
            pid: 7,
            arch: "x86_64".into(),
            freeze_us: 1,
            stopping_us: 1,
            total_us: 2,
            threads: vec![thread(8, vec![frame(0x7f00_0000_1000, Some("poll"))])],
            modules: vec![],
            notes: vec![],
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["method"], "native");
        assert_eq!(v["threads"][0]["frames"][0]["symbol"], "poll");
        assert_eq!(v["threads"][0]["freeze_us"], 12);
        let back: StacksReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
