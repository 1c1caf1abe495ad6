//! Where in a function a uprobe goes.
//!
//! An x86 uprobe replaces one instruction with `int3`. When it is hit the kernel runs the
//! BPF program, then either emulates the replaced instruction (a relative branch or call, a
//! nop, a register push) or copies it out of line and single-steps it, which takes a second
//! trap. On the Firecracker VMs here the difference is tenfold: a probe on `push %rbp` or a
//! `jcc` costs 1.5–2.5 µs a hit, one on `endbr64`, `test` or a `mov` 14–25 µs
//! (`/tmp` micro-benchmark in the README). glibc's `free` starts with `test %rdi,%rdi`,
//! libstdc++'s `operator new` with `endbr64`: probed at their first instruction, every call
//! pays the single step.
//!
//! So the probe goes on the first instruction that the kernel emulates, provided that the
//! instructions before it are straight-line (every call reaches the probe), write no
//! register an entry program reads (the argument registers, `rsp`, `rbp`) and no memory.
//! The stack pointer is then as at entry, so that `[rsp]` is still the return address:
//! the return probe may be attached at the same place, and the entry program's
//! nesting test (by stack pointer) still holds.

/// Instructions looked at past the entry, at most.
const MAX_SKIPPED: usize = 6;

/// Where to probe a function, from the bytes at its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// Bytes from the function's first instruction to the probed one.
    pub skip: usize,
    /// Whether the kernel emulates the probed instruction (one trap) rather than
    /// single-stepping it (two).
    pub emulated: bool,
}

/// Chooses the probe point of a function whose code starts with `code`.
#[must_use]
pub fn probe_point(code: &[u8]) -> ProbePoint {
    let mut at = 0;
    // The first instruction that can be probed at all (not LOCK-prefixed).
    let mut first = None;
    for _ in 0..MAX_SKIPPED {
        let Some(rest) = code.get(at..) else { break };
        if emulated_len(rest).is_some() {
            return ProbePoint { skip: at, emulated: true };
        }
        let len = if let Some(len) = locked_instruction_len(rest) {
            len
        } else {
            first.get_or_insert(at);
            match harmless_len(rest) {
                Some(len) => len,
                None => break,
            }
        };
        at += len;
    }
    ProbePoint { skip: first.unwrap_or(0), emulated: false }
}

/// The length of `code`'s first instruction when the kernel's x86 uprobes emulate it
/// (`arch/x86/kernel/uprobes.c`: `branch_setup_xol_ops`, `push_setup_xol_ops`): `push`
/// of a register (with at most REX.B), `call rel32`, `jmp rel8/rel32`, `jcc rel8/rel32`,
/// `nop`, and the multi-byte `nopl`/`nopw` forms.
#[must_use]
pub fn emulated_len(code: &[u8]) -> Option<usize> {
    let b0 = *code.first()?;
    let len = match b0 {
        0x50..=0x57 | 0x90 => 1,
        0x41 if code.get(1).is_some_and(|b| (0x50..=0x57).contains(b)) => 2,
        0xe8 | 0xe9 => 5,
        0xeb | 0x70..=0x7f => 2,
        0x0f => match *code.get(1)? {
            0x80..=0x8f => 6,
            0x1f => 2 + modrm_operand_len(code.get(2..)?)?,
            _ => return None,
        },
        0x66 if code.get(1) == Some(&0x0f) && code.get(2) == Some(&0x1f) => {
            3 + modrm_operand_len(code.get(3..)?)?
        }
        _ => return None,
    };
    (len <= code.len()).then_some(len)
}

/// Registers an entry program may read: the argument registers, `rsp` and `rbp` (the
/// frame-pointer walk), by their 4-bit x86 numbers.
fn is_read_by_probes(reg: u8) -> bool {
    // rcx=1, rdx=2, rsp=4, rbp=5, rsi=6, rdi=7, r8=8, r9=9.
    matches!(reg, 1 | 2 | 4 | 5 | 6 | 7 | 8 | 9)
}

/// The length of `code`'s first instruction when skipping it over cannot change what an
/// entry probe placed after it reads: straight-line, writing only flags or registers that
/// no entry program reads, and no memory.
fn harmless_len(code: &[u8]) -> Option<usize> {
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        // endbr64: a nop for user space (Linux enforces no user IBT).
        return Some(4);
    }
    let (rex, rest) = match *code.first()? {
        rex @ 0x40..=0x4f => (rex, code.get(1..)?),
        _ => (0, code),
    };
    let prefix = usize::from(rex != 0);
    let op = *rest.first()?;
    let modrm = rest.get(1).copied();
    let register_form = modrm.is_some_and(|m| m >> 6 == 3);
    let len = match op {
        // test/cmp r, r: flags only.
        0x85 | 0x39 | 0x3b if register_form => prefix + 2,
        // mov r, r (0x89: destination in r/m; 0x8b: in reg).
        0x89 | 0x8b if register_form => {
            let m = modrm?;
            let dest =
                if op == 0x89 { (m & 7) | ((rex & 1) << 3) } else { ((m >> 3) & 7) | ((rex & 4) << 1) };
            if is_read_by_probes(dest) {
                return None;
            }
            prefix + 2
        }
        // mov imm32, r32.
        0xb8..=0xbf => {
            if is_read_by_probes((op - 0xb8) | ((rex & 1) << 3)) || rex & 8 != 0 {
                return None;
            }
            prefix + 5
        }
        // xor r32, r32 of one register (zeroing).
        0x31 | 0x33
            if register_form && modrm.is_some_and(|m| (m >> 3) & 7 == m & 7) && (rex >> 2) & 1 == rex & 1 =>
        {
            if is_read_by_probes((modrm? & 7) | ((rex & 1) << 3)) {
                return None;
            }
            prefix + 2
        }
        // cmpb $imm8, disp32(%rip): reads memory, writes flags (glibc's "is malloc
        // initialized" test).
        0x80 if rex == 0 && modrm == Some(0x3d) => 7,
        _ => return None,
    };
    (len <= code.len()).then_some(len)
}

/// The length of a `ModRM` byte and what follows it (SIB, displacement), no immediate.
fn modrm_operand_len(code: &[u8]) -> Option<usize> {
    let modrm = *code.first()?;
    let (mode, rm) = (modrm >> 6, modrm & 7);
    let mut len = 1;
    let mut displacement = match mode {
        1 => 1,
        2 => 4,
        0 if rm == 5 => 4,
        _ => 0,
    };
    if mode != 3 && rm == 4 {
        let sib = *code.get(1)?;
        len += 1;
        if mode == 0 && sib & 7 == 5 {
            displacement = 4;
        }
    }
    Some(len + displacement)
}

/// The length of `code`'s first instruction when it is a LOCK-prefixed read-modify-write
/// of memory (`lock add/or/adc/sbb/and/sub/xor mem, reg|imm`, `lock inc/dec/not/neg mem`).
///
/// x86 uprobes refuse LOCK-prefixed instructions (the kernel answers ENOTSUPP), and Node's
/// `NodeArrayBufferAllocator::Free` starts with `lock sub %rdx,0x10(%rdi)`. Such an
/// instruction writes only memory and flags, so at the next one the arguments and the
/// stack are still as at entry: the probe may go there. `xadd` and `cmpxchg`, which write a
/// register, are not skipped. The instruction is decoded by iced-x86: a wrong length would
/// put the int3 inside an instruction and corrupt the target's code.
#[must_use]
pub fn locked_instruction_len(code: &[u8]) -> Option<usize> {
    use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind};
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    if !decoder.can_decode() {
        return None;
    }
    let instruction = decoder.decode();
    if instruction.is_invalid() || instruction.code() == Code::INVALID || !instruction.has_lock_prefix() {
        return None;
    }
    let memory_only = matches!(
        instruction.mnemonic(),
        Mnemonic::Add
            | Mnemonic::Or
            | Mnemonic::Adc
            | Mnemonic::Sbb
            | Mnemonic::And
            | Mnemonic::Sub
            | Mnemonic::Xor
            | Mnemonic::Inc
            | Mnemonic::Dec
            | Mnemonic::Not
            | Mnemonic::Neg
    );
    (memory_only && instruction.op0_kind() == OpKind::Memory).then_some(instruction.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_and_libstdcxx_entries() {
        // glibc 2.36 free: test %rdi,%rdi; je ...; push %rbp — the je is emulated.
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48];
        assert_eq!(probe_point(&free), ProbePoint { skip: 3, emulated: true });
        // malloc: push %r12.
        assert_eq!(probe_point(&[0x41, 0x54, 0x55, 0x53]), ProbePoint { skip: 0, emulated: true });
        // operator new: endbr64; test %rdi,%rdi; mov $1,%eax; push %rbx.
        let new = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0xb8, 1, 0, 0, 0, 0x53, 0x48];
        assert_eq!(probe_point(&new), ProbePoint { skip: 12, emulated: true });
        // posix_memalign: cmpb $0,disp(%rip); push %r12.
        let memalign = [0x80, 0x3d, 1, 2, 0x14, 0, 0, 0x41, 0x54];
        assert_eq!(probe_point(&memalign), ProbePoint { skip: 7, emulated: true });
        // _Znam: endbr64; jmp rel32 (a tail call).
        assert_eq!(probe_point(&[0xf3, 0x0f, 0x1e, 0xfa, 0xe9, 1, 2, 3, 4]).skip, 4);
    }

    #[test]
    fn argument_registers_are_never_skipped_over() {
        // reallocarray: mov %rsi,%rax; mul %rdx (writes rdx, an argument): first instruction.
        assert_eq!(
            probe_point(&[0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2]),
            ProbePoint { skip: 0, emulated: false }
        );
        // mov %rsi,%rdi writes an argument register.
        assert_eq!(probe_point(&[0x48, 0x89, 0xf7, 0x55]), ProbePoint { skip: 0, emulated: false });
        // mov $1,%edi likewise.
        assert_eq!(probe_point(&[0xbf, 1, 0, 0, 0, 0x55]), ProbePoint { skip: 0, emulated: false });
        // A store to memory is not skipped.
        assert_eq!(probe_point(&[0x48, 0x89, 0x07, 0x55]), ProbePoint { skip: 0, emulated: false });
        // sub $8,%rsp moves the stack pointer.
        assert_eq!(probe_point(&[0x48, 0x83, 0xec, 0x08, 0x55]), ProbePoint { skip: 0, emulated: false });
    }

    #[test]
    fn node_free_skips_its_lock_prefix() {
        // NodeArrayBufferAllocator::Free: lock sub %rdx,0x10(%rdi); mov 0x18(%rdi),%rdi;
        // mov (%rdi),%rax; jmp *0x20(%rax) — probeable after the lock, never emulated.
        let free = [0xf0, 0x48, 0x29, 0x57, 0x10, 0x48, 0x8b, 0x7f, 0x18, 0x48, 0x8b, 0x07, 0xff, 0x60, 0x20];
        assert_eq!(probe_point(&free), ProbePoint { skip: 5, emulated: false });
    }

    #[test]
    fn emulated_forms() {
        assert_eq!(emulated_len(&[0x55]), Some(1));
        assert_eq!(emulated_len(&[0x41, 0x57]), Some(2));
        assert_eq!(emulated_len(&[0x0f, 0x1f, 0x44, 0x00, 0x00]), Some(5));
        assert_eq!(emulated_len(&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]), Some(6));
        assert_eq!(emulated_len(&[0x74, 0x02]), Some(2));
        assert_eq!(emulated_len(&[0xe8, 0, 0, 0]), None, "truncated");
        // push with REX.W, endbr64, indirect jmp: single-stepped.
        assert_eq!(emulated_len(&[0x48, 0x55]), None);
        assert_eq!(emulated_len(&[0xf3, 0x0f, 0x1e, 0xfa]), None);
        assert_eq!(emulated_len(&[0xff, 0xe0]), None);
    }
}
