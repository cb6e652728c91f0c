//! The target's mapped ELF files, loaded before anything is stopped.
//!
//! Each file-backed executable mapping becomes a [`Module`]: the file is memory-mapped
//! from `/proc/PID/map_files/START-END` (the exact inode the process mapped, even if the
//! path was replaced or deleted by an upgrade), or, failing that, from
//! `/proc/PID/root/PATH`, accepted only when its build-id equals the one in the target's
//! own memory. The vDSO is copied out of the target's memory. A separate debug file is
//! found by build-id (`<debug_dir>/.build-id/xx/yyyy.debug`) or `.gnu_debuglink`.
//!
//! Nothing here parses more than section headers up front; unwind rows and symbols are
//! looked up lazily from the mapped bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSegment};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Parses `/proc/PID/maps` text. Paths may contain spaces; everything after the inode is
/// the path (with a trailing ` (deleted)` kept as the kernel printed it).
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let inode = it.next()?.parse().ok()?;
            let path = it.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                inode,
                path,
            })
        })
        .collect()
}

/// Bytes of an ELF image: a read-only file mapping or a copy (the vDSO).
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A section's location: its address (SVMA) and its byte range in the file.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    pub addr: u64,
    pub off: usize,
    pub len: usize,
}

impl Section {
    pub fn data<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        bytes.get(self.off..self.off + self.len).unwrap_or(&[])
    }
}

/// Unwind-relevant sections of one ELF file.
#[derive(Debug, Clone, Default)]
pub struct UnwindSections {
    pub eh_frame: Option<Section>,
    pub eh_frame_hdr: Option<Section>,
    pub debug_frame: Option<Section>,
    pub text: Option<u64>,
    pub got: Option<u64>,
}

/// One ELF image, as parsed from its bytes.
pub struct Elf {
    pub path: PathBuf,
    pub bytes: Bytes,
    pub build_id: Option<Vec<u8>>,
    pub sections: UnwindSections,
    pub has_symtab: bool,
    pub has_dwarf: bool,
    /// The file name in `.gnu_debuglink`, where a separate debug file may be found.
    pub debuglink: Option<String>,
    /// Decompressed copies of SHF_COMPRESSED DWARF sections, made on first use.
    pub(crate) dwarf_owned: OnceLock<BTreeMap<String, Vec<u8>>>,
}

impl Elf {
    pub fn parse(path: PathBuf, bytes: Bytes) -> Result<Elf, String> {
        let (build_id, sections, has_symtab, has_dwarf, debuglink) = {
            let obj = object::File::parse(&*bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            let sec = |name: &str| {
                obj.section_by_name(name).and_then(|s| {
                    // A compressed section's file bytes are not the section; unwinding
                    // skips it (only debug files compress, and .eh_frame never is).
                    let c = s.compressed_file_range().ok()?;
                    if c.format != object::CompressionFormat::None {
                        return None;
                    }
                    let (off, len) = s.file_range()?;
                    Some(Section { addr: s.address(), off: off as usize, len: len as usize })
                })
            };
            let sections = UnwindSections {
                eh_frame: sec(".eh_frame"),
                eh_frame_hdr: sec(".eh_frame_hdr"),
                debug_frame: sec(".debug_frame"),
                text: obj.section_by_name(".text").map(|s| s.address()),
                got: obj.section_by_name(".got").map(|s| s.address()),
            };
            let build_id = obj.build_id().ok().flatten().map(|b| b.to_vec());
            let has_symtab = obj.section_by_name(".symtab").is_some_and(|s| s.size() > 0);
            let has_dwarf = obj.section_by_name(".debug_info").is_some_and(|s| s.size() > 0);
            let debuglink =
                obj.gnu_debuglink().ok().flatten().map(|(name, _crc)| String::from_utf8_lossy(name).into_owned());
            (build_id, sections, has_symtab, has_dwarf, debuglink)
        };
        Ok(Elf { path, bytes, build_id, sections, has_symtab, has_dwarf, debuglink, dwarf_owned: OnceLock::new() })
    }

    pub fn open(path: &Path) -> Result<Elf, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: read-only private mapping of an ELF file. A file truncated underneath
        // us could fault; installed binaries and libraries are replaced by rename, not
        // rewritten in place, and map_files pins the inode the target itself maps.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: mmap: {e}", path.display()))?;
        Elf::parse(path.to_path_buf(), Bytes::Mapped(map))
    }
}

/// A mapped ELF in the target, with its load bias (`avma = svma + bias`).
pub struct Module {
    /// The path as the target mapped it (from `maps`).
    pub name: String,
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub elf: Elf,
    /// A separate debug file (symbols, DWARF, `.debug_frame`), build-id checked.
    pub debug: Option<Elf>,
}

impl Module {
    pub fn contains(&self, avma: u64) -> bool {
        self.start <= avma && avma < self.end
    }
    pub fn build_id_hex(&self) -> Option<String> {
        self.elf.build_id.as_deref().map(hex)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where Debian installs separate debug files (`/usr/lib/debug/.build-id/…`).
pub const DEFAULT_DEBUG_DIR: &str = "/usr/lib/debug";

/// Where separate debug files are searched.
#[derive(Debug, Clone)]
pub struct DebugSearch {
    pub dirs: Vec<PathBuf>,
}

impl Default for DebugSearch {
    fn default() -> Self {
        DebugSearch { dirs: vec![PathBuf::from(DEFAULT_DEBUG_DIR)] }
    }
}

/// All modules of a process, sorted by start address.
#[derive(Default)]
pub struct Modules {
    pub list: Vec<Module>,
}

impl Modules {
    pub fn find(&self, avma: u64) -> Option<&Module> {
        let i = self.list.partition_point(|m| m.start <= avma);
        let m = self.list.get(i.checked_sub(1)?)?;
        m.contains(avma).then_some(m)
    }
}

/// Reads `len` bytes of the target's memory (no stop needed; needs ptrace access rights).
pub fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> usize {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` describes `buf`, which we own mutably; the remote side is only read.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        0
    } else {
        n as usize
    }
}

/// The GNU build-id of the ELF image mapped at `base` in the target, read from its
/// program headers and PT_NOTE segments in memory.
pub fn remote_build_id(pid: i32, base: u64) -> Option<Vec<u8>> {
    let mut eh = [0u8; 64];
    if read_remote(pid, base, &mut eh) != 64 || &eh[..4] != b"\x7fELF" || eh[4] != 2 {
        return None;
    }
    let u16at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64at(&eh, 0x20), u16at(&eh, 0x36), u16at(&eh, 0x38));
    if phentsize < 56 || phnum > 256 {
        return None;
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    if read_remote(pid, base + phoff, &mut ph) != ph.len() {
        return None;
    }
    let phdrs: Vec<&[u8]> = ph.chunks(phentsize as usize).collect();
    // Bias from the PT_LOAD with file offset 0 (the one mapped at `base`).
    let first_load = phdrs.iter().find(|p| u32::from_le_bytes(p[0..4].try_into().unwrap()) == 1)?;
    let bias = base.wrapping_sub(u64at(first_load, 0x10) - u64at(first_load, 0x08));
    for p in &phdrs {
        if u32::from_le_bytes(p[0..4].try_into().unwrap()) != 4 {
            continue;
        }
        let (vaddr, size) = (u64at(p, 0x10), u64at(p, 0x20).min(4096));
        let mut notes = vec![0u8; size as usize];
        if read_remote(pid, bias.wrapping_add(vaddr), &mut notes) != notes.len() {
            continue;
        }
        let mut o = 0usize;
        while o + 12 <= notes.len() {
            let rd = |o: usize| u32::from_le_bytes(notes[o..o + 4].try_into().unwrap()) as usize;
            let (namesz, descsz, kind) = (rd(o), rd(o + 4), rd(o + 8));
            let name_at = o + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let next = desc_at + descsz.div_ceil(4) * 4;
            if next > notes.len() {
                break;
            }
            if kind == 3 && &notes[name_at..name_at + namesz.min(4)] == b"GNU\0" {
                return Some(notes[desc_at..desc_at + descsz].to_vec());
            }
            o = next;
        }
    }
    None
}

/// Loads every executable file-backed mapping (and the vDSO) of `pid`. Problems are
/// returned as notes; a module that cannot be loaded is unwound by frame pointers.
pub fn load(pid: i32, maps: &[Mapping], search: &DebugSearch) -> (Modules, Vec<String>) {
    let mut notes = Vec::new();
    // Group mappings by file: (inode, path) -> mappings.
    let mut files: BTreeMap<(u64, &str), Vec<&Mapping>> = BTreeMap::new();
    for m in maps {
        let file_backed = m.inode != 0 && m.path.starts_with('/');
        if file_backed || m.path == "[vdso]" {
            files.entry((m.inode, m.path.as_str())).or_default().push(m);
        }
    }
    let mut list = Vec::new();
    for ((_, path), maps) in files {
        if !maps.iter().any(|m| m.perms.contains('x')) {
            continue;
        }
        let start = maps.iter().map(|m| m.start).min().unwrap_or(0);
        let end = maps.iter().map(|m| m.end).max().unwrap_or(0);
        let elf = if path == "[vdso]" {
            let mut buf = vec![0u8; (end - start) as usize];
            let n = read_remote(pid, start, &mut buf);
            buf.truncate(n);
            Elf::parse(PathBuf::from("[vdso]"), Bytes::Owned(buf))
        } else {
            open_mapped(pid, path, maps[0], start)
        };
        let elf = match elf {
            Ok(e) => e,
            Err(e) => {
                notes.push(format!("module {path}: {e}"));
                continue;
            }
        };
        // Bias from the mapping whose file offset lies in a PT_LOAD segment.
        let bias = match compute_bias(&elf, &maps) {
            Some(b) => b,
            None => {
                notes.push(format!("module {path}: no PT_LOAD matches its mappings"));
                continue;
            }
        };
        let debug = if path == "[vdso]" { None } else { find_debug(&elf, path, search) };
        list.push(Module { name: path.trim_end_matches(" (deleted)").to_string(), start, end, bias, elf, debug });
    }
    list.sort_by_key(|m| m.start);
    (Modules { list }, notes)
}

fn open_mapped(pid: i32, path: &str, first: &Mapping, base: u64) -> Result<Elf, String> {
    let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end);
    match Elf::open(Path::new(&mf)) {
        Ok(mut e) => {
            e.path = PathBuf::from(path);
            Ok(e)
        }
        Err(e_mf) => {
            let clean = path.trim_end_matches(" (deleted)");
            let root = format!("/proc/{pid}/root{clean}");
            let mut e = Elf::open(Path::new(&root)).map_err(|e| format!("{e_mf}; {e}"))?;
            let remote = remote_build_id(pid, base);
            match (&e.build_id, &remote) {
                (Some(a), Some(b)) if a == b => {}
                _ => {
                    return Err(format!(
                        "{root} does not match the mapped file (build-id {} vs {} in memory)",
                        e.build_id.as_deref().map(hex).unwrap_or_else(|| "none".into()),
                        remote.as_deref().map(hex).unwrap_or_else(|| "unreadable".into())
                    ))
                }
            }
            e.path = PathBuf::from(clean);
            Ok(e)
        }
    }
}

fn compute_bias(elf: &Elf, maps: &[&Mapping]) -> Option<u64> {
    let obj = object::File::parse(&*elf.bytes).ok()?;
    for m in maps {
        for seg in obj.segments() {
            let (foff, fsize) = seg.file_range();
            if foff <= m.offset + 0xfff && m.offset < foff + fsize.max(1) {
                // file offset `m.offset` is at svma `seg.address() + (m.offset - foff)`.
                let svma = seg.address().wrapping_add(m.offset).wrapping_sub(foff);
                return Some(m.start.wrapping_sub(svma));
            }
        }
    }
    None
}

/// `<dir>/.build-id/xx/yyyy.debug` for `id`, per search dir in order. In: a build-id.
/// Out: the first such file whose own build-id note is `id` (a stale file at the right
/// path does not count), parsed; `None` if there is none.
pub fn debug_file_by_build_id(id: &[u8], search: &DebugSearch) -> Option<Elf> {
    if id.len() < 2 {
        return None;
    }
    let h = hex(id);
    search.dirs.iter().find_map(|d| {
        let dbg = Elf::open(&build_id_path(d, &h)).ok()?;
        (dbg.build_id.as_deref() == Some(id)).then_some(dbg)
    })
}

/// Where a debug file for the hex build-id `h` lives under `dir`.
pub fn build_id_path(dir: &Path, h: &str) -> PathBuf {
    dir.join(".build-id").join(&h[..2.min(h.len())]).join(format!("{}.debug", &h[2.min(h.len())..]))
}

/// The separate debug file of `elf` (mapped at `path`): by build-id under each search
/// dir, then by its `.gnu_debuglink` name beside the binary and under each search dir.
pub fn find_debug(elf: &Elf, path: &str, search: &DebugSearch) -> Option<Elf> {
    if elf.has_dwarf && elf.has_symtab {
        return None;
    }
    let clean = path.trim_end_matches(" (deleted)");
    if let Some(dbg) = elf.build_id.as_deref().and_then(|id| debug_file_by_build_id(id, search)) {
        return Some(dbg);
    }
    let link = elf.debuglink.clone()?;
    let dir = Path::new(clean).parent().unwrap_or(Path::new("/"));
    let mut cands = vec![dir.join(&link), dir.join(".debug").join(&link)];
    for d in &search.dirs {
        cands.push(d.join(dir.strip_prefix("/").unwrap_or(dir)).join(&link));
    }
    for p in cands {
        if p == Path::new(clean) {
            continue;
        }
        if let Ok(dbg) = Elf::open(&p) {
            // Both carry a build-id in practice; a mismatch means a stale debug file.
            if elf.build_id.is_none() || dbg.build_id == elf.build_id {
                return Some(dbg);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a2c000 r--p 00000000 fd:01 1234 /usr/bin/qemu system\n\
             7ffd1000-7ffd3000 rw-p 00000000 00:00 0                          [stack]\n\
             7f00-7f10 r-xp 00001000 fd:01 99 /usr/lib/x.so (deleted)\n\
             7f20-7f30 rw-p 00000000 00:00 0\n",
        );
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].path, "/usr/bin/qemu system");
        assert_eq!(m[0].start, 0x55d0c0a00000);
        assert_eq!(m[1].path, "[stack]");
        assert_eq!(m[2].offset, 0x1000);
        assert_eq!(m[2].inode, 99);
        assert_eq!(m[2].path, "/usr/lib/x.so (deleted)");
        assert_eq!(m[3].path, "");
    }

    #[test]
    fn own_executable_loads_with_its_build_id_and_bias() {
        let me = std::process::id() as i32;
        let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let (mods, _notes) = load(me, &maps, &DebugSearch::default());
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let m = mods.list.iter().find(|m| Path::new(&m.name) == exe).expect("own executable is a module");
        // The build-id in memory (read via the program headers) equals the file's.
        assert!(m.elf.build_id.is_some());
        assert_eq!(remote_build_id(me, m.start), m.elf.build_id);
        // This function's runtime address lies in the module, and the bias maps it
        // back into the file's .text.
        let here = own_executable_loads_with_its_build_id_and_bias as fn() as usize as u64;
        assert!(std::ptr::eq(mods.find(here).unwrap(), m));
        let svma = here - m.bias;
        let obj = object::File::parse(&*m.elf.bytes).unwrap();
        let text = obj.section_by_name(".text").unwrap();
        assert!(text.address() <= svma && svma < text.address() + text.size());
        assert!(mods.list.iter().any(|m| m.name == "[vdso]"), "the vDSO is loaded from memory");
    }
}
