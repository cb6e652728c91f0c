//! The raw native snapshot in the archive, so stacks can be unwound and named again
//! offline, later, with whatever debug info exists then (`inspect --resymbolize`).
//!
//! Two files (format `wedge-autopsy-raw-snapshot`, version 1; docs/raw-snapshot.md):
//! - `stacks/raw/snapshot.json`: per thread its /proc facts, the 27 general registers in
//!   `user_regs_struct` order (names in `reg_names`) and where its copied stack bytes lie
//!   in `data.bin`; per module its path, address range, load bias, build-id,
//!   `.gnu_debuglink` name and where its CFI sections (`.eh_frame`, `.eh_frame_hdr`,
//!   `.debug_frame`) lie in `data.bin`, or why they were left out.
//! - `stacks/raw/data.bin`: the stack copies, then the CFI sections, each 8-aligned.
//!
//! CFI is kept per module up to [`CFI_CAP_MODULE`] and [`CFI_CAP_TOTAL`] in all
//! (QEMU 7.2's own `.eh_frame` + `.eh_frame_hdr` are 1.3 MiB, libc's 0.2 MiB); the vDSO
//! is kept whole (8 KiB). Symbols are not copied: offline, names come from the binary
//! on the host when its build-id matches, from a debug file found by build-id or
//! debuglink, and otherwise from the names recorded at capture time.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::modules::{self, Bytes, DebugSearch, Elf, Module, Modules, Section, UnwindSections};
use super::snapshot::{Capture, ThreadCapture};
use super::{Captured, SyscallInfo};
use crate::procfs::Syscall;

pub const FORMAT: &str = "wedge-autopsy-raw-snapshot";
pub const VERSION: u32 = 1;
pub const JSON_PATH: &str = "stacks/raw/snapshot.json";
pub const DATA_PATH: &str = "stacks/raw/data.bin";
/// CFI bytes kept per module, and for the whole snapshot.
pub const CFI_CAP_MODULE: usize = 8 << 20;
pub const CFI_CAP_TOTAL: usize = 32 << 20;

/// `user_regs_struct` field order, as stored in [`RawThread::regs`].
pub const REG_NAMES: [&str; 27] = [
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax",
    "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
];

/// A byte range of `data.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawThread {
    pub tid: i32,
    pub comm: String,
    pub state: char,
    pub capture: Capture,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wchan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<SyscallInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_stack: Option<Vec<String>>,
    /// The 27 registers in [`REG_NAMES`] order; absent when the thread was not stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regs: Option<Vec<u64>>,
    /// Address of the first copied stack byte (the SP at the freeze).
    pub stack_addr: u64,
    pub stack: Blob,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawSection {
    /// `.eh_frame`, `.eh_frame_hdr`, `.debug_frame`, or `image` (the whole vDSO).
    pub name: String,
    /// The section's address in the file (SVMA).
    pub addr: u64,
    pub data: Blob,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawModule {
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// `avma = svma + bias`.
    pub bias: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debuglink: Option<String>,
    /// The debug file used at capture time, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
    pub has_symtab: bool,
    pub has_dwarf: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub got: Option<u64>,
    #[serde(default)]
    pub sections: Vec<RawSection>,
    /// Why CFI was not kept (over the cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfi_omitted: Option<String>,
}

/// `stacks/raw/snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawSnapshot {
    pub format: String,
    pub version: u32,
    pub arch: String,
    pub pid: i32,
    pub reg_names: Vec<String>,
    pub freeze_us: u64,
    pub stopping_us: u64,
    pub threads: Vec<RawThread>,
    pub modules: Vec<RawModule>,
}

/// The registers in [`REG_NAMES`] order (also the order of a core's `pr_reg`).
pub fn regs_array(u: &libc::user_regs_struct) -> [u64; 27] {
    [
        u.r15, u.r14, u.r13, u.r12, u.rbp, u.rbx, u.r11, u.r10, u.r9, u.r8, u.rax, u.rcx, u.rdx, u.rsi, u.rdi,
        u.orig_rax, u.rip, u.cs, u.eflags, u.rsp, u.ss, u.fs_base, u.gs_base, u.ds, u.es, u.fs, u.gs,
    ]
}

fn regs_vec(u: &libc::user_regs_struct) -> Vec<u64> {
    regs_array(u).to_vec()
}

fn regs_struct(v: &[u64]) -> Option<libc::user_regs_struct> {
    if v.len() != 27 {
        return None;
    }
    // SAFETY: plain data, every field assigned below.
    let mut u: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    let f = [
        &mut u.r15,
        &mut u.r14,
        &mut u.r13,
        &mut u.r12,
        &mut u.rbp,
        &mut u.rbx,
        &mut u.r11,
        &mut u.r10,
        &mut u.r9,
        &mut u.r8,
        &mut u.rax,
        &mut u.rcx,
        &mut u.rdx,
        &mut u.rsi,
        &mut u.rdi,
        &mut u.orig_rax,
        &mut u.rip,
        &mut u.cs,
        &mut u.eflags,
        &mut u.rsp,
        &mut u.ss,
        &mut u.fs_base,
        &mut u.gs_base,
        &mut u.ds,
        &mut u.es,
        &mut u.fs,
        &mut u.gs,
    ];
    for (slot, val) in f.into_iter().zip(v) {
        *slot = *val;
    }
    Some(u)
}

fn syscall_back(s: &SyscallInfo) -> Syscall {
    match s {
        SyscallInfo::In { nr, args, sp, pc } => Syscall::In { nr: *nr, args: args.clone(), sp: *sp, pc: *pc },
        SyscallInfo::Blocked { sp, pc } => Syscall::Blocked { sp: *sp, pc: *pc },
        SyscallInfo::Running => Syscall::Running,
    }
}

struct DataWriter {
    data: Vec<u8>,
}

impl DataWriter {
    fn push(&mut self, bytes: &[u8]) -> Blob {
        while self.data.len() % 8 != 0 {
            self.data.push(0);
        }
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(bytes);
        Blob { offset, len: bytes.len() as u64 }
    }
}

/// The raw form of a capture: (`snapshot.json` document, `data.bin` bytes).
pub fn encode(c: &Captured) -> (RawSnapshot, Vec<u8>) {
    let mut w = DataWriter { data: Vec::new() };
    let threads = c
        .snapshot
        .threads
        .iter()
        .map(|t| RawThread {
            tid: t.tid,
            comm: t.comm.clone(),
            state: t.state,
            capture: t.capture,
            wchan: t.wchan.clone(),
            syscall: t.syscall.as_ref().map(SyscallInfo::from),
            kernel_stack: t.kernel_stack.clone(),
            regs: t.regs.as_ref().map(regs_vec),
            stack_addr: t.stack_base,
            stack: w.push(&t.stack),
            stopped_us: t.stopped_us,
            errors: t.errors.clone(),
        })
        .collect();
    let mut total = 0usize;
    let mut mods = Vec::new();
    for m in &c.modules.list {
        let s = &m.elf.sections;
        let mut wanted: Vec<(&str, Section)> = Vec::new();
        if m.name == "[vdso]" {
            wanted.push(("image", Section { addr: 0, off: 0, len: m.elf.bytes.len() }));
        } else {
            for (name, sec) in
                [(".eh_frame", s.eh_frame), (".eh_frame_hdr", s.eh_frame_hdr), (".debug_frame", s.debug_frame)]
            {
                if let Some(sec) = sec {
                    wanted.push((name, sec));
                }
            }
        }
        let size: usize = wanted.iter().map(|(_, s)| s.len).sum();
        let mut omitted = None;
        let mut sections = Vec::new();
        if size > CFI_CAP_MODULE {
            omitted = Some(format!("{size} bytes of CFI, over the {} MiB per-module cap", CFI_CAP_MODULE >> 20));
        } else if total + size > CFI_CAP_TOTAL {
            omitted = Some(format!("the snapshot's {} MiB CFI cap was reached", CFI_CAP_TOTAL >> 20));
        } else {
            total += size;
            for (name, sec) in wanted {
                sections.push(RawSection { name: name.into(), addr: sec.addr, data: w.push(sec.data(&m.elf.bytes)) });
            }
        }
        mods.push(RawModule {
            name: m.name.clone(),
            start: m.start,
            end: m.end,
            bias: m.bias,
            build_id: m.build_id_hex(),
            debuglink: m.elf.debuglink.clone(),
            debug_file: m.debug.as_ref().map(|d| d.path.display().to_string()),
            has_symtab: m.elf.has_symtab,
            has_dwarf: m.elf.has_dwarf,
            text: s.text,
            got: s.got,
            sections,
            cfi_omitted: omitted,
        });
    }
    let doc = RawSnapshot {
        format: FORMAT.into(),
        version: VERSION,
        arch: "x86_64".into(),
        pid: c.pid,
        reg_names: REG_NAMES.iter().map(|s| s.to_string()).collect(),
        freeze_us: c.snapshot.freeze_us,
        stopping_us: c.snapshot.stopping_us,
        threads,
        modules: mods,
    };
    (doc, w.data)
}

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("stacks/raw/snapshot.json: {0}")]
    Json(String),
    #[error("stacks/raw/snapshot.json is format {0:?} version {1}; this build reads {FORMAT} version {VERSION}")]
    Version(String, u32),
    #[error("stacks/raw/data.bin is shorter than snapshot.json says ({0})")]
    Truncated(String),
}

fn slice<'a>(data: &'a [u8], b: &Blob, what: &str) -> Result<&'a [u8], RawError> {
    let (o, l) = (b.offset as usize, b.len as usize);
    data.get(o..o.checked_add(l).ok_or_else(|| RawError::Truncated(what.into()))?)
        .ok_or_else(|| RawError::Truncated(what.into()))
}

/// Parses and checks `snapshot.json`.
pub fn parse(json: &[u8]) -> Result<RawSnapshot, RawError> {
    let doc: RawSnapshot = serde_json::from_slice(json).map_err(|e| RawError::Json(e.to_string()))?;
    if doc.format != FORMAT || doc.version != VERSION {
        return Err(RawError::Version(doc.format, doc.version));
    }
    Ok(doc)
}

/// The captured threads back, as [`super::analyze`] takes them.
pub fn threads(doc: &RawSnapshot, data: &[u8]) -> Result<Vec<ThreadCapture>, RawError> {
    doc.threads
        .iter()
        .map(|t| {
            Ok(ThreadCapture {
                tid: t.tid,
                comm: t.comm.clone(),
                state: t.state,
                wchan: t.wchan.clone(),
                syscall: t.syscall.as_ref().map(syscall_back),
                kernel_stack: t.kernel_stack.clone(),
                capture: t.capture,
                regs: t.regs.as_deref().and_then(regs_struct),
                fpregs: None,
                stack_base: t.stack_addr,
                stack: slice(data, &t.stack, &format!("stack of thread {}", t.tid))?.to_vec(),
                stopped_us: t.stopped_us,
                errors: t.errors.clone(),
            })
        })
        .collect()
}

/// Where a rebuilt module's names and CFI came from, for the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleSource {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// The binary on this host, when its build-id matches the captured one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
    /// CFI from the archive (vs. from the binary on this host).
    pub archived_cfi: bool,
    /// Symbols and line tables available now (binary's own or a debug file's DWARF).
    pub has_lines: bool,
}

/// A hook that finds a debug file for a build-id when the local lookup did not
/// (debuginfod in `inspect --resymbolize`; never during a capture).
pub type FetchDebug<'a> = &'a dyn Fn(&str) -> Option<PathBuf>;

/// Rebuilds the modules of a raw snapshot on this host: the binary itself when it is
/// still installed with the same build-id, else the archived CFI; debug files by
/// build-id and debuglink under `search`, then `fetch`.
pub fn modules(
    doc: &RawSnapshot,
    data: &[u8],
    search: &DebugSearch,
    fetch: Option<FetchDebug<'_>>,
) -> (Modules, Vec<ModuleSource>) {
    let mut list = Vec::new();
    let mut sources = Vec::new();
    for rm in &doc.modules {
        let local = (rm.name != "[vdso]")
            .then(|| Elf::open(std::path::Path::new(&rm.name)).ok())
            .flatten()
            .filter(|e| e.build_id.as_deref().map(modules::hex) == rm.build_id && rm.build_id.is_some());
        let (elf, archived) = match local {
            Some(e) => (e, false),
            None => (archived_elf(rm, data), true),
        };
        let mut debug = modules::find_debug(&elf, &rm.name, search);
        if debug.is_none() && !(elf.has_dwarf && elf.has_symtab) && rm.name != "[vdso]" {
            if let (Some(f), Some(id)) = (fetch, rm.build_id.as_deref()) {
                debug = f(id).and_then(|p| Elf::open(&p).ok()).filter(|d| d.build_id == elf.build_id);
            }
        }
        sources.push(ModuleSource {
            name: rm.name.clone(),
            build_id: rm.build_id.clone(),
            binary: (!archived).then(|| rm.name.clone()),
            debug_file: debug.as_ref().map(|d| d.path.display().to_string()),
            archived_cfi: archived,
            has_lines: elf.has_dwarf || debug.as_ref().is_some_and(|d| d.has_dwarf),
        });
        list.push(Module { name: rm.name.clone(), start: rm.start, end: rm.end, bias: rm.bias, elf, debug });
    }
    list.sort_by_key(|m| m.start);
    (Modules { list }, sources)
}

/// An [`Elf`] made of the archived sections only (no symbols, no DWARF); the vDSO's
/// archived `image` is a whole ELF file and is parsed as one.
fn archived_elf(rm: &RawModule, data: &[u8]) -> Elf {
    let build_id = rm.build_id.as_deref().and_then(unhex);
    if let Some(img) = rm.sections.iter().find(|s| s.name == "image") {
        if let Ok(bytes) = slice(data, &img.data, &rm.name) {
            if let Ok(e) = Elf::parse(PathBuf::from(&rm.name), Bytes::Owned(bytes.to_vec())) {
                return Elf { debuglink: rm.debuglink.clone(), ..e };
            }
        }
    }
    let mut bytes = Vec::new();
    let mut sections = UnwindSections { text: rm.text, got: rm.got, ..Default::default() };
    for s in &rm.sections {
        let Ok(b) = slice(data, &s.data, &rm.name) else { continue };
        let sec = Section { addr: s.addr, off: bytes.len(), len: b.len() };
        bytes.extend_from_slice(b);
        match s.name.as_str() {
            ".eh_frame" => sections.eh_frame = Some(sec),
            ".eh_frame_hdr" => sections.eh_frame_hdr = Some(sec),
            ".debug_frame" => sections.debug_frame = Some(sec),
            _ => {}
        }
    }
    Elf {
        path: PathBuf::from(&rm.name),
        bytes: Bytes::Owned(bytes),
        build_id,
        sections,
        has_symtab: false,
        has_dwarf: false,
        debuglink: rm.debuglink.clone(),
        dwarf_owned: OnceLock::new(),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip_in_user_regs_order() {
        let v: Vec<u64> = (1..=27).collect();
        let u = regs_struct(&v).unwrap();
        assert_eq!((u.r15, u.rip, u.rsp, u.gs), (1, 17, 20, 27));
        assert_eq!(regs_vec(&u), v);
        assert!(regs_struct(&v[..26]).is_none());
    }

    #[test]
    fn blobs_are_aligned_and_bounds_checked() {
        let mut w = DataWriter { data: Vec::new() };
        let a = w.push(b"abc");
        let b = w.push(b"defgh");
        assert_eq!((a.offset, b.offset), (0, 8));
        assert_eq!(slice(&w.data, &b, "b").unwrap(), b"defgh");
        assert!(slice(&w.data, &Blob { offset: 8, len: 6 }, "x").is_err());
        assert!(slice(&w.data, &Blob { offset: u64::MAX, len: 2 }, "x").is_err());
        assert_eq!(unhex("0aff"), Some(vec![10, 255]));
        assert_eq!(unhex("0af"), None);
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let doc = r#"{"format":"wedge-autopsy-raw-snapshot","version":2,"arch":"x86_64","pid":1,"reg_names":[],
            "freeze_us":0,"stopping_us":0,"threads":[],"modules":[]}"#;
        let e = parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
    }
}
