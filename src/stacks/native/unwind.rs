//! Offline unwinding (x86_64 only): registers + copied stack bytes + loaded modules in,
//! frames out. Never touches a process, so it runs after every thread is released.
//!
//! Rules, in order, per frame:
//! - DWARF CFI from `.eh_frame` (via the `.eh_frame_hdr` binary-search table, else a
//!   scan), then `.debug_frame` of the binary or its debug file. CFA and register
//!   *expressions* are evaluated (glibc's `__restore_rt` and PLT stubs use them).
//! - Frame 0 and the frame interrupted by a signal are looked up at their exact PC;
//!   every other frame at return address − 1 (the call may be a function's last insn).
//! - No CFI for the PC: the frame-pointer chain (`rbp`), as a last resort.
//! - Stop on: return address undefined in CFI (`_start`, `clone3`, `start_thread` mark
//!   the outermost frame that way), return address 0, a CFA that does not increase
//!   (except across a signal frame, which may switch to an alternate stack), unreadable
//!   memory, or the depth cap.

use gimli::{
    BaseAddresses, CfaRule, DebugFrame, EhFrame, EhFrameHdr, EndianSlice, Evaluation, EvaluationResult, LittleEndian,
    Location, Register, RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, Value,
};
use serde::{Deserialize, Serialize};

use super::modules::{Module, Modules};

/// DWARF register numbers on x86_64.
pub const RBP: usize = 6;
pub const RSP: usize = 7;
pub const RIP: usize = 16;
pub const NREGS: usize = 17;

/// General-purpose registers by DWARF number (rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp,
/// r8–r15, rip); `None` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs(pub [Option<u64>; NREGS]);

impl Regs {
    pub fn get(&self, r: usize) -> Option<u64> {
        self.0.get(r).copied().flatten()
    }
    pub fn set(&mut self, r: usize, v: Option<u64>) {
        if let Some(slot) = self.0.get_mut(r) {
            *slot = v;
        }
    }
    /// From `PTRACE_GETREGS`' `user_regs_struct`.
    pub fn from_user(u: &libc::user_regs_struct) -> Regs {
        let v = [
            u.rax, u.rdx, u.rcx, u.rbx, u.rsi, u.rdi, u.rbp, u.rsp, u.r8, u.r9, u.r10, u.r11, u.r12, u.r13, u.r14,
            u.r15, u.rip,
        ];
        Regs(v.map(Some))
    }
    /// Only PC and SP known (a thread that was not stopped: `/proc/TID/syscall`).
    pub fn pc_sp(pc: u64, sp: u64) -> Regs {
        let mut r = Regs::default();
        r.set(RIP, Some(pc));
        r.set(RSP, Some(sp));
        r
    }
}

/// How a frame's caller was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The thread's registers (frame 0).
    Context,
    Cfi,
    FramePointer,
}

/// One unwound frame, before symbolization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// PC for frame 0 (and the frame a signal interrupted), return address otherwise.
    pub pc: u64,
    /// The address used for CFI and symbol lookup (`pc` or `pc - 1`).
    pub lookup: u64,
    /// How this frame was reached.
    pub via: Via,
    /// This frame is a signal trampoline (`__restore_rt`); its caller is exact.
    pub signal: bool,
}

/// Why unwinding ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// CFI marked the return address undefined (the outermost frame).
    Outermost,
    ZeroReturn,
    NonIncreasingCfa,
    UnreadableMemory(u64),
    DepthCap,
    /// No CFI and no usable frame pointer.
    NoUnwindInfo(u64),
    CfiError(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Outermost => f.write_str("outermost frame"),
            End::ZeroReturn => f.write_str("return address 0"),
            End::NonIncreasingCfa => f.write_str("stack pointer did not increase"),
            End::UnreadableMemory(a) => write!(f, "memory at {a:#x} not in the copied stack"),
            End::DepthCap => f.write_str("depth cap reached"),
            End::NoUnwindInfo(pc) => write!(f, "no unwind info or frame pointer at {pc:#x}"),
            End::CfiError(e) => write!(f, "CFI error: {e}"),
        }
    }
}

fn read_u64(mem: &dyn Fn(u64, &mut [u8]) -> bool, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem(addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// A memory reader over one copied stack region.
pub fn stack_reader(base: u64, bytes: &[u8]) -> impl Fn(u64, &mut [u8]) -> bool + '_ {
    move |addr: u64, out: &mut [u8]| {
        let Some(off) = addr.checked_sub(base) else { return false };
        let Ok(off) = usize::try_from(off) else { return false };
        match bytes.get(off..off.saturating_add(out.len())) {
            Some(src) if src.len() == out.len() => {
                out.copy_from_slice(src);
                true
            }
            _ => false,
        }
    }
}

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Where a CFI row came from, so expressions can be read from the right section.
enum Source<'a> {
    Eh(EhFrame<R<'a>>),
    Debug(DebugFrame<R<'a>>),
}

pub struct Unwinder<'m> {
    modules: &'m Modules,
    ctx: Box<UnwindContext<usize>>,
    pub max_depth: usize,
}

struct Step {
    regs: Regs,
    cfa: u64,
    signal: bool,
}

enum StepErr {
    NoInfo,
    End(End),
}

impl<'m> Unwinder<'m> {
    pub fn new(modules: &'m Modules) -> Self {
        Unwinder { modules, ctx: Box::new(UnwindContext::new()), max_depth: 256 }
    }

    /// Unwinds from `regs` using `mem`, the copied memory: `mem(addr, buf)` fills `buf`
    /// and returns true, or returns false when `[addr, addr + buf.len())` was not copied.
    /// Returns the frames and why it stopped.
    pub fn unwind(&mut self, regs: Regs, mem: &dyn Fn(u64, &mut [u8]) -> bool) -> (Vec<RawFrame>, End) {
        let mut frames = Vec::new();
        let mut regs = regs;
        let mut exact = true;
        let mut via = Via::Context;
        let mut prev_cfa: Option<u64> = None;
        let mut prev_signal = false;
        loop {
            let Some(pc) = regs.get(RIP) else { return (frames, End::ZeroReturn) };
            if pc == 0 {
                return (frames, End::ZeroReturn);
            }
            if frames.len() >= self.max_depth {
                return (frames, End::DepthCap);
            }
            let lookup = if exact { pc } else { pc - 1 };
            let module = self.modules.find(lookup);
            let step = match module {
                Some(m) => self.cfi_step(m, lookup, &regs, mem),
                None => Err(StepErr::NoInfo),
            };
            let (next, by_fp) = match step {
                Ok(s) => (s, false),
                Err(StepErr::End(e)) => {
                    frames.push(RawFrame { pc, lookup, via, signal: false });
                    return (frames, e);
                }
                Err(StepErr::NoInfo) => match fp_step(&regs, mem) {
                    Some(s) => (s, true),
                    None => {
                        frames.push(RawFrame { pc, lookup, via, signal: false });
                        return (frames, End::NoUnwindInfo(pc));
                    }
                },
            };
            frames.push(RawFrame { pc, lookup, via, signal: next.signal });
            // The stack grows down: each caller's CFA lies above its callee's. A signal
            // frame may switch stacks (sigaltstack), so the check skips that transition.
            if let Some(p) = prev_cfa {
                if next.cfa <= p && !prev_signal && !next.signal {
                    return (frames, End::NonIncreasingCfa);
                }
            }
            prev_cfa = Some(next.cfa);
            prev_signal = next.signal;
            exact = next.signal;
            via = if by_fp { Via::FramePointer } else { Via::Cfi };
            regs = next.regs;
        }
    }

    fn cfi_step(
        &mut self,
        m: &Module,
        lookup: u64,
        regs: &Regs,
        mem: &dyn Fn(u64, &mut [u8]) -> bool,
    ) -> Result<Step, StepErr> {
        let svma = lookup.wrapping_sub(m.bias);
        let bytes: &[u8] = &m.elf.bytes;
        let s = &m.elf.sections;
        let mut bases = BaseAddresses::default();
        if let Some(t) = s.text {
            bases = bases.set_text(t);
        }
        if let Some(g) = s.got {
            bases = bases.set_got(g);
        }
        // .eh_frame, through its sorted table when there is one.
        if let Some(eh) = s.eh_frame {
            let mut eh_frame = EhFrame::new(eh.data(bytes), LittleEndian);
            eh_frame.set_address_size(8);
            let bases = bases.clone().set_eh_frame(eh.addr);
            let mut found = None;
            if let Some(hdr) = s.eh_frame_hdr {
                let bases = bases.clone().set_eh_frame_hdr(hdr.addr);
                if let Ok(parsed) = EhFrameHdr::new(hdr.data(bytes), LittleEndian).parse(&bases, 8) {
                    if let Some(table) = parsed.table() {
                        found = Some(
                            table
                                .fde_for_address(&eh_frame, &bases, svma, EhFrame::cie_from_offset)
                                .ok()
                                .filter(|f| f.contains(svma)),
                        );
                    }
                }
            }
            let fde = match found {
                Some(f) => f,
                None => eh_frame.fde_for_address(&bases, svma, EhFrame::cie_from_offset).ok(),
            };
            if let Some(fde) = fde {
                let signal = fde.is_signal_trampoline();
                let row = fde
                    .unwind_info_for_address(&eh_frame, &bases, &mut self.ctx, svma)
                    .map_err(|e| StepErr::End(End::CfiError(e.to_string())))?
                    .clone();
                return apply_row(&row, &Source::Eh(eh_frame), regs, mem, signal).map_err(StepErr::End);
            }
        }
        // .debug_frame of the binary, then of its debug file.
        for elf in std::iter::once(&m.elf).chain(m.debug.as_ref()) {
            let Some(df) = elf.sections.debug_frame else { continue };
            let mut debug_frame = DebugFrame::new(df.data(&elf.bytes), LittleEndian);
            debug_frame.set_address_size(8);
            if let Ok(fde) = debug_frame.fde_for_address(&bases, svma, DebugFrame::cie_from_offset) {
                let signal = fde.is_signal_trampoline();
                let row = fde
                    .unwind_info_for_address(&debug_frame, &bases, &mut self.ctx, svma)
                    .map_err(|e| StepErr::End(End::CfiError(e.to_string())))?
                    .clone();
                return apply_row(&row, &Source::Debug(debug_frame), regs, mem, signal).map_err(StepErr::End);
            }
        }
        Err(StepErr::NoInfo)
    }
}

fn apply_row(
    row: &UnwindTableRow<usize>,
    src: &Source<'_>,
    regs: &Regs,
    mem: &dyn Fn(u64, &mut [u8]) -> bool,
    signal: bool,
) -> Result<Step, End> {
    let expr = |e: &gimli::UnwindExpression<usize>| match src {
        Source::Eh(s) => e.get(s),
        Source::Debug(s) => e.get(s),
    };
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let base =
                regs.get(register.0 as usize).ok_or(End::CfiError(format!("CFA register {} unknown", register.0)))?;
            base.wrapping_add(*offset as u64)
        }
        CfaRule::Expression(e) => {
            let e = expr(e).map_err(|e| End::CfiError(e.to_string()))?;
            match eval(e, regs, mem, None)? {
                Loc::Addr(a) | Loc::Val(a) => a,
            }
        }
    };
    let mut next = *regs;
    // Caller's SP is the CFA unless a rule says otherwise.
    next.set(RSP, Some(cfa));
    // RIP (the return address column) must have a rule; no rule means outermost.
    let mut ra_rule_seen = false;
    let mut ra_undefined = false;
    for (reg, rule) in row.registers() {
        let r = reg.0 as usize;
        if r >= NREGS {
            continue;
        }
        if r == RIP {
            ra_rule_seen = true;
            ra_undefined = matches!(rule, RegisterRule::Undefined);
        }
        let v = match rule {
            RegisterRule::Undefined => None,
            RegisterRule::SameValue => regs.get(r),
            RegisterRule::Offset(o) => {
                let a = cfa.wrapping_add(*o as u64);
                Some(read_u64(mem, a).ok_or(End::UnreadableMemory(a))?)
            }
            RegisterRule::ValOffset(o) => Some(cfa.wrapping_add(*o as u64)),
            RegisterRule::Register(Register(o)) => regs.get(*o as usize),
            RegisterRule::Expression(e) => {
                let e = expr(e).map_err(|e| End::CfiError(e.to_string()))?;
                let a = match eval(e, regs, mem, Some(cfa))? {
                    Loc::Addr(a) | Loc::Val(a) => a,
                };
                Some(read_u64(mem, a).ok_or(End::UnreadableMemory(a))?)
            }
            RegisterRule::ValExpression(e) => {
                let e = expr(e).map_err(|e| End::CfiError(e.to_string()))?;
                match eval(e, regs, mem, Some(cfa))? {
                    Loc::Addr(a) | Loc::Val(a) => Some(a),
                }
            }
            RegisterRule::Constant(c) => Some(*c),
            RegisterRule::Architectural => None,
        };
        next.set(r, v);
    }
    if !ra_rule_seen || ra_undefined {
        return Err(End::Outermost);
    }
    if next.get(RIP).is_none() {
        // E.g. vfork keeps its return address in rdi, unknown without registers.
        return Err(End::CfiError("the return address is in a register that is not known".into()));
    }
    if next.get(RIP) == Some(0) {
        return Err(End::ZeroReturn);
    }
    Ok(Step { regs: next, cfa, signal })
}

enum Loc {
    Addr(u64),
    Val(u64),
}

fn eval(
    e: gimli::Expression<R<'_>>,
    regs: &Regs,
    mem: &dyn Fn(u64, &mut [u8]) -> bool,
    initial: Option<u64>,
) -> Result<Loc, End> {
    let enc = gimli::Encoding { address_size: 8, format: gimli::Format::Dwarf32, version: 4 };
    let mut ev: Evaluation<R<'_>> = e.evaluation(enc);
    if let Some(v) = initial {
        ev.set_initial_value(v);
    }
    let err = |e: gimli::Error| End::CfiError(format!("expression: {e}"));
    let mut res = ev.evaluate().map_err(err)?;
    for _ in 0..64 {
        res = match res {
            EvaluationResult::Complete => {
                let pieces = ev.result();
                return match pieces.first().map(|p| &p.location) {
                    Some(Location::Address { address }) => Ok(Loc::Addr(*address)),
                    Some(Location::Value { value }) => Ok(Loc::Val(value.to_u64(u64::MAX).map_err(err)?)),
                    Some(Location::Register { register }) => {
                        Ok(Loc::Val(regs.get(register.0 as usize).ok_or(End::CfiError("register unknown".into()))?))
                    }
                    _ => Err(End::CfiError("unsupported expression result".into())),
                };
            }
            EvaluationResult::RequiresMemory { address, size, .. } => {
                let mut b = [0u8; 8];
                let n = (size as usize).min(8);
                if !mem(address, &mut b[..n]) {
                    return Err(End::UnreadableMemory(address));
                }
                ev.resume_with_memory(Value::Generic(u64::from_le_bytes(b))).map_err(err)?
            }
            EvaluationResult::RequiresRegister { register, .. } => {
                let v =
                    regs.get(register.0 as usize).ok_or(End::CfiError(format!("register {} unknown", register.0)))?;
                ev.resume_with_register(Value::Generic(v)).map_err(err)?
            }
            other => return Err(End::CfiError(format!("unsupported expression need: {other:?}"))),
        };
    }
    Err(End::CfiError("expression did not finish".into()))
}

/// Frame-pointer step: caller RIP at `[rbp+8]`, caller RBP at `[rbp]`, CFA `rbp+16`.
fn fp_step(regs: &Regs, mem: &dyn Fn(u64, &mut [u8]) -> bool) -> Option<Step> {
    let rbp = regs.get(RBP)?;
    let rsp = regs.get(RSP)?;
    if rbp == 0 || rbp < rsp || rbp % 8 != 0 {
        return None;
    }
    let ra = read_u64(mem, rbp + 8)?;
    let saved = read_u64(mem, rbp)?;
    let mut next = Regs::default();
    // Callee-saved registers other than rbp are unknown after a frame-pointer step.
    next.set(RIP, Some(ra));
    next.set(RSP, Some(rbp + 16));
    next.set(RBP, Some(saved));
    Some(Step { regs: next, cfa: rbp + 16, signal: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_reader_bounds() {
        let bytes: Vec<u8> = (0..32u8).collect();
        let mem = stack_reader(0x1000, &bytes);
        let mut b = [0u8; 8];
        assert!(mem(0x1000, &mut b));
        assert_eq!(b[0], 0);
        assert!(mem(0x1018, &mut b));
        assert_eq!(b[7], 31);
        assert!(!mem(0x1019, &mut b));
        assert!(!mem(0xfff, &mut b));
    }

    #[test]
    fn frame_pointer_chain_without_modules() {
        // Two frames linked by rbp; no module covers the PCs, so only the fp chain works.
        let base = 0x7000u64;
        let mut stack = vec![0u8; 0x100];
        let put = |s: &mut Vec<u8>, at: u64, v: u64| {
            let o = (at - base) as usize;
            s[o..o + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut stack, 0x7010, 0x7040); // saved rbp of frame 1
        put(&mut stack, 0x7018, 0x4000_1234); // return into frame 1
        put(&mut stack, 0x7040, 0); // frame 1's saved rbp: end of chain
        put(&mut stack, 0x7048, 0x4000_5678);
        let mut regs = Regs::pc_sp(0x4000_0100, 0x7000);
        regs.set(RBP, Some(0x7010));
        let modules = Modules::default();
        let mut u = Unwinder::new(&modules);
        let mem = stack_reader(base, &stack);
        let (frames, end) = u.unwind(regs, &mem);
        let pcs: Vec<u64> = frames.iter().map(|f| f.pc).collect();
        assert_eq!(pcs, vec![0x4000_0100, 0x4000_1234, 0x4000_5678]);
        assert_eq!(frames[0].lookup, 0x4000_0100);
        assert_eq!(frames[1].lookup, 0x4000_1233);
        assert_eq!(frames[1].via, Via::FramePointer);
        assert_eq!(end, End::NoUnwindInfo(0x4000_5678));
    }
}
