//! The ELF core file format (x86_64 Linux), as the kernel writes it and gdb reads it:
//! an `ET_CORE` header, one `PT_NOTE` segment (NT_PRPSINFO, then per thread
//! NT_PRSTATUS + NT_FPREGSET, then NT_AUXV and NT_FILE), and one `PT_LOAD` per memory
//! range. Pure byte layout; what goes in is decided in [`super`].

/// Note types (`linux/elf.h`).
pub const NT_PRSTATUS: u32 = 1;
pub const NT_FPREGSET: u32 = 2;
pub const NT_PRPSINFO: u32 = 3;
pub const NT_AUXV: u32 = 6;
pub const NT_FILE: u32 = 0x4649_4c45;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
pub const EHDR_SIZE: usize = 64;
pub const PHDR_SIZE: usize = 56;
/// More program headers than this need the PN_XNUM extension; we stay below it.
pub const MAX_PHNUM: usize = 0xfff0;

/// One thread's `struct elf_prstatus` (336 bytes on x86_64).
pub struct PrStatus {
    pub tid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub sid: i32,
    /// `user_regs_struct`, 27 registers.
    pub regs: [u64; 27],
    pub fpvalid: bool,
}

impl PrStatus {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 336];
        // pr_info (12) + pr_cursig (2) + pad (2) + sigpend (8) + sighold (8) = 32.
        b[32..36].copy_from_slice(&self.tid.to_le_bytes());
        b[36..40].copy_from_slice(&self.ppid.to_le_bytes());
        b[40..44].copy_from_slice(&self.pgrp.to_le_bytes());
        b[44..48].copy_from_slice(&self.sid.to_le_bytes());
        // Four struct timevals (48..112), then pr_reg.
        for (i, r) in self.regs.iter().enumerate() {
            b[112 + i * 8..120 + i * 8].copy_from_slice(&r.to_le_bytes());
        }
        b[328..332].copy_from_slice(&(self.fpvalid as i32).to_le_bytes());
        b
    }
}

/// The process's `struct elf_prpsinfo` (136 bytes on x86_64).
pub struct PrPsInfo {
    pub state: u8,
    pub sname: u8,
    pub nice: i8,
    pub flag: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub sid: i32,
    /// `comm`, truncated to 15 bytes.
    pub fname: String,
    /// The command line, spaces between arguments, truncated to 79 bytes.
    pub psargs: String,
}

impl PrPsInfo {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 136];
        b[0] = self.state;
        b[1] = self.sname;
        b[3] = self.nice as u8;
        b[8..16].copy_from_slice(&self.flag.to_le_bytes());
        b[16..20].copy_from_slice(&self.uid.to_le_bytes());
        b[20..24].copy_from_slice(&self.gid.to_le_bytes());
        b[24..28].copy_from_slice(&self.pid.to_le_bytes());
        b[28..32].copy_from_slice(&self.ppid.to_le_bytes());
        b[32..36].copy_from_slice(&self.pgrp.to_le_bytes());
        b[36..40].copy_from_slice(&self.sid.to_le_bytes());
        let f = self.fname.as_bytes();
        b[40..40 + f.len().min(15)].copy_from_slice(&f[..f.len().min(15)]);
        let a = self.psargs.as_bytes();
        b[56..56 + a.len().min(79)].copy_from_slice(&a[..a.len().min(79)]);
        b
    }
}

/// One file-backed mapping for NT_FILE.
pub struct FileMapping {
    pub start: u64,
    pub end: u64,
    /// File offset in bytes (NT_FILE stores it in pages).
    pub offset: u64,
    pub path: String,
}

/// NT_FILE's descriptor: count, page size, (start, end, page offset) each, then names.
pub fn nt_file(maps: &[FileMapping]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(maps.len() as u64).to_le_bytes());
    b.extend_from_slice(&4096u64.to_le_bytes());
    for m in maps {
        for v in [m.start, m.end, m.offset / 4096] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    for m in maps {
        b.extend_from_slice(m.path.as_bytes());
        b.push(0);
    }
    b
}

/// Appends one note (`CORE` owner) to `out`, 4-byte aligned as ELF notes are.
pub fn note(out: &mut Vec<u8>, kind: u32, desc: &[u8]) {
    let name = b"CORE\0";
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    pad4(out);
    out.extend_from_slice(desc);
    pad4(out);
}

fn pad4(v: &mut Vec<u8>) {
    while v.len() % 4 != 0 {
        v.push(0);
    }
}

/// A memory range in the core: where it was mapped and its permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub vaddr: u64,
    pub len: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

/// The file layout: the header bytes (ELF header, program headers, notes, padding to a
/// page) and the file offset of each load's data, which follow back to back.
pub fn layout(notes: &[u8], loads: &[Load]) -> (Vec<u8>, Vec<u64>) {
    let phnum = loads.len() + 1;
    let notes_off = EHDR_SIZE + PHDR_SIZE * phnum;
    let data_off = (notes_off + notes.len()).div_ceil(4096) * 4096;
    let mut h = Vec::with_capacity(data_off);
    // e_ident: ELFCLASS64, little endian, version 1, System V ABI.
    h.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    h.extend_from_slice(&4u16.to_le_bytes()); // ET_CORE
    h.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    h.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    h.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    h.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    h.extend_from_slice(&(phnum as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let phdr = |h: &mut Vec<u8>, kind: u32, flags: u32, off: u64, vaddr: u64, size: u64, align: u64| {
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&vaddr.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes()); // p_paddr
        h.extend_from_slice(&size.to_le_bytes()); // p_filesz
        h.extend_from_slice(&size.to_le_bytes()); // p_memsz
        h.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut h, PT_NOTE, 0, notes_off as u64, 0, notes.len() as u64, 4);
    let mut offsets = Vec::with_capacity(loads.len());
    let mut off = data_off as u64;
    for l in loads {
        let flags = (l.read as u32 * PF_R) | (l.write as u32 * PF_W) | (l.exec as u32 * PF_X);
        phdr(&mut h, PT_LOAD, flags, off, l.vaddr, l.len, 4096);
        offsets.push(off);
        off += l.len;
    }
    h.extend_from_slice(notes);
    h.resize(data_off, 0);
    (h, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_program_headers_parse_back() {
        let mut notes = Vec::new();
        let st = PrStatus { tid: 42, ppid: 1, pgrp: 42, sid: 42, regs: [7; 27], fpvalid: true };
        note(&mut notes, NT_PRSTATUS, &st.bytes());
        let loads = [
            Load { vaddr: 0x10000, len: 0x2000, read: true, write: true, exec: false },
            Load { vaddr: 0x40000, len: 0x1000, read: true, write: false, exec: true },
        ];
        let (head, offs) = layout(&notes, &loads);
        assert_eq!(head.len() % 4096, 0);
        assert_eq!(offs, vec![head.len() as u64, head.len() as u64 + 0x2000]);
        // A parser sees an ET_CORE with one note segment and the two loads.
        let mut file = head.clone();
        file.resize(file.len() + 0x3000, 0xaa);
        let elf = object::read::elf::ElfFile64::<object::LittleEndian>::parse(&file[..]).unwrap();
        use object::read::elf::{FileHeader, ProgramHeader};
        let e = object::LittleEndian;
        assert_eq!(elf.elf_header().e_type(e), object::elf::ET_CORE);
        let ph = elf.elf_program_headers();
        assert_eq!(ph.len(), 3);
        assert_eq!(ph[0].p_type(e), object::elf::PT_NOTE);
        assert_eq!((ph[1].p_vaddr(e), ph[1].p_filesz(e), ph[1].p_flags(e).0), (0x10000, 0x2000, PF_R | PF_W));
        let mut it = ph[0].notes(e, &file[..]).unwrap().unwrap();
        let n = it.next().unwrap().unwrap();
        assert_eq!((n.name(), n.n_type(e).0), (&b"CORE"[..], NT_PRSTATUS));
        assert_eq!(&n.desc()[32..36], &42i32.to_le_bytes());
        assert_eq!(n.desc().len(), 336);
    }

    #[test]
    fn nt_file_layout() {
        let b = nt_file(&[FileMapping { start: 0x1000, end: 0x3000, offset: 0x2000, path: "/x".into() }]);
        assert_eq!(&b[0..8], &1u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(&b[32..40], &2u64.to_le_bytes(), "offset in pages");
        assert_eq!(&b[40..], b"/x\0");
        assert_eq!(
            PrPsInfo {
                state: 0,
                sname: b'S',
                nice: 0,
                flag: 0,
                uid: 0,
                gid: 0,
                pid: 1,
                ppid: 0,
                pgrp: 1,
                sid: 1,
                fname: "qemu".into(),
                psargs: "a b".into()
            }
            .bytes()
            .len(),
            136
        );
    }
}
