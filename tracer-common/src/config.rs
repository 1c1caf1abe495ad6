//! Settings userspace writes into the eBPF object's globals before loading it.

/// Bit in [`TRACK_FLAGS`]: mmap, munmap, mremap, mprotect, madvise.
pub const TRACK_MMAP: u32 = 1 << 0;
/// Bit in [`TRACK_FLAGS`]: brk.
pub const TRACK_BRK: u32 = 1 << 1;
/// Bit in [`TRACK_FLAGS`]: user page faults.
pub const TRACK_FAULTS: u32 = 1 << 2;
/// Bit in [`TRACK_FLAGS`]: OOM kills, machine-wide.
pub const TRACK_OOM: u32 = 1 << 3;
/// Bit in [`TRACK_FLAGS`]: malloc-family uprobes (see [`crate::malloc`]).
pub const TRACK_MALLOC: u32 = 1 << 4;

/// Name of the global that is 1 when the processes a traced process forks are traced too
/// (`u32`; `--children`): the kernel adds them to [`MAP_TRACED`] itself.
pub const GLOBAL_FOLLOW_CHILDREN: &str = "FOLLOW_CHILDREN";
/// Name of the global holding the only traced tgid (`u32`) when the traced set cannot
/// change (one target, no `--children`), 0 otherwise: probes then compare with it instead
/// of looking [`MAP_TRACED`] up (measured here: 54 against 77 ns per page fault of an
/// untraced process, which every process on the machine pays).
pub const GLOBAL_SOLE_TGID: &str = "SOLE_TGID";
/// Name of the global holding the offset of `group_dead` in the `sched:sched_process_exit`
/// record (`u32`, from its `format` file), or 0 where the kernel lacks the field (then the
/// exit of the thread-group leader ends the process).
pub const GLOBAL_EXIT_GROUP_DEAD_OFFSET: &str = "EXIT_GROUP_DEAD_OFFSET";
/// Name of the global that is 1 when a cgroup is traced (`u32`; `--cgroup`): a process
/// that joins one of the cgroups in [`MAP_CGROUPS`] is traced from then on, and one moved
/// to another cgroup of the same hierarchy is no longer.
pub const GLOBAL_CGROUP_MODE: &str = "CGROUP_MODE";
/// Name of the global holding the traced cgroup's hierarchy id (`u32`): 0 for cgroup v2,
/// the first column of `/proc/PID/cgroup` for a v1 hierarchy.
pub const GLOBAL_CGROUP_HIERARCHY: &str = "CGROUP_HIERARCHY";
/// Names of the globals holding the offsets of `dst_root`, `dst_id` and `pid` in the
/// `cgroup:cgroup_attach_task` record (`u32`, from its `format` file).
pub const GLOBAL_ATTACH_ROOT_OFFSET: &str = "ATTACH_ROOT_OFFSET";
pub const GLOBAL_ATTACH_ID_OFFSET: &str = "ATTACH_ID_OFFSET";
pub const GLOBAL_ATTACH_PID_OFFSET: &str = "ATTACH_PID_OFFSET";
/// Name of the global holding the `TRACK_*` bits (`u32`).
pub const GLOBAL_TRACK_FLAGS: &str = "TRACK_FLAGS";
/// Name of the global holding how many bytes of user stack to copy (`u32`,
/// at most [`crate::STACK_COPY_MAX`]).
pub const GLOBAL_STACK_COPY_BYTES: &str = "STACK_COPY_BYTES";

/// Name of the global holding the page-fault sampling period (`u32`): one
/// not-present fault in this many is sent with its stack.
pub const GLOBAL_FAULT_SAMPLE_PERIOD: &str = "FAULT_SAMPLE_PERIOD";

/// Name of the global holding how many bytes of an `oom:mark_victim` record to copy
/// (`u32`, at most [`crate::OOM_RECORD_MAX`]): its size per the tracepoint's format.
pub const GLOBAL_OOM_RECORD_LEN: &str = "OOM_RECORD_LEN";

/// Name of the ring buffer map.
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the hash map of traced processes: tgid → 1. Userspace seeds it with the targets;
/// the kernel adds children (with [`GLOBAL_FOLLOW_CHILDREN`]) and removes processes that exit.
pub const MAP_TRACED: &str = "TRACED";
/// Name of the hash map of traced cgroups: cgroup id (the kernfs id, the directory's inode
/// number) → 1. Userspace seeds it with the cgroup and its descendants.
pub const MAP_CGROUPS: &str = "CGROUPS";
/// Capacity of [`MAP_CGROUPS`].
pub const CGROUPS_MAX: u32 = 4096;
/// Default capacity of [`MAP_TRACED`].
pub const TRACED_MAX: u32 = 8192;
/// Name of the ring buffer that carries only OOM records, so that a storm of stack
/// events on [`MAP_EVENTS`] cannot crowd out the one record that matters.
pub const MAP_OOM_EVENTS: &str = "OOM_EVENTS";
/// Name of the per-CPU counters map, indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Events dropped because the ring buffer was full.
pub const COUNTER_RINGBUF_FULL: u32 = 0;
/// Syscalls whose entry arguments could not be saved (per-thread table full).
pub const COUNTER_PENDING_FULL: u32 = 1;
/// Stack copies that failed entirely (the event was still sent, without stack bytes).
pub const COUNTER_STACK_READ_FAILED: u32 = 2;
/// Events sent to userspace.
pub const COUNTER_EVENTS_SENT: u32 = 3;
/// Not-present user page faults of the target (all of them, sampled or not).
pub const COUNTER_FAULTS: u32 = 4;
/// Children not followed because [`MAP_TRACED`] was full.
pub const COUNTER_TRACED_FULL: u32 = 5;
/// Probe programs that could not read their tracepoint record or the current task.
pub const COUNTER_PROBE_FAILED: u32 = 6;
/// OOM records dropped because their ring buffer was full.
pub const COUNTER_OOM_LOST: u32 = 7;
/// mmap-family calls dropped because their arguments or result could not be read from
/// the syscall tracepoint's record.
pub const COUNTER_SYSCALL_UNREADABLE: u32 = 8;
/// mmap-family calls whose exit was never seen: their saved entry was replaced by the
/// thread's next call, or was still there when the thread exited (the call is lost).
pub const COUNTER_PENDING_STALE: u32 = 9;
/// Allocator calls still in progress when their thread exited (the thread called `exit`
/// inside them, e.g. from a `new_handler`): their saved entry is removed, nothing is
/// recorded for them.
pub const COUNTER_MALLOC_EXITED_INSIDE: u32 = 10;
/// Stacks not taken because the per-CPU scratch buffer was held by another program that
/// was preempted on the same CPU (uprobe programs run preemptibly): the event is kept,
/// without its stack, rather than built in a buffer another task is writing.
pub const COUNTER_SCRATCH_BUSY: u32 = 11;
/// Number of counters.
pub const COUNTER_COUNT: u32 = 12;
