//! A copy of the top of the user stack, read in one piece at a probe, from which the
//! stack walks read their words: a walk through 40-60 frames reads two or three words
//! from each, and one `bpf_probe_read_user` of the window costs about as much as a
//! handful of word-sized ones (the node-buffers walk went from 15.7 µs to 8.2 µs per
//! allocation with it, see the README). Words outside the window are read on their own.

use aya_ebpf::helpers::generated::bpf_probe_read_user as raw_read_user;

const PAGE_BYTES: u64 = 4096;
/// Words of the window's buffer (a power of two, for the index mask).
pub(crate) const WINDOW_WORDS: usize = 1024;

#[repr(C)]
pub(crate) struct StackWindow {
    /// A word read outside the window (map memory: a read through the BPF stack would
    /// leave each loop iteration's word there, and no two iterations would look alike
    /// to the verifier).
    frame: [u64; 1],
    /// `len` bytes of the user stack from `base` (the probe's `sp`).
    words: [u64; WINDOW_WORDS],
    base: u64,
    len: u64,
}

impl StackWindow {
    /// Reads `bytes` (at most the buffer's size) of the stack from `sp` up, or, near the
    /// stack's end (where the whole window is not mapped), the rest of `sp`'s page.
    #[inline(always)]
    pub(crate) fn load(&mut self, sp: u64, bytes: u32) {
        self.base = sp;
        self.len = 0;
        let bytes = bytes & (WINDOW_WORDS as u32 * 8 * 2 - 1);
        if bytes > WINDOW_WORDS as u32 * 8 {
            return;
        }
        let dst = self.words.as_mut_ptr().cast();
        // SAFETY: writes at most the buffer's size; a checked read of user memory.
        if bytes > 0 && unsafe { raw_read_user(dst, bytes, sp as *const core::ffi::c_void) } == 0 {
            self.len = u64::from(bytes);
            return;
        }
        let rest = (PAGE_BYTES - (sp & (PAGE_BYTES - 1))) as u32;
        // SAFETY: as above, `rest` is at most a page.
        if rest >= 16 && unsafe { raw_read_user(dst, rest & 0x1fff, sp as *const core::ffi::c_void) } == 0 {
            self.len = u64::from(rest);
        }
    }

    /// The user word at `addr`: from the window when it holds it, else read on its own.
    #[inline(always)]
    pub(crate) fn word(&mut self, addr: u64) -> Option<u64> {
        let off = addr.wrapping_sub(self.base);
        // SAFETY: a field of our map value; volatile so that the bound is read afresh at
        // each use (a value the verifier has seen compared in one iteration would carry
        // that comparison's bounds into the next).
        let len = unsafe { core::ptr::read_volatile(&raw const self.len) };
        if off < len && off & 7 == 0 {
            // `len` is at most the buffer's size, so the mask changes nothing but gives
            // the verifier the index's bound (a compare the compiler may fold into
            // another register's test would not).
            let idx = (off >> 3) as usize & (WINDOW_WORDS - 1);
            return Some(self.words[idx]);
        }
        // SAFETY: writes the 8 bytes of `frame[0]`; a checked read of user memory.
        let ret =
            unsafe { raw_read_user(self.frame.as_mut_ptr().cast(), 8, addr as *const core::ffi::c_void) };
        if ret == 0 { Some(self.frame[0]) } else { None }
    }
}
