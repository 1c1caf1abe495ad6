//! User-stack unwinding over a copy of the stack, with framehop: `.eh_frame` CFI where a
//! module has it (glibc has no frame pointers), frame pointers elsewhere (JIT code).
//!
//! framehop's fallback rules, read from its source (0.16), which this relies on:
//! - an address in no module: frame-pointer rule (`bp == 0` ends the walk);
//! - a module without `.eh_frame`/`.debug_frame`, or an address before the module's first
//!   FDE, or a CFI error: frame-pointer rule;
//! - an address inside a module with CFI but in no FDE's range (V8's embedded builtins
//!   inside the node binary): frame pointers for return addresses, but "just return"
//!   (`sp + 8`) for the first frame, since an uncovered leaf is usually a function entry;
//! - every rule checks that the stack pointer moves up, and reads outside the copied
//!   bytes end the walk.

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder};

use super::Regs;
use super::module::Bytes;

/// Deepest stack returned.
pub(crate) const MAX_DEPTH: usize = 128;

/// One frame of an unwound stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UnwoundFrame {
    /// The ip (leaf) or a return address.
    pub addr: u64,
    /// The frame pointer (`rbp`) while this frame executes, when the walk knows it: V8
    /// keeps a JS frame's function and bytecode position at fixed offsets from it.
    pub fp: Option<u64>,
}

/// What one unwind produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Unwound {
    /// Leaf first: the ip, then return addresses.
    pub frames: Vec<UnwoundFrame>,
    /// The walk stopped early (unreadable stack, bad rule, depth limit) rather than at
    /// the stack's root.
    pub truncated: bool,
}

impl Unwound {
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.frames.iter().map(|f| f.addr)
    }
}

pub(crate) struct StackUnwinder {
    unwinder: UnwinderX86_64<Bytes>,
    cache: CacheX86_64,
}

impl std::fmt::Debug for StackUnwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackUnwinder")
            .field("max_known_code_address", &self.unwinder.max_known_code_address())
            .finish_non_exhaustive()
    }
}

impl StackUnwinder {
    pub fn new() -> Self {
        Self { unwinder: UnwinderX86_64::new(), cache: CacheX86_64::new() }
    }

    /// `base_avma` is the process address of the file's stated address 0 (the load bias).
    pub fn add_module(
        &mut self,
        name: &str,
        avma: std::ops::Range<u64>,
        base_avma: u64,
        sections: ExplicitModuleSectionInfo<Bytes>,
    ) {
        self.unwinder.add_module(Module::new(name.to_string(), avma, base_avma, sections));
    }

    /// Removes the module whose range starts at `start` (no-op when there is none).
    pub fn remove_module(&mut self, start: u64) {
        self.unwinder.remove_module(start);
    }

    /// Unwinds `stack`, the bytes at `[regs.sp, regs.sp + stack.len())`. Each frame comes
    /// with the `rbp` the unwind rules recovered for it (callee-saved, so it is the frame's
    /// own until a rule restores the caller's).
    pub fn unwind(&mut self, regs: Regs, stack: &[u8]) -> Unwound {
        let mut read_stack = |addr: u64| read_word(stack, regs.sp, addr);
        let mut unwind_regs = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
        let mut address = FrameAddress::InstructionPointer(regs.ip);
        let mut out = Unwound::default();
        out.frames.push(UnwoundFrame { addr: regs.ip, fp: Some(regs.bp) });
        // The same walk as framehop's `iter_frames`, which does not expose the registers.
        loop {
            if out.frames.len() >= MAX_DEPTH {
                out.truncated = true;
                break;
            }
            match self.unwinder.unwind_frame(address, &mut unwind_regs, &mut self.cache, &mut read_stack) {
                Ok(Some(return_address)) => {
                    let Some(next) = FrameAddress::from_return_address(return_address) else {
                        out.truncated = true;
                        break;
                    };
                    out.frames.push(UnwoundFrame { addr: return_address, fp: Some(unwind_regs.bp()) });
                    address = next;
                }
                Ok(None) => break,
                Err(err) => {
                    log::trace!("unwind stopped after {} frames: {err}", out.frames.len());
                    out.truncated = true;
                    break;
                }
            }
        }
        out
    }
}

/// Reads the little-endian word at `addr` from a stack copy that starts at `sp`.
fn read_word(stack: &[u8], sp: u64, addr: u64) -> Result<u64, ()> {
    let offset = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
    let bytes = stack.get(offset..offset.checked_add(8).ok_or(())?).ok_or(())?;
    Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
}

/// Chooses between the CFI unwind and the kernel's frame-pointer stack (`fp`, leaf first):
/// the frame-pointer stack when CFI found at most the ip, otherwise the CFI stack, extended
/// with the frame-pointer stack's tail when the CFI walk was cut short (the stack copy is
/// bounded; the kernel's walk is not) and its last return address appears in `fp`.
/// Frames taken from the kernel's walk have no known frame pointer.
pub(crate) fn combine(cfi: Unwound, fp: &[u64]) -> Vec<UnwoundFrame> {
    let fp: Vec<u64> = fp.iter().copied().take_while(|&a| a != 0).take(MAX_DEPTH).collect();
    let unknown = |addr: u64| UnwoundFrame { addr, fp: None };
    if cfi.frames.len() <= 1 && fp.len() > cfi.frames.len() {
        return fp.into_iter().map(unknown).collect();
    }
    let mut frames = cfi.frames;
    if cfi.truncated
        && frames.len() >= 2
        && let Some(last) = frames.last().map(|f| f.addr)
        && let Some(pos) = fp.iter().skip(1).position(|&a| a == last)
    {
        let room = MAX_DEPTH.saturating_sub(frames.len());
        frames.extend(fp.iter().skip(pos + 2).take(room).copied().map(unknown));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stack copy from `(offset, word)` pairs.
    fn stack(len: usize, words: &[(usize, u64)]) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        for &(offset, word) in words {
            bytes[offset..offset + 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn frame_pointers_outside_modules() {
        let sp = 0x7ffc_0000_0000;
        // Two frame records: [bp] = caller's bp, [bp + 8] = return address.
        let bytes = stack(0x100, &[(0x20, sp + 0x60), (0x28, 0x2000), (0x60, 0), (0x68, 0x3000)]);
        let mut unwinder = StackUnwinder::new();
        let out = unwinder.unwind(Regs { ip: 0x1000, sp, bp: sp + 0x20 }, &bytes);
        assert_eq!(out.addrs().collect::<Vec<_>>(), vec![0x1000, 0x2000, 0x3000]);
        let fps: Vec<Option<u64>> = out.frames.iter().map(|f| f.fp).collect();
        assert_eq!(fps, vec![Some(sp + 0x20), Some(sp + 0x60), Some(0)], "each frame's own rbp");
        assert!(!out.truncated, "bp == 0 ends the walk cleanly");
    }

    #[test]
    fn garbage_never_panics() {
        let mut unwinder = StackUnwinder::new();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for (ip, sp, bp) in [
            (0, 0, 0),
            (u64::MAX, u64::MAX, u64::MAX),
            (1, u64::MAX - 7, u64::MAX - 15),
            (0x1000, 0x10, 0x8),
            (0x1000, 0x10, 0x10 + 4000),
        ] {
            let out = unwinder.unwind(Regs { ip, sp, bp }, &junk);
            assert!(!out.frames.is_empty() && out.frames.len() <= MAX_DEPTH);
            unwinder.unwind(Regs { ip, sp, bp }, &[]);
            unwinder.unwind(Regs { ip, sp, bp }, &junk[..7]);
        }
    }

    #[test]
    fn depth_is_bounded() {
        // A frame-pointer cycle that keeps moving up: 200 records, each pointing to the next.
        let sp = 0x1_0000;
        let words: Vec<(usize, u64)> = (0..200)
            .flat_map(|i| [(i * 16, sp + (i as u64 + 1) * 16), (i * 16 + 8, 0x5000 + i as u64)])
            .collect();
        let bytes = stack(201 * 16, &words);
        let out = StackUnwinder::new().unwind(Regs { ip: 0x4000, sp, bp: sp }, &bytes);
        assert_eq!(out.frames.len(), MAX_DEPTH);
        assert!(out.truncated);
    }

    /// CFI frames with made-up frame pointers, for [`combine`].
    fn cfi(addrs: &[u64], truncated: bool) -> Unwound {
        let frames = addrs.iter().map(|&addr| UnwoundFrame { addr, fp: Some(addr + 1) }).collect();
        Unwound { frames, truncated }
    }

    fn addrs(frames: &[UnwoundFrame]) -> Vec<u64> {
        frames.iter().map(|f| f.addr).collect()
    }

    #[test]
    fn combine_prefers_cfi_and_falls_back_to_fp() {
        let fp = [0x10, 0x20, 0x30, 0x40, 0];
        let one = combine(cfi(&[0x10], true), &fp);
        assert_eq!(addrs(&one), vec![0x10, 0x20, 0x30, 0x40]);
        assert!(one.iter().all(|f| f.fp.is_none()), "the kernel's walk knows no frame pointers");

        let good = cfi(&[0x10, 0x99, 0xaa], false);
        assert_eq!(combine(good.clone(), &fp), good.frames);

        let cut = combine(cfi(&[0x10, 0x99, 0x30], true), &fp);
        assert_eq!(addrs(&cut), vec![0x10, 0x99, 0x30, 0x40], "stitched at the shared return address");
        assert_eq!(cut[2].fp, Some(0x31), "CFI frames keep their frame pointers");
        assert_eq!(cut[3].fp, None);

        assert_eq!(addrs(&combine(cfi(&[0x10, 0x99], true), &fp)), vec![0x10, 0x99]);
        assert!(combine(Unwound::default(), &[]).is_empty());
    }
}
