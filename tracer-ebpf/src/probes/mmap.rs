//! Address-space changes of the target: mmap, munmap, mremap, brk, mprotect, madvise.
//!
//! Arguments are saved at `sys_enter_*` by thread id and the event is sent at
//! `sys_exit_*`, so only calls that succeeded reach userspace, with their result.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    COUNTER_EVENTS_SENT, COUNTER_PENDING_FULL, COUNTER_RINGBUF_FULL, EventHeader, MemEvent,
    MemEventWithStack, TRACK_BRK, TRACK_MMAP, UserStack, kind,
};

use crate::{
    maps::{EVENTS, PENDING, Pending, SCRATCH, count, traced, track_flags, wakeup_flags},
    probes::stack,
};

/// Offset of `args[0]` in a `syscalls:sys_enter_*` record and of `ret` in `sys_exit_*`
/// (stable since the syscall tracepoints exist; see their `format` files).
const ARGS_OFFSET: usize = 16;

const MADV_FREE: u64 = 8;
const MADV_DONTNEED: u64 = 4;
const MADV_REMOVE: u64 = 9;

/// Returns the current thread id when it belongs to a traced process and `family` is
/// tracked.
#[inline(always)]
pub(crate) fn target_tid(family: u32) -> Option<u32> {
    if track_flags() & family == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return None;
    }
    Some(pid_tgid as u32)
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoint records hold six `unsigned long` arguments at
    // ARGS_OFFSET; the read is checked by the helper.
    unsafe { ctx.read_at::<u64>(ARGS_OFFSET + n * 8) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: `ret` sits at ARGS_OFFSET in every sys_exit record.
    unsafe { ctx.read_at::<i64>(ARGS_OFFSET) }.unwrap_or(-1)
}

#[inline(always)]
fn save(tid: u32, pending: &Pending) {
    if PENDING.insert(&tid, pending, u64::from(BPF_ANY)).is_err() {
        count(COUNTER_PENDING_FULL);
    }
}

#[inline(always)]
fn take(tid: u32) -> Option<Pending> {
    // SAFETY: the value is copied out before the entry is removed.
    let pending = unsafe { PENDING.get(&tid) }.copied();
    if pending.is_some() {
        let _ = PENDING.remove(&tid);
    }
    pending
}

#[inline(always)]
pub(crate) fn header(kind: u32, tid: u32, has_stack: u32) -> EventHeader {
    EventHeader {
        kind,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        tid,
        has_stack,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

fn event_from(pending: &Pending, kind: u32, tid: u32, has_stack: u32) -> MemEvent {
    MemEvent {
        header: header(kind, tid, has_stack),
        addr: pending.addr,
        len: pending.len,
        old_addr: pending.old_addr,
        old_len: pending.old_len,
        prot: pending.prot,
        flags: pending.flags as u32,
        fd: pending.fd as i32,
        advice: 0,
    }
}

/// Sends an event without a stack.
#[inline(always)]
fn send(event: &MemEvent) {
    if EVENTS.output::<MemEvent>(event, wakeup_flags()).is_ok() {
        count(COUNTER_EVENTS_SENT);
    } else {
        count(COUNTER_RINGBUF_FULL);
    }
}

/// Sends an event followed by the current user stack.
#[inline(always)]
pub(crate) fn send_with_stack(ctx: &TracePointContext, event: MemEvent) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let scratch: &mut MemEventWithStack = unsafe { &mut *scratch };
    scratch.event = event;
    stack::capture(ctx.as_ptr(), &mut scratch.stack);
    let mut stack_len = scratch.stack.stack_len as usize;
    if stack_len > tracer_common::STACK_COPY_MAX {
        stack_len = tracer_common::STACK_COPY_MAX;
    }
    let size = core::mem::size_of::<MemEvent>() + UserStack::DATA_OFFSET + stack_len;
    // SAFETY: `size` is at most the size of the scratch value.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            (scratch as *mut MemEventWithStack).cast(),
            size as u64,
            wakeup_flags(),
        )
    };
    if ret == 0 {
        count(COUNTER_EVENTS_SENT);
    } else {
        count(COUNTER_RINGBUF_FULL);
    }
}

#[tracepoint]
pub fn tp_sys_enter_mmap(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_MMAP) {
        save(
            tid,
            &Pending {
                kind: kind::MMAP,
                addr: arg(&ctx, 0),
                len: arg(&ctx, 1),
                prot: arg(&ctx, 2) as u32,
                flags: arg(&ctx, 3),
                fd: arg(&ctx, 4),
                old_addr: 0,
                old_len: 0,
            },
        );
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_MMAP) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    let addr = ret(&ctx);
    // Errors are small negative numbers; addresses are below the kernel half.
    if pending.kind != kind::MMAP || addr < 0 {
        return 0;
    }
    let mut event = event_from(&pending, kind::MMAP, tid, 1);
    event.addr = addr as u64;
    send_with_stack(&ctx, event);
    0
}

#[tracepoint]
pub fn tp_sys_enter_munmap(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_MMAP) {
        save(
            tid,
            &Pending {
                kind: kind::MUNMAP,
                addr: arg(&ctx, 0),
                len: arg(&ctx, 1),
                prot: 0,
                flags: 0,
                fd: u64::MAX,
                old_addr: 0,
                old_len: 0,
            },
        );
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_munmap(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_MMAP) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    if pending.kind == kind::MUNMAP && ret(&ctx) == 0 {
        send(&event_from(&pending, kind::MUNMAP, tid, 0));
    }
    0
}

#[tracepoint]
pub fn tp_sys_enter_mremap(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_MMAP) {
        save(
            tid,
            &Pending {
                kind: kind::MREMAP,
                old_addr: arg(&ctx, 0),
                old_len: arg(&ctx, 1),
                len: arg(&ctx, 2),
                flags: arg(&ctx, 3),
                addr: arg(&ctx, 4),
                prot: 0,
                fd: u64::MAX,
            },
        );
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_mremap(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_MMAP) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    let addr = ret(&ctx);
    if pending.kind != kind::MREMAP || addr < 0 {
        return 0;
    }
    let mut event = event_from(&pending, kind::MREMAP, tid, 1);
    event.addr = addr as u64;
    send_with_stack(&ctx, event);
    0
}

#[tracepoint]
pub fn tp_sys_enter_brk(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_BRK) {
        save(
            tid,
            &Pending {
                kind: kind::BRK,
                old_addr: arg(&ctx, 0),
                addr: 0,
                len: 0,
                flags: 0,
                prot: 0,
                fd: u64::MAX,
                old_len: 0,
            },
        );
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_brk(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_BRK) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    // brk(0) only asks for the current break: nothing changes.
    if pending.kind != kind::BRK || pending.old_addr == 0 {
        return 0;
    }
    let mut event = event_from(&pending, kind::BRK, tid, 1);
    event.addr = ret(&ctx) as u64;
    send_with_stack(&ctx, event);
    0
}

#[tracepoint]
pub fn tp_sys_enter_mprotect(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_MMAP) {
        save(
            tid,
            &Pending {
                kind: kind::MPROTECT,
                addr: arg(&ctx, 0),
                len: arg(&ctx, 1),
                prot: arg(&ctx, 2) as u32,
                flags: 0,
                fd: u64::MAX,
                old_addr: 0,
                old_len: 0,
            },
        );
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_mprotect(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_MMAP) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    if pending.kind == kind::MPROTECT && ret(&ctx) == 0 {
        send(&event_from(&pending, kind::MPROTECT, tid, 0));
    }
    0
}

#[tracepoint]
pub fn tp_sys_enter_madvise(ctx: TracePointContext) -> u32 {
    if let Some(tid) = target_tid(TRACK_MMAP) {
        let advice = arg(&ctx, 2);
        // Only advice that gives pages back changes what the target holds.
        if advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE {
            save(
                tid,
                &Pending {
                    kind: kind::MADVISE,
                    addr: arg(&ctx, 0),
                    len: arg(&ctx, 1),
                    flags: advice,
                    prot: 0,
                    fd: u64::MAX,
                    old_addr: 0,
                    old_len: 0,
                },
            );
        }
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_madvise(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_tid(TRACK_MMAP) else {
        return 0;
    };
    let Some(pending) = take(tid) else { return 0 };
    if pending.kind == kind::MADVISE && ret(&ctx) == 0 {
        let mut event = event_from(&pending, kind::MADVISE, tid, 0);
        event.advice = pending.flags as u32;
        event.flags = 0;
        send(&event);
    }
    0
}
