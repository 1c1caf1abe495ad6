//! Allocator tracking (`--track malloc`): uprobes on the malloc family keep the target's
//! outstanding allocations and per-stack totals in kernel tables, which userspace reads
//! as snapshots instead of receiving every call as an event.
//!
//! Stacks are frame-pointer walks taken at the allocator's entry, where the caller's
//! frame chain is still intact, keyed by a 64-bit hash of their addresses in a hash map
//! (a real hash table: no bucket collisions, only a counted table-full condition).

/// Frames kept per allocation stack (frame-pointer walk at the allocator's entry).
pub const MALLOC_STACK_DEPTH: usize = 64;

/// The stack id of allocations whose stack could not be captured or stored.
pub const MALLOC_UNKNOWN_STACK: u64 = 0;

/// Fixed-point unit of the estimated allocation counts in [`MallocStackTotals`]: one
/// allocation counts `MALLOC_COUNT_ONE` (a sampled one counts its inverse probability).
pub const MALLOC_COUNT_ONE: u64 = 1 << 16;

/// Largest `MALLOC_SAMPLE_BYTES`: the kernel compares `size << 32` with it.
pub const MALLOC_SAMPLE_BYTES_MAX: u64 = 1 << 32;

/// Name of the global holding the sampling period in bytes (`u64`): an allocation of `s`
/// bytes is kept with probability `min(1, s / period)` and counted as `max(s, period)`
/// bytes. 0 or 1 keeps every allocation.
pub const GLOBAL_MALLOC_SAMPLE_BYTES: &str = "MALLOC_SAMPLE_BYTES";
/// Name of the global holding the smallest allocation tracked (`u64`, bytes).
pub const GLOBAL_MALLOC_MIN_SIZE: &str = "MALLOC_MIN_SIZE";

/// Name of the global that is 1 when the probes must wait for the target's next exec
/// (`memtrace run`: they are attached to the shell that is about to exec the command).
pub const GLOBAL_MALLOC_WAIT_EXEC: &str = "MALLOC_WAIT_EXEC";

/// One `u32`: 1 once the target has exec'd (see [`GLOBAL_MALLOC_WAIT_EXEC`]).
pub const MAP_MALLOC_STATE: &str = "MALLOC_STATE";
/// Outstanding allocations: address → [`MallocLive`].
pub const MAP_MALLOC_LIVE: &str = "MALLOC_LIVE";
/// Stacks: stack id → [`MallocStack`].
pub const MAP_MALLOC_STACKS: &str = "MALLOC_STACKS";
/// Per-stack totals: stack id → [`MallocStackTotals`].
pub const MAP_MALLOC_TOTALS: &str = "MALLOC_TOTALS";
/// Calls in progress, by thread id (entry → return).
pub const MAP_MALLOC_PENDING: &str = "MALLOC_PENDING";
/// Ring buffer of stack ids stored for the first time, so that userspace learns them (and
/// symbolizes them while the target lives) without walking [`MAP_MALLOC_STACKS`].
pub const MAP_MALLOC_NEW_STACKS: &str = "MALLOC_NEW_STACKS";
/// Per-CPU counters, indexed by the `MCOUNTER_*` constants.
pub const MAP_MALLOC_COUNTERS: &str = "MALLOC_COUNTERS";

/// The V8 frames of node-buffers stacks (`--malloc-probes node-buffers`): stack id →
/// [`MallocJsSlots`], stored with the stack the first time it is seen, so that userspace
/// names JS frames from V8's heap without a perf map.
pub const MAP_MALLOC_JS_SLOTS: &str = "MALLOC_JS_SLOTS";
/// Where V8's code is in the traced process, as [`V8CodeRange`]s at the `V8CODE_*` slots
/// (written by userspace once it has read the node module; all zero until then).
pub const MAP_MALLOC_V8_CODE: &str = "MALLOC_V8_CODE";
/// Slot of [`MAP_MALLOC_V8_CODE`]: the node module's native code (V8's C++ and node's):
/// frames there are not JS, except in the builtins ranges.
pub const V8CODE_NATIVE: u32 = 0;
/// First of the slots holding V8's embedded builtins (where the interpreter runs: every
/// interpreted frame returns there, so its bytecode tells it apart).
pub const V8CODE_BUILTINS: u32 = 1;
/// Builtins ranges at most (the executable's own and V8's remapped copy).
pub const V8CODE_BUILTINS_MAX: u32 = 2;
/// Slot holding, as `start`/`end`, the byte offsets below the frame pointer of an
/// interpreted frame's `BytecodeArray` and bytecode offset (positive: `fp - start`).
pub const V8CODE_OFFSETS: u32 = V8CODE_BUILTINS + V8CODE_BUILTINS_MAX;
pub const V8CODE_SLOTS: u32 = V8CODE_OFFSETS + 1;

/// Bytes kept below a V8 frame's frame pointer: its context or frame-type marker, the
/// `JSFunction`, the argument count and, for interpreted frames, the bytecode array and
/// offset (V8 8.x to 12.x use at most 40).
pub const MALLOC_JS_SLOT_BYTES: usize = 48;
/// Frames of a stack whose slots may be kept: [`MallocJsSlots::frames`]`[i]` is the frame
/// of `MallocStack::ips[i]`, except `frames[0]`, which is the caller's (the frame of
/// `MallocStack::ret_addr`; `ips[0]` is the probed function itself). Frames deeper than
/// this are not named from the heap.
pub const MALLOC_JS_FRAMES: usize = 32;

/// Allocator calls seen (entries of malloc, calloc, ..., not free).
pub const MCOUNTER_CALLS: u32 = 0;
/// Allocations recorded in the live table.
pub const MCOUNTER_TRACKED: u32 = 1;
/// Allocations not recorded because of sampling or `--malloc-min-size`.
pub const MCOUNTER_SKIPPED: u32 = 2;
/// Frees of recorded allocations.
pub const MCOUNTER_FREES: u32 = 3;
/// Frees (and reallocs) of pointers not in the live table: allocated before tracing,
/// not sampled, or lost to a full table. Ignored.
pub const MCOUNTER_FREES_UNKNOWN: u32 = 4;
/// Allocations lost because the live table was full.
pub const MCOUNTER_LIVE_FULL: u32 = 5;
/// Bytes of the allocations lost because the live table was full.
pub const MCOUNTER_LIVE_FULL_BYTES: u32 = 6;
/// Allocations whose stack was not stored because the stack table was full.
pub const MCOUNTER_STACKS_FULL: u32 = 7;
/// Allocations whose user stack could not be walked.
pub const MCOUNTER_STACK_FAILED: u32 = 8;
/// Stacks without per-stack totals because the totals table was full.
pub const MCOUNTER_TOTALS_FULL: u32 = 9;
/// Calls lost because the in-progress table was full.
pub const MCOUNTER_PENDING_FULL: u32 = 10;
/// Calls whose return was never seen (longjmp or an exception through the allocator).
pub const MCOUNTER_PENDING_STALE: u32 = 11;
/// Allocator calls that failed (returned NULL).
pub const MCOUNTER_FAILED: u32 = 12;
/// An address was allocated again while the table still held it: its free was missed
/// (freed through a path that is not probed). The old entry is dropped and counted.
pub const MCOUNTER_REUSED: u32 = 13;
/// New stack ids that could not be announced (ring buffer full); they are still in the
/// stack table and are found when the report is made.
pub const MCOUNTER_ANNOUNCE_FULL: u32 = 14;
/// Estimated bytes allocated (weighted), all stacks.
pub const MCOUNTER_ALLOC_BYTES: u32 = 15;
/// Estimated bytes freed (weighted), all stacks.
pub const MCOUNTER_FREE_BYTES: u32 = 16;
/// node-buffers: Buffers allocated before userspace said where V8's code is (the first
/// moments of a trace); recorded under the unknown stack.
pub const MCOUNTER_V8_UNKNOWN: u32 = 17;
/// node-buffers: new stacks whose V8 frames could not be kept (table full): their JS
/// frames stay unnamed.
pub const MCOUNTER_JS_SLOTS_FULL: u32 = 18;
/// Stacks whose CFI walk (through a module without frame pointers) met an address with
/// no usable unwind row: the stack ends there.
pub const MCOUNTER_CFI_NO_ROW: u32 = 19;
/// Stacks whose walk could not read the user stack (a fault, or a frame that does not
/// move up): the stack ends there.
pub const MCOUNTER_CFI_READ_FAILED: u32 = 20;
/// Stacks walked through CFI that were cut at [`MALLOC_STACK_DEPTH`] frames.
pub const MCOUNTER_CFI_DEPTH: u32 = 21;
/// Allocations whose stack was walked through CFI (their leaf is in a tabled module).
pub const MCOUNTER_CFI_WALKS: u32 = 22;
/// Number of counters.
pub const MCOUNTER_COUNT: u32 = 23;

/// One outstanding allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MallocLive {
    /// Bytes requested.
    pub size: u64,
    /// Key into [`MAP_MALLOC_STACKS`]; [`MALLOC_UNKNOWN_STACK`] when not captured.
    pub stack_id: u64,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) at the call.
    pub ts_ns: u64,
    /// Bytes this allocation stands for: `size`, or `max(size, period)` when sampled.
    pub weight: u64,
}

/// A user stack at an allocator's entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MallocStack {
    /// The word at the stack pointer on entry: the return address into the caller. The
    /// kernel's frame-pointer walk skips it when the allocator does not start with
    /// `push %rbp`/`endbr64`; userspace inserts it after `ips[0]` unless `ips[1]` is it.
    pub ret_addr: u64,
    /// Valid entries of `ips`.
    pub depth: u32,
    #[allow(
        clippy::pub_underscore_fields,
        reason = "explicit padding, zeroed by the writer; carries no data"
    )]
    pub _pad: u32,
    /// Leaf first: `ips[0]` is the allocator's entry address.
    pub ips: [u64; MALLOC_STACK_DEPTH],
}

/// A range of process addresses, `[start, end)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V8CodeRange {
    pub start: u64,
    pub end: u64,
}

/// One frame of a node-buffers stack that may be V8's, with the words below its frame
/// pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MallocJsFrame {
    /// The frame's frame pointer.
    pub fp: u64,
    /// The words at `[fp - MALLOC_JS_SLOT_BYTES, fp)`, lowest address first.
    pub slots: [u64; MALLOC_JS_SLOT_BYTES / 8],
}

/// The V8 frames of one stack (see [`MAP_MALLOC_JS_SLOTS`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MallocJsSlots {
    /// Bit `i` set: `frames[i]` holds a frame.
    pub mask: u64,
    /// The stack pointer at the probe.
    pub sp: u64,
    pub frames: [MallocJsFrame; MALLOC_JS_FRAMES],
}

/// Totals of one stack since tracing began. Monotonic: outstanding = alloc − free.
/// Bytes and counts are estimates when sampling (weighted by inverse probability).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MallocStackTotals {
    pub alloc_bytes: u64,
    /// In units of [`MALLOC_COUNT_ONE`].
    pub alloc_count: u64,
    pub free_bytes: u64,
    /// In units of [`MALLOC_COUNT_ONE`].
    pub free_count: u64,
    /// First allocation recorded from this stack.
    pub first_ts_ns: u64,
    /// Latest allocation recorded from this stack.
    pub last_ts_ns: u64,
}

impl MallocStack {
    /// The stack as memtrace's unwinder returns them: leaf first, index 0 the exact ip,
    /// the rest return addresses, with `ret_addr` put back where the kernel left it out.
    #[must_use]
    pub fn addresses(&self, out: &mut [u64; MALLOC_STACK_DEPTH + 1]) -> usize {
        let depth = (self.depth as usize).min(MALLOC_STACK_DEPTH);
        if depth == 0 {
            return 0;
        }
        out[0] = self.ips[0];
        let mut n = 1;
        if self.ret_addr != 0 && (depth < 2 || self.ips[1] != self.ret_addr) {
            out[n] = self.ret_addr;
            n += 1;
        }
        for &ip in &self.ips[1..depth] {
            out[n] = ip;
            n += 1;
        }
        n
    }
}

/// Sampling of allocations (`--malloc-sample-bytes`), shared by the kernel and userspace so
/// that both use the same integer arithmetic.
///
/// With a period of `N` bytes, an allocation of `s < N` bytes is kept when a uniform
/// 32-bit random number is below [`sample_threshold`], that is with probability
/// `p = ⌊s·2³²/N⌋ / 2³² ≈ s/N`, and then stands for `s/p ≈ N` bytes and `1/p ≈ N/s`
/// allocations (Horvitz–Thompson: the expected estimate is the true total). Allocations of
/// at least `N` bytes are always kept, at their size. A period of 0 or 1 keeps everything.
#[allow(
    clippy::inline_always,
    reason = "called from the eBPF probes, whose hot path must not depend on the optimiser's inlining choices"
)]
pub mod sampling {
    use super::{MALLOC_COUNT_ONE, MALLOC_SAMPLE_BYTES_MAX};

    /// Whether `period` samples at all.
    #[inline(always)]
    #[must_use]
    pub const fn is_sampling(period: u64) -> bool {
        period > 1 && period <= MALLOC_SAMPLE_BYTES_MAX
    }

    /// A 32-bit random number below this keeps an allocation of `size` bytes; `None` when
    /// it is always kept.
    #[inline(always)]
    #[must_use]
    pub const fn sample_threshold(size: u64, period: u64) -> Option<u64> {
        if !is_sampling(period) || size >= period {
            return None;
        }
        // size < period <= 2^32, so size << 32 does not overflow; a 0-byte allocation is
        // sampled like a 1-byte one (it stands for allocations, not bytes).
        let size = if size == 0 { 1 } else { size };
        Some((size << 32) / period)
    }

    /// Estimated bytes a kept allocation of `size` stands for.
    #[inline(always)]
    #[must_use]
    pub const fn weight_bytes(size: u64, period: u64) -> u64 {
        match sample_threshold(size, period) {
            None => size,
            // 0-byte allocations stand for no bytes, whatever their probability.
            Some(_) if size == 0 => 0,
            Some(threshold) => scale(size, threshold),
        }
    }

    /// Estimated allocations a kept allocation of `size` stands for, in units of
    /// [`MALLOC_COUNT_ONE`].
    #[inline(always)]
    #[must_use]
    pub const fn weight_count(size: u64, period: u64) -> u64 {
        match sample_threshold(size, period) {
            None => MALLOC_COUNT_ONE,
            Some(threshold) => scale(MALLOC_COUNT_ONE, threshold),
        }
    }

    /// `value / p` with `p = threshold / 2^32`, i.e. `⌊value · 2^32 / threshold⌋`, for
    /// `value < 2^32`. The threshold is at least 1 (size ≥ 1, period ≤ 2^32).
    #[inline(always)]
    const fn scale(value: u64, threshold: u64) -> u64 {
        if threshold == 0 {
            return 0;
        }
        // value < 2^32 here (a size below the period, or MALLOC_COUNT_ONE): split the
        // multiplication so that value << 32 cannot overflow.
        let whole = (value << 16) / threshold;
        let rest = (value << 16) % threshold;
        (whole << 16) + ((rest << 16) / threshold)
    }
}

const _: () = assert!(core::mem::size_of::<MallocLive>() == 32);
const _: () = assert!(core::mem::size_of::<MallocStack>() == 16 + 8 * MALLOC_STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<MallocStackTotals>() == 48);
const _: () = assert!(core::mem::size_of::<MallocJsFrame>() == 8 + MALLOC_JS_SLOT_BYTES);
const _: () =
    assert!(core::mem::size_of::<MallocJsSlots>() == 16 + (8 + MALLOC_JS_SLOT_BYTES) * MALLOC_JS_FRAMES);
const _: () = assert!(MALLOC_JS_FRAMES <= 64 && MALLOC_JS_FRAMES <= MALLOC_STACK_DEPTH);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, `Copy`, integers and integer arrays only, no implicit padding
    // (sizes asserted above): every bit pattern is valid.
    unsafe impl aya::Pod for super::MallocLive {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::MallocStack {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::MallocStackTotals {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::V8CodeRange {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::MallocJsSlots {}
}
