//! How the address-space syscalls become events: which calls are kept at entry, and what
//! a call that succeeded changed, from its six raw arguments and its result. One
//! description for all of them (the kernel side saves the arguments at `sys_enter_*` and
//! calls [`change`] at `sys_exit_*`), kept here so that it is tested on the host.

#![allow(
    clippy::inline_always,
    reason = "called by eBPF programs with a constant `kind`: inlined, each program keeps only its own case"
)]

use crate::{MemEvent, kind};

/// `madvise` advice that gives pages back (the only advice that changes what is held).
pub const MADV_DONTNEED: u64 = 4;
pub const MADV_FREE: u64 = 8;
pub const MADV_REMOVE: u64 = 9;

/// Arguments of a syscall as its tracepoint record holds them.
pub type Args = [u64; 6];

/// How many arguments of the syscall `kind` are read at entry.
#[must_use]
#[inline(always)]
pub const fn arg_count(kind: u32) -> usize {
    match kind {
        kind::MMAP => 5,
        kind::MREMAP => 4,
        kind::MUNMAP => 2,
        kind::BRK => 1,
        kind::MPROTECT | kind::MADVISE => 3,
        _ => 0,
    }
}

/// Whether a call is worth saving at entry.
#[must_use]
#[inline(always)]
pub const fn wanted(kind: u32, args: &Args) -> bool {
    match kind {
        kind::MADVISE => matches!(args[2], MADV_DONTNEED | MADV_FREE | MADV_REMOVE),
        _ => true,
    }
}

/// What the call `kind` with `args` changed, given its result `ret`: the event (its header
/// is left for the caller, with `kind` set) and whether the user stack goes with it.
/// `None` when it failed or changed nothing.
#[must_use]
#[inline(always)]
pub fn change(kind: u32, args: &Args, ret: i64) -> Option<(MemEvent, bool)> {
    let mut event = MemEvent { fd: -1, ..MemEvent::default() };
    event.header.kind = kind;
    let with_stack = match kind {
        // Errors are small negative numbers; addresses are below the kernel half.
        kind::MMAP if ret >= 0 => {
            event.addr = ret as u64;
            event.len = args[1];
            event.prot = args[2] as u32;
            event.flags = args[3] as u32;
            event.fd = args[4] as i32;
            true
        }
        kind::MREMAP if ret >= 0 => {
            event.old_addr = args[0];
            event.old_len = args[1];
            event.len = args[2];
            event.flags = args[3] as u32;
            event.addr = ret as u64;
            true
        }
        // brk(0) only asks for the current break; otherwise the result is the break now,
        // moved or not.
        kind::BRK if args[0] != 0 => {
            event.old_addr = args[0];
            event.addr = ret as u64;
            true
        }
        kind::MUNMAP if ret == 0 => {
            event.addr = args[0];
            event.len = args[1];
            false
        }
        kind::MPROTECT if ret == 0 => {
            event.addr = args[0];
            event.len = args[1];
            event.prot = args[2] as u32;
            false
        }
        kind::MADVISE if ret == 0 && wanted(kind::MADVISE, args) => {
            event.addr = args[0];
            event.len = args[1];
            event.advice = args[2] as u32;
            false
        }
        _ => return None,
    };
    Some((event, with_stack))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENOMEM: i64 = -12;

    #[test]
    fn mmap_takes_the_address_it_returned_and_its_stack() {
        let args = [0, 8192, 3, 0x22, u64::MAX, 0];
        let (event, with_stack) = change(kind::MMAP, &args, 0x7f00_0000_0000).expect("a mapping");
        assert!(with_stack);
        assert_eq!((event.header.kind, event.addr, event.len), (kind::MMAP, 0x7f00_0000_0000, 8192));
        assert_eq!((event.prot, event.flags, event.fd), (3, 0x22, -1));
        assert_eq!(change(kind::MMAP, &args, ENOMEM), None);
    }

    #[test]
    fn mremap_moves_old_to_the_result() {
        let args = [0x1000, 4096, 8192, 1, 0, 0];
        let (event, with_stack) = change(kind::MREMAP, &args, 0x5000).expect("a move");
        assert!(with_stack);
        assert_eq!((event.old_addr, event.old_len, event.addr, event.len), (0x1000, 4096, 0x5000, 8192));
        assert_eq!(change(kind::MREMAP, &args, ENOMEM), None);
    }

    #[test]
    fn brk_query_changes_nothing_and_a_move_reports_the_new_break() {
        assert_eq!(change(kind::BRK, &[0; 6], 0x60_0000), None);
        let (event, with_stack) = change(kind::BRK, &[0x62_0000, 0, 0, 0, 0, 0], 0x62_0000).expect("a move");
        assert!(with_stack);
        assert_eq!((event.old_addr, event.addr), (0x62_0000, 0x62_0000));
    }

    #[test]
    fn unmap_protect_and_advice_need_success_and_carry_no_stack() {
        let (unmap, stack) = change(kind::MUNMAP, &[0x1000, 4096, 0, 0, 0, 0], 0).expect("an unmap");
        assert!(!stack);
        assert_eq!((unmap.addr, unmap.len, unmap.fd), (0x1000, 4096, -1));
        assert_eq!(change(kind::MUNMAP, &[0x1000, 4096, 0, 0, 0, 0], -22), None);
        let (protect, _) = change(kind::MPROTECT, &[0x1000, 4096, 1, 0, 0, 0], 0).expect("a change");
        assert_eq!(protect.prot, 1);
        let (advice, _) = change(kind::MADVISE, &[0x1000, 4096, MADV_FREE, 0, 0, 0], 0).expect("advice");
        assert_eq!((advice.advice, advice.flags), (MADV_FREE as u32, 0));
    }

    #[test]
    fn only_advice_that_gives_pages_back_is_kept() {
        for advice in [MADV_DONTNEED, MADV_FREE, MADV_REMOVE] {
            assert!(wanted(kind::MADVISE, &[0, 0, advice, 0, 0, 0]));
        }
        // MADV_WILLNEED, MADV_HUGEPAGE.
        for advice in [3, 14] {
            assert!(!wanted(kind::MADVISE, &[0, 0, advice, 0, 0, 0]));
            assert_eq!(change(kind::MADVISE, &[0, 0, advice, 0, 0, 0], 0), None);
        }
        assert!(wanted(kind::MMAP, &[0; 6]));
    }

    #[test]
    fn every_kind_reads_the_arguments_its_change_uses() {
        assert_eq!(arg_count(kind::MMAP), 5);
        assert_eq!(arg_count(kind::MREMAP), 4);
        assert_eq!(arg_count(kind::BRK), 1);
        assert_eq!(arg_count(kind::FAULT), 0);
        assert_eq!(change(kind::FAULT, &[0; 6], 0), None);
    }
}
