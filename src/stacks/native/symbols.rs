//! Names for addresses: ELF symbol tables (`.symtab`, else `.dynsym`, from the binary
//! or its separate debug file), file:line and inlined frames from DWARF via addr2line,
//! and demangling (Rust legacy/v0 via rustc-demangle, C++ via cpp_demangle, both through
//! `addr2line::demangle_auto`, which the addr2line dependency already compiles in).
//!
//! Runs after the threads are released; only the modules that frames land in are read.

use std::borrow::Cow;

use object::{Object, ObjectSymbol, SymbolKind};
use serde::{Deserialize, Serialize};

use super::modules::{Elf, Module};

/// One function symbol: address (SVMA), size, demangled name.
#[derive(Debug, Clone)]
struct Sym {
    addr: u64,
    size: u64,
    global: bool,
    name: String,
}

/// A module's function symbols, sorted by address.
#[derive(Debug, Default)]
pub struct SymbolTable {
    syms: Vec<Sym>,
}

impl SymbolTable {
    fn from_elf(elf: &Elf, out: &mut Vec<Sym>) {
        let Ok(obj) = object::File::parse(&*elf.bytes) else { return };
        let mut take = |s: object::Symbol<'_, '_>| {
            if s.is_undefined() || s.address() == 0 || !matches!(s.kind(), SymbolKind::Text | SymbolKind::Unknown) {
                return;
            }
            if let Ok(name) = s.name() {
                if name.is_empty() {
                    return;
                }
                out.push(Sym { addr: s.address(), size: s.size(), global: s.is_global(), name: name.to_string() });
            }
        };
        if elf.has_symtab {
            obj.symbols().for_each(&mut take);
        }
        obj.dynamic_symbols().for_each(&mut take);
    }

    /// Symbols of the binary, plus those of its debug file (stripped binaries keep only
    /// `.dynsym`; the debug file has the full `.symtab`).
    pub fn build(module: &Module) -> SymbolTable {
        let mut syms = Vec::new();
        SymbolTable::from_elf(&module.elf, &mut syms);
        if let Some(d) = &module.debug {
            SymbolTable::from_elf(d, &mut syms);
        }
        // At one address prefer a sized, global symbol (what elfutils shows too).
        syms.sort_by(|a, b| {
            a.addr.cmp(&b.addr).then((b.size > 0).cmp(&(a.size > 0))).then(b.global.cmp(&a.global))
        });
        syms.dedup_by_key(|s| s.addr);
        SymbolTable { syms }
    }

    /// The symbol containing `svma`: `(name, offset)`.
    pub fn lookup(&self, svma: u64) -> Option<(&str, u64)> {
        let i = self.syms.partition_point(|s| s.addr <= svma);
        // Walk back a few entries for a sized symbol that contains the address (nested
        // or overlapping symbols); an unsized one is accepted up to the next symbol.
        for (k, s) in self.syms[..i].iter().rev().take(4).enumerate() {
            let off = svma - s.addr;
            if (s.size == 0 && k == 0) || off < s.size {
                return Some((&s.name, off));
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

pub fn demangle(name: &str) -> String {
    addr2line::demangle_auto(Cow::Borrowed(name), None).into_owned()
}

type Reader<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// Per-module DWARF contexts, built on first use. Borrow the modules' mapped bytes.
pub struct Symbolizer<'m> {
    dwarf: Vec<(usize, Option<addr2line::Context<Reader<'m>>>)>,
}

fn dwarf_context(elf: &Elf) -> Option<addr2line::Context<Reader<'_>>> {
    use object::ObjectSection;
    let obj = object::File::parse(&*elf.bytes).ok()?;
    // Debian's debug files compress their DWARF (SHF_COMPRESSED); decompress once.
    let owned = elf.dwarf_owned.get_or_init(|| {
        obj.sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
            .filter(|s| s.compressed_file_range().is_ok_and(|c| c.format != object::CompressionFormat::None))
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.uncompressed_data().ok()?.into_owned())))
            .collect()
    });
    let load = |id: gimli::SectionId| -> Result<Reader<'_>, gimli::Error> {
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
        Symbolizer { dwarf: Vec::new() }
    }

    /// Resolves frame address `pc` in `module` (index `idx`). `lookup` is the address to look up:
    /// the PC for frame 0 and after a signal frame, return address − 1 otherwise.
    pub fn resolve(&mut self, idx: usize, module: &'m Module, pc: u64, lookup: u64, with_lines: bool) -> Resolved {
        let svma = lookup.wrapping_sub(module.bias);
        let table = module.symbols.get_or_init(|| SymbolTable::build(module));
        let mut r = Resolved::default();
        if let Some((name, off)) = table.lookup(svma) {
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
                let elf = if module.elf.has_dwarf { Some(&module.elf) } else { module.debug.as_ref().filter(|d| d.has_dwarf) };
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

    fn table(v: &[(u64, u64, &str)]) -> SymbolTable {
        let mut syms: Vec<Sym> =
            v.iter().map(|(a, s, n)| Sym { addr: *a, size: *s, global: true, name: n.to_string() }).collect();
        syms.sort_by_key(|s| s.addr);
        SymbolTable { syms }
    }

    #[test]
    fn lookup_respects_sizes() {
        let t = table(&[(0x1000, 0x10, "a"), (0x1020, 0, "b"), (0x1040, 0x100, "c")]);
        assert_eq!(t.lookup(0x1000), Some(("a", 0)));
        assert_eq!(t.lookup(0x100f), Some(("a", 0xf)));
        assert_eq!(t.lookup(0x1010), None);
        assert_eq!(t.lookup(0x1030), Some(("b", 0x10)));
        assert_eq!(t.lookup(0x1140), None);
        assert_eq!(t.lookup(0xfff), None);
    }

    #[test]
    fn demangles_rust_and_cpp() {
        assert_eq!(demangle("_ZN3foo3barE"), "foo::bar");
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(demangle("main"), "main");
    }
}
