//! Names for addresses: ELF symbol tables (`.symtab`, else `.dynsym`, from the binary
//! or its separate debug file), file:line and inlined frames from DWARF via addr2line,
//! and demangling (Rust legacy/v0 via rustc-demangle, C++ via cpp_demangle, both through
//! `addr2line::demangle_auto`, which the addr2line dependency already compiles in).
//!
//! Runs after the threads are released; only the modules that frames land in are read.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::modules::{Elf, Module};

/// One function symbol: address (SVMA), size, and where its NUL-terminated name is.
#[derive(Debug, Clone, Copy)]
struct Sym {
    addr: u64,
    size: u64,
    /// Byte offset of the name in the file (`debug` says which file).
    name: u64,
    debug: bool,
    /// Binding rank as elfutils ranks it: 3 global, 2 weak, 1 local.
    rank: u8,
}

/// A module's function symbols, sorted by address. Names stay in the mapped file
/// until a lookup needs one (QEMU plus its libraries have ~100k symbols).
#[derive(Debug, Default)]
pub struct SymbolTable {
    syms: Vec<Sym>,
}

fn collect(bytes: &[u8], debug: bool, dynamic: bool, out: &mut Vec<Sym>) {
    use object::elf;
    use object::read::elf::{ElfFile64, FileHeader, SectionHeader, Sym as _};
    let Ok(file) = ElfFile64::<object::LittleEndian>::parse(bytes) else { return };
    let endian = file.endian();
    let table = if dynamic { file.elf_dynamic_symbol_table() } else { file.elf_symbol_table() };
    let Ok(sections) = file.elf_header().sections(endian, bytes) else { return };
    let Ok(strsec) = sections.section(table.string_section()) else { return };
    let stroff = strsec.sh_offset(endian);
    for sym in table.symbols() {
        let kind = sym.st_type();
        let shndx = sym.st_shndx(endian);
        let value = sym.st_value(endian);
        if !(kind == elf::STT_FUNC || kind == elf::STT_GNU_IFUNC || (kind == elf::STT_NOTYPE && !dynamic))
            || shndx == elf::SHN_UNDEF
            || shndx == elf::SHN_ABS
            || value == 0
            || sym.st_name(endian) == 0
        {
            continue;
        }
        out.push(Sym {
            addr: value,
            size: sym.st_size(endian),
            name: stroff + sym.st_name(endian) as u64,
            debug,
            rank: match sym.st_bind() {
                elf::STB_GLOBAL => 3,
                elf::STB_WEAK => 2,
                elf::STB_LOCAL => 1,
                _ => 0,
            },
        });
    }
}

impl SymbolTable {
    /// `.symtab` of the binary or its debug file when there is one, else `.dynsym`.
    pub fn build(module: &Module) -> SymbolTable {
        let mut syms = Vec::new();
        if module.elf.has_symtab {
            collect(&module.elf.bytes, false, false, &mut syms);
        } else if let Some(d) = module.debug.as_ref().filter(|d| d.has_symtab) {
            collect(&d.bytes, true, false, &mut syms);
        }
        if syms.is_empty() {
            collect(&module.elf.bytes, false, true, &mut syms);
        }
        // At one address prefer a sized symbol, then the binding elfutils prefers
        // (global, weak, local), then the first in table order (a stable sort), so the
        // names match eu-stack's.
        // (Sorting by the original index keeps that order without a slower stable sort.)
        let mut keyed: Vec<(u64, bool, std::cmp::Reverse<u8>, u32)> =
            syms.iter().enumerate().map(|(i, s)| (s.addr, s.size == 0, std::cmp::Reverse(s.rank), i as u32)).collect();
        keyed.sort_unstable();
        let mut syms: Vec<Sym> = keyed.into_iter().map(|k| syms[k.3 as usize]).collect();
        syms.dedup_by_key(|s| s.addr);
        SymbolTable { syms }
    }

    fn name<'a>(s: &Sym, module: &'a Module) -> &'a str {
        let bytes: &[u8] =
            if s.debug { module.debug.as_ref().map_or(&[][..], |d| &d.bytes) } else { &module.elf.bytes };
        let tail = bytes.get(s.name as usize..).unwrap_or(&[]);
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    /// The symbol containing `svma` in `module`: `(name, offset)`.
    pub fn lookup_in<'a>(&self, module: &'a Module, svma: u64) -> Option<(&'a str, u64)> {
        let (s, off) = self.find(svma)?;
        Some((SymbolTable::name(s, module), off))
    }

    fn find(&self, svma: u64) -> Option<(&Sym, u64)> {
        let i = self.syms.partition_point(|s| s.addr <= svma);
        // Walk back a few entries for a sized symbol that contains the address (nested
        // or overlapping symbols); an unsized one is accepted up to the next symbol.
        for (k, s) in self.syms[..i].iter().rev().take(4).enumerate() {
            let off = svma - s.addr;
            if (s.size == 0 && k == 0) || off < s.size {
                return Some((s, off));
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.syms.len()
    }
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }
}

/// An inlined call at a frame's PC, innermost first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inlined {
    pub function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

/// What the symbolizer found for one address.
#[derive(Debug, Default, Clone)]
pub struct Resolved {
    pub symbol: Option<String>,
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: Vec<Inlined>,
}

/// Demangles Rust (`_ZN…E`, `_R…`) and C++ (`_Z…`) names; anything else is returned as
/// is (cpp_demangle would otherwise read a C function named `c` as the type `char`).
pub fn demangle(name: &str) -> String {
    if !(name.starts_with("_Z") || name.starts_with("_R") || name.starts_with("__Z")) {
        return name.to_string();
    }
    addr2line::demangle_auto(Cow::Borrowed(name), None).into_owned()
}

type Reader<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// Per-module DWARF contexts, built on first use. Borrow the modules' mapped bytes.
pub struct Symbolizer<'m> {
    dwarf: Vec<(usize, Option<addr2line::Context<Reader<'m>>>)>,
    /// Each module's symbol table by module index, built on first lookup (after the
    /// threads are released). The symbolizer owns it so modules stay plain data.
    tables: std::collections::HashMap<usize, SymbolTable>,
}

fn dwarf_context(elf: &Elf) -> Option<addr2line::Context<Reader<'_>>> {
    use object::{Object, ObjectSection};
    let obj = object::File::parse(&*elf.bytes).ok()?;
    // What addr2line needs for names, lines and inlines; location lists, .debug_frame,
    // macros are never read, so never decompressed.
    const NEEDED: &[&str] = &[
        ".debug_info",
        ".debug_abbrev",
        ".debug_line",
        ".debug_str",
        ".debug_line_str",
        ".debug_rnglists",
        ".debug_ranges",
        ".debug_aranges",
        ".debug_addr",
        ".debug_str_offsets",
    ];
    // Debian's debug files compress their DWARF (SHF_COMPRESSED); decompress once.
    let owned = elf.dwarf_owned.get_or_init(|| {
        NEEDED
            .iter()
            .filter_map(|name| obj.section_by_name(name))
            .filter(|s| s.compressed_file_range().is_ok_and(|c| c.format != object::CompressionFormat::None))
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.uncompressed_data().ok()?.into_owned())))
            .collect()
    });
    let load = |id: gimli::SectionId| -> Result<Reader<'_>, gimli::Error> {
        if !NEEDED.contains(&id.name()) {
            return Ok(gimli::EndianSlice::new(&[], gimli::LittleEndian));
        }
        let data = match owned.get(id.name()) {
            Some(v) => v.as_slice(),
            None => obj
                .section_by_name(id.name())
                .and_then(|s| s.file_range())
                .and_then(|(o, l)| elf.bytes.get(o as usize..(o + l) as usize))
                .unwrap_or(&[]),
        };
        Ok(gimli::EndianSlice::new(data, gimli::LittleEndian))
    };
    let dwarf = gimli::Dwarf::load(load).ok()?;
    addr2line::Context::from_dwarf(dwarf).ok()
}

impl<'m> Symbolizer<'m> {
    pub fn new() -> Self {
        Symbolizer { dwarf: Vec::new(), tables: Default::default() }
    }

    /// Resolves frame address `pc` in `module` (index `idx`). `lookup` is the address to look up:
    /// the PC for frame 0 and after a signal frame, return address − 1 otherwise.
    pub fn resolve(&mut self, idx: usize, module: &'m Module, pc: u64, lookup: u64, with_lines: bool) -> Resolved {
        let svma = lookup.wrapping_sub(module.bias);
        let table = self.tables.entry(idx).or_insert_with(|| SymbolTable::build(module));
        let mut r = Resolved::default();
        if let Some((name, off)) = table.lookup_in(module, svma) {
            r.symbol = Some(demangle(name));
            // Offsets are reported relative to the frame's own address (PC or return
            // address), as eu-stack and gdb print them.
            r.offset = Some(off + (pc - lookup));
        }
        if !with_lines {
            return r;
        }
        let pos = match self.dwarf.iter().position(|(i, _)| *i == idx) {
            Some(p) => p,
            None => {
                let elf = if module.elf.has_dwarf {
                    Some(&module.elf)
                } else {
                    module.debug.as_ref().filter(|d| d.has_dwarf)
                };
                self.dwarf.push((idx, elf.and_then(dwarf_context)));
                self.dwarf.len() - 1
            }
        };
        let Some(ctx) = &self.dwarf[pos].1 else { return r };
        let Ok(mut frames) = ctx.find_frames(svma).skip_all_loads() else { return r };
        let mut all = Vec::new();
        while let Ok(Some(f)) = frames.next() {
            let function = f.function.as_ref().and_then(|n| n.demangle().ok().map(|c| c.into_owned()));
            let (file, line) = match &f.location {
                Some(l) => (l.file.map(str::to_string), l.line),
                None => (None, None),
            };
            all.push(Inlined { function, file, line });
        }
        // The last entry is the real (outer) function; those before it were inlined into it.
        if let Some(outer) = all.pop() {
            r.file = outer.file;
            r.line = outer.line;
            if r.symbol.is_none() {
                r.symbol = outer.function;
            }
        }
        r.inlined = all;
        r
    }
}

impl Default for Symbolizer<'_> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v: &[(u64, u64, u64)]) -> SymbolTable {
        let mut syms: Vec<Sym> =
            v.iter().map(|(a, s, n)| Sym { addr: *a, size: *s, name: *n, debug: false, rank: 3 }).collect();
        syms.sort_by_key(|s| s.addr);
        SymbolTable { syms }
    }

    #[test]
    fn lookup_respects_sizes() {
        let t = table(&[(0x1000, 0x10, 1), (0x1020, 0, 2), (0x1040, 0x100, 3)]);
        let find = |a| t.find(a).map(|(s, off)| (s.name, off));
        assert_eq!(find(0x1000), Some((1, 0)));
        assert_eq!(find(0x100f), Some((1, 0xf)));
        assert_eq!(find(0x1010), None);
        assert_eq!(find(0x1030), Some((2, 0x10)));
        assert_eq!(find(0x1140), None);
        assert_eq!(find(0xfff), None);
    }

    #[test]
    fn demangles_rust_and_cpp() {
        assert_eq!(demangle("_ZN3foo3barE"), "foo::bar");
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("c"), "c");
        assert_eq!(demangle("b"), "b");
    }
}
