use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    CGROUPS_MAX, COUNTER_COUNT, COUNTER_SCRATCH_BUSY, MCOUNTER_COUNT, MallocLive, MallocStack,
    MallocStackTotals, MemEventWithStack, TRACED_MAX,
};

/// Set by userspace before load (see `tracer_common::config`).
#[unsafe(no_mangle)]
pub static TRACK_FLAGS: u32 = 0;
#[unsafe(no_mangle)]
pub static STACK_COPY_BYTES: u32 = 0;

#[unsafe(no_mangle)]
pub static FAULT_SAMPLE_PERIOD: u32 = 64;
#[unsafe(no_mangle)]
pub static FOLLOW_CHILDREN: u32 = 0;
#[unsafe(no_mangle)]
pub static SOLE_TGID: u32 = 0;
#[unsafe(no_mangle)]
pub static EXIT_GROUP_DEAD_OFFSET: u32 = 0;

#[unsafe(no_mangle)]
pub static CGROUP_MODE: u32 = 0;
#[unsafe(no_mangle)]
pub static CGROUP_HIERARCHY: u32 = 0;
#[unsafe(no_mangle)]
pub static ATTACH_ROOT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
pub static ATTACH_ID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
pub static ATTACH_PID_OFFSET: u32 = 0;

/// 1 under `memtrace run`: the malloc probes wait for the command's exec (see
/// `probes::common::armed`).
#[unsafe(no_mangle)]
pub static MALLOC_WAIT_EXEC: u32 = 0;

/// The traced cgroups (`--cgroup`: the cgroup and its descendants), cgroup id → 1.
#[map(name = "CGROUPS")]
pub static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUPS_MAX, 0);

/// Reads a global that userspace writes before load; volatile so that the compiler does
/// not fold the initial value.
#[inline(always)]
pub fn global(value: &'static u32) -> u32 {
    // SAFETY: a plain read of a `'static` global.
    unsafe { core::ptr::read_volatile(value) }
}

/// Whether cgroup `id` is one of the traced cgroups.
#[inline(always)]
pub fn cgroup_traced(id: u64) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { CGROUPS.get(&id) }.is_some()
}

/// The traced processes, tgid → 1: seeded by userspace, followed by the kernel (see
/// `probes::process`). Every probe asks it, so the filter follows a process tree with no
/// round trip through userspace.
#[map(name = "TRACED")]
pub static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(TRACED_MAX, 0);

/// Whether the process `tgid` is traced.
#[inline(always)]
pub fn traced(tgid: u32) -> bool {
    // SAFETY: as in `track_flags`.
    let sole = unsafe { core::ptr::read_volatile(&raw const SOLE_TGID) };
    if sole != 0 {
        return tgid == sole;
    }
    // SAFETY: the value is only tested for presence, never held across a map update.
    unsafe { TRACED.get(&tgid) }.is_some()
}

/// Bytes of an `oom:mark_victim` record (from its format file; see `tracer_common`).
#[unsafe(no_mangle)]
pub static OOM_RECORD_LEN: u32 = 0;

#[inline(always)]
pub fn oom_record_len() -> u32 {
    // SAFETY: as in `target_tgid`.
    unsafe { core::ptr::read_volatile(&raw const OOM_RECORD_LEN) }
}

#[inline(always)]
pub fn fault_sample_period() -> u32 {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const FAULT_SAMPLE_PERIOD) }
}

#[inline(always)]
pub fn follow_children() -> bool {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const FOLLOW_CHILDREN) != 0 }
}

#[inline(always)]
pub fn exit_group_dead_offset() -> u32 {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const EXIT_GROUP_DEAD_OFFSET) }
}

#[inline(always)]
pub fn track_flags() -> u32 {
    // SAFETY: a plain read of a global that userspace writes before load; volatile so
    // that the compiler does not fold the initial value.
    unsafe { core::ptr::read_volatile(&raw const TRACK_FLAGS) }
}

#[inline(always)]
pub fn stack_copy_bytes() -> u32 {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const STACK_COPY_BYTES) }
}

/// Size is overridden by userspace (`--ring-buffer-mib`); this is the default.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// OOM records only: a few hundred fit, and stack events never take their room.
#[map(name = "OOM_EVENTS")]
pub static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Syscall arguments saved at entry, by thread id, until the syscall's exit (see
/// `probes::mmap`); a thread that exits leaves its entry to `probes::process`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    /// The syscall (`tracer_common::kind`).
    pub kind: u32,
    pub _pad: u32,
    pub args: tracer_common::syscall::Args,
}

#[map(name = "PENDING")]
pub static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(16384, 0);

/// Scratch space to assemble an event with its stack copy (too large for the BPF stack).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<MemEventWithStack> = PerCpuArray::with_max_entries(1, 0);

/// A malloc-family call in progress, by thread id (see `probes::malloc`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MallocPending {
    pub kind: u32,
    /// 1 when the allocation is to be recorded (sampled and not filtered out).
    pub track: u32,
    pub size: u64,
    pub stack_id: u64,
    pub ts_ns: u64,
    /// Stack pointer at entry.
    pub sp: u64,
    /// realloc: the block passed in, and whether it was in the table (then `old` holds
    /// its entry, taken out at entry so that no other thread's new block at the same
    /// address can be confused with it).
    pub old_ptr: u64,
    pub has_old: u64,
    pub old: MallocLive,
    /// posix_memalign: where the pointer is written (a backing store's reallocation:
    /// the backing store).
    pub memptr: u64,
}

/// Sized by userspace (`tracer_common::MAP_MALLOC_PENDING`).
#[map(name = "MALLOC_PENDING")]
pub static MALLOC_PENDING: HashMap<u32, MallocPending> = HashMap::with_max_entries(16384, 0);

/// Slot 0: 1 once a `memtrace run` command has exec'd (see `probes::common::armed`).
#[map(name = "MALLOC_STATE")]
pub static MALLOC_STATE: Array<u32> = Array::with_max_entries(1, 0);

/// Set by userspace before load (see `tracer_common::malloc`).
#[unsafe(no_mangle)]
pub static MALLOC_SAMPLE_BYTES: u64 = 0;
#[unsafe(no_mangle)]
pub static MALLOC_MIN_SIZE: u64 = 0;

#[inline(always)]
pub fn sample_bytes() -> u64 {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const MALLOC_SAMPLE_BYTES) }
}

#[inline(always)]
pub fn min_size() -> u64 {
    // SAFETY: as in `track_flags`.
    unsafe { core::ptr::read_volatile(&raw const MALLOC_MIN_SIZE) }
}

/// The malloc family's tables (see `probes::malloc`). Sizes are defaults; userspace sets
/// them (`--malloc-max-live`, `--malloc-max-stacks`) and shrinks them to almost nothing
/// when malloc is not tracked. Tables that fill slowly are not preallocated, so they cost
/// what they hold.
#[map(name = "MALLOC_LIVE")]
pub static MALLOC_LIVE: HashMap<u64, MallocLive> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

#[map(name = "MALLOC_STACKS")]
pub static MALLOC_STACKS: HashMap<u64, MallocStack> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// Per CPU, so that updates touch no other CPU's cache line; userspace sums the CPUs'
/// values. Updated with atomic adds ([`add`]): uprobe programs are preemptible.
#[map(name = "MALLOC_TOTALS")]
pub static MALLOC_TOTALS: PerCpuHashMap<u64, MallocStackTotals> =
    PerCpuHashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

#[map(name = "MALLOC_NEW_STACKS")]
pub static MALLOC_NEW_STACKS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map(name = "MALLOC_COUNTERS")]
pub static MALLOC_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MCOUNTER_COUNT, 0);

/// Where a stack is assembled (too large for the BPF stack); taken with
/// [`claim_scratch`]`(`[`SCRATCH_MALLOC_STACK`]`)`.
#[map(name = "MALLOC_STACK_SCRATCH")]
pub static MALLOC_STACK_SCRATCH: PerCpuArray<MallocStack> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch buffers, by their slot in [`SCRATCH_BUSY`].
pub const SCRATCH_EVENT: u32 = 0;
pub const SCRATCH_MALLOC_STACK: u32 = 1;
pub const SCRATCH_JS_STACK: u32 = 2;

/// Per CPU, 1 while a program assembles something in the scratch buffer of that slot.
///
/// What the kernel guarantees (6.18, read in its source): tracepoint programs run with
/// preemption disabled (`__DO_TRACE`; the faultable syscall tracepoints take
/// `guard(preempt_notrace)` in `perf_syscall_enter`/`perf_syscall_exit` before
/// `trace_call_bpf`), and `trace_call_bpf` refuses to start a second perf-attached program
/// on a CPU where one runs (`bpf_prog_active`, counted in the program's
/// `recursion_misses`), so [`SCRATCH`] is never shared (it is claimed all the same, so
/// that a kernel that ran them preemptibly would lose stacks, counted, rather than mix
/// them). Uprobe programs do not:
/// `bpf_prog_run_array_uprobe` only disables migration (`migrate_disable` under RCU), and
/// with a preemptible kernel (`preempt=full`/`lazy`, selectable at run time under
/// `PREEMPT_DYNAMIC`) a task preempted inside `uprobe_malloc` can be followed on the same
/// CPU by another task's `uprobe_malloc`, which would overwrite the stack the first one is
/// hashing. The flag is taken with an atomic exchange (one instruction, which preemption
/// cannot split); a program that finds it taken skips the scratch and counts
/// `COUNTER_SCRATCH_BUSY`.
#[map(name = "SCRATCH_BUSY")]
pub static SCRATCH_BUSY: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// The scratch buffer of one slot, held until dropped.
pub struct ScratchClaim(*mut u64);

impl Drop for ScratchClaim {
    #[inline(always)]
    fn drop(&mut self) {
        // The buffer's last use comes before the release (a plain store: the BPF target
        // has no atomic store, and a single aligned store cannot be split by preemption).
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        // SAFETY: a valid pointer to this CPU's flag, which this claim set.
        unsafe { core::ptr::write_volatile(self.0, 0) };
    }
}

/// Takes the scratch buffer of `slot` on this CPU, or counts `COUNTER_SCRATCH_BUSY`.
#[inline(always)]
pub fn claim_scratch(slot: u32) -> Option<ScratchClaim> {
    let flag = SCRATCH_BUSY.get_ptr_mut(slot)?;
    // SAFETY: a valid pointer to this CPU's flag; the exchange is atomic (BPF_XCHG).
    let was = unsafe {
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::SeqCst }>(flag, 1)
    };
    if was != 0 {
        count(COUNTER_SCRATCH_BUSY);
        return None;
    }
    Some(ScratchClaim(flag))
}

/// Ring buffer data beyond which a send wakes the reader at once. Below it the reader is
/// not woken (it drains on its own timer every 100 ms): a wakeup per event costs the
/// traced service a context switch on a busy machine.
const WAKEUP_THRESHOLD: u64 = 1 << 20;

/// Flags for a ring buffer send: wake the reader only when data piles up.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if EVENTS.query(u64::from(aya_ebpf::bindings::BPF_RB_AVAIL_DATA)) >= WAKEUP_THRESHOLD {
        u64::from(aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(aya_ebpf::bindings::BPF_RB_NO_WAKEUP)
    }
}

/// Adds `n` to the counter at `slot` with one atomic instruction (BPF_XADD), so that a
/// uprobe program preempted between load and store cannot lose another task's add on the
/// same CPU.
///
/// # Safety
/// `slot` must point into a map value (or other memory) valid for the program's run.
#[inline(always)]
pub unsafe fn add(slot: *mut u64, n: u64) {
    // SAFETY: per the caller.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, n)
    };
}

/// Adds one to a `COUNTER_*`.
#[inline(always)]
pub fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a valid pointer to this CPU's slot.
        unsafe { add(slot, 1) };
    }
}
