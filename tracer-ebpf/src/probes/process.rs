//! The traced set of processes follows the process tree in the kernel: a traced process's
//! new child is traced from its first instruction (with `FOLLOW_CHILDREN`), an exec is
//! announced so that userspace drops the old image, and a process that ends leaves the set.
//! A thread that ends takes its unfinished per-thread entries with it.
//!
//! New processes are seen at `task:task_newtask` rather than `sched:sched_process_fork`:
//! both fire in the parent before the child first runs, but only `task_newtask` carries
//! the clone flags, which tell a new thread (same process, already traced) from a new
//! process.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_send_signal},
    macros::{tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};
use tracer_common::{
    COMM_LEN, COUNTER_MALLOC_EXITED_INSIDE, COUNTER_PENDING_STALE, COUNTER_PROBE_FAILED, kind,
};

use crate::{
    maps::{
        CGROUP_MODE, MALLOC_PENDING, PENDING, TRACED, count, exit_group_dead_offset, follow_children, global,
        traced,
    },
    probes::common::{
        Failure, arm_after_exec, armed, current_tgid, field, joins_at_exec, run, send_proc, trace,
    },
};

/// Offsets in the `task:task_newtask` record (its `format` file; unchanged since the
/// tracepoint was added in 3.7).
const NEWTASK_PID_OFFSET: usize = 8;
const NEWTASK_COMM_OFFSET: usize = 12;
const NEWTASK_CLONE_FLAGS_OFFSET: usize = 32;
const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn comm() -> Result<[u8; COMM_LEN], Failure> {
    bpf_get_current_comm().map_err(|_| COUNTER_PROBE_FAILED)
}

#[tracepoint]
pub fn tp_task_newtask(ctx: TracePointContext) -> u32 {
    run(try_task_newtask(&ctx))
}

#[inline(always)]
fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, Failure> {
    if !follow_children() {
        return Ok(0);
    }
    let parent = current_tgid();
    if !traced(parent) {
        return Ok(0);
    }
    let flags = field::<u64>(ctx, NEWTASK_CLONE_FLAGS_OFFSET, COUNTER_PROBE_FAILED)?;
    if flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    let child = field::<i32>(ctx, NEWTASK_PID_OFFSET, COUNTER_PROBE_FAILED)? as u32;
    trace(child)?;
    let comm = field::<[u8; COMM_LEN]>(ctx, NEWTASK_COMM_OFFSET, COUNTER_PROBE_FAILED)?;
    send_proc(kind::FORK, child, parent, comm)
}

#[tracepoint]
pub fn tp_sched_process_exec(_ctx: TracePointContext) -> u32 {
    run(try_sched_process_exec())
}

#[inline(always)]
fn try_sched_process_exec() -> Result<u32, Failure> {
    let tgid = current_tgid();
    if !traced(tgid) {
        if joins_at_exec(tgid)? {
            send_proc(kind::JOIN, tgid, 0, comm()?)?;
        }
        return Ok(0);
    }
    arm_after_exec();
    // The comm is the new image's by now (set while the binary was loaded).
    send_proc(kind::EXEC, tgid, 0, comm()?)
}

#[tracepoint]
pub fn tp_sched_process_exit(ctx: TracePointContext) -> u32 {
    run(try_sched_process_exit(&ctx))
}

/// Removes what the exiting thread `tid` left in the per-thread tables: a call it entered
/// and will never return from. Only threads of traced processes have entries, and under
/// `--cgroup` those of processes that left the traced set (so every thread is looked at
/// there: two lookups, measured at ~0.6 µs per thread exit on this loaded VM).
#[inline(always)]
fn forget_thread(tid: u32) {
    // An address-space syscall cannot be interrupted by the thread's end (its exit
    // tracepoint fires first), so an entry here is one whose exit program was not attached
    // yet.
    if PENDING.get_ptr(&tid).is_some() && PENDING.remove(&tid).is_ok() {
        count(COUNTER_PENDING_STALE);
    }
    // A thread can end inside an allocator: `exit` from a `new_handler`, or a signal
    // handler that ends the thread while `malloc` waits in `mmap`.
    if MALLOC_PENDING.get_ptr(&tid).is_some() && MALLOC_PENDING.remove(&tid).is_ok() {
        count(COUNTER_MALLOC_EXITED_INSIDE);
    }
}

#[inline(always)]
fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, Failure> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let traced = traced(tgid);
    if traced || global(&CGROUP_MODE) != 0 {
        forget_thread(pid_tgid as u32);
    }
    if !traced {
        return Ok(0);
    }
    let offset = exit_group_dead_offset();
    let group_dead = if offset == 0 {
        // Kernels without `group_dead`: the leader's exit ends the process.
        pid_tgid as u32 == tgid
    } else {
        field::<u8>(ctx, offset as usize, COUNTER_PROBE_FAILED)? != 0
    };
    if !group_dead {
        return Ok(0);
    }
    // Absent already is fine: the entry is gone either way.
    let _ = TRACED.remove(&tgid);
    send_proc(kind::EXIT, tgid, 0, comm()?)
}

const SIGSTOP: u32 = 19;

/// `_exit` of a `memtrace run` command (attached for its pid only): announces the exit and
/// stops the process, so that its memory map is still there when userspace reads it; a
/// program that lives a millisecond is otherwise gone before its modules are known.
/// Userspace resumes it at once (`SIGCONT`). Nothing is stopped when the announcement
/// cannot be sent: nobody would resume it.
#[uprobe]
pub fn uprobe_exit(ctx: ProbeContext) -> u32 {
    run(try_uprobe_exit(&ctx))
}

#[inline(always)]
fn try_uprobe_exit(ctx: &ProbeContext) -> Result<u32, Failure> {
    let tgid = current_tgid();
    // Before the exec the waiting shell is not the command.
    if !traced(tgid) || !armed() {
        return Ok(0);
    }
    let status: u64 = ctx.arg(0).ok_or(COUNTER_PROBE_FAILED)?;
    // Without its comm the announcement still goes: the stop must be announced.
    let comm = comm();
    send_proc(kind::EXITING, tgid, status as u32, comm.unwrap_or([0; COMM_LEN]))?;
    // SAFETY: no preconditions; signals the current process.
    unsafe { bpf_send_signal(SIGSTOP) };
    comm.map(|_| 0)
}
