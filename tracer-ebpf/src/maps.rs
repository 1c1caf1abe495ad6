use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{CGROUPS_MAX, COUNTER_COUNT, MemEventWithStack, TRACED_MAX};

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

/// Size is overridden by userspace (`--ring-buffer`); this is the default.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// OOM records only: a few hundred fit, and stack events never take their room.
#[map(name = "OOM_EVENTS")]
pub static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Syscall arguments saved at entry, by thread id, until the syscall's exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    pub kind: u32,
    pub prot: u32,
    pub addr: u64,
    pub len: u64,
    pub old_addr: u64,
    pub old_len: u64,
    pub flags: u64,
    pub fd: u64,
}

#[map(name = "PENDING")]
pub static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(16384, 0);

/// Scratch space to assemble an event with its stack copy (too large for the BPF stack).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<MemEventWithStack> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
pub fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}
