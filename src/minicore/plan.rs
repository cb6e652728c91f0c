//! What goes into a minicore: every readable mapping that holds QEMU's own state, minus
//! guest RAM, `MADV_DONTDUMP` mappings, device mappings and never-touched pages.
//!
//! Guest RAM is recognised, before anything is stopped, by:
//! - `VmFlags` `dc` (`MADV_DONTFORK`): QEMU sets it on every RAM block it allocates
//!   (`ram_block_add`), and on little else;
//! - `VmFlags` `ht` (hugetlb): QEMU's only hugetlb memory is guest RAM;
//! - size: an anonymous, memfd or shared mapping exactly as large as a RAM block
//!   (`x-query-ramblock` "Total") or memory backend (`query-memdev` "size"), ≥ 2 MiB.
//!
//! Never-touched pages are found with `/proc/PID/pagemap` (bit 63 present, bit 62
//! swapped): neither set means the page was never faulted in and reads as zero. Such
//! pages are left out of the core (gdb then reports them as inaccessible).

use serde::Serialize;

use crate::stacks::native::modules::{parse_maps, Mapping};

/// Guest RAM blocks smaller than this are not matched by size alone (ROMs, small
/// RAM blocks would collide with ordinary allocations such as coroutine stacks).
const RAM_MATCH_MIN: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// One mapping from `/proc/PID/smaps`.
#[derive(Debug, Clone)]
pub struct Region {
    pub map: Mapping,
    pub flags: Vec<String>,
    /// Pages of this mapping that are anonymous (written or private): `Anonymous:` in kB.
    pub anonymous_kb: u64,
}

impl Region {
    fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }
    pub fn len(&self) -> u64 {
        self.map.end - self.map.start
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn file_backed(&self) -> bool {
        self.map.inode != 0 && self.map.path.starts_with('/') && !self.map.path.starts_with("/memfd:")
    }
}

/// Parses `/proc/PID/smaps`.
pub fn parse_smaps(text: &str) -> Vec<Region> {
    let mut out: Vec<Region> = Vec::new();
    for line in text.lines() {
        let head = line.split(' ').next().unwrap_or("");
        if head.contains('-') && !head.ends_with(':') {
            if let Some(m) = parse_maps(line).pop() {
                out.push(Region { map: m, flags: Vec::new(), anonymous_kb: 0 });
                continue;
            }
        }
        let Some(r) = out.last_mut() else { continue };
        if let Some(f) = line.strip_prefix("VmFlags:") {
            r.flags = f.split_whitespace().map(str::to_string).collect();
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            r.anonymous_kb = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    out
}

/// Sizes of the guest's RAM as QMP reports them: `x-query-ramblock` totals and
/// `query-memdev` sizes (either reply may be missing).
pub fn ram_sizes(ramblock: Option<&serde_json::Value>, memdev: Option<&serde_json::Value>) -> Vec<u64> {
    let mut sizes = Vec::new();
    if let Some(text) = ramblock.and_then(|v| v["return"]["human-readable-text"].as_str()) {
        // Columns: Block Name, PSize ("4 KiB"), Offset, Used, Total[, HVA…]: the third
        // hex number is Total.
        for line in text.lines().skip(1) {
            let hex: Vec<u64> = line
                .split_whitespace()
                .filter_map(|t| t.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()))
                .collect();
            if let Some(total) = hex.get(2) {
                sizes.push(*total);
            }
        }
    }
    for m in memdev.and_then(|v| v["return"].as_array()).into_iter().flatten() {
        if let Some(s) = m["size"].as_u64() {
            sizes.push(s);
        }
    }
    sizes.retain(|s| *s >= RAM_MATCH_MIN);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Why a mapping is not in the core.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Excluded {
    pub start: u64,
    pub end: u64,
    pub path: String,
    pub reason: &'static str,
}

/// What to dump of one mapping: all of it (anonymous state, written file data) or only
/// its first page (an ELF header, so gdb can match build-ids).
#[derive(Debug, Clone)]
pub struct Included {
    pub region: Region,
    pub header_only: bool,
}

/// Splits the mappings into those to dump and those left out (with the reason).
pub fn select(regions: &[Region], ram: &[u64]) -> (Vec<Included>, Vec<Excluded>) {
    let mut inc = Vec::new();
    let mut exc = Vec::new();
    for r in regions {
        let m = &r.map;
        let why = if !m.perms.starts_with('r') {
            Some("not readable")
        } else if matches!(m.path.as_str(), "[vvar]" | "[vvar_vclock]" | "[vsyscall]") {
            Some("kernel page")
        } else if r.flag("dd") {
            Some("MADV_DONTDUMP")
        } else if r.flag("io") || r.flag("pf") || m.path.starts_with("anon_inode:") {
            Some("device memory")
        } else if r.flag("ht") {
            Some("guest RAM (hugetlb)")
        } else if r.flag("dc") && !r.file_backed() {
            Some("guest RAM (MADV_DONTFORK, as QEMU marks its RAM blocks)")
        } else if !r.file_backed() && r.len() >= RAM_MATCH_MIN && ram.contains(&r.len()) {
            Some("guest RAM (size of a RAM block)")
        } else if r.file_backed() && m.perms.as_bytes().get(3) == Some(&b's') {
            Some("shared file mapping")
        } else {
            None
        };
        if let Some(reason) = why {
            exc.push(Excluded { start: m.start, end: m.end, path: m.path.clone(), reason });
            continue;
        }
        if r.file_backed() {
            if r.anonymous_kb > 0 {
                // Written since it was mapped (.data, .bss, relro/GOT): QEMU's state.
                inc.push(Included { region: r.clone(), header_only: false });
            } else if m.offset == 0 {
                inc.push(Included { region: r.clone(), header_only: true });
            } else {
                exc.push(Excluded { start: m.start, end: m.end, path: m.path.clone(), reason: "unmodified file data" });
            }
        } else {
            inc.push(Included { region: r.clone(), header_only: false });
        }
    }
    (inc, exc)
}

/// A run of touched pages: `[start, end)`.
pub type Run = (u64, u64);

/// Touched page runs of `[start, end)` from `pagemap` (present or swapped), runs closer
/// than `gap` bytes merged.
pub fn touched_runs(pagemap: &std::fs::File, start: u64, end: u64, gap: u64) -> std::io::Result<Vec<Run>> {
    use std::os::unix::fs::FileExt;
    let mut runs: Vec<Run> = Vec::new();
    let pages = (end - start) / PAGE;
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(4096);
        let want = &mut buf[..(n * 8) as usize];
        let off = (start / PAGE + done) * 8;
        let got = pagemap.read_at(want, off)?;
        if got == 0 {
            break;
        }
        for (i, e) in want[..got - got % 8].chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().unwrap());
            if v & (3 << 62) == 0 {
                continue;
            }
            let a = start + (done + i as u64) * PAGE;
            match runs.last_mut() {
                Some(last) if a <= last.1 + gap => last.1 = a + PAGE,
                _ => runs.push((a, a + PAGE)),
            }
        }
        done += (got / 8) as u64;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Anonymous:          6144 kB
VmFlags: rd wr mr mw me dc ac hg mg 
7f0020000000-7f0020200000 rw-p 00000000 00:00 0 
Anonymous:           512 kB
VmFlags: rd wr mr mw me ac 
7f0030000000-7f0040000000 rw-s 00000000 00:01 77                         /memfd:pc.ram (deleted)
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms 
55d000000000-55d000400000 r--p 00000000 fd:01 12 /usr/bin/qemu-system-x86_64
Anonymous:             0 kB
VmFlags: rd mr mw me 
55d000800000-55d000900000 rw-p 00800000 fd:01 12 /usr/bin/qemu-system-x86_64
Anonymous:            40 kB
VmFlags: rd wr mr mw me ac 
55d000a00000-55d000b00000 r-xp 00400000 fd:01 12 /usr/bin/qemu-system-x86_64
Anonymous:             0 kB
VmFlags: rd ex mr mw me 
7f0050000000-7f0050001000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd 
7f0060000000-7f0060100000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me dd 
";

    #[test]
    fn ram_dontdump_and_file_data_are_told_apart() {
        let regions = parse_smaps(SMAPS);
        assert_eq!(regions.len(), 8);
        assert_eq!(regions[1].anonymous_kb, 512);
        let ram = ram_sizes(
            None,
            Some(&serde_json::json!({"return": [{"id": "pc.ram", "size": 268435456u64}, {"id": "m", "size": 4096}]})),
        );
        assert_eq!(ram, vec![268435456], "tiny sizes are never matched");
        let (inc, exc) = select(&regions, &ram);
        let reason = |start: u64| exc.iter().find(|e| e.start == start).map(|e| e.reason);
        assert!(reason(0x7f0000000000).unwrap().starts_with("guest RAM (MADV_DONTFORK"));
        assert_eq!(reason(0x7f0030000000), Some("guest RAM (size of a RAM block)"), "memfd RAM by size");
        assert_eq!(reason(0x7f0060000000), Some("MADV_DONTDUMP"));
        assert_eq!(reason(0x7f0050000000), Some("kernel page"));
        assert_eq!(reason(0x55d000a00000), Some("unmodified file data"));
        let inc: Vec<(u64, bool)> = inc.iter().map(|i| (i.region.map.start, i.header_only)).collect();
        assert_eq!(inc, vec![(0x7f0020000000, false), (0x55d000000000, true), (0x55d000800000, false)]);
    }

    #[test]
    fn ramblock_totals_are_the_third_hex_column() {
        let v = serde_json::json!({"return": {"human-readable-text":
            "              Block Name    PSize              Offset               Used              Total\n\
                              pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000\n\
                /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000\n"}});
        assert_eq!(ram_sizes(Some(&v), None), vec![0x200000, 0x10000000]);
    }

    #[test]
    fn pagemap_of_our_own_memory() {
        // A fresh anonymous mapping: untouched, then one page written.
        let len = 64 * PAGE as usize;
        // SAFETY: anonymous private mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        assert!(touched_runs(&pm, start, start + len as u64, 0).unwrap().is_empty());
        // SAFETY: inside the mapping.
        unsafe { *(p as *mut u8).add(10 * PAGE as usize) = 1 };
        unsafe { *(p as *mut u8).add(12 * PAGE as usize) = 1 };
        let runs = touched_runs(&pm, start, start + len as u64, 0).unwrap();
        assert_eq!(runs, vec![(start + 10 * PAGE, start + 11 * PAGE), (start + 12 * PAGE, start + 13 * PAGE)]);
        let merged = touched_runs(&pm, start, start + len as u64, PAGE).unwrap();
        assert_eq!(merged, vec![(start + 10 * PAGE, start + 13 * PAGE)]);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, len) };
    }
}
