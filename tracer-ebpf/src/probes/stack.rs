//! Capture of the user stack at a syscall: registers, a frame-pointer walk by the
//! kernel, and a copy of the top of the stack for CFI unwinding in userspace.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, pt_regs},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_user, bpf_task_pt_regs},
    },
};
use tracer_common::{COUNTER_STACK_READ_FAILED, FP_STACK_DEPTH, STACK_COPY_MAX, UserStack};

use crate::maps::{count, stack_copy_bytes};

/// Smallest copy tried when larger ones fault (the stack's top is near).
const STACK_COPY_MIN: u32 = 512;

/// Fills `stack` for the current task. `ctx` is the program's context.
#[inline(always)]
pub fn capture(ctx: *mut core::ffi::c_void, stack: &mut UserStack) {
    stack.ip = 0;
    stack.sp = 0;
    stack.bp = 0;
    stack.stack_len = 0;
    // SAFETY: helpers called with pointers to our own buffers and sizes that fit them.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        if let Ok(r) = bpf_probe_read_kernel(regs) {
            stack.ip = r.rip;
            stack.sp = r.rsp;
            stack.bp = r.rbp;
        }
        let got = bpf_get_stack(
            ctx,
            stack.fp_frames.as_mut_ptr().cast(),
            (FP_STACK_DEPTH * 8) as u32,
            u64::from(BPF_F_USER_STACK),
        );
        stack.fp_depth = if got > 0 { (got / 8) as u32 } else { 0 };
    }
    if stack.sp == 0 {
        count(COUNTER_STACK_READ_FAILED);
        return;
    }
    // A copy that crosses the top of the stack mapping faults as a whole, so halve the
    // size until it fits.
    let mut size = stack_copy_bytes();
    if size > STACK_COPY_MAX as u32 {
        size = STACK_COPY_MAX as u32;
    }
    let mut attempt = 0;
    while attempt < 6 && size >= STACK_COPY_MIN {
        let bounded = size & (STACK_COPY_MAX as u32 * 2 - 1);
        if bounded > STACK_COPY_MAX as u32 || bounded == 0 {
            break;
        }
        // SAFETY: `bounded` <= the size of `data`.
        let ret = unsafe {
            bpf_probe_read_user(stack.data.as_mut_ptr().cast(), bounded, stack.sp as *const core::ffi::c_void)
        };
        if ret == 0 {
            stack.stack_len = bounded;
            return;
        }
        size /= 2;
        attempt += 1;
    }
    count(COUNTER_STACK_READ_FAILED);
}
