//! The traced set of processes follows the process tree in the kernel: a traced process's
//! new child is traced from its first instruction (with `FOLLOW_CHILDREN`), an exec is
//! announced so that userspace drops the old image, and a process that ends leaves the set.
//!
//! New processes are seen at `task:task_newtask` rather than `sched:sched_process_fork`:
//! both fire in the parent before the child first runs, but only `task_newtask` carries
//! the clone flags, which tell a new thread (same process, already traced) from a new
//! process.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_RB_FORCE_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_send_signal},
    macros::{tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};
use tracer_common::{
    COMM_LEN, COUNTER_EVENTS_SENT, COUNTER_PROBE_FAILED, COUNTER_RINGBUF_FULL, COUNTER_TRACED_FULL,
    EventHeader, ProcEvent, kind,
};

use crate::{
    maps::{EVENTS, TRACED, count, exit_group_dead_offset, follow_children, traced},
    probes::{
        cgroup::joins_at_exec,
        malloc::{arm_after_exec, armed},
    },
};

/// Offsets in the `task:task_newtask` record (its `format` file; unchanged since the
/// tracepoint was added in 3.7).
const NEWTASK_PID_OFFSET: usize = 8;
const NEWTASK_COMM_OFFSET: usize = 12;
const NEWTASK_CLONE_FLAGS_OFFSET: usize = 32;
const CLONE_THREAD: u64 = 0x0001_0000;

/// Sends a lifecycle event, waking the reader at once: a new process's memory map is best
/// read before it changes (or the process ends), and these events are rare.
#[inline(always)]
pub(crate) fn send(kind: u32, tgid: u32, parent_tgid: u32, comm: [u8; COMM_LEN]) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = ProcEvent {
        header: EventHeader {
            kind,
            tgid,
            tid: pid_tgid as u32,
            has_stack: 0,
            // SAFETY: no preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        parent_tgid,
        _pad: 0,
        comm,
    };
    if EVENTS.output::<ProcEvent>(&event, u64::from(BPF_RB_FORCE_WAKEUP)).is_ok() {
        count(COUNTER_EVENTS_SENT);
        true
    } else {
        count(COUNTER_RINGBUF_FULL);
        false
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[tracepoint]
pub fn tp_task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx).unwrap_or_else(|_| {
        count(COUNTER_PROBE_FAILED);
        0
    })
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i64> {
    if !follow_children() {
        return Ok(0);
    }
    let parent = current_tgid();
    if !traced(parent) {
        return Ok(0);
    }
    // SAFETY: fixed offsets of the task_newtask record, read through the checked helper.
    let flags = unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS_OFFSET) }?;
    if flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    // SAFETY: as above.
    let child = unsafe { ctx.read_at::<i32>(NEWTASK_PID_OFFSET) }? as u32;
    if TRACED.insert(&child, &1, u64::from(BPF_ANY)).is_err() {
        count(COUNTER_TRACED_FULL);
        return Ok(0);
    }
    // SAFETY: as above.
    let comm = unsafe { ctx.read_at::<[u8; COMM_LEN]>(NEWTASK_COMM_OFFSET) }?;
    let _ = send(kind::FORK, child, parent, comm);
    Ok(0)
}

#[tracepoint]
pub fn tp_sched_process_exec(ctx: TracePointContext) -> u32 {
    try_sched_process_exec(&ctx).unwrap_or_else(|_| {
        count(COUNTER_PROBE_FAILED);
        0
    })
}

fn try_sched_process_exec(_ctx: &TracePointContext) -> Result<u32, i64> {
    let tgid = current_tgid();
    if !traced(tgid) {
        if joins_at_exec(tgid) {
            send(kind::JOIN, tgid, 0, bpf_get_current_comm()?);
        }
        return Ok(0);
    }
    arm_after_exec();
    // The comm is the new image's by now (set while the binary was loaded).
    let _ = send(kind::EXEC, tgid, 0, bpf_get_current_comm()?);
    Ok(0)
}

#[tracepoint]
pub fn tp_sched_process_exit(ctx: TracePointContext) -> u32 {
    try_sched_process_exit(&ctx).unwrap_or_else(|_| {
        count(COUNTER_PROBE_FAILED);
        0
    })
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !traced(tgid) {
        return Ok(0);
    }
    let offset = exit_group_dead_offset();
    let group_dead = if offset == 0 {
        // Kernels without `group_dead`: the leader's exit ends the process.
        pid_tgid as u32 == tgid
    } else {
        // SAFETY: the offset comes from the tracepoint's format file; checked read.
        unsafe { ctx.read_at::<u8>(offset as usize) }? != 0
    };
    if !group_dead {
        return Ok(0);
    }
    // Absent already is fine: the entry is gone either way.
    let _ = TRACED.remove(&tgid);
    let _ = send(kind::EXIT, tgid, 0, bpf_get_current_comm()?);
    Ok(0)
}

const SIGSTOP: u32 = 19;

/// `_exit` of a `memtrace run` command (attached for its pid only): announces the exit and
/// stops the process, so that its memory map is still there when userspace reads it; a
/// program that lives a millisecond is otherwise gone before its modules are known.
/// Userspace resumes it at once (`SIGCONT`). Nothing is stopped when the announcement
/// cannot be sent: nobody would resume it.
#[uprobe]
pub fn uprobe_exit(ctx: ProbeContext) -> u32 {
    let tgid = current_tgid();
    // Before the exec the waiting shell is not the command.
    if !traced(tgid) || !armed() {
        return 0;
    }
    let status: u64 = ctx.arg(0).unwrap_or(0);
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    if send(kind::EXITING, tgid, status as u32, comm) {
        // SAFETY: no preconditions; signals the current process.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
    0
}
