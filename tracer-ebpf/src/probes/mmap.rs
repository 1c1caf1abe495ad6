//! Address-space changes of the target: mmap, munmap, mremap, brk, mprotect, madvise.
//!
//! Arguments are saved at `sys_enter_*` by thread id and the event is sent at
//! `sys_exit_*`, so only calls that succeeded reach userspace, with their result. The
//! twelve programs share one entry and one exit; what each call changed is decided by
//! `tracer_common::syscall::change`.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    COUNTER_PENDING_FULL, COUNTER_PENDING_STALE, COUNTER_SYSCALL_UNREADABLE, TRACK_BRK, TRACK_MMAP, kind,
    syscall::{self, Args},
};

use crate::{
    maps::{PENDING, Pending, count},
    probes::common::{EEXIST, Failure, field, header, run, send_mem, send_with_stack, target_tid},
};

/// Offset of `args[0]` in a `syscalls:sys_enter_*` record and of `ret` in `sys_exit_*`
/// (stable since the syscall tracepoints exist; see their `format` files).
const ARGS_OFFSET: usize = 16;

/// Saves the call at its entry.
#[inline(always)]
fn enter(ctx: &TracePointContext, family: u32, kind: u32) -> Result<u32, Failure> {
    let Some(tid) = target_tid(family) else { return Ok(0) };
    let mut args: Args = [0; 6];
    for (n, arg) in args.iter_mut().enumerate().take(syscall::arg_count(kind)) {
        *arg = field::<u64>(ctx, ARGS_OFFSET + n * 8, COUNTER_SYSCALL_UNREADABLE)?;
    }
    if !syscall::wanted(kind, &args) {
        return Ok(0);
    }
    let pending = Pending { kind, _pad: 0, args };
    match PENDING.insert(&tid, &pending, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(0),
        // The thread's previous call never reached its exit program (it was attached
        // after the entry's): that call is lost, this one replaces it.
        Err(e) if e == EEXIST => {
            count(COUNTER_PENDING_STALE);
            PENDING.insert(&tid, &pending, u64::from(BPF_ANY)).map_err(|_| COUNTER_PENDING_FULL)?;
            Ok(0)
        }
        Err(_) => Err(COUNTER_PENDING_FULL),
    }
}

/// Sends what the call changed, at its exit.
#[inline(always)]
fn exit(ctx: &TracePointContext, family: u32, kind: u32) -> Result<u32, Failure> {
    let Some(tid) = target_tid(family) else { return Ok(0) };
    // SAFETY: the value is copied out before the entry is removed; only this thread
    // writes its entry.
    let Some(pending) = (unsafe { PENDING.get(&tid) }).copied() else {
        // Not saved: not wanted, entered before tracing began, or the table was full
        // (counted at entry).
        return Ok(0);
    };
    let _ = PENDING.remove(&tid);
    if pending.kind != kind {
        return Err(COUNTER_PENDING_STALE);
    }
    let ret = field::<i64>(ctx, ARGS_OFFSET, COUNTER_SYSCALL_UNREADABLE)?;
    let Some((mut event, with_stack)) = syscall::change(kind, &pending.args, ret) else {
        return Ok(0);
    };
    event.header = header(kind, tid, u32::from(with_stack));
    if with_stack { send_with_stack(ctx, event) } else { send_mem(&event) }
}

#[tracepoint]
pub fn tp_sys_enter_mmap(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_MMAP, kind::MMAP))
}

#[tracepoint]
pub fn tp_sys_exit_mmap(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_MMAP, kind::MMAP))
}

#[tracepoint]
pub fn tp_sys_enter_munmap(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_MMAP, kind::MUNMAP))
}

#[tracepoint]
pub fn tp_sys_exit_munmap(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_MMAP, kind::MUNMAP))
}

#[tracepoint]
pub fn tp_sys_enter_mremap(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_MMAP, kind::MREMAP))
}

#[tracepoint]
pub fn tp_sys_exit_mremap(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_MMAP, kind::MREMAP))
}

#[tracepoint]
pub fn tp_sys_enter_brk(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_BRK, kind::BRK))
}

#[tracepoint]
pub fn tp_sys_exit_brk(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_BRK, kind::BRK))
}

#[tracepoint]
pub fn tp_sys_enter_mprotect(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_MMAP, kind::MPROTECT))
}

#[tracepoint]
pub fn tp_sys_exit_mprotect(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_MMAP, kind::MPROTECT))
}

#[tracepoint]
pub fn tp_sys_enter_madvise(ctx: TracePointContext) -> u32 {
    run(enter(&ctx, TRACK_MMAP, kind::MADVISE))
}

#[tracepoint]
pub fn tp_sys_exit_madvise(ctx: TracePointContext) -> u32 {
    run(exit(&ctx, TRACK_MMAP, kind::MADVISE))
}
