//! Node's Buffers and ArrayBuffers by their V8 backing stores (`--malloc-probes
//! node-buffers`): one trap per allocation and one per free.
//!
//! Every ArrayBuffer's memory belongs to a `v8::internal::BackingStore`. V8 allocates it
//! in `BackingStore::Allocate` and, once the object holds its pointer and length, calls
//! `SetAllocatorFromIsolate(this, isolate)` on it; memory that Node allocated itself is
//! wrapped by `BackingStore::WrapAllocation`; `~BackingStore` releases either. The tables
//! and the accounting are the malloc family's (`probes::malloc`), keyed by the memory's
//! address. The object's first two fields are `void* buffer_start_` and `size_t
//! byte_length_` in every V8 from 8.x (Node 14) to 12.x (Node 22).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use tracer_common::{MCOUNTER_CALLS, MCOUNTER_FAILED, MCOUNTER_FREES_UNKNOWN, MCOUNTER_SKIPPED, MallocLive};

use crate::probes::js_stack;
use crate::probes::malloc::{
    MALLOC_LIVE, MALLOC_PENDING, Pending, account_free, count, keep, kind, record_block, regs, release,
    take_live, target_tid,
};

/// Offsets in `v8::internal::BackingStore`.
const BUFFER_START: u64 = 0;
const BYTE_LENGTH: u64 = 8;

/// The memory and length a backing store holds (user memory, read checked).
#[inline(always)]
fn read_store(store: u64) -> Option<(u64, u64)> {
    if store == 0 {
        return None;
    }
    // SAFETY: checked reads of the target's memory.
    let start = unsafe { bpf_probe_read_user((store + BUFFER_START) as *const u64) }.ok()?;
    // SAFETY: as above.
    let length = unsafe { bpf_probe_read_user((store + BYTE_LENGTH) as *const u64) }.ok()?;
    Some((start, length))
}

/// Records `length` bytes at `start`, allocated by the caller of the probed function.
#[inline(always)]
fn allocated(ctx: &ProbeContext, start: u64, length: u64) -> u32 {
    if start == 0 || length == 0 {
        return 0;
    }
    if target_tid().is_none() {
        return 0;
    }
    count(MCOUNTER_CALLS);
    if !keep(length) {
        count(MCOUNTER_SKIPPED);
        return 0;
    }
    // SAFETY: no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let stack_id = js_stack::capture(ctx.regs);
    record_block(start, length, stack_id, ts_ns);
    0
}

/// `v8::internal::BackingStore::SetAllocatorFromIsolate(this, isolate)`, called by
/// `BackingStore::Allocate` on every store it makes.
#[uprobe]
pub fn uprobe_backing_store_new(ctx: ProbeContext) -> u32 {
    let store: u64 = ctx.arg(0).unwrap_or(0);
    match read_store(store) {
        Some((start, length)) => allocated(&ctx, start, length),
        None => 0,
    }
}

/// `BackingStore::WrapAllocation(void* start, size_t length, deleter, data, shared)`; it
/// returns a `unique_ptr` through a hidden first argument.
#[uprobe]
pub fn uprobe_backing_store_wrap(ctx: ProbeContext) -> u32 {
    let start: u64 = ctx.arg(1).unwrap_or(0);
    let length: u64 = ctx.arg(2).unwrap_or(0);
    allocated(&ctx, start, length)
}

/// `BackingStore::WrapAllocation(Isolate*, void* start, size_t length, shared, free)`.
#[uprobe]
pub fn uprobe_backing_store_wrap_isolate(ctx: ProbeContext) -> u32 {
    let start: u64 = ctx.arg(2).unwrap_or(0);
    let length: u64 = ctx.arg(3).unwrap_or(0);
    allocated(&ctx, start, length)
}

/// `BackingStore::~BackingStore(this)`: its memory is released.
#[uprobe]
pub fn uprobe_backing_store_free(ctx: ProbeContext) -> u32 {
    let store: u64 = ctx.arg(0).unwrap_or(0);
    match read_store(store) {
        Some((start, _)) => release(&ctx, start),
        None => 0,
    }
}

/// `BackingStore::Reallocate(this, isolate, new_length)`: the store keeps its allocation
/// site and gets a new address and length, read at the return (`reallocated`).
#[uprobe]
pub fn uprobe_backing_store_realloc(ctx: ProbeContext) -> u32 {
    let store: u64 = ctx.arg(0).unwrap_or(0);
    let Some(tid) = target_tid() else { return 0 };
    let Some((start, _)) = read_store(store) else { return 0 };
    let Some(old) = take_live(start) else {
        // Not recorded (allocated before tracing, or not sampled): nothing to move.
        count(MCOUNTER_FREES_UNKNOWN);
        return 0;
    };
    let (sp, _) = regs(ctx.regs);
    let pending = Pending {
        kind: kind::BACKING_REALLOC,
        track: 1,
        size: old.size,
        stack_id: old.stack_id,
        ts_ns: old.ts_ns,
        sp,
        old_ptr: start,
        has_old: 1,
        old,
        memptr: store,
    };
    if MALLOC_PENDING.insert(tid, &pending, 0).is_err() {
        let _ = MALLOC_LIVE.insert(start, &old, u64::from(BPF_NOEXIST));
    }
    0
}

/// The return of `BackingStore::Reallocate` (a `bool`, true when the store was moved).
#[inline(always)]
pub(crate) fn reallocated(pending: &Pending, ret: u64) {
    let moved = ret as u8 != 0;
    let store = if moved { read_store(pending.memptr) } else { None };
    let Some((start, length)) = store else {
        if moved {
            count(MCOUNTER_FAILED);
        }
        // A failed reallocation leaves the store as it was.
        let _ = MALLOC_LIVE.insert(pending.old_ptr, &pending.old, u64::from(BPF_NOEXIST));
        return;
    };
    account_free(&pending.old);
    let old: &MallocLive = &pending.old;
    record_block(start, length, old.stack_id, old.ts_ns);
}
