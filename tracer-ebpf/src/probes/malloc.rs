//! The malloc family (`--track malloc`): outstanding allocations and per-stack totals kept
//! in kernel tables; userspace reads them as snapshots.
//!
//! Entry probes save the call (size, stack) by thread; `uretprobe_alloc` records the
//! returned pointer; `uprobe_free` removes it. Allocator functions call each other
//! (`operator new` → `malloc`, `memalign` → `malloc`, `realloc(p, 0)` → `free`), so a call
//! made while the thread is inside a tracked call (its stack pointer below the saved one)
//! is left to the outer call, and a return belongs to the saved call only when the stack
//! pointer is above the one saved at entry. A tail call (`_Znam` → `_Znwm`,
//! `reallocarray` → `realloc`) enters with the same stack pointer and is also left to the
//! outer call, whose single return both see.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_stack,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    MALLOC_STACK_DEPTH, MALLOC_UNKNOWN_STACK, MCOUNTER_ALLOC_BYTES, MCOUNTER_ANNOUNCE_FULL, MCOUNTER_CALLS,
    MCOUNTER_FAILED, MCOUNTER_FREE_BYTES, MCOUNTER_FREES, MCOUNTER_FREES_UNKNOWN, MCOUNTER_LIVE_FULL,
    MCOUNTER_LIVE_FULL_BYTES, MCOUNTER_PENDING_FULL, MCOUNTER_PENDING_STALE, MCOUNTER_REUSED,
    MCOUNTER_SKIPPED, MCOUNTER_STACK_FAILED, MCOUNTER_STACKS_FULL, MCOUNTER_TOTALS_FULL, MCOUNTER_TRACKED,
    MallocLive, MallocStack, MallocStackTotals, TRACK_MALLOC, sampling,
};

use crate::{
    maps::{
        MALLOC_COUNTERS, MALLOC_LIVE, MALLOC_NEW_STACKS, MALLOC_PENDING, MALLOC_STACK_SCRATCH, MALLOC_STACKS,
        MALLOC_TOTALS, MallocPending as Pending, SCRATCH_MALLOC_STACK, add, claim_scratch, min_size,
        sample_bytes, traced, track_flags,
    },
    probes::common::{EEXIST, armed},
};

/// What an entry probe saw.
pub(crate) mod kind {
    /// Leaf allocators: they call no other probed function.
    pub const MALLOC: u32 = 1;
    pub const CALLOC: u32 = 2;
    /// Allocators that may call another probed function.
    pub const REALLOC: u32 = 3;
    pub const POSIX_MEMALIGN: u32 = 4;
    pub const MEMALIGN: u32 = 5;
    pub const OPERATOR_NEW: u32 = 6;
    /// `v8::internal::BackingStore::Reallocate` (see `probes::backing_store`).
    pub const BACKING_REALLOC: u32 = 7;
}

#[inline(always)]
fn count_n(counter: u32, n: u64) {
    if let Some(slot) = MALLOC_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a valid pointer to this CPU's slot.
        unsafe { add(slot, n) };
    }
}

#[inline(always)]
pub(crate) fn count(counter: u32) {
    count_n(counter, 1);
}

/// The current thread id when it belongs to the target and malloc is tracked.
#[inline(always)]
pub(crate) fn target_tid() -> Option<u32> {
    if track_flags() & TRACK_MALLOC == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return None;
    }
    if !armed() {
        // `memtrace run`: the shell that is about to exec the command.
        return None;
    }
    Some(pid_tgid as u32)
}

#[inline(always)]
pub(crate) fn regs(regs: *mut pt_regs) -> (u64, u64) {
    // SAFETY: the context of a uprobe is the user registers saved by the kernel.
    let r = unsafe { &*regs };
    (r.rsp, r.rax)
}

/// Whether the thread is inside a tracked call entered at a higher stack pointer.
#[inline(always)]
fn nested(tid: u32, sp: u64) -> bool {
    match MALLOC_PENDING.get_ptr(tid) {
        // SAFETY: a valid pointer to the map value; only this thread writes its entry.
        Some(p) => sp < unsafe { (*p).sp },
        None => false,
    }
}

#[inline(always)]
pub(crate) fn mix(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}

/// The per-CPU slot where a stack is assembled.
#[inline(always)]
pub(crate) fn stack_scratch() -> Option<*mut MallocStack> {
    MALLOC_STACK_SCRATCH.get_ptr_mut(0)
}

/// The stack at an allocator's entry: through CFI when the allocator is in a module
/// without frame pointers (`probes::cfi`), by frame pointers otherwise.
#[inline(always)]
fn capture_allocator_stack(ctx: &ProbeContext, sp: u64) -> u64 {
    // Uprobe programs are preemptible: another task's may hold this CPU's scratch, the
    // stack and the CFI walk's state (see `maps::SCRATCH_BUSY`), for the whole capture.
    let Some(_claim) = claim_scratch(SCRATCH_MALLOC_STACK) else {
        return MALLOC_UNKNOWN_STACK;
    };
    let walked = crate::probes::cfi::walk(ctx);
    let Some(stack) = MALLOC_STACK_SCRATCH.get_ptr_mut(0) else {
        return MALLOC_UNKNOWN_STACK;
    };
    // SAFETY: the per-CPU scratch slot is ours while `_claim` lives.
    let stack = unsafe { &mut *stack };
    if !walked && !walk_by_frame_pointers(ctx.regs.cast(), sp, stack) {
        return MALLOC_UNKNOWN_STACK;
    }
    hash_and_store(stack)
}

/// The kernel's frame-pointer walk, plus the return address it skips at a function's
/// entry (see `MallocStack::ret_addr`).
#[inline(always)]
fn walk_by_frame_pointers(ctx: *mut core::ffi::c_void, sp: u64, stack: &mut MallocStack) -> bool {
    // SAFETY: the buffer is `ips`, of exactly the size passed.
    let got = unsafe {
        bpf_get_stack(
            ctx,
            stack.ips.as_mut_ptr().cast(),
            (MALLOC_STACK_DEPTH * 8) as u32,
            u64::from(BPF_F_USER_STACK),
        )
    };
    if got <= 0 {
        count(MCOUNTER_STACK_FAILED);
        return false;
    }
    stack.depth = (got as u64 / 8) as u32;
    stack._pad = 0;
    // SAFETY: a checked read of the user stack's top word.
    stack.ret_addr = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    true
}

/// Stores `stack` under the hash of its addresses (see [`store_stack`]); returns its id.
#[inline(always)]
fn hash_and_store(stack: &MallocStack) -> u64 {
    let depth = stack.depth as usize;
    let mut h = mix(0x6d61_6c6c_6f63_0001, stack.ret_addr);
    for i in 0..MALLOC_STACK_DEPTH {
        if i >= depth {
            break;
        }
        h = mix(h, stack.ips[i]);
    }
    if h == MALLOC_UNKNOWN_STACK {
        h = 1;
    }
    match store_stack(h, stack) {
        Stored::New | Stored::Known => h,
        Stored::Lost => MALLOC_UNKNOWN_STACK,
    }
}

/// What became of a stack given to [`store_stack`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Stored by this call, and announced to userspace.
    New,
    /// Already there (or stored meanwhile by another CPU).
    Known,
    /// The table is full (counted).
    Lost,
}

/// Stores `stack` under `h` unless it is there.
#[inline(always)]
pub(crate) fn store_stack(h: u64, stack: &MallocStack) -> Stored {
    if MALLOC_STACKS.get_ptr(h).is_some() {
        return Stored::Known;
    }
    match MALLOC_STACKS.insert(h, stack, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            if MALLOC_NEW_STACKS.output::<u64>(&h, 0).is_err() {
                count(MCOUNTER_ANNOUNCE_FULL);
            }
            Stored::New
        }
        // Stored meanwhile by another CPU.
        Err(e) if e == EEXIST => Stored::Known,
        Err(_) => {
            count(MCOUNTER_STACKS_FULL);
            Stored::Lost
        }
    }
}

#[inline(always)]
fn totals_for(stack_id: u64, ts_ns: u64) -> Option<*mut MallocStackTotals> {
    if let Some(t) = MALLOC_TOTALS.get_ptr_mut(stack_id) {
        return Some(t);
    }
    let init = MallocStackTotals { first_ts_ns: ts_ns, ..MallocStackTotals::default() };
    match MALLOC_TOTALS.insert(stack_id, &init, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if e == EEXIST => {}
        Err(_) => {
            count(MCOUNTER_TOTALS_FULL);
            return None;
        }
    }
    MALLOC_TOTALS.get_ptr_mut(stack_id)
}

#[inline(always)]
fn account_alloc(live: &MallocLive) {
    count(MCOUNTER_TRACKED);
    count_n(MCOUNTER_ALLOC_BYTES, live.weight);
    if let Some(t) = totals_for(live.stack_id, live.ts_ns) {
        // SAFETY: a valid pointer to this CPU's value (see `count_n`).
        let t = unsafe { &mut *t };
        // SAFETY: pointers to fields of this CPU's value (see `maps::add`).
        unsafe {
            add(&raw mut t.alloc_bytes, live.weight);
            add(&raw mut t.alloc_count, sampling::weight_count(live.size, sample_bytes()));
        }
        t.last_ts_ns = live.ts_ns;
        if t.first_ts_ns == 0 {
            t.first_ts_ns = live.ts_ns;
        }
    }
}

#[inline(always)]
pub(crate) fn account_free(live: &MallocLive) {
    count(MCOUNTER_FREES);
    count_n(MCOUNTER_FREE_BYTES, live.weight);
    if let Some(t) = MALLOC_TOTALS.get_ptr_mut(live.stack_id) {
        // SAFETY: a valid pointer to this CPU's value (see `count_n`).
        let t = unsafe { &mut *t };
        // SAFETY: as in `account_alloc`.
        unsafe {
            add(&raw mut t.free_bytes, live.weight);
            add(&raw mut t.free_count, sampling::weight_count(live.size, sample_bytes()));
        }
    }
}

/// Takes `ptr` out of the live table; returns its entry if it was there.
#[inline(always)]
pub(crate) fn take_live(ptr: u64) -> Option<MallocLive> {
    // SAFETY: the value is copied out before the entry is removed; only a free of this
    // address (by the program that owns it) removes it.
    let live = unsafe { MALLOC_LIVE.get(ptr) }.copied()?;
    // Two frees of one pointer racing (a double free): only one accounts it.
    MALLOC_LIVE.remove(ptr).ok()?;
    Some(live)
}

/// Records the block `ptr` returned for `pending`.
#[inline(always)]
fn record(ptr: u64, pending: &Pending) {
    record_block(ptr, pending.size, pending.stack_id, pending.ts_ns);
}

/// Records the block `ptr` of `size` bytes allocated at `stack_id` at `ts_ns`.
#[inline(always)]
pub(crate) fn record_block(ptr: u64, size: u64, stack_id: u64, ts_ns: u64) {
    let live = MallocLive { size, stack_id, ts_ns, weight: sampling::weight_bytes(size, sample_bytes()) };
    // Still in the table: its free went through a path that is not probed.
    if let Some(previous) = take_live(ptr) {
        count(MCOUNTER_REUSED);
        account_free(&previous);
    }
    if MALLOC_LIVE.insert(ptr, &live, u64::from(BPF_ANY)).is_err() {
        count(MCOUNTER_LIVE_FULL);
        count_n(MCOUNTER_LIVE_FULL_BYTES, live.weight);
        return;
    }
    account_alloc(&live);
}

/// Whether an allocation of `size` bytes is recorded (`--malloc-min-size`, sampling).
#[inline(always)]
pub(crate) fn keep(size: u64) -> bool {
    if size < min_size() {
        return false;
    }
    match sampling::sample_threshold(size, sample_bytes()) {
        None => true,
        // SAFETY: no preconditions.
        Some(threshold) => u64::from(unsafe { bpf_get_prandom_u32() }) < threshold,
    }
}

/// The common entry: decides whether to record, takes the stack, saves the call.
#[inline(always)]
fn enter(ctx: &ProbeContext, call: u32, size: u64, old_ptr: u64, memptr: u64) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    count(MCOUNTER_CALLS);
    let (sp, _) = regs(ctx.regs);
    if let Some(p) = MALLOC_PENDING.get_ptr(tid) {
        // SAFETY: a valid pointer to the map value; only this thread writes its entry.
        let saved_sp = unsafe { (*p).sp };
        if sp <= saved_sp {
            // Nested in (or tail-called from) a call already being tracked.
            return 0;
        }
        // The saved call never returned (longjmp, or an exception through it).
        count(MCOUNTER_PENDING_STALE);
        let _ = MALLOC_PENDING.remove(tid);
    }
    let track = keep(size);
    // SAFETY: no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let mut pending = Pending {
        kind: call,
        track: u32::from(track),
        size,
        stack_id: MALLOC_UNKNOWN_STACK,
        ts_ns,
        sp,
        old_ptr,
        has_old: 0,
        old: MallocLive::default(),
        memptr,
    };
    if call == kind::REALLOC && old_ptr != 0 {
        if let Some(old) = take_live(old_ptr) {
            pending.old = old;
            pending.has_old = 1;
        } else {
            count(MCOUNTER_FREES_UNKNOWN);
        }
    }
    if track {
        pending.stack_id = capture_allocator_stack(ctx, sp);
    } else {
        count(MCOUNTER_SKIPPED);
        // A leaf allocator that is not recorded needs no return: nothing nests in it.
        if (call == kind::MALLOC || call == kind::CALLOC) && pending.has_old == 0 {
            return 0;
        }
    }
    if MALLOC_PENDING.insert(tid, &pending, u64::from(BPF_ANY)).is_err() {
        count(MCOUNTER_PENDING_FULL);
        if pending.has_old != 0 {
            // Put the old block back rather than lose it.
            let _ = MALLOC_LIVE.insert(old_ptr, &pending.old, u64::from(BPF_ANY));
        }
    }
    0
}

/// `checked_mul` without the 128-bit multiplication the BPF backend lacks. Conservative:
/// products of 2^63 bytes and more (which no allocator serves) count as overflowing.
#[inline(always)]
fn mul(a: u64, b: u64) -> Option<u64> {
    let bits = (64 - a.leading_zeros()) + (64 - b.leading_zeros());
    if bits <= 64 || a == 0 || b == 0 { Some(a.wrapping_mul(b)) } else { None }
}

#[uprobe]
pub fn uprobe_malloc(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(&ctx, kind::MALLOC, size, 0, 0)
}

#[uprobe]
pub fn uprobe_calloc(ctx: ProbeContext) -> u32 {
    let n: u64 = ctx.arg(0).unwrap_or(0);
    let each: u64 = ctx.arg(1).unwrap_or(0);
    // An overflowing product fails with ENOMEM: nothing to record, but the call is seen.
    let size = mul(n, each).unwrap_or(u64::MAX);
    enter(&ctx, kind::CALLOC, size, 0, 0)
}

#[uprobe]
pub fn uprobe_realloc(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(&ctx, kind::REALLOC, size, ptr, 0)
}

#[uprobe]
pub fn uprobe_reallocarray(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let n: u64 = ctx.arg(1).unwrap_or(0);
    let each: u64 = ctx.arg(2).unwrap_or(0);
    match mul(n, each) {
        Some(size) => enter(&ctx, kind::REALLOC, size, ptr, 0),
        // Fails with ENOMEM and leaves the block alone.
        None => 0,
    }
}

#[uprobe]
pub fn uprobe_posix_memalign(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(&ctx, kind::POSIX_MEMALIGN, size, 0, memptr)
}

/// `memalign(alignment, size)` and `aligned_alloc(alignment, size)`.
#[uprobe]
pub fn uprobe_memalign(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(&ctx, kind::MEMALIGN, size, 0, 0)
}

#[uprobe]
pub fn uprobe_valloc(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(&ctx, kind::MEMALIGN, size, 0, 0)
}

/// `pvalloc` rounds the size up to whole pages, and the caller may use all of them.
#[uprobe]
pub fn uprobe_pvalloc(ctx: ProbeContext) -> u32 {
    const PAGE: u64 = 4096;
    let size: u64 = ctx.arg(0).unwrap_or(0);
    let size = size.saturating_add(PAGE - 1) & !(PAGE - 1);
    enter(&ctx, kind::MEMALIGN, size.max(PAGE), 0, 0)
}

/// The C++ `operator new` family (size first): probed so that the stack is taken where the
/// caller's frame is intact, rather than in `malloc` below a frame without a frame pointer.
#[uprobe]
pub fn uprobe_operator_new(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(&ctx, kind::OPERATOR_NEW, size, 0, 0)
}

#[uprobe]
pub fn uprobe_free(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    release(&ctx, ptr)
}

/// A free of `ptr`: taken out of the table at entry, before another thread can be given
/// the same address.
#[inline(always)]
pub(crate) fn release(ctx: &ProbeContext, ptr: u64) -> u32 {
    if ptr == 0 {
        return 0;
    }
    let Some(tid) = target_tid() else { return 0 };
    if let Some(live) = take_live(ptr) {
        account_free(&live);
    } else {
        let (sp, _) = regs(ctx.regs);
        // realloc(p, 0) frees p itself; its return accounts for it.
        if !nested(tid, sp) {
            count(MCOUNTER_FREES_UNKNOWN);
        }
    }
    0
}

/// The return of every allocator probed at entry (one program, many attach points).
#[uretprobe]
pub fn uretprobe_alloc(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_tid() else { return 0 };
    let Some(p) = MALLOC_PENDING.get_ptr(tid) else {
        return 0;
    };
    let (sp, ret) = regs(ctx.regs);
    // SAFETY: a valid pointer to the map value; only this thread writes its entry.
    let pending = unsafe { *p };
    if sp <= pending.sp {
        // The return of a nested call: the outer call's return comes later.
        return 0;
    }
    let _ = MALLOC_PENDING.remove(tid);
    finish(&pending, ret);
    0
}

#[inline(always)]
fn finish(pending: &Pending, ret: u64) {
    match pending.kind {
        kind::BACKING_REALLOC => crate::probes::backing_store::reallocated(pending, ret),
        kind::REALLOC => {
            if ret == 0 {
                if pending.size == 0 && pending.old_ptr != 0 {
                    // glibc's realloc(p, 0) frees p and returns NULL.
                    if pending.has_old != 0 {
                        account_free(&pending.old);
                    }
                } else {
                    count(MCOUNTER_FAILED);
                    if pending.has_old != 0 {
                        // A failed realloc leaves the block as it was.
                        let _ = MALLOC_LIVE.insert(pending.old_ptr, &pending.old, u64::from(BPF_NOEXIST));
                    }
                }
                return;
            }
            if pending.has_old != 0 {
                account_free(&pending.old);
            }
            if pending.track != 0 {
                record(ret, pending);
            }
        }
        kind::POSIX_MEMALIGN => {
            if ret as u32 != 0 {
                count(MCOUNTER_FAILED);
                return;
            }
            // SAFETY: a checked read of the pointer the call just wrote.
            let ptr = unsafe { bpf_probe_read_user(pending.memptr as *const u64) }.unwrap_or(0);
            if ptr != 0 && pending.track != 0 {
                record(ptr, pending);
            }
        }
        _ => {
            if ret == 0 {
                count(MCOUNTER_FAILED);
            } else if pending.track != 0 {
                record(ret, pending);
            }
        }
    }
}
