//! What the probe programs share: the target filter, event headers, sends to the ring
//! buffer, and the error convention.
//!
//! Every program is a thin `fn x(ctx) -> u32 { run(try_x(&ctx)) }`: `try_x` returns
//! `Err(counter)` on any failure, and [`run`] counts it under that `COUNTER_*`, so that
//! nothing is dropped without a count userspace reports.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_ringbuf_output},
    },
    programs::TracePointContext,
};
use tracer_common::{
    COMM_LEN, COUNTER_EVENTS_SENT, COUNTER_PROBE_FAILED, COUNTER_RINGBUF_FULL, COUNTER_TRACED_FULL,
    EventHeader, MemEvent, MemEventWithStack, ProcEvent, STACK_COPY_MAX, UserStack,
};

use crate::{
    maps::{
        CGROUP_HIERARCHY, CGROUP_MODE, EVENTS, MALLOC_STATE, MALLOC_WAIT_EXEC, SCRATCH, SCRATCH_EVENT,
        TRACED, cgroup_traced, claim_scratch, count, global, traced, track_flags, wakeup_flags,
    },
    probes::stack,
};

/// A failure: the `COUNTER_*` it is counted under.
pub type Failure = u32;

/// `-EEXIST` from a map update with `BPF_NOEXIST`: the key is there already.
pub const EEXIST: i32 = -17;

/// The body of every program: counts a failure, and returns 0 either way (a tracing
/// program's return value is ignored, a probe's must be 0).
#[inline(always)]
pub fn run(result: Result<u32, Failure>) -> u32 {
    match result {
        Ok(value) => value,
        Err(counter) => {
            count(counter);
            0
        }
    }
}

/// Reads a field of the tracepoint record at `offset`, or fails with `failure`.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: usize, failure: Failure) -> Result<T, Failure> {
    // SAFETY: a checked read (`bpf_probe_read_kernel`) of the record; a wrong offset
    // reads a wrong value, never faults.
    unsafe { ctx.read_at::<T>(offset) }.map_err(|_| failure)
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The current thread id when it belongs to a traced process and `family` (`TRACK_*`) is
/// tracked.
#[inline(always)]
pub fn target_tid(family: u32) -> Option<u32> {
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
pub fn header(kind: u32, tid: u32, has_stack: u32) -> EventHeader {
    EventHeader {
        kind,
        tgid: current_tgid(),
        tid,
        has_stack,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Sends an event without a stack.
#[inline(always)]
pub fn send_mem(event: &MemEvent) -> Result<u32, Failure> {
    EVENTS.output::<MemEvent>(event, wakeup_flags()).map_err(|_| COUNTER_RINGBUF_FULL)?;
    count(COUNTER_EVENTS_SENT);
    Ok(0)
}

/// Sends an event followed by the current user stack, assembled in the per-CPU scratch
/// buffer and sent cut to the bytes copied (a ring buffer reservation has a fixed size:
/// reserving the largest stack for every event would hold the ring's room for nothing).
/// Without the scratch buffer the event goes without its stack.
#[inline(always)]
pub fn send_with_stack(ctx: &TracePointContext, mut event: MemEvent) -> Result<u32, Failure> {
    let Some(_claim) = claim_scratch(SCRATCH_EVENT) else {
        event.header.has_stack = 0;
        return send_mem(&event);
    };
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(COUNTER_PROBE_FAILED)?;
    // SAFETY: the per-CPU scratch slot is ours while `_claim` lives.
    let scratch: &mut MemEventWithStack = unsafe { &mut *scratch };
    event.header.has_stack = 1;
    scratch.event = event;
    stack::capture(ctx.as_ptr(), &mut scratch.stack);
    let mut stack_len = scratch.stack.stack_len as usize;
    if stack_len > STACK_COPY_MAX {
        stack_len = STACK_COPY_MAX;
    }
    let size = core::mem::size_of::<MemEvent>() + UserStack::DATA_OFFSET + stack_len;
    // SAFETY: `size` is at most the size of the scratch value.
    let ret = unsafe {
        bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            (scratch as *mut MemEventWithStack).cast(),
            size as u64,
            wakeup_flags(),
        )
    };
    if ret != 0 {
        return Err(COUNTER_RINGBUF_FULL);
    }
    count(COUNTER_EVENTS_SENT);
    Ok(0)
}

/// Sends a lifecycle event, waking the reader at once: a new process's memory map is best
/// read before it changes (or the process ends), and these events are rare.
#[inline(always)]
pub fn send_proc(kind: u32, tgid: u32, parent_tgid: u32, comm: [u8; COMM_LEN]) -> Result<u32, Failure> {
    let event = ProcEvent {
        header: EventHeader {
            kind,
            tgid,
            tid: bpf_get_current_pid_tgid() as u32,
            has_stack: 0,
            // SAFETY: no preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        parent_tgid,
        _pad: 0,
        comm,
    };
    EVENTS.output::<ProcEvent>(&event, u64::from(BPF_RB_FORCE_WAKEUP)).map_err(|_| COUNTER_RINGBUF_FULL)?;
    count(COUNTER_EVENTS_SENT);
    Ok(0)
}

/// Adds `tgid` to the traced set.
#[inline(always)]
pub fn trace(tgid: u32) -> Result<(), Failure> {
    TRACED.insert(&tgid, &1, u64::from(BPF_ANY)).map_err(|_| COUNTER_TRACED_FULL)
}

/// At the exec of an untraced process, `--cgroup`: whether it runs in a traced v2 cgroup
/// (it was spawned into it, `clone3(CLONE_INTO_CGROUP)`, which fires no attach event), in
/// which case it is traced from now on.
#[inline(always)]
pub fn joins_at_exec(tgid: u32) -> Result<bool, Failure> {
    if global(&CGROUP_MODE) == 0 || global(&CGROUP_HIERARCHY) != 0 {
        return Ok(false);
    }
    // SAFETY: no preconditions; the current task's cgroup id on the v2 hierarchy.
    let id = unsafe { bpf_get_current_cgroup_id() };
    if !cgroup_traced(id) {
        return Ok(false);
    }
    trace(tgid)?;
    Ok(true)
}

/// Whether the traced process is the one to follow: always, except under `memtrace run`
/// before the waiting shell has exec'd the command (`MALLOC_WAIT_EXEC`).
#[inline(always)]
pub fn armed() -> bool {
    global(&MALLOC_WAIT_EXEC) == 0 || MALLOC_STATE.get(0).is_some_and(|exec_seen| *exec_seen != 0)
}

/// Called at `sched:sched_process_exec` of a traced process (see `probes::process`): the
/// probes are armed from its first instruction on (with `MALLOC_WAIT_EXEC`).
#[inline(always)]
pub fn arm_after_exec() {
    if let Some(state) = MALLOC_STATE.get_ptr_mut(0) {
        // SAFETY: a valid pointer to the array's only value.
        unsafe { *state = 1 };
    }
}
